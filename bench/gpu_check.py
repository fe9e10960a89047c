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

``--dry-run`` prints the plan with each step's budget and the total, and fails when the total is
over TOTAL_BUDGET: tests/test_gpu_check.py runs it on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

from bench import hardware

TOTAL_BUDGET = 420          # seconds of the machine's 7-minute slot, start-up excluded
BUILD_BUDGET = 180          # the CUDA extension, in the background
TRAIN_MIN_SECONDS = 60      # the training benchmark runs only if this much is left
SUMMARY_BUDGET = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rA"]
BENCH = [sys.executable, "-m", "bench", "--device", "cuda", "--quick"]


@dataclasses.dataclass
class Step:
    name: str
    budget: int             # seconds; the step is killed past it
    command: list[str]
    what: str
    needs_build: bool = False


def plan() -> list[Step]:
    return [
        Step("env", 10, [sys.executable, "-m", "bench.gpu_env"], "GPU, driver, torch, triton, peers present"),
        Step("tests-triton", 175, PYTEST + ["-m", "cuda and not cuda_ext", "tests/test_cuda.py"],
             "Triton and torch backends on the GPU at real sizes vs the references (N*V > 2^31, long packed "
             "attention, 2^24 advantage rows)"),
        Step("tests-cuda-ext", 30, PYTEST + ["-m", "cuda_ext", "tests/test_cuda.py"],
             "the CUDA C++ kernels at real sizes", needs_build=True),
        Step("bench-logprobs", 30, BENCH + ["logprobs"], "token_logprobs vs naive, Liger"),
        Step("bench-linear", 40, BENCH + ["linear"], "linear_token_logprobs vs naive, cut-cross-entropy, 3/4 GEMMs"),
        Step("bench-grpo", 40, BENCH + ["grpo"], "linear_grpo_loss vs naive, Liger"),
        Step("bench-attention", 35, BENCH + ["attention"], "varlen_attention vs SDPA, flash-attn"),
        Step("bench-advantages", 20, BENCH + ["advantages"], "group_advantages vs TRL, verl"),
    ]


def build_step() -> Step:
    return Step("build-cuda-ext", BUILD_BUDGET,
                [sys.executable, "setup.py", "build_ext", "--inplace"], "the CUDA extension (background)")


def train_step(seconds: int) -> Step:
    return Step("bench-train", seconds, BENCH + ["train"], "one GRPO update: ours vs naive (if time remains)")


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
    print(f"{'summary':18s} {SUMMARY_BUDGET:6d}s  summary markdown, one JSON, logs archive")
    print(f"{'bench-train':18s} {'rest':>7s}  one GRPO update, only if {TRAIN_MIN_SECONDS} s or more remain")
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
_TEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.M)


def test_outcomes(logs: str) -> list[tuple[str, str, str]]:
    """(step, test id, outcome) from the pytest logs (-v prints one line per test as it ends)."""
    out = []
    for path in sorted(glob.glob(os.path.join(logs, "tests-*.log"))):
        text = open(path, errors="replace").read()
        step = os.path.basename(path)[:-4]
        out += [(step, test, outcome) for test, outcome in _TEST_LINE.findall(text)]
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
    lines += [f"{meta['versions']}", "", "## Steps", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {o['step']} | {o['status']} | {o['seconds']} |" for o in outcomes]
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
                  "| implementation | phase | shape | ms | peak MiB | of measured | of datasheet | peers: their time / ours |",
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


# ---------------------------------------------------------------- main
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
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", R1K_BENCH_OUT=stage,
               MAX_JOBS=str(os.cpu_count() or 8))
    builder = build_step()
    build_log = open(os.path.join(stage, f"{builder.name}.log"), "w")
    build = subprocess.Popen(builder.command, cwd=ROOT, env=env, stdout=build_log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    outcomes = []
    for step in steps:
        if step.needs_build and build.poll() is None:
            try:
                build.wait(timeout=max(1.0, BUILD_BUDGET - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                os.killpg(build.pid, 9)
                build.wait()
        if step.needs_build and not any(o["step"] == builder.name for o in outcomes):
            code = build.returncode
            outcomes.append(dict(step=builder.name, status="ok" if code == 0 else f"failed ({code})",
                                 seconds=round(time.monotonic() - started, 1), log=f"{builder.name}.log"))
            print(f"[{builder.name}] {outcomes[-1]['status']}", flush=True)
        outcomes.append(run_step(step, stage, env))
    left = TOTAL_BUDGET - SUMMARY_BUDGET - (time.monotonic() - started)
    if left >= TRAIN_MIN_SECONDS:
        outcomes.append(run_step(train_step(int(left)), stage, env))
    else:
        outcomes.append(dict(step="bench-train", status=f"skipped: {left:.0f} s left", seconds=0, log=""))
    if build.poll() is None:
        os.killpg(build.pid, 9)
    build_log.close()
    env_log = os.path.join(stage, "env.log")
    meta["versions"] = open(env_log).read().strip().splitlines()[-1] if os.path.exists(env_log) else ""
    table, everything = summarize(stage, outcomes, meta)
    with open(os.path.join(dest, f"{stem}.md"), "w") as f:
        f.write(table)
    with open(os.path.join(dest, f"{stem}.json"), "w") as f:
        json.dump(everything, f, indent=1)
    with tarfile.open(os.path.join(dest, f"{stem}.logs.tar.gz"), "w:gz") as tar:
        tar.add(stage, arcname=stem)
    print(table)
    print(f"gpu check: {time.monotonic() - started:.0f} s; results in {dest}/{stem}.*")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
