"""The GPU check: everything one short lease of an H100/H200 can tell us, in priority order.

``bash bench/gpu_check.sh`` runs this on a bare GPU machine (torch with CUDA, triton, no internet,
no peers installed). Each step is its own process with its own time limit, so a crash, a sticky
CUDA error or a hang costs that step only; everything written before it stays. The CUDA extension
builds in the background while the Triton tests run. The plan's budgets add up to at most
TOTAL_BUDGET seconds (7 minutes); the training benchmark runs last, in whatever time is left.

Results (at most 8 files; the device tool brings back 8): ``gpu-check-<date>-<gpu>-<commit>.md``,
the summary a person reads first (every test, every benchmark row with time, memory, fraction of
the measured ceiling and of the datasheet peak, and its ratio to every peer in the same run),
``....json`` with every row, and ``....logs.tar.gz`` with each step's log and the benchmarks' JSON.
They go to $OUT when set (the device tool), else to bench/results/.

``--dry-run`` prints the plan with each step's budget, what it is made of, and the total, and fails
when the total is over TOTAL_BUDGET: tests/test_gpu_check.py runs it on CPU. A real run records, per
step, how many Triton kernels it compiled (from a cache of its own), to check the plan's counts.

A Triton cache compiled here and carried in the working tree would save the compiles (about 64 cold
ones, ~160 s of CPU, ~90 s of the plan's wall time), but Triton 3.6's cache key cannot match:
``triton_key()`` hashes ``libtriton.so``, which is built per CPython (cp311 here, cp312 on the GPU
image, and a cp312 environment here would need a cp312 torch, whose PyPI build is the multi-GB CUDA
one); launchers are CPython extension modules, looked up by the interpreter's own suffix; and the key
holds each launch's exact specialisation (integer arguments' divisibility by 16, pointer alignment),
which only the tests' own launches give. Instead the Triton tests spread their compiles over
TRITON_TEST_WORKERS pytest-xdist processes where xdist is installed (it is on the GPU image).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

from bench import charts, hardware

TOTAL_BUDGET = 420          # seconds of the machine's 7-minute slot, start-up excluded
BUILD_BUDGET = 180          # the CUDA extension, in the background
TRAIN_MIN_SECONDS = 60      # the training benchmark runs only if this much is left
SUMMARY_BUDGET = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rA"]
BENCH = [sys.executable, "-m", "bench", "--device", "cuda", "--quick"]


# What a step's time is made of, measured on the CI machine (2-core Xeon, Triton 3.6.0, cold caches) or,
# where only the GPU machine can tell, estimated; the dry run prints each step's sum.
COLD_START_S = 25.0   # the first python + CUDA torch import from a new VM's disk, and a CUDA context:
                      # 6.6 s measured cold here for the CPU torch (page cache dropped), 5.0 s warm; the CUDA
                      # build's libraries are ~3 GB more to read, and a context ~1-3 s (estimate)
START_S = 8.0         # each later step: the same import from the page cache (5.0 s measured) + a context
COMPILE_S = 1.9       # one Triton 3.6 kernel variant compiled cold for sm_90a: the gate's 226 variants with
                      # an empty cache here, two at a time on 2 cores: mean 1.9 s, median 1.4, 90th pct 3.5, max 10.6
LAUNCHER_S = 0.6      # Triton 3.6 builds a C launcher per kernel signature with gcc: 0.47-0.59 s measured here
MARGIN = 1.25         # on the sum, for what the estimates miss


@dataclasses.dataclass
class Step:
    name: str
    command: list[str]
    what: str
    compiles: int = 0       # Triton kernel variants the step compiles cold (one launcher each): an estimate
                            # from the tests' and benchmarks' dtypes, shapes and modes; a run reports the count
    work: float = 0.0       # its own running time once compiled (seconds, an estimate until the GPU says)
    start: float = START_S
    needs_build: bool = False
    fixed: int | None = None   # a budget given outright (the build, the training benchmark's remainder)
    workers: int = 1        # pytest-xdist processes sharing the compiles (the GPU machine has xdist, 16 cores)

    @property
    def budget(self) -> int:
        if self.fixed is not None:
            return self.fixed
        compiling = self.compiles * (COMPILE_S + LAUNCHER_S) / self.workers
        return int(-(-(self.start + compiling + self.work) * MARGIN // 1))

    @property
    def costs(self) -> str:
        if self.fixed is not None:
            return "given"
        spread = f" / {self.workers} workers" if self.workers > 1 else ""
        return (f"{self.start:.0f} s start + {self.compiles} compiles x {COMPILE_S + LAUNCHER_S:.1f} s{spread} + "
                f"{self.work:.0f} s work, x{MARGIN}")


# the largest test holds ~45 GB (65,536 x 151,936 bf16 logits and their gradient), the others a few GB
# each: four workers fit in an H200's 141 GB
TRITON_TEST_WORKERS = 4


def _parallel(workers: int) -> list[str]:
    """pytest-xdist's arguments where it is installed (the GPU machine's image has it): the Triton tests'
    cold compiles, CPU work, then run on ``workers`` cores at once instead of one."""
    return ["-n", str(workers)] if importlib.util.find_spec("xdist") else []


# each op's test module holds its GPU checks, marked ``cuda`` (the steps select them with -m)
CUDA_TEST_MODULES = ("tests/test_logprobs.py", "tests/test_linear_logprobs.py", "tests/test_grpo.py",
                     "tests/test_attention.py", "tests/test_advantages.py")


def plan() -> list[Step]:
    cuda_tests = PYTEST + list(CUDA_TEST_MODULES)
    return [
        Step("env", [sys.executable, "-m", "bench.gpu_env"], "GPU, driver, torch, triton, nvcc, setuptools, peers",
             start=COLD_START_S, work=2),
        # the one thing only a GPU can check, first: 4 batch sizes in 3 specialisations (1, 5,000, 2^20 and
        # 2^24 rows) of the by-id kernel, against a float64 torch reference over 2^24 x 3 rewards
        Step("tests-grid-barrier", cuda_tests + ["-m", "cuda and not cuda_ext", "-k", "grid_barrier"],
             "id-grouped advantages through the real multi-program grid barrier (2^24 rows, one launch)",
             compiles=3, work=10),
        # token_logprobs fwd+bwd x 3 dtypes at 4,099 rows and bf16 at 65,536 (8); the fused lm_head on the
        # triton and triton_tile backends, atomic and deterministic, at 3 shapes (20); its one-pass route (2);
        # attention fwd+bwd, 3 cases x 2 dtypes (12); contiguous advantages, tile and persistent (3)
        Step("tests-triton", cuda_tests + _parallel(TRITON_TEST_WORKERS)
             + ["-m", "cuda and not cuda_ext", "-k", "not grid_barrier"],
             "Triton and torch backends on the GPU at real sizes vs the references (N*V > 2^31, 70,000-token "
             "lm_head, long packed attention)", compiles=45, work=45, workers=TRITON_TEST_WORKERS),
        Step("tests-cuda-ext", cuda_tests + ["-m", "cuda_ext"], "the CUDA C++ kernels at real sizes",
             work=15, needs_build=True),
        Step("bench-logprobs", BENCH + ["logprobs"], "token_logprobs vs naive, Liger", compiles=2, work=12),
        Step("bench-linear", BENCH + ["linear"], "linear_token_logprobs vs naive, cut-cross-entropy, 3/4 GEMMs",
             compiles=4, work=15),
        Step("bench-grpo", BENCH + ["grpo"], "linear_grpo_loss vs naive, Liger", compiles=3, work=15),
        Step("bench-attention", BENCH + ["attention"], "varlen_attention vs SDPA, flash-attn", compiles=4, work=12),
        # 18 profiler sessions (3 batches x 6 implementations) and a Python-loop peer
        Step("bench-advantages", BENCH + ["advantages"], "group_advantages vs TRL, verl", compiles=3, work=15),
    ]


def build_step() -> Step:
    return Step("build-cuda-ext", [sys.executable, "-m", "bench.gpu_build"],
                "the CUDA extension (background); fails unless it has its CUDA kernels", fixed=BUILD_BUDGET)


def train_step(seconds: int) -> Step:
    return Step("bench-train", BENCH + ["train"], "one GRPO update: ours vs naive (if time remains)", fixed=seconds)


def budget(steps: list[Step]) -> int:
    """Wall seconds the plan may take: the serial steps, plus any wait for the background build
    beyond the steps that run before the first one that needs it."""
    total, waited = 0, False
    for step in steps:
        if step.needs_build and not waited:
            total = max(total, BUILD_BUDGET)
            waited = True
        total += step.budget
    return total + SUMMARY_BUDGET


def print_plan(steps: list[Step]) -> int:
    print(f"{'step':18s} {'budget':>7s}  what")
    print(f"{build_step().name:18s} {BUILD_BUDGET:6d}s  {build_step().what}")
    for step in steps:
        print(f"{step.name:18s} {step.budget:6d}s  {step.what}{'  (waits for the build)' if step.needs_build else ''}")
        print(f"{'':18s} {'':7s}  = {step.costs}")
    print(f"{'summary':18s} {SUMMARY_BUDGET:6d}s  summary markdown, one JSON, logs archive "
          "(rewritten after every step)")
    print(f"{'bench-train':18s} {'rest':>7s}  one GRPO update, only if {TRAIN_MIN_SECONDS} s or more remain")
    print(f"CUDA_HOME={os.environ.get('CUDA_HOME', '')}  (the toolkit the build uses; bench/gpu_check.sh asks nvcc)")
    total = budget(steps)
    print(f"total budget: {total} s")
    return 0 if total <= TOTAL_BUDGET else 1


def run_step(step: Step, logs: str, env: dict) -> dict:
    """Runs one step in its own process group; returns its outcome. Never raises."""
    path = os.path.join(logs, f"{step.name}.log")
    start = time.monotonic()
    with open(path, "w") as log:
        log.write(f"$ {' '.join(step.command)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            code = proc.wait(timeout=step.budget)
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            status = f"timeout after {step.budget} s"
        except OSError as err:
            status = f"could not start: {err}"
    seconds = time.monotonic() - start
    print(f"[{step.name}] {status} in {seconds:.0f} s", flush=True)
    return dict(step=step.name, status=status, seconds=round(seconds, 1), log=os.path.basename(path))


# ---------------------------------------------------------------- summary
_OUTCOME = r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
_TEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+" + _OUTCOME, re.M)               # pytest -v
_WORKER_LINE = re.compile(r"^\[gw\d+\]\s+\[\s*\d+%\]\s+" + _OUTCOME + r"\s+(tests/\S+::\S+)", re.M)  # -n


def test_outcomes(logs: str) -> list[tuple[str, str, str]]:
    """(step, test id, outcome) from the pytest logs: -v prints one line per test as it ends, and under
    pytest-xdist each line starts with the worker and the outcome."""
    out = []
    for path in sorted(glob.glob(os.path.join(logs, "tests-*.log"))):
        text = open(path, errors="replace").read()
        step = os.path.basename(path)[:-4]
        found = dict(_TEST_LINE.findall(text))
        found.update((test, outcome) for outcome, test in _WORKER_LINE.findall(text))
        out += [(step, test, outcome) for test, outcome in found.items()]
    return out


def peer_ratios(rows: list[dict]) -> dict[int, str]:
    """For each 'ours' row: peer time / our time for every other row of the same shape and phase."""
    ratios = {}
    for i, row in enumerate(rows):
        if not row["name"].startswith("ours") or not row["seconds"]:
            continue
        parts = [f"{other['name']} {other['seconds'] / row['seconds']:.2f}x"
                 for other in rows if other is not row and other["seconds"] and not other["name"].startswith("ours")
                 and other["shape"] == row["shape"] and other.get("phase", "") == row.get("phase", "")]
        ratios[i] = "; ".join(parts)
    return ratios


def datasheet_fraction(row: dict, payload: dict) -> float | None:
    found = hardware.peak_for(payload.get("device", ""))
    if not found or not row["seconds"] or not row["work"] or row.get("bound") not in ("matmul", "bandwidth"):
        return None
    peaks = found[1]
    limit = (peaks["hbm_bytes_per_s"] if row["bound"] == "bandwidth"
             else peaks.get(hardware.DTYPE_KEYS.get(payload["ceilings"]["dtype"], "")))
    return row["work"] / row["seconds"] / limit if limit else None


def summarize(stage: str, outcomes: list[dict], meta: dict) -> tuple[str, dict]:
    """The markdown summary and the one JSON of every row."""
    tests = test_outcomes(stage)
    benches = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(stage, "*-cuda.json")))]
    lines = [f"# GPU check: {meta['gpu']}, commit {meta['commit']}, {meta['date']}", ""]
    lines += [f"{meta['versions']}", "", "## Steps", "",
              "| step | status | seconds | budget | Triton kernels compiled |", "|---|---|---|---|---|"]
    lines += [f"| {o['step']} | {o['status']} | {o['seconds']} | {o.get('budget', '-')} | {o.get('compiles', '-')} |"
              for o in outcomes]
    counts = {k: sum(1 for t in tests if t[2] == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    lines += ["", f"## GPU correctness tests: {counts['PASSED']} passed, {counts['FAILED']} failed, "
              f"{counts['ERROR']} errors, {counts['SKIPPED']} skipped", ""]
    lines += [f"- {outcome} `{test}` ({step})" for step, test, outcome in tests if outcome != "PASSED"]
    everything = dict(meta=meta, steps=outcomes, tests=[dict(step=s, test=t, outcome=o) for s, t, o in tests],
                      benchmarks=[])
    for payload in benches:
        rows = payload["rows"]
        ratios = peer_ratios(rows)
        lines += ["", f"## {payload['benchmark']}" + (" (--quick)" if payload.get("quick") else ""), "",
                  f"measured ceilings: {payload['ceilings']['bandwidth'] / 1e9:.0f} GB/s copy, "
                  f"{payload['ceilings']['matmul_flops'] / 1e12:.0f} TFLOP/s {payload['ceilings']['dtype']} matmul", "",
                  "| implementation | phase | shape | ms | peak MiB | of measured | of datasheet "
                  "| peers: their time / ours |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, row in enumerate(rows):
            ms = f"{row['seconds'] * 1e3:.2f}" if row["seconds"] else (row["note"] or "-")
            mib = f"{row['peak_bytes'] / 2**20:.0f}" if row["peak_bytes"] is not None else "-"
            measured = f"{row['fraction'] * 100:.1f}%" if row["fraction"] else "-"
            sheet = datasheet_fraction(row, payload)
            row["datasheet_fraction"] = sheet
            lines.append(f"| {row['name']} | {row.get('phase', '')} | {row['shape']} | {ms} | {mib} | {measured} | "
                         f"{f'{sheet * 100:.1f}%' if sheet else '-'} | {ratios.get(i, '')} |")
        everything["benchmarks"].append(payload)
    return "\n".join(lines) + "\n", everything


def _replace(path: str, write) -> None:
    """Write ``path`` through a temporary file and a rename, so that a kill mid-write leaves the
    previous version whole."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_results(stage: str, outcomes: list[dict], meta: dict, dest: str, stem: str) -> str:
    """The summary, the JSON and the logs archive as they stand, rewritten after every step, so that a
    run cut short at any point (its own limit, the machine's) leaves every finished step's results."""
    env_log = os.path.join(stage, "env.log")
    if os.path.exists(env_log):
        meta["versions"] = (open(env_log).read().strip().splitlines() or [""])[-1]
    table, everything = summarize(stage, outcomes, meta)

    def markdown(path):
        with open(path, "w") as f:
            f.write(table)

    def rows(path):
        with open(path, "w") as f:
            json.dump(everything, f, indent=1)

    def archive(path):
        with tarfile.open(path, "w:gz") as tar:
            tar.add(stage, arcname=stem)

    for payload in everything["benchmarks"]:           # the charts python -m bench draws, from the same rows
        charts.write_chart(payload, os.path.join(dest, f"{stem}-{payload['benchmark']}.png"))
    _replace(os.path.join(dest, f"{stem}.logs.tar.gz"), archive)
    _replace(os.path.join(dest, f"{stem}.md"), markdown)
    _replace(os.path.join(dest, f"{stem}.json"), rows)    # last: a JSON naming a step means all three have it
    return table


# ---------------------------------------------------------------- main
def _compiled(cache: str) -> int:
    """Kernels in a Triton cache directory (one cubin each)."""
    return len(glob.glob(os.path.join(cache, "*", "*.cubin")))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "nogit"


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return out[0].replace("NVIDIA ", "").replace(" ", "_") if out else "nogpu"
    except (OSError, subprocess.TimeoutExpired):
        return "nogpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its total budget")
    args = parser.parse_args(argv)
    steps = plan()
    if args.dry_run:
        return print_plan(steps)
    if print_plan(steps):
        return 1
    started = time.monotonic()
    meta = dict(date=datetime.date.today().isoformat(), gpu=_gpu_name(), commit=_git_commit(), versions="")
    stem = f"gpu-check-{meta['date']}-{meta['gpu']}-{meta['commit']}"
    dest = os.environ.get("OUT") or os.path.join(ROOT, "bench", "results")
    os.makedirs(dest, exist_ok=True)
    stage = tempfile.mkdtemp(prefix="r1k-gpu-check-")
    # a Triton cache of this run's own: each step's count of new kernels (cubins) is the compile count the
    # plan's budgets estimate, measured
    cache = tempfile.mkdtemp(prefix="r1k-triton-cache-")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", R1K_BENCH_OUT=stage,
               MAX_JOBS=str(os.cpu_count() or 8), TRITON_CACHE_DIR=cache)
    outcomes = []
    save_results(stage, outcomes, meta, dest, stem)
    builder = build_step()
    build_log = open(os.path.join(stage, f"{builder.name}.log"), "w")
    build = subprocess.Popen(builder.command, cwd=ROOT, env=env, stdout=build_log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    for step in steps:
        timed_out = False
        if step.needs_build and build.poll() is None:
            try:
                build.wait(timeout=max(1.0, BUILD_BUDGET - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                os.killpg(build.pid, 9)
                build.wait()
                timed_out = True
        if step.needs_build and not any(o["step"] == builder.name for o in outcomes):
            code = build.returncode
            build_log.flush()
            last = (open(build_log.name, errors="replace").read().strip().splitlines() or [""])[-1]
            status = ("ok" if code == 0 else f"timeout after {BUILD_BUDGET} s" if timed_out
                      else f"failed ({code}): {last[:200]}")
            outcomes.append(dict(step=builder.name, status=status,
                                 seconds=round(time.monotonic() - started, 1), log=f"{builder.name}.log"))
            print(f"[{builder.name}] {outcomes[-1]['status']}", flush=True)
            save_results(stage, outcomes, meta, dest, stem)
        before = _compiled(cache)
        outcomes.append(dict(run_step(step, stage, env), compiles=_compiled(cache) - before, budget=step.budget))
        save_results(stage, outcomes, meta, dest, stem)
    left = TOTAL_BUDGET - SUMMARY_BUDGET - (time.monotonic() - started)
    if left >= TRAIN_MIN_SECONDS:
        outcomes.append(run_step(train_step(int(left)), stage, env))
    else:
        outcomes.append(dict(step="bench-train", status=f"skipped: {left:.0f} s left", seconds=0, log=""))
    if build.poll() is None:
        os.killpg(build.pid, 9)
    build_log.close()
    table = save_results(stage, outcomes, meta, dest, stem)
    print(table)
    print(f"gpu check: {time.monotonic() - started:.0f} s; results in {dest}/{stem}.*")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
