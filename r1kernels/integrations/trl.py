"""Drop r1kernels into TRL's GRPOTrainer (TRL 1.16.x, SUPPORTED_TRL; other versions raise).

TRL's GRPOTrainer scores completions through a fused LM head (``trl.trainer.utils.add_fused_lm_head``)
whose vocabulary work is one autograd function over (hidden, weight, bias, labels). ``patch()``
swaps that function for ``r1kernels.linear_token_logprobs``: the [tokens, V] logits never exist,
on any backend (Triton on GPU, C++ on CPU), forward and backward, deterministic on request.
TRL's own loss math (every loss type, masks, metrics) is left in place: it is the semantics
``r1kernels.policy_loss`` matches, so TRL keeps all its features and gains our kernels.
``patch(loss=True)`` also replaces GRPOTrainer's loss by ``linear_grpo_loss`` on the backbone's
hidden states (the one-pass fused lm_head + loss where it applies), with ``loss_options(args)``,
as TRL's ``use_liger_kernel`` swaps in Liger's loss.

Under ``torch.autocast`` the lm_head product runs in the autocast dtype with fp32 accumulation, as
TRL's kernel does. Not covered (those calls go to TRL's own kernel, with one warning): final-logit
softcapping (Gemma-2 style), the extra per-token outputs ``log_sum_sq_probs``, ``mean_logits`` and
``is_top1``, and hidden states whose dtype differs from the LM head's.

    import r1kernels.integrations.trl as r1k_trl
    r1k_trl.patch()          # before GRPOTrainer(...) is built; r1k_trl.unpatch() restores TRL
    r1k_trl.patch(loss=True) # the loss too
"""
from __future__ import annotations

import warnings

import torch


from r1kernels.integrations._forward import call_as_forward
from r1kernels.logprobs import linear_token_logprobs

# TRL releases whose fused-LM-head entry points (trl.trainer.utils._ChunkedLogProbFunction, used by
# add_fused_lm_head) the patch was checked against; the `trl` extra pins the same range
SUPPORTED_TRL = ("1.16", "1.17")      # [first, end)
_SUPPORTED_OUTPUTS = {"log_probs", "entropy"}
_original = None


class _R1KernelsLogProbs:
    """Stands in for TRL's chunked log-prob autograd function: same ``apply`` signature and outputs
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)."""

    deterministic = None
    _warned = False

    @classmethod
    def apply(cls, hidden, weight, bias, labels, temperature, chunk_size, final_logit_softcapping, logit_scale,
              outputs=("log_probs",)):
        unsupported = set(outputs) - _SUPPORTED_OUTPUTS
        if final_logit_softcapping or unsupported or hidden.dtype != weight.dtype or not logit_scale:
            if not cls._warned:
                warnings.warn("r1kernels TRL patch: falling back to TRL's kernel for this call "
                              f"(softcapping={final_logit_softcapping}, outputs={sorted(unsupported)}, "
                              f"dtypes={hidden.dtype}/{weight.dtype})", stacklevel=2)
                cls._warned = True
            return _original.apply(hidden, weight, bias, labels, temperature, chunk_size, final_logit_softcapping,
                                   logit_scale, outputs)
        # logits * logit_scale / temperature == logits / (temperature / logit_scale)
        logp, entropy = linear_token_logprobs(hidden, weight, labels, bias, temperature / logit_scale,
                                              return_entropy=True, deterministic=cls.deterministic)
        return logp, (entropy if "entropy" in outputs else None), None, None, None


def loss_options(args) -> dict:
    """``policy_loss`` / ``grpo_loss`` / ``linear_grpo_loss`` keyword options from a TRL ``GRPOConfig``,
    TRL's defaults where the names differ (epsilon_high falls back to epsilon). Per-batch values stay
    per call: ``num_items_in_batch`` (and ``num_processes``), ``old_logprobs``, ``ref_logprobs``,
    ``is_ratio`` (vLLM's importance-sampling ratio), ``sampling_logprobs``. A setting we do not
    implement raises, naming it, rather than being dropped."""
    from r1kernels.grpo import LOSS_TYPES

    unsupported = {"loss_type": args.loss_type not in LOSS_TYPES,
                   "use_adaptive_entropy": getattr(args, "use_adaptive_entropy", False)}
    for name, bad in unsupported.items():
        if bad:
            raise NotImplementedError(f"GRPOConfig.{name} = {getattr(args, name)!r} is not supported by r1kernels "
                                      f"(loss types: {tuple(LOSS_TYPES)})")
    accepts = LOSS_TYPES[args.loss_type].accepts
    options = dict(loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level,
                   beta=args.beta, use_bias_correction_kl=args.use_bias_correction_kl,
                   entropy_coef=args.entropy_coef, top_entropy_quantile=args.top_entropy_quantile,
                   off_policy_mask_threshold=args.off_policy_mask_threshold)
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    per_type = dict(epsilon_low=args.epsilon, epsilon_high=epsilon_high, delta=args.delta,
                    max_completion_length=args.max_completion_length,
                    sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
                    vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
                    vespo_lambda_neg=args.vespo_lambda_neg)
    options.update({name: value for name, value in per_type.items() if name in accepts and value is not None})
    return options


def check_trl_version(version: str | None = None) -> None:
    """Raise, naming the installed and supported versions, outside SUPPORTED_TRL: other releases moved
    or changed the entry points the patch swaps (1.10's patch_chunked_lm_head takes another signature;
    0.x has no fused LM head), so a patch there would be silently unused or break."""
    from packaging.version import Version

    if version is None:
        import trl
        version = trl.__version__
    first, end = (Version(v) for v in SUPPORTED_TRL)
    if not first <= Version(Version(version).base_version) < end:   # pre-releases of a supported version count
        raise RuntimeError(f"r1kernels.integrations.trl supports TRL >= {SUPPORTED_TRL[0]}, < {SUPPORTED_TRL[1]}; "
                           f"TRL {version} is installed")


class _CaptureHead:
    """Stands in for TRL's chunked log-prob function during one forward of the loss route: it keeps
    what the loss needs of the fused LM head's inputs (hidden states, temperature, softcap, scale;
    the weight is read again inside lm_head's forward) and returns zeros, so the backbone runs once,
    under TRL's own forward, and the head's work is ours."""

    captured = None

    @classmethod
    def apply(cls, hidden, weight, bias, labels, temperature, chunk_size, final_logit_softcapping, logit_scale,
              outputs=("log_probs",)):
        cls.captured = (hidden, temperature, final_logit_softcapping, logit_scale)
        zeros = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        return zeros, (zeros if "entropy" in outputs else None), None, None, None


_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
               "mm_token_type_ids", "image_position_ids")


def _loss_route_applies(trainer, inputs) -> bool:
    """Our fused loss covers the text-only objective; the rest stays TRL's own _compute_loss."""
    from r1kernels.grpo import LOSS_TYPES
    args = trainer.args
    return (args.loss_type in LOSS_TYPES and not getattr(args, "use_adaptive_entropy", False)
            and not trainer.aux_loss_enabled and not any(inputs.get(k) is not None for k in _MULTIMODAL))


# TRL 1.16's _compute_loss logs the clip fractions under these names for these loss types (cispo its own)
_TRL_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_TRL_CLIP_MEANS = {"clip_ratio_low": "clip_ratio/low_mean", "clip_ratio_high": "clip_ratio/high_mean",
                   "clip_ratio_region": "clip_ratio/region_mean"}


def _log_metrics(trainer, ours: dict, mask, policy_scale: float, mode: str) -> None:
    """Every metric TRL's _compute_loss logs, under its names and with its reductions over processes:
    masked means as TRL's global_masked_mean (local sums and counts, summed over the processes, in one
    reduce), per-process values gathered (in one gather) for TRL's nanmin / nanmax / nanmean."""
    from r1kernels.grpo import LOSS_TYPES
    args, metrics = trainer.args, trainer._metrics[mode]
    tokens = mask.sum().float()
    sequences = torch.tensor(float(mask.shape[0]), device=tokens.device)
    clip_count = sequences if args.importance_sampling_level == "sequence" else tokens
    means, gathered = {}, {}          # TRL's name -> (our local mean, its count) / (local value, reduction)
    if args.beta:
        means["kl"] = (ours["kl_mean"], tokens)
    means["entropy"] = (ours["entropy_mean"], tokens)
    if args.loss_type in _TRL_CLIPPED:
        means.update({theirs: (ours[name], clip_count) for name, theirs in _TRL_CLIP_MEANS.items()})
        gathered["clip_ratio/low_min"] = (ours["clip_ratio_low_min"], torch.min)
        gathered["clip_ratio/high_max"] = (ours["clip_ratio_high_max"], torch.max)
    elif args.loss_type == "cispo":
        means["cispo_clip_ratio"] = (ours["clip_ratio_high"], clip_count)
    if LOSS_TYPES[args.loss_type].sequence_weight is not None:        # vespo's phi, a mean over sequences
        means["vespo/phi_seq_mean"] = (ours["sequence_weight_mean"], sequences)
    if args.entropy_coef != 0.0:         # TRL logs these when its entropy bonus is on
        gathered["policy_loss"] = (ours["policy_loss"] * policy_scale, torch.mean)
        if mode == "train" and trainer.accelerator.sync_gradients:
            metrics["entropy_coef"].append(args.entropy_coef)
    totals = trainer.accelerator.reduce(
        torch.stack([torch.stack([mean.float() * count, count.float()]) for mean, count in means.values()]),
        reduction="sum")
    for name, value in zip(means, (totals[:, 0] / totals[:, 1].clamp(min=1.0)).tolist()):
        metrics[name].append(value)
    if gathered:
        values = trainer.accelerator.gather(torch.stack([value.float() for value, _ in gathered.values()])[None])
        for column, (name, (_, reduce)) in zip(values.unbind(1), gathered.items()):
            column = column[~torch.isnan(column)]
            metrics[name].append(reduce(column).item() if column.numel() else float("nan"))


def _capture_head_inputs(trainer, forward, inputs):
    """The fused LM head's inputs for this batch, from TRL's own forward (``forward``: the model's
    forward, called without the engine's hooks since we run inside them): the backbone's hidden
    states at the completion positions [B, C, H], the temperature and ``(softcap, logit_scale)``."""
    from trl.trainer import utils as trl_utils

    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    batch, keep = completion_ids.shape
    head, trl_utils._ChunkedLogProbFunction = trl_utils._ChunkedLogProbFunction, _CaptureHead
    try:
        trainer._get_per_token_logps_and_entropies(forward, torch.cat([prompt_ids, completion_ids], 1),
                                                   torch.cat([prompt_mask, completion_mask], 1), keep)
    finally:
        trl_utils._ChunkedLogProbFunction = head
    hidden, temperature, softcap, scale = _CaptureHead.captured
    _CaptureHead.captured = None
    if hidden.shape[0] == batch * (prompt_ids.shape[1] + keep - 1):         # every position scored
        hidden = hidden.view(batch, -1, hidden.shape[-1])[:, -keep:]
    else:                                                                     # only the valid ones (Triton)
        valid = completion_mask.bool()[..., None]
        hidden = hidden.new_zeros(batch, keep, hidden.shape[-1]).masked_scatter(valid, hidden)
    return hidden, temperature, (softcap, scale)


def _fused_compute_loss(trainer, model, inputs):
    """TRL's GRPO loss through ``linear_grpo_loss``: the backbone's hidden states go to our fused
    lm_head + loss (one pass where it applies), with TRL's options (``loss_options``), per-batch
    inputs, gradient-accumulation scaling, autocast and logged metrics.

    It runs inside the engine-wrapped model's forward, and the lm_head's part inside the lm_head
    module's own forward (``call_as_forward``), so that whatever the engine does around a forward
    (ZeRO-3's gathers, FSDP2's unshard and reshard, for the loss and for its backward) covers the
    weight the loss reads: after the model's forward has returned, that weight may be released."""
    from r1kernels.grpo import LOSS_TYPES, linear_grpo_loss

    if not _loss_route_applies(trainer, inputs):
        return _original_compute_loss(trainer, model, inputs)
    unwrapped = trainer.accelerator.unwrap_model(model)
    completion_ids = inputs["completion_ids"]
    valid = inputs["completion_mask"].bool()
    mask = valid if "tool_mask" not in inputs else valid & inputs["tool_mask"].bool()
    args = trainer.args
    mode = "train" if trainer.model.training else "eval"
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    items = LOSS_TYPES[args.loss_type].counts_items
    # TRL divides each micro-batch's policy loss by the accumulation steps GA, except where num_items_in_batch
    # (dapo, cispo, vespo) normalises it: that count spans the generation batch of steps_per_generation (spg)
    # micro-batches, so TRL rescales by spg / GA instead. Its entropy bonus is divided by GA whatever the type:
    # our loss (policy - coef H) is scaled as the policy term, so coef is given divided back.
    policy_scale = args.steps_per_generation / accumulation if items and mode == "train" else 1.0
    loss_scale = policy_scale if items else 1.0 / accumulation
    options = loss_options(args)
    options["entropy_coef"] = args.entropy_coef / accumulation / loss_scale
    per_call = dict(old_logprobs=inputs.get("old_per_token_logps"), sampling_logprobs=inputs.get(
        "sampling_per_token_logps"))
    if args.beta:
        per_call["ref_logprobs"] = inputs["ref_per_token_logps"]
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        per_call["is_ratio"] = inputs["importance_sampling_ratio"]
    if items:
        per_call.update(num_items_in_batch=inputs["num_items_in_batch"].clamp(min=1.0),
                        num_processes=trainer.accelerator.num_processes)

    def inside_model_forward():
        hidden, temperature, (softcap, scale) = _capture_head_inputs(trainer, unwrapped.forward, inputs)
        if softcap or not scale:
            return None
        lm_head = unwrapped.get_output_embeddings()

        def inside_lm_head_forward(hidden):
            # the lm_head as TRL runs it: in TRL's autocast (bf16/fp16 products, fp32 accumulation), or in
            # fp32 with cast_lm_head_to_fp32 (TRL then hands over fp32 hidden states and weights)
            precision = (torch.autocast(hidden.device.type, enabled=False)
                         if getattr(args, "cast_lm_head_to_fp32", False) else trainer.accelerator.autocast())
            with precision:
                out = linear_grpo_loss(hidden, lm_head.weight, completion_ids, inputs["advantages"], mask,
                                       bias=lm_head.bias, temperature=temperature / scale,
                                       deterministic=_R1KernelsLogProbs.deterministic, **options, **per_call)
            return out.loss, out.metrics

        return call_as_forward(lm_head, lm_head, inside_lm_head_forward, hidden)

    result = call_as_forward(model, unwrapped, inside_model_forward)
    if result is None:                     # softcapped or unscaled logits: TRL's own loss
        return _original_compute_loss(trainer, model, inputs)
    loss, metrics = result
    _log_metrics(trainer, metrics, mask, policy_scale, mode)
    return loss * loss_scale


_original_compute_loss = None


def patch(deterministic: bool | None = None, loss: bool = False) -> None:
    """Route TRL's fused LM head through r1kernels; with ``loss=True`` also GRPOTrainer's loss, through
    ``linear_grpo_loss`` end to end (as ``use_liger_kernel`` swaps in Liger's loss; multimodal
    batches, MoE aux losses and adaptive entropy stay TRL's). Idempotent. Raises outside
    SUPPORTED_TRL."""
    global _original, _original_compute_loss
    check_trl_version()
    from trl.trainer import utils as trl_utils

    if _original is None:
        _original = trl_utils._ChunkedLogProbFunction
    _R1KernelsLogProbs.deterministic = deterministic
    trl_utils._ChunkedLogProbFunction = _R1KernelsLogProbs
    if loss and _original_compute_loss is None:
        from trl.trainer.grpo_trainer import GRPOTrainer
        _original_compute_loss = GRPOTrainer._compute_loss
        GRPOTrainer._compute_loss = _fused_compute_loss


def unpatch() -> None:
    """Restore TRL's own kernel and loss."""
    global _original, _original_compute_loss
    if _original is not None:
        from trl.trainer import utils as trl_utils

        trl_utils._ChunkedLogProbFunction = _original
        _original = None
    if _original_compute_loss is not None:
        from trl.trainer.grpo_trainer import GRPOTrainer

        GRPOTrainer._compute_loss = _original_compute_loss
        _original_compute_loss = None


def is_patched() -> bool:
    return _original is not None


__all__ = ["patch", "unpatch", "is_patched", "loss_options", "check_trl_version", "SUPPORTED_TRL"]
