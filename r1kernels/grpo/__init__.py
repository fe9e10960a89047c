"""GRPO-family policy losses: one exact PyTorch implementation on per-token vectors.

``policy_loss`` holds all the loss math (TRL GRPOTrainer semantics, plus verl's dual-clip
and KL estimators). ``grpo_loss`` and ``linear_grpo_loss`` only put the vocabulary kernels
(``token_logprobs`` / ``linear_token_logprobs``) under it; no backend has its own copy.

Per token, with r = exp(logp - old) (GSPO: the masked sequence mean of logp - old, exponentiated):
    grpo, bnpo, dr_grpo, dapo, luspo:  l = -min(r' A, clip(r, 1-eps_low, 1+eps_high) A),  r' = min(r, delta)
                                dual-clip (clip_ratio_c): for A < 0, l = min(l, -clip_ratio_c A)
    cispo:                      l = -sg(min(r, eps_high)) A logp
    vespo:                      l = -sg(phi(w)) A logp, w the sequence's ratio (see _vespo_weight)
    sapo:                       l = -sigmoid(tau (r - 1)) 4 / tau A,  tau = tau_pos if A > 0 else tau_neg
then l *= keep (off_policy_mask_threshold: 0 for a sequence with A < 0 whose mean sampling - current
log-prob drift exceeds it; top_entropy_quantile q: 0 below the batch's (1 - q) entropy quantile),
l *= is_ratio (vLLM importance-sampling correction), l += beta KL(ref || policy) (times r with
use_bias_correction_kl, TRL's default). Normalisers (m = mask): grpo, sapo: mean over sequences of
sum(l m) / max(sum m, 1); bnpo: sum(l m) / max(sum m, 1); dr_grpo: sum(l m) / (B max_completion_length);
dapo, cispo: sum(l m) / (num_items_in_batch / num_processes), local max(sum m, 1) when not given;
luspo: sum(l m) / B. Finally loss -= entropy_coef * the token mean of H over the kept tokens (TRL).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from r1kernels import _checks, constants
from r1kernels._tensors import accumulation_dtype
from r1kernels.logprobs import linear_token_logprobs, linear_token_logprobs_one_pass, token_logprobs
# the loss types and options live in loss_types; the public ones are re-exported here, where they were
from r1kernels.grpo.loss_types import (IS_LEVELS, KL_ESTIMATORS, LOSS_TYPES, NORMALISERS, TYPE_OPTIONS,  # noqa: F401
                                       LossOptions, LossType, Normaliser, loss_normaliser, loss_options)


@dataclasses.dataclass
class GRPOLossOutput:
    loss: Tensor                  # scalar, differentiable: loss_sum / normaliser
    logprobs: Tensor              # fp32 per-token log-probs, detached (next step's old_logprobs)
    metrics: dict                 # 0-d detached tensors: kl_mean, clip ratios, entropy_mean, ratio stats
    entropy: Optional[Tensor] = None  # per-token entropy, detached, when computed
    normaliser: Optional[Tensor] = None  # 0-d: the loss type's denominator (its count, or 1 where that is 0)

    @property
    def loss_sum(self) -> Tensor:
        """The loss before normalisation (differentiable), for a trainer that normalises once over
        micro-batches and ranks by the summed ``loss_normaliser`` counts."""
        return self.loss * self.normaliser


@dataclasses.dataclass
class _Layout:
    """Every layout flattened to tokens: values [N], mask [N], and the sequence of each token."""
    shape: tuple          # the logprobs' own shape, to reshape inputs given in it
    mask: Tensor          # [N] float
    seq_ids: Tensor       # [N] long
    num_seqs: int
    padded: bool          # [B, T]: per-sequence sums are row sums

    def seq_sum(self, x: Tensor) -> Tensor:
        if self.padded:
            return x.view(self.shape).sum(1)             # (B, T) spelled out: B = 0 leaves -1 undefined
        return torch.zeros(self.num_seqs, dtype=x.dtype, device=x.device).index_add(0, self.seq_ids, x)

    def per_token(self, name: str, x: Optional[Tensor], allow_per_seq: bool = False,
                  per_sequence: Optional[bool] = None) -> Optional[Tensor]:
        """A per-token input flattened to [N]; per-sequence inputs ([S] or [S, 1]) broadcast to their
        tokens when allowed (see ``per_token_or_sequence``)."""
        if x is None:
            return None
        if not allow_per_seq:
            if tuple(_checks.tensor(name, x).shape) != self.shape:
                raise ValueError(f"{name} must have shape {self.shape}, got {tuple(x.shape)}")
            return x.reshape(-1)
        values, one_per_sequence = self.per_token_or_sequence(name, x, per_sequence)
        return values[self.seq_ids] if one_per_sequence else values

    def per_token_or_sequence(self, name: str, x: Tensor, per_sequence: Optional[bool] = None) -> tuple[Tensor, bool]:
        """(values, one per sequence?): ``x`` as [N] per token, or as [S] when it holds one value per
        sequence, given [S] or [S, 1] (TRL's sequence-level importance ratio is [B, 1]). ``per_sequence``
        says which ``x`` is (None: told by its shape, which cannot tell a packed batch with as many tokens
        as sequences; a padded [B, 1] batch is read per token, which means the same)."""
        _checks.tensor(name, x)
        shape, per_seq_shapes = tuple(x.shape), ((self.num_seqs,), (self.num_seqs, 1))
        if per_sequence is not None:
            if (shape in per_seq_shapes) if per_sequence else shape == self.shape:
                return x.reshape(-1), per_sequence
            expected = f"({self.num_seqs},) or ({self.num_seqs}, 1)" if per_sequence else f"{self.shape}"
            raise ValueError(f"{name} must have shape {expected} with per_sequence={per_sequence}, got {shape}")
        if shape == self.shape:
            if not self.padded and self.shape == (self.num_seqs,) and not bool(
                    (self.seq_ids == torch.arange(self.num_seqs, device=self.seq_ids.device)).all()):
                # as many tokens as sequences, some of them empty: [S] and [N] cannot be told apart
                raise ValueError(f"{name} has {self.num_seqs} values, both the number of tokens and of sequences "
                                 "(some sequences are empty), so it could be per-token or per-sequence: say which "
                                 "with per_sequence=True (a value per sequence) or per_sequence=False (per token)")
            return x.reshape(-1), False
        if shape in per_seq_shapes:
            return x.reshape(-1), True
        raise ValueError(f"{name} must have shape {self.shape}, ({self.num_seqs},) or ({self.num_seqs}, 1), "
                         f"got {shape}")


def _layout(logprobs: Tensor, mask: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> _Layout:
    device = logprobs.device
    if cu_seqlens is None:
        if logprobs.dim() != 2:
            raise ValueError(f"logprobs must be [B, T] (padded) or [N] with cu_seqlens (packed), "
                             f"got shape {tuple(logprobs.shape)}")
        batch, length = logprobs.shape
        seq_ids = torch.arange(batch, device=device).repeat_interleave(length)
        num_seqs = batch
    else:
        _checks.tensor("cu_seqlens", cu_seqlens)
        if logprobs.dim() != 1:
            raise ValueError(f"with cu_seqlens, logprobs must be packed [N], got shape {tuple(logprobs.shape)}")
        _checks.cu_seqlens("cu_seqlens", cu_seqlens, logprobs.shape[0])
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        num_seqs = lengths.shape[0]
        seq_ids = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths,
                                          output_size=logprobs.shape[0])
    if mask is None:
        flat_mask = torch.ones(logprobs.numel(), dtype=torch.float32, device=device)
    else:
        _checks.tensor("mask", mask)
        if tuple(mask.shape) != tuple(logprobs.shape):
            raise ValueError(f"mask must have the logprobs' shape {tuple(logprobs.shape)}, got {tuple(mask.shape)}")
        flat_mask = mask.reshape(-1).to(torch.float32)
    return _Layout(tuple(logprobs.shape), flat_mask, seq_ids, num_seqs, padded=cu_seqlens is None)


def _kl(estimator: str, logp: Tensor, ref: Tensor) -> Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy."""
    if estimator == "k1":
        return logp - ref
    if estimator == "k2":
        return 0.5 * (logp - ref) ** 2
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    return k3.clamp(-10.0, 10.0) if estimator == "k3_clamped" else k3


@dataclasses.dataclass
class _Terms:
    """Everything policy_loss reads, flattened to tokens, with its options resolved."""
    layout: _Layout
    m: Tensor                 # [N] mask in the accumulation dtype
    adv: Tensor               # [N]
    old: Optional[Tensor]     # [N] or None (on-policy: the current log-probs, detached)
    ref: Optional[Tensor]
    is_ratio: Optional[Tensor]  # [N], a per-sequence ratio broadcast to its tokens
    tokens_per_seq: Tensor    # [S]
    options: dict
    sampling: Optional[Tensor] = None   # [N] the sampler's log-probs (off_policy_mask_threshold), else old
    seq_weight: Optional[Tensor] = None  # [N] the loss type's per-sequence weight (vespo), set by _loss_from_terms
    is_ratio_per_seq: Optional[Tensor] = None  # [S] when is_ratio was given one per sequence (vespo counts it once)


def _prepare(shape_like: Tensor, advantages: Tensor, mask, old_logprobs, ref_logprobs, cu_seqlens, is_ratio,
             acc: torch.dtype, options: LossOptions, sampling_logprobs: Optional[Tensor] = None,
             per_sequence: Optional[bool] = None) -> _Terms:
    """Validation and flattening shared by policy_loss and the one-pass fused loss."""
    _checks.floating("advantages", advantages)
    if per_sequence is not None and not isinstance(per_sequence, bool):
        raise TypeError(f"per_sequence must be True, False or None, got {per_sequence!r}")
    options.validate(has_ref=ref_logprobs is not None)
    layout = _layout(shape_like, mask, cu_seqlens)
    adv = layout.per_token("advantages", advantages, allow_per_seq=True, per_sequence=per_sequence).to(acc)
    old = layout.per_token("old_logprobs", old_logprobs)
    ref = layout.per_token("ref_logprobs", ref_logprobs)
    is_ratio_per_seq = None
    if is_ratio is not None:
        is_ratio, one_per_sequence = layout.per_token_or_sequence("is_ratio", is_ratio, per_sequence)
        is_ratio = is_ratio.to(acc)
        if one_per_sequence:
            is_ratio_per_seq, is_ratio = is_ratio, is_ratio[layout.seq_ids]
    sampling = layout.per_token("sampling_logprobs", sampling_logprobs)
    m = layout.mask.to(acc)
    return _Terms(layout, m, adv, None if old is None else old.to(acc), None if ref is None else ref.to(acc),
                  is_ratio, layout.seq_sum(m), options.as_dict(), None if sampling is None else sampling.to(acc),
                  is_ratio_per_seq=is_ratio_per_seq)


def _per_token_loss(t: _Terms, logp: Tensor, log_ratio: Tensor, keep: Optional[Tensor] = None, rows=slice(None)):
    """(l, ratio, low, high, kl) for the tokens ``rows``: the loss of each token before masking and
    normalisation (the entropy bonus is added after it, see _entropy_bonus). ``log_ratio`` is
    log(pi / pi_old) per token (already broadcast for GSPO); ``keep`` [rows] masks the policy term
    (off-policy sequences, low-entropy tokens), not the KL term, in TRL's order."""
    o = t.options
    entry = LOSS_TYPES[o["loss_type"]]
    ratio = torch.exp(log_ratio)
    per_token, low, high = entry.token_loss(ratio, t.adv[rows], logp, o,
                                            None if t.seq_weight is None else t.seq_weight[rows])
    if keep is not None:
        per_token = per_token * keep
    if t.is_ratio is not None and entry.sequence_weight is None:
        per_token = per_token * t.is_ratio[rows]
    kl = None if t.ref is None else _kl(o["kl_estimator"], logp, t.ref[rows])
    if kl is not None and o["beta"] > 0 and o["use_bias_correction_kl"]:
        # TRL's default: the KL gradient is unbiased off-policy (DeepSeek-V3.2); TRL's KL metric is this
        # corrected term when beta > 0, and the plain estimate is logged otherwise
        kl = kl * ratio
    if o["beta"] > 0:
        per_token = per_token + o["beta"] * kl
    return per_token, ratio, low, high, kl


def _keep_and_bonus_mask(t: _Terms, logp: Tensor, ent: Optional[Tensor]) -> tuple[Optional[Tensor], Tensor]:
    """(keep [N] or None, the entropy bonus's mask [N]) from the batch-wide options:
    off_policy_mask_threshold (DeepSeek-V3.2): drop the policy term of a sequence with A < 0 whose
    mean of sampling - current log-prob over its tokens exceeds the threshold; top_entropy_quantile q:
    keep only tokens whose entropy reaches the (1 - q) quantile of the batch's masked entropies (the
    entropy bonus then acts on the same tokens)."""
    o, m, keep = t.options, t.m, None
    if o["off_policy_mask_threshold"] is not None:
        sampling = t.sampling if t.sampling is not None else (logp.detach() if t.old is None else t.old)
        drift = torch.nan_to_num(sampling - logp.detach(), nan=0.0)      # unscored tokens give no evidence
        seq_drift = t.layout.seq_sum(drift * m) / t.tokens_per_seq.clamp(min=1.0)
        keep = ((t.adv >= 0) | (seq_drift[t.layout.seq_ids] <= o["off_policy_mask_threshold"])).to(m.dtype)
    bonus_mask = m
    if o["top_entropy_quantile"] < 1.0:
        if ent is None:
            raise ValueError("top_entropy_quantile < 1 needs entropy")
        active = ent.detach()[m > 0]
        if active.numel():
            threshold = torch.quantile(active.float(), 1.0 - o["top_entropy_quantile"]).to(ent.dtype)
            high = ((ent.detach() * m >= threshold) & (m > 0)).to(m.dtype)
        else:
            high = torch.zeros_like(m)
        keep = high if keep is None else keep * high
        bonus_mask = m * high
    return keep, bonus_mask


def _entropy_bonus(t: _Terms, ent: Optional[Tensor], bonus_mask: Tensor) -> Tensor:
    """entropy_coef times the token mean of the entropy over ``bonus_mask``, whatever the loss type's
    normaliser (TRL: L = L_policy - coef * H)."""
    if ent is None:
        raise ValueError("entropy_coef > 0 needs entropy")
    return t.options["entropy_coef"] * (ent * bonus_mask).sum() / bonus_mask.sum().clamp(min=1.0)


def _normalisation(t: _Terms) -> tuple[Tensor, Tensor]:
    """(u m [N], denominator 0-d) with loss = sum_t u_t m_t l_t / denominator (see Normaliser); a
    zero count divides by 1, as the loss is then 0. Both depend only on the mask and the layout, so they
    are known before any log-prob is (the one-pass fused loss needs that)."""
    entry = NORMALISERS[LOSS_TYPES[t.options["loss_type"]].normaliser]
    unit = t.m / t.tokens_per_seq.clamp(min=1.0)[t.layout.seq_ids] if entry.per_sequence else t.m
    count = torch.as_tensor(entry.count(t.layout.num_seqs, t.m.sum(), t.options), dtype=t.m.dtype, device=t.m.device)
    return unit, torch.where(count > 0, count, torch.ones_like(count))


def policy_loss(logprobs: Tensor, advantages: Tensor, mask: Optional[Tensor] = None, *,
                old_logprobs: Optional[Tensor] = None, ref_logprobs: Optional[Tensor] = None,
                entropy: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                is_ratio: Optional[Tensor] = None, sampling_logprobs: Optional[Tensor] = None,
                per_sequence: Optional[bool] = None, **options) -> GRPOLossOutput:
    """The GRPO-family loss on per-token log-probs (see the module docstring for the formulas).

    Layouts: padded ``logprobs [B, T]`` with ``mask [B, T]`` and ``advantages [B]`` or ``[B, T]``;
    or packed ``logprobs [N]`` with ``cu_seqlens [S+1]`` (int32, flash-attn convention; zero-length
    sequences allowed), optional ``mask [N]``, ``advantages [S]`` or ``[N]``. ``old_logprobs``,
    ``ref_logprobs``, ``entropy`` take the logprobs' shape; ``is_ratio`` (the sampler's importance-sampling
    correction) that shape or one per sequence, ``[S]`` or ``[S, 1]`` (TRL's sequence modes): it scales
    each token's loss, and vespo counts a per-sequence ratio once in its sequence weight. ``per_sequence``
    (True / False) says whether ``advantages`` and ``is_ratio`` hold a value per sequence or per token; None
    tells by shape, which a packed batch with as many tokens as sequences (some empty) cannot, and then raises.

    ``old_logprobs=None`` is on-policy (ratio 1, gradient still flows). ``epsilon_low`` defaults
    to 0.2 and ``epsilon_high`` to ``epsilon_low`` for the clipped types; cispo needs ``epsilon_high``
    (a raw cap, e.g. 5.0); sapo's temperatures default to 1.0 (A > 0) and 1.05 (A < 0).
    ``use_bias_correction_kl`` (TRL's default, True) multiplies the per-token KL by the importance
    ratio, which makes its gradient the unbiased reverse-KL gradient off-policy (DeepSeek-V3.2).
    An option that does not apply to ``loss_type`` raises rather than being ignored. ``options``: the
    fields of ``LossOptions``, each declared there once with its default.
    """
    _checks.floating("logprobs", logprobs)
    opts = loss_options("policy_loss", options)
    acc = accumulation_dtype(logprobs.dtype)  # fp64 in, fp64 math (tests)
    t = _prepare(logprobs, advantages, mask, old_logprobs, ref_logprobs, cu_seqlens, is_ratio, acc, opts,
                 sampling_logprobs, per_sequence)
    return _loss_from_terms(t, logprobs, entropy)


def _loss_from_terms(t: _Terms, logprobs: Tensor, entropy: Optional[Tensor]) -> GRPOLossOutput:
    """policy_loss after validation: the per-token loss, its normalisation and the metrics."""
    layout, m, acc = t.layout, t.m, t.m.dtype
    logp = logprobs.reshape(-1).to(acc)
    ent = layout.per_token("entropy", entropy)
    ent = None if ent is None else ent.to(acc)
    old = logp.detach() if t.old is None else t.old

    log_ratio = logp - old
    weight_of = LOSS_TYPES[t.options["loss_type"]].sequence_weight
    if weight_of is not None:
        t.seq_weight = weight_of(t, log_ratio)
    if t.options["importance_sampling_level"] == "sequence":
        seq_log_ratio = layout.seq_sum(log_ratio * m) / t.tokens_per_seq.clamp(min=1.0)
        log_ratio = seq_log_ratio[layout.seq_ids]
    keep, bonus_mask = _keep_and_bonus_mask(t, logp, ent)
    per_token, ratio, low, high, kl = _per_token_loss(t, logp, log_ratio, keep)

    unit, denominator = _normalisation(t)
    policy = (per_token * unit).sum() / denominator
    loss = policy - _entropy_bonus(t, ent, bonus_mask) if t.options["entropy_coef"] > 0 else policy

    metrics = _metrics(t, ratio, low, high, kl, ent, policy)
    return GRPOLossOutput(loss, logprobs.detach().to(acc), metrics, None if entropy is None else entropy.detach(),
                          denominator)


@torch.no_grad()
def _metrics(t: _Terms, ratio, low, high, kl, ent, policy) -> dict:
    """Masked token means (0-d tensors, no host sync), as TRL logs them: with a sequence-level ratio
    (GSPO), the clip fractions are means over the batch's sequences. Also TRL's per-sequence extremes
    of the clip fractions (``clip_ratio_low_min``, ``clip_ratio_high_max``: over the sequences with a
    token, or every sequence at sequence level; NaN when none), ``ratio_min`` / ``ratio_max`` over the
    unmasked tokens (NaN when none), ``policy_loss`` (the loss before the
    entropy bonus) and, for a loss type with a per-sequence weight (vespo's phi), its mean over the
    sequences (an empty one's weight is phi(w = 1) = 1)."""
    m = t.m
    denom = m.sum().clamp(min=1.0)
    sequence_level = t.options["importance_sampling_level"] == "sequence"

    def mean(x):
        return (x.float() * m).sum() / denom

    def per_seq(x):
        return t.layout.seq_sum(x.to(m.dtype) * m) / t.tokens_per_seq.clamp(min=1.0)

    def clip_mean(x, x_per_seq=None):
        if not sequence_level:
            return mean(x)
        return (per_seq(x) if x_per_seq is None else x_per_seq).sum().float() / max(t.layout.num_seqs, 1)

    def extreme(values, counted, reduce):
        """min or max of ``values`` where ``counted``; NaN where none is (never a sentinel such as 3.4e38).
        No boolean indexing, which would make shapes depend on the data under compile."""
        if not values.numel():
            return values.new_full((), float("nan"))
        empty = float("inf") if reduce is torch.min else -float("inf")
        return torch.where(counted.any(), reduce(torch.where(counted, values, empty)), float("nan"))

    # per-sequence clip extremes over the sequences with a token (every sequence at sequence level)
    seq_counted = torch.ones_like(t.tokens_per_seq, dtype=torch.bool) if sequence_level else t.tokens_per_seq > 0
    low_per_seq, high_per_seq = per_seq(low), per_seq(high)
    metrics = dict(
        clip_ratio_low=clip_mean(low, low_per_seq), clip_ratio_high=clip_mean(high, high_per_seq),
        clip_ratio_region=clip_mean(low | high),
        clip_ratio_low_min=extreme(low_per_seq.float(), seq_counted, torch.min),
        clip_ratio_high_max=extreme(high_per_seq.float(), seq_counted, torch.max),
        ratio_mean=mean(ratio),
        ratio_min=extreme(ratio, m > 0, torch.min), ratio_max=extreme(ratio, m > 0, torch.max),
        policy_loss=policy.detach().float(),
    )
    if kl is not None:
        metrics["kl_mean"] = mean(kl)
    if ent is not None:
        metrics["entropy_mean"] = mean(ent)
    if t.seq_weight is not None:
        weights = torch.where(t.tokens_per_seq > 0, per_seq(t.seq_weight), torch.ones_like(t.tokens_per_seq))
        metrics["sequence_weight_mean"] = weights.sum().float() / max(t.layout.num_seqs, 1)
    return metrics


def _mask_from_targets(targets: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Tokens with target -100 are masked too, whatever ``mask`` says (which must have targets' shape:
    a broadcast would silently mask other tokens, or fail with torch's message)."""
    valid = targets != constants.IGNORE_INDEX
    if mask is None:
        return valid
    if _checks.tensor("mask", mask).shape != targets.shape:
        raise ValueError(f"mask must have the targets' shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
    return mask.to(torch.bool) & valid


def grpo_loss(logits: Tensor, targets: Tensor, advantages: Tensor, mask: Optional[Tensor] = None, *,
              temperature: float = 1.0, **options) -> GRPOLossOutput:
    """``policy_loss`` on ``token_logprobs(logits, targets, temperature)``; ``options`` as policy_loss.

    ``logits [B, T, V]`` / ``targets [B, T]`` (padded) or ``[N, V]`` / ``[N]`` with ``cu_seqlens``.
    Entropy is computed alongside (free in the same pass) for ``entropy_mean`` and ``entropy_coef``.
    """
    if "entropy" in options:
        raise ValueError("grpo_loss computes the entropy itself; do not pass entropy")
    logp, ent = token_logprobs(logits, targets, temperature, return_entropy=True)
    if not options.get("entropy_coef"):
        ent = ent.detach()
    return policy_loss(logp, advantages, _mask_from_targets(targets, mask), entropy=ent, **options)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor,
                     mask: Optional[Tensor] = None, *, bias: Optional[Tensor] = None, temperature: float = 1.0,
                     deterministic: Optional[bool] = None, **options) -> GRPOLossOutput:
    """``policy_loss`` on ``linear_token_logprobs(hidden, weight, targets, bias)``: the [tokens, V]
    logits never exist, forward or backward. ``options`` as policy_loss.

    When gradients are needed and the loss is token-level (``importance_sampling_level="token"``:
    each token's d loss / d logp and d loss / d entropy depend on its own values and on normalisers
    known before the pass), the gradients are computed in the forward, chunk by chunk, by autograd
    over policy_loss's own per-token code: three GEMM-equivalents, no recomputed logits, and
    ``loss.backward()`` only scales the stored d hidden / d weight / d bias. Their memory (the size
    of the gradients themselves) is held from the forward on. The cases of ``TWO_PASS_ROUTES`` (GSPO,
    batch-wide masks, vespo, the fully fused kernel, compiled graphs, autocast, no gradient) take the
    two-pass route: log-probs forward, policy_loss, then the recomputing backward.
    """
    if "entropy" in options:
        raise ValueError("linear_grpo_loss computes the entropy itself; do not pass entropy")
    token_mask = _mask_from_targets(targets, mask)
    inputs = {k: v for k, v in options.items() if k in _INPUT_ARGUMENTS}
    opts = loss_options("linear_grpo_loss", {k: v for k, v in options.items() if k not in _INPUT_ARGUMENTS})
    if _two_pass_reason(hidden, weight, bias, opts) is None:
        out = _linear_grpo_loss_one_pass(hidden, weight, bias, targets, advantages, token_mask, temperature,
                                         deterministic, inputs, opts)
        if out is not None:
            return out
    logp, ent = linear_token_logprobs(hidden, weight, targets, bias, temperature, return_entropy=True,
                                      deterministic=deterministic)
    if not options.get("entropy_coef"):
        ent = ent.detach()
    return policy_loss(logp, advantages, token_mask, entropy=ent, **options)


# Why linear_grpo_loss takes the two-pass route (log-probs forward, policy_loss, then the recomputing
# backward) rather than computing the gradients in the forward. The first five are read from the
# options (_two_pass_reason), the last three from the fused lm_head (logprobs.one_pass_blocker).
# docs/ops.md lists them, written by scripts/generate_docs.py; tests/test_docs.py checks it.
TWO_PASS_ROUTES = {
    "no_grad": "no gradient is asked for (`torch.no_grad`, or no input requires grad)",
    "sequence_level": "GSPO, `importance_sampling_level=\"sequence\"` (the ratio is a sequence mean)",
    "off_policy_mask": "`off_policy_mask_threshold` (the mask is a sequence's mean KL)",
    "top_entropy_quantile": "`top_entropy_quantile < 1` (the threshold is a quantile over the batch)",
    "whole_sequence": "a loss type whose token loss depends on its whole sequence (vespo)",
    "fused_tile": "the fully fused Triton kernel (`triton_tile`, or `deterministic=True` on `triton`), "
                  "which needs every row's statistics before any d logits",
    "compiled": "a `torch.compile` graph",
    "autocast": "`torch.autocast`",
}


def _two_pass_reason(hidden, weight, bias, opts: LossOptions) -> Optional[str]:
    """The TWO_PASS_ROUTES key read from the inputs and the options, or None: the one-pass route is
    tried (the fused lm_head may still decline)."""
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))):
        return "no_grad"
    return opts.two_pass_reason()


def _linear_grpo_loss_one_pass(hidden, weight, bias, targets, advantages, token_mask, temperature, deterministic,
                               inputs: dict, opts: LossOptions) -> Optional[GRPOLossOutput]:
    """The one-pass route of linear_grpo_loss (None where it does not apply); ``inputs``: its
    policy_loss input arguments (old_logprobs, ..., per_sequence)."""
    acc = accumulation_dtype(hidden.dtype)
    t = _prepare(targets, advantages, token_mask, inputs.get("old_logprobs"), inputs.get("ref_logprobs"),
                 inputs.get("cu_seqlens"), inputs.get("is_ratio"), acc, opts, inputs.get("sampling_logprobs"),
                 inputs.get("per_sequence"))
    unit, denominator = _normalisation(t)
    weights = unit / denominator
    bonus_weights = t.m / t.m.sum().clamp(min=1.0)      # the entropy bonus: a token mean (no entropy mask here)
    entropy_grad = t.options["entropy_coef"] > 0

    def token_grads(rows, logp, entropy):
        with torch.enable_grad():
            logp = logp.detach().to(acc).requires_grad_()
            entropy = entropy.detach().to(acc).requires_grad_(entropy_grad)
            old = logp.detach() if t.old is None else t.old[rows]
            objective = (_per_token_loss(t, logp, logp - old, rows=rows)[0] * weights[rows]).sum()
            if entropy_grad:
                objective = objective - t.options["entropy_coef"] * (entropy * bonus_weights[rows]).sum()
            inputs = (logp, entropy) if entropy_grad else (logp,)
            grads = torch.autograd.grad(objective, inputs)
        return grads[0], (grads[1] if entropy_grad else None)

    done = linear_token_logprobs_one_pass(hidden, weight, targets, bias, temperature, token_grads, deterministic)
    if done is None:
        return None
    logp, entropy, grads = done
    with torch.no_grad():   # the loss value and the metrics, from the same per-token code
        out = _loss_from_terms(t, logp.view(targets.shape), entropy.view(targets.shape))
    loss = _LossWithGradients.apply(out.loss, hidden, weight, bias, *grads)
    return dataclasses.replace(out, loss=loss)


# policy_loss's tensor keyword arguments, which linear_grpo_loss passes through with the options
# policy_loss's keyword arguments that are not LossOptions: the inputs and how to read them
_INPUT_ARGUMENTS = ("old_logprobs", "ref_logprobs", "cu_seqlens", "is_ratio", "sampling_logprobs", "per_sequence")


def check_options(**options) -> None:
    """Raise as ``policy_loss`` would on these keyword options (every one but the tensors), before any
    work: a trainer checks its config with it. ``beta > 0`` is taken to come with ref_logprobs."""
    loss_options("check_options", options).validate(has_ref=True)


class _LossWithGradients(torch.autograd.Function):
    """A loss value whose gradients with respect to (hidden, weight, bias) were computed in the
    forward: backward scales them by the incoming gradient, in place (a copy would double the
    memory of d weight), so it may run once."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        ctx.hidden_shape = hidden.shape
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("linear_grpo_loss: backward ran twice through a loss whose gradients were "
                               "computed in the forward; compute the loss again for a second backward")
        grads, ctx.grads = ctx.grads, None
        if grad_output.device.type == "cpu" and bool(grad_output == 1):
            scaled = grads      # loss.backward(): nothing to scale (reading the value is free on CPU only)
        else:
            scaled = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads]
        if scaled[0] is not None:
            scaled[0] = scaled[0].view(ctx.hidden_shape)
        return (None, *scaled, None, None, None)


class GRPOLoss(torch.nn.Module):
    """``grpo_loss`` with its options held: ``GRPOLoss(loss_type="dapo", beta=0.04)(logits, targets, adv, mask)``."""

    def __init__(self, temperature: float = 1.0, **options):
        super().__init__()
        self.temperature, self.options = temperature, options

    def forward(self, logits, targets, advantages, mask=None, **per_call) -> GRPOLossOutput:
        return grpo_loss(logits, targets, advantages, mask, temperature=self.temperature,
                         **{**self.options, **per_call})


class LinearGRPOLoss(torch.nn.Module):
    """``linear_grpo_loss`` with its options held; call with (hidden, weight, targets, advantages, mask)."""

    def __init__(self, temperature: float = 1.0, **options):
        super().__init__()
        self.temperature, self.options = temperature, options

    def forward(self, hidden, weight, targets, advantages, mask=None, bias=None, **per_call) -> GRPOLossOutput:
        return linear_grpo_loss(hidden, weight, targets, advantages, mask, bias=bias, temperature=self.temperature,
                                **{**self.options, **per_call})
