"""bench/gpu_check.sh, tested on CPU: its plan fits the 7-minute slot, a failing or hanging step
costs only itself, and the summary compares every row of ours with every peer of the same run."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
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
    assert [s.name for s in gpu_check.plan()][:4] == ["env", "tests-grid-barrier", "tests-triton", "tests-cuda-ext"]
    # every step's budget is its measured and estimated costs, printed under it
    assert all("compiles x" in line or "given" in line for line in lines if line.strip().startswith("= "))


def test_a_plan_over_budget_fails_the_dry_run(monkeypatch):
    steps = gpu_check.plan() + [gpu_check.Step("extra", ["true"], "one step too many", fixed=60)]
    assert gpu_check.budget(steps) > gpu_check.TOTAL_BUDGET
    assert gpu_check.print_plan(steps) == 1


def test_a_hanging_or_failing_step_costs_only_itself(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    hang = gpu_check.run_step(gpu_check.Step("hang", ["sleep", "30"], "", fixed=1), str(tmp_path), env)
    fail = gpu_check.run_step(gpu_check.Step("fail", ["false"], "", fixed=5), str(tmp_path), env)
    ok = gpu_check.run_step(gpu_check.Step("ok", ["echo", "fine"], "", fixed=5), str(tmp_path), env)
    assert hang["status"].startswith("timeout") and hang["seconds"] < 10
    assert fail["status"] == "exit 1"
    assert ok["status"] == "ok" and "fine" in (tmp_path / "ok.log").read_text()


def test_summary_lists_failures_and_ratios_to_each_peer(tmp_path):
    (tmp_path / "tests-triton.log").write_text(
        "tests/test_x.py::test_a[triton] PASSED [ 50%]\ntests/test_x.py::test_b[triton] FAILED [100%]\n")
    (tmp_path / "tests-grid-barrier.log").write_text(      # pytest-xdist's -v lines
        "[gw1] [ 50%] PASSED tests/test_x.py::test_c[5000] \n[gw0] [100%] SKIPPED tests/test_x.py::test_c[1] \n")
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
    assert "2 passed, 1 failed, 0 errors, 1 skipped" in table
    assert "FAILED `tests/test_x.py::test_b[triton]`" in table
    ours = next(line for line in table.splitlines() if line.startswith("| ours op"))
    assert "naive 2.00x" in ours and "5.00x" not in ours          # only the same phase is compared
    assert "80.9%" in ours                                          # 8e12 / 0.01 s of 989.4 TFLOP/s bf16
    outcomes = {t["test"]: (t["step"], t["outcome"]) for t in everything["tests"]}
    assert outcomes["tests/test_x.py::test_b[triton]"] == ("tests-triton", "FAILED")
    assert outcomes["tests/test_x.py::test_c[5000]"] == ("tests-grid-barrier", "PASSED")
    assert everything["benchmarks"][0]["rows"][0]["datasheet_fraction"] > 0.8


def test_the_plan_finds_the_cuda_toolkit_from_nvcc():
    """gpu_check.sh exports CUDA_HOME from nvcc's own report of where it lives (here nvcc on PATH is a
    wrapper script in /usr/local/bin, and torch's guess would be wrong); the dry run prints it."""
    import shutil
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=120, env=env)
    home = next(line for line in result.stdout.splitlines() if line.startswith("CUDA_HOME=")).split()[0][10:]
    home = pathlib.Path(home)
    assert (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def test_the_build_step_names_why_the_extension_has_no_cuda(monkeypatch):
    from bench import gpu_build
    if torch.version.cuda is None:
        assert gpu_build.why_not_cuda() == f"torch {torch.__version__} has no CUDA"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr("torch.utils.cpp_extension.CUDA_HOME", None)
    assert gpu_build.why_not_cuda().startswith("no CUDA toolkit found (set CUDA_HOME")


KILLED_CHECK = """
import sys
from bench import gpu_check as g
g.plan = lambda: [g.Step("first", ["echo", "one"], "a", fixed=30), g.Step("second", ["echo", "two"], "b", fixed=30),
                  g.Step("third", ["sleep", "60"], "c: killed while it runs", fixed=60)]
g.build_step = lambda: g.Step("build-cuda-ext", ["true"], "the build", fixed=30)
sys.exit(g.main([]))
"""


def test_a_check_killed_mid_run_keeps_every_finished_step(tmp_path):
    """The summary, the JSON and the logs archive are rewritten after every step: a run killed in its
    third step (as the machine's own limit would) leaves the first two steps' results."""
    import signal
    import tarfile
    import time

    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CHECK], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = list(tmp_path.glob("gpu-check-*.json"))
            if found and [s["step"] for s in json.loads(found[0].read_text())["steps"]] == ["first", "second"]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the first two steps' results never appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stem = found[0].name[:-len(".json")]
    everything = json.loads((tmp_path / f"{stem}.json").read_text())
    assert [(s["step"], s["status"]) for s in everything["steps"]] == [("first", "ok"), ("second", "ok")]
    table = (tmp_path / f"{stem}.md").read_text()
    assert "| first | ok |" in table and "| second | ok |" in table and "third" not in table
    assert everything["steps"][0]["compiles"] == 0 and everything["steps"][0]["budget"] == 30
    with tarfile.open(tmp_path / f"{stem}.logs.tar.gz") as tar:
        logs = {m.name.split("/")[-1]: m for m in tar.getmembers()}
        assert "two" in tar.extractfile(logs["second.log"]).read().decode()
    assert not list(tmp_path.glob("*.tmp"))


def test_every_table_states_its_floor_and_who_is_ahead():
    """bench's tables end with, per shape and phase, the floor at the measured ceiling and the
    leader, ours against the fastest peer (reference rows are yardsticks, never the leader)."""
    from bench.common import summary_lines
    shape = "N=4"
    rows = [Row("ours op [cpu]", shape, 2.0, None, 100.0, 200.0, phase="fwd", bound="matmul"),
            Row("naive", shape, 3.0, None, 100.0, 200.0, phase="fwd", bound="matmul"),
            Row("torch.compile(naive)", shape, 1.6, None, 100.0, 200.0, phase="fwd", bound="matmul"),
            Row("reference: 3 matmuls", shape, 0.1, None, 100.0, 200.0, phase="fwd", bound="matmul"),
            Row("ours op [cpu]", shape, 1.0, None, 100.0, 200.0, phase="fwd+bwd", bound="matmul"),
            Row("naive", shape, 4.0, None, 100.0, 200.0, phase="fwd+bwd", bound="matmul")]
    fwd, both = summary_lines(rows)
    assert fwd.startswith("fwd N=4: floor 500.0 ms at the measured matmul ceiling")
    assert "ahead: torch.compile(naive) (ours op [cpu] at 1.25x the time of the fastest peer" in fwd
    assert "ahead: ours op [cpu] (ours op [cpu] at 0.25x the time of the fastest peer, naive)" in both


def test_save_and_the_gpu_check_draw_the_charts(tmp_path):
    """python -m bench's save() writes a chart beside its JSON, and the GPU check's results the same per
    benchmark; the x axis keeps what varies between shapes (the vocabulary), not what they share."""
    pytest.importorskip("matplotlib")
    from bench import charts
    ceilings = Ceilings(bandwidth=1e10, matmul_flops=1e11, dtype="float32")
    rows = [Row(name, f"B=4 T=8 V={v} float32", seconds, 2**20 * v // 1024, 1e9, 1e11, "", "fwd+bwd", "matmul")
            for v in (8192, 32768) for name, seconds in (("ours op [cpu]", 0.01), ("naive", 0.03))]
    rows.append(Row("broken peer", "B=4 T=8 V=8192 float32", None, None, 1e9, 1e11, "failed: OOM", "fwd+bwd"))
    path = save("demo", rows, ceilings, torch.device("cpu"), out_dir=str(tmp_path))
    png = pathlib.Path(path).with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert charts._axis_labels([rows[0].shape, rows[2].shape]) == ["V=8192", "V=32768"]
    payload = json.loads(pathlib.Path(path).read_text())
    untimed = dict(payload, rows=[r for r in payload["rows"] if r["seconds"] is None])
    assert charts.write_chart(untimed, str(tmp_path / "none.png")) is None       # nothing timed: no chart
    (tmp_path / "demo-cuda.json").write_text(json.dumps(payload))
    dest = tmp_path / "out"
    dest.mkdir()
    gpu_check.save_results(str(tmp_path), [], dict(gpu="H200", commit="abc", date="2026-12-07", versions="torch"),
                           str(dest), "gpu-check-demo")
    assert (dest / "gpu-check-demo-demo.png").read_bytes()[:4] == b"\x89PNG"
