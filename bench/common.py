"""Timing, memory and hardware-ceiling helpers shared by every benchmark.

Times are medians over repeats after warm-up: CUDA events on GPU, perf_counter on CPU.
Peak memory is the allocator's high-water mark above the starting point: CUDA's
max_memory_allocated on GPU; on CPU the process's resident high-water mark (VmHWM), which
tracks live tensor bytes because glibc's mmap threshold is held at 64 KiB while it is measured
(each large allocation its own mapping). Times run under glibc's usual settings: a 64 KiB threshold
for them would turn every freed buffer into page faults on its next use (+30-60% on bench train).
Ceilings are measured in the same run (a large copy for bandwidth, a large matmul for FLOP/s)
so that "fraction of the limit" compares against this machine, not a datasheet.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from bench import charts
from r1kernels.hardware import proc_status_bytes

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (from /proc/cpuinfo where there is one) and torch's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# mallopt(3) parameters and the values glibc's dynamic rule settles on once a buffer of 32 MiB or more
# has been freed (as in every benchmark here): the mmap threshold at its 64-bit maximum, trim at twice it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_SETTLED = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}
_MEASURING = {_M_MMAP_THRESHOLD: 64 << 10, _M_TRIM_THRESHOLD: 128 << 10}
_LIBC = ctypes.CDLL(None)   # the process's own symbols, libc's among them (no find_library subprocess)


def _mallopt(settings: dict, trim: bool = False) -> None:
    """Apply glibc malloc settings, then with ``trim`` hand every free heap page back to the kernel, so
    that reusing one counts in VmHWM (a no-op where the C library is not glibc)."""
    if hasattr(_LIBC, "mallopt"):
        for param, value in settings.items():
            _LIBC.mallopt(param, value)
        if trim:
            _LIBC.malloc_trim(0)


def peak_memory(fn, device: torch.device) -> int:
    """Bytes allocated at the peak of ``fn()`` above what was live before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _mallopt(_MEASURING, trim=True)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = proc_status_bytes("VmRSS")
        fn()
        return proc_status_bytes("VmHWM") - before
    finally:
        _mallopt(_SETTLED)


@dataclasses.dataclass
class Ceilings:
    bandwidth: float      # bytes/s, measured copy (read + write)
    matmul_flops: float   # FLOP/s, measured square matmul in the benchmark dtype
    dtype: str

    def describe(self) -> str:
        return (f"measured ceilings: copy bandwidth {self.bandwidth / 1e9:.1f} GB/s, "
                f"{self.dtype} matmul {self.matmul_flops / 1e12:.2f} TFLOP/s")


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_time = median_time(lambda: dst.copy_(src), device)
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm_time = median_time(lambda: a @ b, device)
    return Ceilings(2 * n_bytes / copy_time, 2 * size ** 3 / mm_time, str(dtype).replace("torch.", ""))


@dataclasses.dataclass
class Row:
    name: str                   # the implementation: "ours ... [backend]", a peer, or "reference: ..."
    shape: str
    seconds: float | None
    peak_bytes: int | None
    work: float = 0.0           # bytes or FLOPs the op must move/do
    limit: float = 0.0          # bytes/s or FLOP/s ceiling
    note: str = ""
    phase: str = ""             # fwd, bwd or fwd+bwd; rows of one shape and phase are compared
    bound: str = ""             # "matmul" or "bandwidth": which ceiling ``limit`` and ``work`` refer to

    @property
    def fraction(self) -> float | None:
        if not self.seconds or not self.limit or not self.work:
            return None
        return self.work / self.seconds / self.limit


def print_table(title: str, rows: list[Row], ceilings: Ceilings) -> None:
    print(f"\n== {title} ==  ({ceilings.describe()})")
    header = f"{'implementation':44s} {'shape':28s} {'median ms':>10s} {'peak MiB':>9s} {'of limit':>8s}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = f"{r.seconds * 1e3:10.2f}" if r.seconds is not None else f"{'-':>10s}"
        mib = f"{r.peak_bytes / 2**20:9.1f}" if r.peak_bytes is not None else f"{'-':>9s}"
        frac = f"{r.fraction * 100:7.1f}%" if r.fraction is not None else f"{'-':>8s}"
        name = f"{r.name} {r.phase}".strip()
        print(f"{name:44s} {r.shape:28s} {ms} {mib} {frac}  {r.note}")
    for line in summary_lines(rows):
        print(line)


def summary_lines(rows: list[Row]) -> list[str]:
    """Per shape and phase: the floor (the work at the measured ceiling) and who is ahead, ours
    against the fastest peer; ``reference: ...`` rows are yardsticks, not peers."""
    groups: dict = {}
    for r in rows:
        if r.seconds and not r.name.startswith("reference"):
            groups.setdefault((r.phase, r.shape), []).append(r)
    lines = []
    for (phase, shape), group in groups.items():
        text = f"{phase} {shape}".strip() + ":"       # advantages' rows have no phase
        bounded = next((r for r in group if r.work and r.limit), None)
        if bounded:
            text += f" floor {bounded.work / bounded.limit * 1e3:.1f} ms at the measured {bounded.bound} ceiling;"
        ours = min((r for r in group if r.name.startswith("ours")), key=lambda r: r.seconds, default=None)
        peer = min((r for r in group if not r.name.startswith("ours")), key=lambda r: r.seconds, default=None)
        if ours and peer:
            ahead = ours if ours.seconds <= peer.seconds else peer
            text += (f" ahead: {ahead.name} ({ours.name} at {ours.seconds / peer.seconds:.2f}x the time of the "
                     f"fastest peer, {peer.name})")
        lines.append(text)
    return lines


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save(name: str, rows: list[Row], ceilings: Ceilings, device: torch.device, out_dir: str | None = None,
         quick: bool = False) -> str:
    out_dir = out_dir or os.environ.get("R1K_BENCH_OUT", RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    payload = dict(
        benchmark=name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device_name(device), torch=torch.__version__, commit=git_commit(), quick=quick,
        ceilings=dataclasses.asdict(ceilings),
        rows=[dict(dataclasses.asdict(r), fraction=r.fraction) for r in rows])
    path = os.path.join(out_dir, f"{name}-{device.type}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    charts.write_chart(payload, os.path.splitext(path)[0] + ".png")
    return path


def try_case(fn):
    """Runs a benchmark case; a peer that fails (OOM, unsupported) becomes a note, not a crash."""
    try:
        return fn(), ""
    except Exception as err:  # noqa: BLE001 - any peer failure is reported in the table
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"
