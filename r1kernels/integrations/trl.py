"""Drop r1kernels into TRL's GRPOTrainer (TRL >= 1.16, where it is installed).

TRL's GRPOTrainer scores completions through a fused LM head (``trl.trainer.utils.add_fused_lm_head``)
whose vocabulary work is one autograd function over (hidden, weight, bias, labels). ``patch()``
swaps that function for ``r1kernels.linear_token_logprobs``: the [tokens, V] logits never exist,
on any backend (Triton on GPU, C++ on CPU), forward and backward, deterministic on request.
TRL's own loss math (every loss type, masks, metrics) is left in place: it is the semantics
``r1kernels.policy_loss`` matches, so TRL keeps all its features and gains our kernels.

Under ``torch.autocast`` the lm_head product runs in the autocast dtype with fp32 accumulation, as
TRL's kernel does. Not covered (those calls go to TRL's own kernel, with one warning): final-logit
softcapping (Gemma-2 style), the extra per-token outputs ``log_sum_sq_probs``, ``mean_logits`` and
``is_top1``, and hidden states whose dtype differs from the LM head's.

    import r1kernels.integrations.trl as r1k_trl
    r1k_trl.patch()          # before GRPOTrainer(...) is built; r1k_trl.unpatch() restores TRL
"""
from __future__ import annotations

import warnings


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
                    sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg)
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


def patch(deterministic: bool | None = None) -> None:
    """Route TRL's fused LM head through r1kernels. Idempotent. Raises outside SUPPORTED_TRL."""
    global _original
    check_trl_version()
    from trl.trainer import utils as trl_utils

    if _original is None:
        _original = trl_utils._ChunkedLogProbFunction
    _R1KernelsLogProbs.deterministic = deterministic
    trl_utils._ChunkedLogProbFunction = _R1KernelsLogProbs


def unpatch() -> None:
    """Restore TRL's own kernel."""
    global _original
    if _original is not None:
        from trl.trainer import utils as trl_utils

        trl_utils._ChunkedLogProbFunction = _original
        _original = None


def is_patched() -> bool:
    return _original is not None


__all__ = ["patch", "unpatch", "is_patched", "loss_options", "check_trl_version", "SUPPORTED_TRL"]
