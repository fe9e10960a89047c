"""r1kernels' varlen attention as a transformers attention implementation named "r1kernels".

    import r1kernels.integrations.transformers as r1k_hf
    r1k_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="r1kernels")   # or
    model.set_attn_implementation("r1kernels")

Any Llama / Qwen2 / Qwen3-style causal LM then runs packed batches with no cross-sequence
attention: ``input_ids [1, N]`` with ``position_ids`` restarting at 0 per sequence, or with
explicit ``cu_seq_lens_q/k`` and ``max_length_q/k`` (transformers'
``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` convention), which are used as
given, so no layer has to derive them from ``position_ids`` (a host sync). Padded batches with a
2-D attention mask are unpadded per call. The mask function registered with it is
transformers' flash-attention one (a 2-D padding mask or None), without which transformers
would drop padding masks for an unknown implementation.
"""
from __future__ import annotations

import torch

from r1kernels.attention import varlen_attention

NAME = "r1kernels"


def _cu_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _cu_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence starts are where positions restart at their minimum (one host sync)."""
    flat = position_ids.reshape(-1)
    starts = (flat == flat.min()).nonzero().view(-1).to(torch.int32)
    return torch.cat([starts, torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)])


def r1kernels_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                        softcap=None, is_causal=None, **kwargs):
    """transformers AttentionInterface: query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] -> ([B, Sq, Hq, D], None)."""
    if dropout:
        raise NotImplementedError(f"attention dropout {dropout} is not supported by r1kernels")
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    q = query.transpose(1, 2)                         # [B, Sq, Hq, D]
    k, v = key.transpose(1, 2), value.transpose(1, 2)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)
    options = dict(softmax_scale=scaling, causal=causal, window_size=window, softcap=softcap or 0.0)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    if cu_q is None and batch == 1 and position_ids is not None and q_len == k_len and q_len > 1:
        cu_q = _cu_from_position_ids(position_ids)
    if cu_q is not None:                              # packed: one row holding several sequences
        cu_q = cu_q.to(torch.int32)
        cu_k = cu_q if cu_k is None else cu_k.to(torch.int32)
        max_q = kwargs.get("max_length_q")
        max_k = kwargs.get("max_length_k")
        max_q = int((cu_q[1:] - cu_q[:-1]).max()) if max_q is None else max_q
        max_k = int((cu_k[1:] - cu_k[:-1]).max()) if max_k is None else max_k
        out = varlen_attention(q.reshape(-1, heads, head_dim), k.reshape(-1, k.shape[2], head_dim),
                               v.reshape(-1, v.shape[2], head_dim), cu_q, cu_k, max_q, max_k, **options)
        return out.view(batch, q_len, heads, head_dim), None

    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        key_mask = attention_mask[:, -k_len:].bool()
        query_mask = key_mask[:, -q_len:] if q_len == k_len else torch.ones(batch, q_len, dtype=torch.bool,
                                                                             device=q.device)
        q_rows, k_rows = query_mask.reshape(-1).nonzero().view(-1), key_mask.reshape(-1).nonzero().view(-1)
        lens_q, lens_k = query_mask.sum(1), key_mask.sum(1)
        out = varlen_attention(q.reshape(-1, heads, head_dim)[q_rows], k.reshape(-1, k.shape[2], head_dim)[k_rows],
                               v.reshape(-1, v.shape[2], head_dim)[k_rows], _cu_from_lengths(lens_q),
                               _cu_from_lengths(lens_k), int(lens_q.max()), int(lens_k.max()), **options)
        full = out.new_zeros(batch * q_len, heads, head_dim).index_copy(0, q_rows, out)
        return full.view(batch, q_len, heads, head_dim), None

    # dense batch: B sequences of equal length (bottom-right causal also covers cached decoding)
    cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (batch + 1) * k_len, k_len, dtype=torch.int32, device=q.device)
    out = varlen_attention(q.reshape(-1, heads, head_dim), k.reshape(-1, k.shape[2], head_dim),
                           v.reshape(-1, v.shape[2], head_dim), cu_q, cu_k, q_len, k_len, **options)
    return out.view(batch, q_len, heads, head_dim), None


def register(name: str = NAME) -> str:
    """Register the attention function and its mask function with transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, r1kernels_attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
