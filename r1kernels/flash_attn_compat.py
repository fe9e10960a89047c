"""Drop-in for ``flash_attn.flash_attn_varlen_func`` with flash-attn's exact signature, on r1kernels."""
from __future__ import annotations

from r1kernels.attention import varlen_attention


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Returns ``out``, or ``(out, softmax_lse, None)`` with ``return_attn_probs`` (no S_dmask is kept)."""
    if dropout_p:
        raise NotImplementedError(f"dropout_p > 0 is not supported by r1kernels (got {dropout_p})")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not supported by r1kernels")
    if block_table is not None:
        raise NotImplementedError("block_table (paged KV cache) is not supported by r1kernels")
    result = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                              deterministic=deterministic, return_lse=return_attn_probs)
    if return_attn_probs:
        out, lse = result
        return out, lse, None
    return result
