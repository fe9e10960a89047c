"""bench/gpu_check.sh, tested on CPU: its plan fits the 7-minute slot, a failing or hanging step
costs only itself, and the summary compares every row of ours with every peer of the same run."""
import json
import pathlib
import subprocess

import torch

from bench import gpu_check
from bench.common import Ceilings, Row, save

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_prints_the_plan_within_budget():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    total = int(lines[-1].removeprefix("total budget: ").removesuffix(" s"))
    assert total <= gpu_check.TOTAL_BUDGET == 420
    for step in gpu_check.plan():
        assert any(line.startswith(step.name) for line in lines)
    assert [s.name for s in gpu_check.plan()][:3] == ["env", "tests-triton", "tests-cuda-ext"]


def test_a_plan_over_budget_fails_the_dry_run(monkeypatch):
    steps = gpu_check.plan() + [gpu_check.Step("extra", 60, ["true"], "one step too many")]
    assert gpu_check.budget(steps) > gpu_check.TOTAL_BUDGET
    assert gpu_check.print_plan(steps) == 1


def test_a_hanging_or_failing_step_costs_only_itself(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    hang = gpu_check.run_step(gpu_check.Step("hang", 1, ["sleep", "30"], ""), str(tmp_path), env)
    fail = gpu_check.run_step(gpu_check.Step("fail", 5, ["false"], ""), str(tmp_path), env)
    ok = gpu_check.run_step(gpu_check.Step("ok", 5, ["echo", "fine"], ""), str(tmp_path), env)
    assert hang["status"].startswith("timeout") and hang["seconds"] < 10
    assert fail["status"] == "exit 1"
    assert ok["status"] == "ok" and "fine" in (tmp_path / "ok.log").read_text()


def test_summary_lists_failures_and_ratios_to_each_peer(tmp_path):
    (tmp_path / "tests-triton.log").write_text(
        "tests/test_cuda.py::test_a[triton] PASSED [ 50%]\ntests/test_cuda.py::test_b[triton] FAILED [100%]\n")
    ceilings = Ceilings(bandwidth=4.0e12, matmul_flops=8.0e14, dtype="bfloat16")
    rows = [Row("ours op [triton]", "N=8", 0.010, 2**20, 8e12, ceilings.matmul_flops, "", "fwd", "matmul"),
            Row("naive", "N=8", 0.020, 2**21, 8e12, ceilings.matmul_flops, "", "fwd", "matmul"),
            Row("naive", "N=8", 0.050, None, 8e12, ceilings.matmul_flops, "", "fwd+bwd", "matmul")]
    path = save("demo", rows, ceilings, torch.device("cpu"), out_dir=str(tmp_path), quick=True)
    payload = json.loads(pathlib.Path(path).read_text())
    payload["device"] = "NVIDIA H200"
    (tmp_path / "demo-cuda.json").write_text(json.dumps(payload))
    steps = [dict(step="tests-triton", status="exit 1", seconds=3.0, log="tests-triton.log")]
    meta = dict(gpu="H200", commit="abc", date="2026-11-29", versions="torch")
    table, everything = gpu_check.summarize(str(tmp_path), steps, meta)
    assert "1 passed, 1 failed" in table
    assert "FAILED `tests/test_cuda.py::test_b[triton]`" in table
    ours = next(line for line in table.splitlines() if line.startswith("| ours op"))
    assert "naive 2.00x" in ours and "5.00x" not in ours          # only the same phase is compared
    assert "80.9%" in ours                                          # 8e12 / 0.01 s of 989.4 TFLOP/s bf16
    assert everything["tests"][1]["outcome"] == "FAILED"
    assert everything["benchmarks"][0]["rows"][0]["datasheet_fraction"] > 0.8
