"""TRL drop-in: where TRL is installed, TRL's fused LM head routed through r1kernels gives TRL's
own log-probs, entropies, GRPO loss and parameter gradients on a tiny Qwen2 model."""
import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")
transformers = pytest.importorskip("transformers")

import r1kernels  # noqa: E402
import r1kernels.integrations.trl as r1k_trl  # noqa: E402
from r1kernels.reference import grpo_loss_ref  # noqa: E402
from trl_vllm_worker import IS_MODES  # noqa: E402


def _tiny_model():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.Qwen2ForCausalLM(config)
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    return model


def _grpo_step(model, ids, labels, adv, old):
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    mask = labels[:, 1:] != -100
    loss = grpo_loss_ref(out.log_probs.double(), adv, mask, old, loss_type="grpo", beta=0.0)
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss, grads


def test_patched_trl_matches_trl_and_r1kernels_loss():
    model = _tiny_model()
    ids = torch.randint(0, 131, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100                   # prompt tokens
    labels[1, 9:] = -100                   # a shorter completion
    adv = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    old = -torch.rand(3, 11, dtype=torch.float64)

    trl_out, trl_loss, trl_grads = _grpo_step(model, ids, labels, adv, old)
    r1k_trl.patch()
    try:
        assert r1k_trl.is_patched()
        ours_out, ours_loss, ours_grads = _grpo_step(model, ids, labels, adv, old)
    finally:
        r1k_trl.unpatch()
    assert not r1k_trl.is_patched()
    torch.testing.assert_close(ours_out.log_probs, trl_out.log_probs, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ours_out.entropy, trl_out.entropy, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ours_loss, trl_loss, atol=1e-6, rtol=1e-5)
    assert trl_grads.keys() == ours_grads.keys() and "lm_head.weight" in ours_grads
    for name in trl_grads:
        torch.testing.assert_close(ours_grads[name], trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)

    # and r1kernels' own linear_grpo_loss on the backbone's hidden states gives that same loss
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    mask = labels[:, 1:] != -100
    ours_direct = r1kernels.linear_grpo_loss(hidden, model.lm_head.weight, labels[:, 1:], adv.float(), mask,
                                             temperature=0.7, old_logprobs=old.float())
    torch.testing.assert_close(ours_direct.loss.double(), trl_loss, atol=1e-6, rtol=1e-5)


def test_unsupported_calls_fall_back_to_trl():
    model = _tiny_model()
    ids = torch.randint(0, 131, (2, 8))
    r1k_trl.patch()
    try:
        with pytest.warns(UserWarning, match="falling back"):
            h = torch.randn(5, 32)
            w = torch.randn(131, 32)
            r1k_trl._R1KernelsLogProbs._warned = False
            out = trl_utils._ChunkedLogProbFunction.apply(h, w, None, torch.randint(0, 131, (5,)), 1.0, 4096, 30.0,
                                                         1.0, ("log_probs",))
        assert out[0].shape == (5,)
        assert model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.shape == (2, 7)
    finally:
        r1k_trl.unpatch()


def _trl_compute_loss(args, logp, entropy, inputs):
    """TRL 1.16's own GRPOTrainer._compute_loss on one batch, run on a stand-in trainer: one process,
    no accumulation, no vLLM, the per-token log-probs and entropies given."""
    import collections
    import types

    from trl.trainer.grpo_trainer import GRPOTrainer

    one_process = types.SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                                        gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x,
                                        pad_across_processes=lambda x, dim, pad_index: x)
    trainer = types.SimpleNamespace(
        args=args, loss_type=args.loss_type, beta=args.beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level, top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold, max_completion_length=args.max_completion_length,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        entropy_coef=args.entropy_coef, use_adaptive_entropy=False, _entropy_bonus_enabled=args.entropy_coef != 0,
        current_gradient_accumulation_steps=1, model=types.SimpleNamespace(training=True), accelerator=one_process,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy, None),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights)
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


def _grpo_config(**kwargs):
    from trl import GRPOConfig
    return GRPOConfig(**{"output_dir": "/tmp/r1k-trl", "report_to": [], "use_cpu": True, "bf16": False, **kwargs})


LOSS_CONFIGS = {
    "grpo": dict(beta=0.04), "bnpo": dict(delta=1.5), "dr_grpo": dict(max_completion_length=7),
    "dapo": dict(epsilon_high=0.28, entropy_coef=0.01), "cispo": dict(epsilon_high=5.0),
    "sapo": dict(beta=0.02), "luspo": dict(importance_sampling_level="sequence"),
    "vespo": dict(vespo_k_pos=1.5, vespo_lambda_neg=2.5),
}


@pytest.mark.parametrize("extra", [{}, dict(off_policy_mask_threshold=0.05, top_entropy_quantile=0.6)],
                         ids=["plain", "masks"])
@pytest.mark.parametrize("loss_type", list(LOSS_CONFIGS))
def test_trl_compute_loss_equals_ours_with_loss_options(loss_type, extra):
    """One batch of TRL's own _compute_loss against policy_loss(**loss_options(args)): ratios far
    outside the clip range, loss and gradient (log-probs and entropies)."""
    args = _grpo_config(loss_type=loss_type, **{**LOSS_CONFIGS[loss_type], **extra})
    gen = torch.Generator().manual_seed(1)
    batch, length = 4, 7
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    logp = (-torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    entropy = (torch.rand(batch, length, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.7
    ref = logp.detach() + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.0, -0.7, 0.3, -1.2], dtype=torch.float64)
    inputs = dict(prompt_ids=torch.zeros(batch, 1, dtype=torch.long), prompt_mask=torch.ones(batch, 1),
                  completion_ids=torch.zeros(batch, length, dtype=torch.long), completion_mask=mask,
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=mask.sum().double())
    trl_loss, trl_metrics = _trl_compute_loss(args, logp, entropy, inputs)
    trl_grads = torch.autograd.grad(trl_loss, (logp, entropy), allow_unused=True)
    options = r1k_trl.loss_options(args)
    ours = r1kernels.policy_loss(logp, adv, mask.bool(), old_logprobs=old, ref_logprobs=ref if args.beta else None,
                                 entropy=entropy, num_items_in_batch=mask.sum().double()
                                 if r1kernels.grpo.LOSS_TYPES[loss_type].counts_items else None,
                                 **options)
    grads = torch.autograd.grad(ours.loss, (logp, entropy), allow_unused=True)
    # TRL builds sapo's temperatures and vespo's k and lambda as float32 tensors (torch.where of two
    # floats; 1.05 rounded to 2^-24): that much apart there
    rtol = 1e-6 if loss_type in ("sapo", "vespo") else 1e-10
    torch.testing.assert_close(ours.loss, trl_loss, rtol=rtol, atol=1e-12)
    for g, t in zip(grads, trl_grads):
        torch.testing.assert_close(torch.zeros_like(logp) if g is None else g,
                                   torch.zeros_like(logp) if t is None else t, rtol=rtol * 10, atol=1e-12)
    # the clip metrics as TRL logs them (cispo: tokens with A > 0 only; with delta: on the capped ratio)
    names = ({"clip_ratio_high": "cispo_clip_ratio"} if loss_type == "cispo" else
             {"clip_ratio_low": "clip_ratio/low_mean", "clip_ratio_high": "clip_ratio/high_mean",
              "clip_ratio_region": "clip_ratio/region_mean"} if r1kernels.grpo.LOSS_TYPES[loss_type].clipped
             else {})
    for ours_name, trl_name in names.items():
        # TRL averages in float32 (its mask count is cast to float)
        assert ours.metrics[ours_name].item() == pytest.approx(trl_metrics[trl_name][0], rel=1e-6), ours_name
    if args.beta:
        assert ours.metrics["kl_mean"].item() == pytest.approx(trl_metrics["kl"][0], rel=1e-6)
    assert ours.metrics["entropy_mean"].item() == pytest.approx(trl_metrics["entropy"][0], rel=1e-6)


def test_loss_options_refuse_what_we_do_not_implement():
    with pytest.raises(NotImplementedError, match="use_adaptive_entropy"):
        r1k_trl.loss_options(_grpo_config(use_adaptive_entropy=True))


@pytest.mark.parametrize("version, ok", [("1.16.0", True), ("1.16.3", True), ("1.16.1rc1", True), ("1.15.2", False),
                                         ("1.10.0", False), ("0.29.0", False), ("1.17.0", False)])
def test_patch_refuses_trl_outside_the_supported_range(version, ok, monkeypatch):
    import trl
    if ok:
        r1k_trl.check_trl_version(version)
        return
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"supports TRL >= 1.16, < 1.17; TRL {version} is installed"):
        r1k_trl.patch()
    assert not r1k_trl.is_patched()


def _grpo_trainer(directory, reward, **options):
    """TRL's GRPOTrainer on a tiny random Qwen2 (saved under ``directory``, loaded by path: beta > 0 loads a
    reference copy) with a local character tokenizer, 4 prompts a step of 4 generations each."""
    import datasets
    from trl import GRPOTrainer

    from trainer.tokenizer import builtin_tokenizer
    tokenizer = builtin_tokenizer()
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    args = _grpo_config(**{**dict(output_dir=str(directory / "out"), per_device_train_batch_size=4,
                                  num_generations=4, max_completion_length=8, max_steps=3, logging_steps=1,
                                  save_strategy="no", seed=0, learning_rate=1e-3), **options})
    dataset = datasets.Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(24)]})
    return GRPOTrainer(model=str(directory), reward_funcs=reward, args=args, train_dataset=dataset,
                       processing_class=tokenizer)


def _run_grpo_trainer(loss_type, beta, num_iterations, level, patched, directory, **overrides):
    """A few steps of TRL's GRPOTrainer (``_grpo_trainer``): (every completion generated, logged losses,
    final parameters, the logged rows)."""
    generated = []

    def reward(completions, **kwargs):
        generated.extend(completions)
        return [len(c) / 10 - 0.3 * c.count("1") for c in completions]

    options = dict(LOSS_CONFIGS[loss_type])
    options.update(loss_type=loss_type, beta=beta, num_iterations=num_iterations, importance_sampling_level=level)
    options.update(overrides)
    if patched:
        r1k_trl.patch(loss=True)
    try:
        trainer = _grpo_trainer(directory, reward, **options)
        trainer.train()
    finally:
        r1k_trl.unpatch()
    rows = [h for h in trainer.state.log_history if "loss" in h]
    return (generated, [h["loss"] for h in rows], {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            rows)


# TRL's vLLM importance-sampling correction (use_vllm=True): its modes (IS_MODES, from the real-vLLM runs'
# worker); a (B, 1) ratio in the sequence_* modes, (B, T) in the token_* ones. TRL refuses vespo with the
# sequence_* modes.
# every loss type TRL admits with each mode, and GSPO (grpo with a sequence-level ratio, and the KL term)
IS_CONFIGS = {**LOSS_CONFIGS, "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04)}
IS_CASES = [(name, mode) for name in IS_CONFIGS for mode in IS_MODES
            if not (name == "vespo" and mode.startswith("sequence"))]


def _trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """The ratio as TRL 1.16's _generate_and_score_completions builds it: exp(old - sampling) over the loss
    mask (unscored NaN tokens count as 0), summed per sequence in the sequence_* modes, then clamped
    (*_truncate) or zeroed outside [clip_min, clip_max] (*_mask)."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    ratio = torch.exp(diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff)
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    return ratio.masked_fill((ratio < clip_min) | (ratio > clip_max), 0.0)


def _vllm_batch(trainer, mode, tool_mask, seed=0):
    """One batch of GRPOTrainer's inputs as TRL hands them to _compute_loss with vLLM rollouts: padded
    prompts and completions of lengths 6, 3, 1 and 5, old log-probs far from the policy's (ratios beyond
    the clip range), the sampler's log-probs (one token unscored: NaN) and TRL's importance-sampling ratio,
    whose clip range [0.6, 1.6] both truncates and masks here."""
    gen = torch.Generator().manual_seed(seed)
    batch, prompt, length = 4, 3, 6
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(5, vocab, (batch, prompt), generator=gen)
    prompt_mask = torch.ones(batch, prompt, dtype=torch.long)
    prompt_mask[0, 0] = 0                                         # a left-padded prompt
    completion_ids = torch.randint(5, vocab, (batch, length), generator=gen)
    completion_mask = (torch.arange(length)[None] < torch.tensor([6, 3, 1, 5])[:, None]).long()
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.tensor([1.0, -0.7, 0.3, -1.2]))
    loss_mask = completion_mask
    if tool_mask:                                                  # tool results inside completions
        inputs["tool_mask"] = torch.ones(batch, length, dtype=torch.long)
        inputs["tool_mask"][0, 2:4] = 0
        inputs["tool_mask"][3, 1] = 0
        loss_mask = completion_mask * inputs["tool_mask"]
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            length)
    old = logp + 0.4 * torch.randn(batch, length, generator=gen)
    sampling = old + 0.3 * torch.randn(batch, length, generator=gen)
    sampling[1, 0] = float("nan")
    inputs.update(old_per_token_logps=old, sampling_per_token_logps=sampling,
                  importance_sampling_ratio=_trl_is_ratio(old, sampling, loss_mask, mode, 0.6, 1.6),
                  num_items_in_batch=loss_mask.sum())
    if trainer.beta:
        inputs["ref_per_token_logps"] = logp + 0.2 * torch.randn(batch, length, generator=gen)
    return inputs


@pytest.mark.parametrize("case, mode", IS_CASES, ids=[f"{t}-{m}" for t, m in IS_CASES])
def test_trl_compute_loss_with_vllm_is_ratio_equals_patched(case, mode, tmp_path, monkeypatch):
    """One batch of TRL's own compute_loss with vLLM's importance-sampling ratio, every loss type TRL admits
    with each mode (34 cases with GSPO), against compute_loss under patch(loss=True): the same loss, every
    parameter's gradient and every metric TRL logs, with and without tool_mask, without and with gradient
    accumulation (GA 2 of a generation batch of 4 micro-batches)."""
    trainer = _grpo_trainer(tmp_path, lambda completions, **kwargs: [0.0] * len(completions),
                            **{"loss_type": case, **IS_CONFIGS[case]},
                            vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.6,
                            vllm_importance_sampling_clip_max=1.6)
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True     # as with use_vllm=True
    model = trainer.model
    calls = []
    original = r1kernels.grpo.linear_grpo_loss
    monkeypatch.setattr(r1kernels.grpo, "linear_grpo_loss", lambda *a, **k: calls.append(1) or original(*a, **k))

    def compute(inputs):
        trainer._metrics["train"].clear()
        model.zero_grad()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()}

    for tool_mask in (False, True):
        for accumulation, per_generation in ((1, 1), (2, 4)):
            trainer.current_gradient_accumulation_steps = accumulation
            trainer.args.steps_per_generation = per_generation
            inputs = _vllm_batch(trainer, mode, tool_mask)
            ratio = inputs["importance_sampling_ratio"]
            assert ratio.shape == ((4, 1) if mode.startswith("sequence") else (4, 6))
            bound = (ratio == 0) if mode.endswith("mask") else (ratio == 0.6) | (ratio == 1.6)
            assert bound.any() and ((ratio > 0.6) & (ratio < 1.6) & (ratio != 1)).any(), ratio
            case = f"tool_mask={tool_mask}, GA={accumulation}"
            theirs = compute(inputs)
            r1k_trl.patch(loss=True)
            try:
                ours = compute(inputs)
            finally:
                r1k_trl.unpatch()
            torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=1e-5, msg=case)
            assert ours[1].keys() == theirs[1].keys() and "lm_head.weight" in ours[1]
            for name, grad in theirs[1].items():
                torch.testing.assert_close(ours[1][name], grad, atol=1e-6, rtol=1e-4, msg=f"{case}: {name}")
            assert ours[2].keys() == theirs[2].keys(), sorted(set(ours[2]) ^ set(theirs[2]))
            for name, values in theirs[2].items():
                assert ours[2][name] == pytest.approx(values, rel=1e-5, abs=1e-6, nan_ok=True), f"{case}: {name}"
    assert len(calls) == 4, "every patched compute_loss must go through linear_grpo_loss"


# what TRL's _compute_loss logs (the rest of a row, rewards, lengths, timings, comes from elsewhere in TRL)
LOSS_METRICS = ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean", "policy_loss",
                "entropy_coef")


def _assert_same_run(ours, plain, steps):
    """The same generations, losses within 1e-6, parameters within 1e-5, and every logged row with the
    same keys and TRL's loss metrics at the same values."""
    assert ours[0] == plain[0], "the generations must be identical"
    assert len(ours[1]) == len(plain[1]) >= steps
    for a, b in zip(ours[1], plain[1]):
        assert a == pytest.approx(b, abs=1e-6)
    # AdamW at lr 1e-3 moves a weight by up to 1e-3 per step; a gradient near Adam's eps (the key bias
    # has none analytically; dr_grpo's are small, over B x max_completion_length) turns rounding noise into
    # up to ~1.3e-5 there, a wrong gradient gives ~1e-3 (the entropy bonus GA times too large: 2.7e-3)
    for name, value in plain[2].items():
        torch.testing.assert_close(ours[2][name], value, rtol=1e-5, atol=2e-5, msg=name)
    for mine, theirs in zip(ours[3], plain[3]):
        assert sorted(mine) == sorted(theirs), f"logged keys differ: {sorted(set(mine) ^ set(theirs))}"
        for key in LOSS_METRICS:
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6, nan_ok=True), key


@pytest.mark.parametrize("beta, num_iterations, level", [(0.0, 1, "token"), (0.04, 2, "sequence")],
                         ids=["plain", "kl-2iter-gspo"])
@pytest.mark.parametrize("loss_type", list(LOSS_CONFIGS))
def test_grpo_trainer_with_our_fused_loss_route(loss_type, beta, num_iterations, level, tmp_path, monkeypatch):
    """TRL's GRPOTrainer for real, plain and with patch(loss=True) (its loss through linear_grpo_loss):
    the same generations, losses within 1e-6, parameters after three steps within 1e-5, and the same
    logged metrics under TRL's names."""
    plain = _run_grpo_trainer(loss_type, beta, num_iterations, level, False, tmp_path / "plain")
    calls = []
    original = r1kernels.grpo.linear_grpo_loss
    monkeypatch.setattr(r1kernels.grpo, "linear_grpo_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    ours = _run_grpo_trainer(loss_type, beta, num_iterations, level, True, tmp_path / "ours")
    assert len(calls) == 3, "each of the three training steps' loss must go through linear_grpo_loss"
    _assert_same_run(ours, plain, 3)
    assert not r1k_trl.is_patched()


@pytest.mark.parametrize("accumulation", [1, 2, 4])
@pytest.mark.parametrize("loss_type", list(LOSS_CONFIGS))
def test_grpo_trainer_under_gradient_accumulation_with_an_entropy_bonus(loss_type, accumulation, tmp_path,
                                                                        monkeypatch):
    """gradient_accumulation_steps 1, 2, 4 (steps_per_generation follows it, TRL's default) with
    entropy_coef > 0, for every loss type: TRL divides the entropy bonus by the accumulation steps
    whatever the loss type's normaliser (it was GA times too large for dapo, cispo and vespo). Two
    steps: the second step's generations come from the first step's update."""
    level = "sequence" if loss_type == "luspo" else "token"
    extra = dict(gradient_accumulation_steps=accumulation, entropy_coef=0.05, max_steps=2)
    plain = _run_grpo_trainer(loss_type, 0.0, 1, level, False, tmp_path / "plain", **extra)
    calls = []
    original = r1kernels.grpo.linear_grpo_loss
    monkeypatch.setattr(r1kernels.grpo, "linear_grpo_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    ours = _run_grpo_trainer(loss_type, 0.0, 1, level, True, tmp_path / "ours", **extra)
    assert len(calls) == 2 * accumulation, "every micro-batch's loss must go through linear_grpo_loss"
    _assert_same_run(ours, plain, 2)
    assert "policy_loss" in ours[3][0] and "entropy_coef" in ours[3][0]


def test_grpo_trainer_under_bf16_runs_the_lm_head_as_configured(tmp_path):
    """bf16=True: the patched lm_head runs in TRL's autocast (bf16 products, fp32 accumulation), as TRL's
    own; cast_lm_head_to_fp32=True: in fp32, as TRL's then. The logged entropy tells the two apart: they
    differ by 3.8e-6, ours and TRL's by at most two fp32 ulps at 4.4 (our kernel sums in another order)."""
    tolerance = 1e-6
    entropies = {}
    for cast in (False, True):
        extra = dict(bf16=True, max_steps=2, cast_lm_head_to_fp32=cast)
        plain = _run_grpo_trainer("dapo", 0.0, 1, "token", False, tmp_path / f"plain-{cast}", **extra)
        ours = _run_grpo_trainer("dapo", 0.0, 1, "token", True, tmp_path / f"ours-{cast}", **extra)
        assert ours[0] == plain[0]
        for mine, theirs in zip(ours[3], plain[3]):
            assert mine["entropy"] == pytest.approx(theirs["entropy"], rel=0, abs=tolerance), cast
        entropies[cast] = plain[3][0]["entropy"]
    assert abs(entropies[True] - entropies[False]) > 2 * tolerance, "bf16 and fp32 heads should log different entropies"
