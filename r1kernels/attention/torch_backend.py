"""The ``torch`` backend of varlen attention: SDPA per sequence, or the float32 reference math (CPU
training; the contract ``attend`` of ``r1kernels.attention``)."""
from __future__ import annotations

import torch

from r1kernels._tensors import accumulation_dtype
from r1kernels.attention.reference import empty_output, varlen_attention_ref


def _sdpa_per_sequence(q, k, v, bounds_q, bounds_k, scale, causal):
    """One SDPA call per sequence (equal q and k lengths when causal, no window, no softcap, no sinks).
    Queries split by cu_q, keys and values by cu_k; a query with no key gives 0. ``split``, not one
    slice per sequence: the backward of S slices writes S zero-filled [total, H, D] gradients (quadratic
    in the sequences: 0.08 s of a 0.16 s layer at 64 rollouts on CPU), a split's backward one."""
    sizes_q = [b - a for a, b in zip(bounds_q[:-1], bounds_q[1:])]
    sizes_k = [b - a for a, b in zip(bounds_k[:-1], bounds_k[1:])]
    outs = []
    for q_s, k_s, v_s in zip(q.split(sizes_q), k.split(sizes_k), v.split(sizes_k)):
        if q_s.shape[0] == 0:
            continue
        if k_s.shape[0] == 0:
            outs.append(q.new_zeros(q_s.shape))
            continue
        # [1, H, T, D]: on CPU only 4-d inputs reach SDPA's flash kernel (3-d ones take the math path,
        # which materialises the [T, T] scores: 1.4x slower at 64-512 tokens)
        out = torch.nn.functional.scaled_dot_product_attention(
            q_s.transpose(0, 1)[None], k_s.transpose(0, 1)[None], v_s.transpose(0, 1)[None], is_causal=causal,
            scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out[0].transpose(0, 1))
    if not outs:
        return empty_output(q, k, v, q.dtype)
    return torch.cat(outs)


def attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window_size, softcap, sinks, deterministic, need_lse):
    """(out, lse or None); every path is deterministic. SDPA per sequence where its semantics are exactly ours, else the
    float32 reference math (bottom-right causal with unequal lengths, windows, softcap, sinks, lse,
    and non-finite inputs, whose NaNs SDPA spreads through masked scores to every query). Both read
    the offsets on the host (this backend loops over sequences in Python)."""
    plain = (not need_lse and softcap == 0 and window_size == (-1, -1) and sinks is None and q.dtype != torch.float64
             and all(bool(torch.isfinite(x).all()) for x in (q, k, v)))
    if plain:
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        if not causal or bounds_q == bounds_k:
            return _sdpa_per_sequence(q, k, v, bounds_q, bounds_k, scale, causal), None
    compute = accumulation_dtype(q.dtype)
    out, lse = varlen_attention_ref(q, k, v, cu_q, cu_k, scale, causal, window_size, softcap, dtype=compute,
                                    sinks=sinks)
    return out.to(q.dtype), lse.float()
