"""r1kernels inside verl's own engine (verl 0.9.x, SUPPORTED_VERL; other versions raise), activated by
importing this module in every worker: ``actor_rollout_ref.model.external_lib=r1kernels.integrations.verl``.

What the import does (once per process):

1. **Fused log-probs.** With ``actor_rollout_ref.model.use_fused_kernels=true``, verl replaces the HF
   model's forward by one that never builds logits and asks ``FusedLinearForPPO`` (its ``torch`` and
   ``liger`` backends) or ``linear_cross_entropy`` (``triton``) for (log-probs, entropy) from the
   hidden states and ``lm_head.weight``. Both names now run ``linear_token_logprobs`` (Triton on GPU,
   C++ on CPU), inside lm_head's own forward: under FSDP2 an untied lm_head is a unit of its own, its
   weight a DTensor shard outside that forward (verl's own path fails there: "aten.mm.default got mixed
   torch.Tensor and DTensor"); inside, FSDP2 unshards it, and reduce-scatters its gradient to the shard.
   Log-probs and entropy come back in fp32 (the lm_head product under verl's bf16 autocast runs in bf16
   with fp32 accumulation, its logits never rounded to bf16); the entropy's gradient is computed only
   when the loss uses it. An unknown ``fused_kernel_options.impl_backend`` raises (verl skips its patch).
2. **TRL's objectives** as verl policy losses (``actor.policy_loss.loss_mode``): ``POLICY_LOSSES``, one
   per TRL loss type (``r1k_grpo``, ``r1k_bnpo``, ``r1k_dr_grpo``, ``r1k_dapo``, ``r1k_cispo``,
   ``r1k_sapo``, ``r1k_luspo``, ``r1k_vespo``) plus ``r1k_gspo``, computed by ``policy_loss`` and
   normalised over verl's global batch (``verl_normaliser``). ``register_policy_loss`` adds others.
   ``actor.kl_loss_type=r1k_k3_bias_corrected`` is TRL's KL term (k3 times the importance ratio,
   ``use_bias_correction_kl``) for verl's KL loss.
3. **Grouped advantages** as verl estimators (``algorithm.adv_estimator``): ``r1k_grpo`` (scaled by the
   group's std unless ``algorithm.norm_adv_by_std_in_grpo=false``) and ``r1k_rloo``, by
   ``group_advantages`` over the prompts' ``uid`` groups.
4. **Packed attention**: registers ``r1kernels`` with transformers, for
   ``+actor_rollout_ref.model.override_config.attn_implementation=r1kernels`` (verl packs each
   micro-batch into one row with position ids restarting per sequence; the attention reads them).
"""
from __future__ import annotations

import contextvars
import functools
import sys
import types

import numpy as np
import torch

from r1kernels.advantages import group_advantages
from r1kernels.grpo import LOSS_TYPES, _kl, check_options, loss_normaliser, policy_loss
from r1kernels.integrations import transformers as _hf
from r1kernels.integrations._forward import call_as_forward
from r1kernels.logprobs import linear_token_logprobs

SUPPORTED_VERL = ("0.9.1", "0.10")        # [first, end): the releases whose hooks below were checked
VERL_FUSED_BACKENDS = ("torch", "triton", "liger")   # verl's fused_kernel_options.impl_backend values

# ---------------------------------------------------------------- 1. fused log-probs

# The output embedding of the model whose forward is running (set by the wrapper verl's patched
# forwards get, read where verl asks for log-probs from ``lm_head.weight``).
_HEAD = contextvars.ContextVar("r1kernels_verl_head", default=None)


def _logprobs_and_entropy(hidden, weight, labels, temperature):
    """verl's fused call: (log p(label) [...], entropy [...]) in fp32 from hidden [..., H] and the
    lm_head weight [V, H]; run inside lm_head's forward when the weight is that module's."""
    head = _HEAD.get()
    if head is None or head.weight is not weight:
        return linear_token_logprobs(hidden, weight, labels.long(), None, float(temperature), return_entropy=True)

    def inside_head_forward(h):      # the module's parameters are whole here (FSDP2: unsharded)
        return linear_token_logprobs(h, head.weight, labels.long(), head.bias, float(temperature),
                                     return_entropy=True)

    return call_as_forward(head, head, inside_head_forward, hidden)


class FusedLinearForPPO(torch.nn.Module):
    """Stands in for ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (same constructor and
    call); ``chunk_size`` is unused: our kernels tile the vocabulary themselves."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        return _logprobs_and_entropy(hidden_states, vocab_weights, input_ids, temperature)


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """Stands in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (the ``triton``
    backend): (log-probs, entropy) per token."""
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' (per-token log-probs), got {reduction!r}")
    if dist_process_group is not None:
        raise NotImplementedError("dist_process_group: a vocabulary split across ranks (tensor parallel) is "
                                  "not supported; verl's FSDP engine passes None")
    return _logprobs_and_entropy(hidden, weight, labels, temperature)


def _with_output_embeddings(forward):
    """A model forward that makes its output embedding known to ``_logprobs_and_entropy``."""
    @functools.wraps(forward)
    def forward_with_head(self, *args, **kwargs):
        token = _HEAD.set(self.get_output_embeddings())
        try:
            return forward(self, *args, **kwargs)
        finally:
            _HEAD.reset(token)

    forward_with_head.r1kernels_head = True
    return forward_with_head


def _patching_forward_with_backends(verl_patch):
    """verl's ``patch_forward_with_backends``, raising on an unknown backend (verl skips its patch then,
    and training fails later on ``.log_probs``) and wrapping the forward it installs."""
    @functools.wraps(verl_patch)
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if use_fused_kernels and fused_kernels_backend not in VERL_FUSED_BACKENDS:
            raise ValueError(f"actor_rollout_ref.model.fused_kernel_options.impl_backend must be one of "
                             f"{VERL_FUSED_BACKENDS} with use_fused_kernels=true, got {fused_kernels_backend!r}")
        verl_patch(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
        cls = type(model)
        if use_fused_kernels and not getattr(cls.forward, "r1kernels_head", False):
            cls.forward = _with_output_embeddings(cls.forward)

    return patch_forward_with_backends


# ---------------------------------------------------------------- 2. policy losses


def verl_normaliser(loss_type: str, response_mask: torch.Tensor, global_batch_info: dict) -> float:
    """The denominator of ``loss_type``'s loss over verl's global mini-batch, divided by ``dp_size``
    (verl's FSDP averages the ranks' gradients and sums the micro-batches' losses, so each micro-batch's
    loss is its ``loss_sum`` over this). From ``global_batch_size`` (sequences) and ``batch_num_tokens``,
    or, on one rank, the micro-batch's own counts where verl gives none; dr_grpo's horizon is
    ``actor.loss_scale_factor``."""
    dp_size = global_batch_info.get("dp_size") or 1
    counts = {"global_batch_size": response_mask.shape[0], "batch_num_tokens": response_mask.sum()}
    for name, local in counts.items():
        value = global_batch_info.get(name)
        if value is None and dp_size > 1:
            raise ValueError(f"verl's global_batch_info must give {name} when dp_size = {dp_size} > 1")
        counts[name] = local if value is None else value
    horizon = global_batch_info.get("loss_scale_factor")
    if LOSS_TYPES[loss_type].needs_max_completion_length and horizon is None:
        raise ValueError(f"loss_type {loss_type!r} normalises by B * max_completion_length: set "
                         "actor_rollout_ref.actor.loss_scale_factor to the rollout's max response length")
    count = loss_normaliser(loss_type, counts["global_batch_size"], counts["batch_num_tokens"], horizon)
    count = float(count)
    return (count if count > 0 else 1.0) / dp_size


def _options_from_actor(loss_type: str, config) -> dict:
    """The LossOptions verl's actor config sets: the clip range (``clip_ratio_low`` / ``_high``, else
    ``clip_ratio``) for the clipped types, cispo's cap 1 + ``clip_ratio_high`` (TRL's epsilon_high is the
    cap itself), sapo's ``tau_pos`` / ``tau_neg``."""
    if config is None:
        return {}
    low = config.clip_ratio if config.clip_ratio_low is None else config.clip_ratio_low
    high = config.clip_ratio if config.clip_ratio_high is None else config.clip_ratio_high
    if LOSS_TYPES[loss_type].clipped:
        return {"epsilon_low": low, "epsilon_high": high}
    if loss_type == "cispo":
        return {"epsilon_high": 1.0 + high}
    if loss_type == "sapo":
        return {"sapo_temperature_pos": config.tau_pos, "sapo_temperature_neg": config.tau_neg}
    return {}


_CONFIG_GIVES = {"max_completion_length": 1, "epsilon_high": 1.2}   # stand-ins for the check
ROLLOUT_IS_LEVELS = ("token", "sequence")   # verl's algorithm.rollout_correction.rollout_is


def _is_ratio_from_verl(weights, response_mask, rollout_is, loss_type):
    """verl's ``rollout_is_weights`` as ``policy_loss``'s ``is_ratio``. verl hands [mb, R] at both of its
    levels: a ratio per token, or (``rollout_is="sequence"``) the sequence's ratio on each of its tokens,
    0 on padding. Every loss type but vespo multiplies each token's loss by it, the same either way; vespo
    folds it into the sequence's weight (the per-token ratios' product), where r on each of L tokens would
    count r^L: it must be told the level. At "sequence" each row's one value is taken (a row whose tokens
    differ raises: those are per-token weights)."""
    if rollout_is is None and LOSS_TYPES[loss_type].whole_sequence:
        raise ValueError("vespo folds verl's rollout_is_weights into each sequence's weight, and verl hands "
                         "them as [B, R] at both of its levels (algorithm.rollout_correction.rollout_is "
                         "token or sequence): say which, registering the loss with "
                         "r1kernels.integrations.verl.register_policy_loss(name, loss_type='vespo', "
                         "rollout_is='token' or 'sequence')")
    if rollout_is != "sequence":            # per token, or the same for a type that scales each token's loss
        return weights
    mask = response_mask.bool()
    per_sequence = (weights * mask).amax(-1, keepdim=True)       # weights are >= 0
    spread = ((weights - per_sequence).abs() * mask).amax()
    if spread > 1e-6 * per_sequence.amax().clamp(min=1.0):
        raise ValueError(f"rollout_is='sequence', but rollout_is_weights differ within a response (by {spread:.3g}): "
                         "these are verl's per-token weights (rollout_is='token')")
    return per_sequence


def make_policy_loss(rollout_is=None, **options):
    """A verl policy-loss function computing ``policy_loss`` with these LossOptions (``loss_type`` and any
    other; they win over those taken from verl's actor config). Called by verl per micro-batch on padded
    [mb, R] tensors: returns (loss_sum / ``verl_normaliser``, metrics), with verl's ``actor/ppo_kl`` and
    ``actor/pg_clipfrac`` (the tokens whose clip binds) and our metrics under ``actor/r1k/``.
    ``rollout_is_weights`` (verl's rollout correction) multiply each token's loss, as in verl's own losses;
    ``rollout_is`` ("token" / "sequence", verl's ``algorithm.rollout_correction.rollout_is``) says which
    level verl computed them at, which vespo needs (see ``_is_ratio_from_verl``).
    ``loss_agg_mode`` is not read: the loss type fixes the policy term's normalisation, as in TRL (verl
    still aggregates its entropy and KL terms with it). TRL's types have no dual clip, so
    ``actor/pg_clipfrac_lower`` is not reported."""
    loss_type = options.get("loss_type", "grpo")
    if rollout_is not in (None, *ROLLOUT_IS_LEVELS):
        raise ValueError(f"rollout_is must be one of {ROLLOUT_IS_LEVELS} or None, got {rollout_is!r}")
    # what verl's config gives at each call (dr_grpo's horizon, cispo's cap) is filled in to check the rest now
    check_options(**{**{name: _CONFIG_GIVES[name] for name in LOSS_TYPES[loss_type].needs}, **options})

    def r1kernels_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None):
        info = {} if config is None else dict(config.global_batch_info)
        normaliser = verl_normaliser(loss_type, response_mask, info)
        given = _options_from_actor(loss_type, config)
        if LOSS_TYPES[loss_type].needs_max_completion_length:
            given["max_completion_length"] = info["loss_scale_factor"]
        is_ratio = None if rollout_is_weights is None else _is_ratio_from_verl(rollout_is_weights, response_mask,
                                                                                 rollout_is, loss_type)
        out = policy_loss(log_prob, advantages, response_mask, old_logprobs=old_log_prob, is_ratio=is_ratio,
                          **{**given, **options})
        loss = out.loss_sum / normaliser
        with torch.no_grad():
            mask = response_mask.to(log_prob.dtype)
            ppo_kl = ((old_log_prob - log_prob) * mask).sum() / mask.sum().clamp(min=1.0)
        metrics = {"actor/ppo_kl": ppo_kl.item(), "actor/pg_clipfrac": out.metrics["clip_ratio_region"].item()}
        metrics.update({f"actor/r1k/{name}": value.item() for name, value in out.metrics.items()})
        return loss, metrics

    return r1kernels_policy_loss


# verl loss_mode -> LossOptions: one per TRL loss type, and GSPO (TRL's sequence-level ratio)
POLICY_LOSSES = {**{f"r1k_{name}": {"loss_type": name} for name in LOSS_TYPES},
                 "r1k_gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence"}}


def register_policy_loss(name: str, rollout_is=None, **options):
    """Register ``make_policy_loss(rollout_is, **options)`` with verl as loss_mode ``name`` (in a module of
    your own named by ``external_lib``: e.g. ``register_policy_loss("grpo_delta", loss_type="grpo",
    delta=4.0)``, or ``register_policy_loss("vespo_seq_is", loss_type="vespo", rollout_is="sequence")``)."""
    from verl.trainer.ppo import core_algos

    return core_algos.register_policy_loss(name)(make_policy_loss(rollout_is, **options))


# TRL's KL term with use_bias_correction_kl (its default): k3(ref, logp) times the importance ratio
# exp(logp - old), the ratio's gradient included (unbiased off-policy, DeepSeek-V3.2). verl adds its KL
# loss in ppo_loss from (log_prob, ref_log_prob) alone; the old log-probs of the same micro-batch are
# those its policy-loss call just received, remembered here.
BIAS_CORRECTED_KL = "r1k_k3_bias_corrected"
_POLICY_INPUTS = contextvars.ContextVar("r1kernels_verl_policy_inputs", default=None)


def _remembering_policy_inputs(get_policy_loss_fn):
    """verl's ``get_policy_loss_fn``, whose functions remember (old_log_prob, log_prob) of their call."""
    @functools.wraps(get_policy_loss_fn)
    def get_remembering(name):
        loss_fn = get_policy_loss_fn(name)

        @functools.wraps(loss_fn)
        def remembering(*args, **kwargs):
            _POLICY_INPUTS.set((kwargs.get("old_log_prob"), kwargs.get("log_prob")))
            return loss_fn(*args, **kwargs)

        return remembering

    return get_remembering


def _with_bias_corrected_kl(kl_penalty):
    """verl's ``kl_penalty`` (logprob, ref_logprob, kl_penalty=type), with BIAS_CORRECTED_KL added."""
    @functools.wraps(kl_penalty)
    def kl_penalty_with_ours(logprob, ref_logprob, kl_penalty):
        if kl_penalty != BIAS_CORRECTED_KL:
            return verl_kl_penalty(logprob, ref_logprob, kl_penalty)
        old, current = _POLICY_INPUTS.get() or (None, None)
        if current is not logprob or old is None:
            raise RuntimeError(f"kl_loss_type={BIAS_CORRECTED_KL} needs the old log-probs of the same micro-batch, "
                               "which verl's ppo_loss hands its policy loss just before; this call came elsewhere")
        return _kl("k3", logprob, ref_logprob) * torch.exp(logprob - old)

    verl_kl_penalty = kl_penalty
    return kl_penalty_with_ours


# ---------------------------------------------------------------- 3. advantages


def _group_ids(index) -> torch.Tensor:
    """verl's per-row prompt ``uid`` values (any hashable) as integer group ids."""
    return torch.from_numpy(np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)[1])


def _estimator(estimator: str):
    def r1kernels_advantages(token_level_rewards, response_mask, index=None, config=None, epsilon: float = 1e-4,
                             **kwargs):
        """verl advantage estimator: ``group_advantages`` of each response's summed reward within its
        prompt's group (``index``: the uids), broadcast over its response tokens; (advantages, returns)."""
        if index is None:
            raise ValueError("verl gave no index (the prompts' uid): grouped advantages need the groups")
        scale = None
        if estimator == "grpo" and config is not None and not config.get("norm_adv_by_std_in_grpo", True):
            scale = "none"
        scores = token_level_rewards.sum(dim=-1)
        adv = group_advantages(scores, group_ids=_group_ids(index).to(scores.device), estimator=estimator,
                               scale=scale, eps=epsilon)
        adv = adv.to(token_level_rewards.dtype)[:, None] * response_mask
        return adv, adv

    return r1kernels_advantages


ADVANTAGE_ESTIMATORS = {"r1k_grpo": "grpo", "r1k_rloo": "rloo"}     # verl adv_estimator -> ours


# ---------------------------------------------------------------- activation


def _check_version(version=None) -> None:
    from packaging.version import Version

    if version is None:
        from importlib.metadata import version as installed
        version = installed("verl")
    first, end = (Version(v) for v in SUPPORTED_VERL)
    if not first <= Version(Version(version).base_version) < end:
        raise RuntimeError(f"r1kernels.integrations.verl supports verl >= {SUPPORTED_VERL[0]}, < {SUPPORTED_VERL[1]}; "
                           f"verl {version} is installed")


def _activate() -> None:
    _check_version()
    from verl.models.transformers import monkey_patch
    from verl.trainer.ppo import core_algos
    from verl.utils.experimental import torch_functional
    from verl.workers.utils import losses

    torch_functional.FusedLinearForPPO = FusedLinearForPPO
    try:
        from verl.utils.kernel import linear_cross_entropy as verl_lce
    except ImportError:     # verl's triton kernel needs Triton; the name is ours either way
        verl_lce = types.ModuleType("verl.utils.kernel.linear_cross_entropy")
        sys.modules[verl_lce.__name__] = verl_lce
    verl_lce.linear_cross_entropy = linear_cross_entropy
    if not getattr(monkey_patch.patch_forward_with_backends, "__wrapped__", None):
        monkey_patch.patch_forward_with_backends = _patching_forward_with_backends(
            monkey_patch.patch_forward_with_backends)
    if not getattr(losses.kl_penalty, "__wrapped__", None):    # ppo_loss looks both up in its module
        losses.kl_penalty = _with_bias_corrected_kl(losses.kl_penalty)
        losses.get_policy_loss_fn = _remembering_policy_inputs(losses.get_policy_loss_fn)
    for name, options in POLICY_LOSSES.items():
        register_policy_loss(name, **options)
    for name, estimator in ADVANTAGE_ESTIMATORS.items():
        if name not in core_algos.ADV_ESTIMATOR_REGISTRY:
            core_algos.register_adv_est(name)(_estimator(estimator))
    _hf.register()


_activate()
