"""TRL's GRPOTrainer with vLLM rollouts, as the R1 recipe runs it (open-r1: ``use_vllm=True``,
``vllm_mode="colocate"``), for real on vLLM's CPU build: plain TRL against ``patch()`` and
``patch(loss=True)`` under each of TRL's importance-sampling modes (``sequence_mask``, TRL's default,
hands the loss a (B, 1) ratio, ``token_*`` a (B, T) one). Every run finishes, takes the same generations,
logs the same losses and gradient norms, and ends with every parameter equal to plain TRL's (fp32, two SGD
steps), in one process and in two under DeepSpeed ZeRO-3 (open-r1's launch). A stale sampler (rollouts
from the initial policy) spreads the ratios until TRL's clip range truncates or masks them, equal too.

``bash scripts/test_vllm_cpu.sh`` runs this module in vLLM's CPU environment (with TRL and DeepSpeed);
elsewhere it skips. The runs (``tests/trl_vllm_worker.py``, whose docstring says what differs from a
user's script and why) take 1-3 minutes each on 2 cores and are shared by the tests.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytest.importorskip("trl")
from trl_vllm_worker import IS_MODES, ROUTES  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

if not current_platform.is_cpu():
    pytest.skip("vLLM's CPU build runs these; the GPU machine has no vLLM", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "trl_vllm_worker.py")
# the loss route of TRL's default mode first, on a fresh engine: the runs after it share that engine, and
# their equal generations and parameters show that sharing it changes nothing
RUN_ORDER = ",".join([f"{IS_MODES[0]}/loss", f"{IS_MODES[0]}/plain", f"{IS_MODES[0]}/kernel"]
                     + [f"{mode}/{route}" for mode in IS_MODES[1:] for route in ROUTES])
# (worker options, processes)
SETUPS = {
    "synced": ((), 1),
    "stale": (("--stale", "--clip", "0.8", "1.2"), 1),
    "zero3": (("--zero3",), 2),
}
_done = {}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _runs(setup: str, tmp_path_factory) -> dict:
    """Every (mode, route) run of one setup, in one launch (cached for the session): what rank 0 wrote."""
    if setup not in _done:
        options, processes = SETUPS[setup]
        out = tmp_path_factory.mktemp(setup) / "runs.pt"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", DS_ACCELERATOR="cpu")
        if processes == 1:
            launch = [sys.executable]
        else:       # open-r1's launch: accelerate with DeepSpeed ZeRO-3 (examples/accelerate/zero3.yaml)
            env["OMP_NUM_THREADS"] = "1"
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      os.path.join(ROOT, "examples", "accelerate", "zero3.yaml"), "--num_processes", str(processes),
                      "--main_process_port", str(_free_port())]
        done = subprocess.run([*launch, WORKER, str(out), "--runs", RUN_ORDER, *options], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{setup} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        _done[setup] = torch.load(out)
    return _done[setup]


def _assert_same_run(ours: dict, plain: dict):
    """The same generations, logged losses (1e-6) and gradient norms (1e-5 relative), every parameter
    within 1e-6 of plain TRL's, after a training that moved the parameters, lm_head included, by far more."""
    assert ours["generated"] == plain["generated"], "the generations must be identical"
    assert len(ours["rows"]) == len(plain["rows"]) == 2
    for mine, theirs in zip(ours["rows"], plain["rows"]):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-6)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)
    assert ours["parameters"].keys() == plain["parameters"].keys()
    for name, value in plain["parameters"].items():
        torch.testing.assert_close(ours["parameters"][name], value, atol=1e-6, rtol=0.0,
                                   msg=lambda detail, name=name: f"{name}: {detail}")
    moved = {n: (plain["parameters"][n] - p).abs().max().item() for n, p in plain["initial"].items()}
    assert max(moved.values()) > 1e-2 and moved["lm_head.weight"] > 1e-3, moved


def _ratio_range(run: dict, step: int) -> tuple:
    row = run["rows"][step]
    return row["sampling/importance_sampling_ratio/min"], row["sampling/importance_sampling_ratio/max"]


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("mode", IS_MODES)
def test_patched_trl_with_vllm_rollouts_equals_plain_trl(setup, mode, tmp_path_factory):
    """Under each IS mode: patch() and patch(loss=True) train as plain TRL, the loss route through our fused
    loss at both steps; the sampler is synced for real (its log-probs differ from the trainer's by bf16
    rounding) or stale (far apart, ratios truncated or masked by the clip range [0.8, 1.2])."""
    runs = _runs(setup, tmp_path_factory)
    plain = runs[f"{mode}/plain"]
    assert plain["processes"] == SETUPS[setup][1]
    if setup == "zero3":
        assert plain["engine"] == "DeepSpeedEngine" and plain["lm_head_persistent"] is False, \
            "ZeRO-3 must partition lm_head"
    drift = plain["rows"][1]["sampling/sampling_logp_difference/mean"]
    low, high = _ratio_range(plain, 1)
    if setup == "stale":
        assert drift > 0.05, "a stale sampler drifts from the policy"
        assert (low == 0.0) if mode.endswith("mask") else (low == pytest.approx(0.8) or high == pytest.approx(1.2))
    else:
        assert drift < 0.01, "a synced sampler differs from the trainer by rounding alone"
        assert low != high, "the ratio must be computed and logged"
    for route in ROUTES[1:]:
        ours = runs[f"{mode}/{route}"]
        _assert_same_run(ours, plain)
        assert ours["fused_calls"] == (2 if route == "loss" else 0)
    assert plain["fused_calls"] == 0


def test_runs_sharing_an_engine_sample_as_a_fresh_one(tmp_path_factory):
    """The first run of a launch starts the engine (TRL's default mode, loss route), the later ones share
    it. Every run starts from the same weights and seed, so its first step's 4 generations (one prompt's
    group) must be those of the fresh engine's first step, whatever the mode and route."""
    runs = _runs("synced", tmp_path_factory)
    fresh = runs[RUN_ORDER.split(",")[0]]["generated"][:4]
    assert len(set(fresh)) == 4
    for name, run in runs.items():
        assert run["generated"][:4] == fresh, name
