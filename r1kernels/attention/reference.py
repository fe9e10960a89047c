"""Spec of varlen attention (flash-attn's flash_attn_varlen_func semantics), one sequence at a time.

For sequence s with Lq queries and Lk keys, query i sits at key position i + (Lk - Lq)
(bottom-right alignment). Key j is visible when j <= i + Lk - Lq (causal), and within the
window: i + Lk - Lq - left <= j <= i + Lk - Lq + right (-1 = unbounded). Scores are
q.k * softmax_scale, then softcap * tanh(score / softcap) when softcap > 0. With ``sinks [Hq]``
(GPT-OSS's attention sinks) each head's softmax gets one more logit, sinks[h], in its denominator
only: it attends to no value. A query that sees no key outputs 0; its log-sum-exp is +inf as in
flash-attn 2 (so that the backward's exp(score - lse) is 0), or the sink's logit when there is one.
Hq must be a multiple of Hkv (GQA/MQA).

Non-finite inputs: a NaN (or inf) reaches exactly the softmaxes that include it. One in q_i makes
query i's scores NaN; one in k_j or anywhere in v_j makes key j's scores NaN for the queries that
see it. Those queries' outputs and lse are NaN, every other query's are finite, and gradients
follow the same dependencies: an invisible pair contributes exactly 0, never 0 * NaN.
"""
from __future__ import annotations

import math

import torch


def visible_keys(q_len: int, k_len: int, causal: bool, window_size, device) -> torch.Tensor:
    """[q_len, k_len] bool: which keys each query may attend to."""
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if right >= 0:
        allowed &= j <= i + right
    if left >= 0:
        allowed &= j >= i - left
    return allowed


class _FiniteOrZero(torch.autograd.Function):
    """x with its non-finite entries as 0, for products whose NaNs are put back where they belong
    (as NaN scores); the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(torch.isfinite(x), x, 0.0)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _nan_where(condition, dtype):
    """NaN where ``condition``, else 0, in ``dtype``: added, so that gradients pass through unchanged."""
    return torch.where(condition, math.nan, 0.0).to(dtype)


def empty_output(q, k, v, dtype):
    """The output of no queries, [0, Hq, D], connected to q, k and v so that backward gives each its
    (zero) gradient: a scalar times 0 broadcast onto no elements, so a NaN in k or v shows nowhere."""
    return q.to(dtype) + (k.sum() + v.sum()).to(dtype) * 0


def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                         window_size=(-1, -1), softcap=0.0, dtype=torch.float64, sinks=None):
    """(out [total_q, Hq, D] in ``dtype``, lse [Hq, total_q] in ``dtype``). Differentiable by autograd,
    also with respect to ``sinks``."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    outs, lses = [], []
    for s in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        k0, k1 = int(cu_seqlens_k[s]), int(cu_seqlens_k[s + 1])
        qs = q[q0:q1].to(dtype).transpose(0, 1)                                   # [Hq, Lq, D]
        ks = k[k0:k1].to(dtype).transpose(0, 1).repeat_interleave(hq // hkv, 0)  # [Hq, Lk, D]
        vs = v[k0:k1].to(dtype).transpose(0, 1).repeat_interleave(hq // hkv, 0)
        scores = _FiniteOrZero.apply(qs) @ _FiniteOrZero.apply(ks).transpose(1, 2) * scale
        bad_q = (~torch.isfinite(qs)).any(-1)
        bad_k = (~torch.isfinite(ks)).any(-1) | (~torch.isfinite(vs)).any(-1)       # a key with its value
        scores = scores + _nan_where(bad_q[:, :, None] | bad_k[:, None, :], dtype)
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        allowed = visible_keys(q1 - q0, k1 - k0, causal, window_size, q.device)
        scores = scores.masked_fill(~allowed, -math.inf)
        with_sinks = scores if sinks is None else torch.cat(
            [scores, sinks.to(dtype)[:, None, None].expand(-1, q1 - q0, 1)], -1)
        lse = torch.logsumexp(with_sinks, -1)                                     # [Hq, Lq]
        probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None]).masked_fill(~allowed, 0.0)
        outs.append((probs @ _FiniteOrZero.apply(vs)).transpose(0, 1))
        lses.append(torch.where(lse == -math.inf, math.inf, lse))
    out = torch.cat(outs, 0) if outs else empty_output(q, k, v, dtype)
    lse = torch.cat(lses, 1) if lses else q.new_zeros(hq, 0, dtype=dtype)
    return out, lse
