"""The ``flash_attn`` backend of varlen attention: flash-attn 2's own kernel, when installed and asked for
(the contract ``attend`` of ``r1kernels.attention``)."""
from __future__ import annotations


def attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, sinks, deterministic, need_lse):
    if sinks is not None:
        raise NotImplementedError("sinks: flash-attn 2 has no attention sinks; use the triton or torch backend")
    from flash_attn import flash_attn_varlen_func
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
                                         window_size=window, softcap=softcap, deterministic=deterministic,
                                         return_attn_probs=True)
    return out, lse
