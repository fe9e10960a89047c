"""r1kernels' varlen attention as a transformers attention implementation named "r1kernels".

    import r1kernels.integrations.transformers as r1k_hf
    r1k_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="r1kernels")   # or
    model.set_attn_implementation("r1kernels")

Which tokens attend to which, decided in this order (the first that applies):

1. A 2-D padding mask (transformers hands one over only when there is padding, or when a static
   cache holds more key slots than the mask covers): the unpadded tokens of each row form one
   sequence, queries being the last ``q_len`` positions of the mask; a static cache's keys past
   the mask are never read. The mask wins over ``position_ids``, which the model derives itself.
2. ``cu_seq_lens_q/k`` (and ``max_length_q/k``), as transformers'
   ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives them: used as given.
3. ``position_ids`` [B, L] with ``q_len == k_len > 1``: a new sequence starts at each row start
   and wherever a position is not its predecessor's plus one, in every row (several packed rows
   work, unlike transformers' flash-attention path, which only unpacks batch 1).
4. ``position_ids`` [B, L] whose last position + 1 is less than the key length: a static cache, whose
   slots past the queries' last position are not filled yet (transformers hands over no mask when
   there is no padding): each row's keys are its first ``last + 1`` slots, causal bottom-right.
5. Otherwise B dense rows, causal bottom-right (which also covers decoding with a dynamic cache).

The layout is derived once per forward: it is cached on the tensor it comes from (the mask, the
position ids or the offsets, which are the same object in every layer), so a forward costs at most
one device-to-host copy, and validating the offsets happens there too; each layer then calls the
kernels with no host sync. GPT-OSS's attention sinks (``s_aux``) are supported. The mask function
registered with it is transformers' flash-attention one (a 2-D padding mask or None), without
which transformers would drop padding masks for an unknown implementation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from r1kernels import _checks
from r1kernels.attention import _validate_offsets, _validate_tensors, attend

NAME = "r1kernels"


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each sequence of a batch lies, in the flattened [B * length] rows."""
    cu_q: Tensor                          # [S+1] int32, on the device
    cu_k: Tensor
    max_q: int
    max_k: int
    q_rows: Optional[Tensor] = None       # indices of the queries that take part (None: every row, in order)
    k_rows: Optional[Tensor] = None
    k_slots: Optional[int] = None         # key slots per row in use (a static cache has more; None: all)


_LAYOUTS = WeakTensorKeyDictionary()      # source tensor -> {(version, shape key): _Layout}


def _cached(source: Tensor, key: tuple, build) -> _Layout:
    """``build()`` once per (source tensor, key): the layers of one forward share their layout."""
    if torch.compiler.is_compiling():
        return build()
    per_source = _LAYOUTS.setdefault(source, {})
    key = (source._version, *key)
    if key not in per_source:
        per_source[key] = build()
    return per_source[key]


def _to_host(tensor: Tensor) -> Tensor:
    """The forward's one device-to-host copy (a sync on an accelerator)."""
    return tensor.to("cpu", copy=True)


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Host to device without waiting on the device (pinned memory, asynchronous copy on CUDA)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _cu_from_lengths(lengths: Tensor) -> Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0).to(torch.int32), (1, 0))


def _longest(cu: Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def _dense(batch: int, q_len: int, k_len: int, device) -> _Layout:
    cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=device)
    cu_k = torch.arange(0, (batch + 1) * k_len, k_len, dtype=torch.int32, device=device)
    return _Layout(cu_q, cu_k, q_len, k_len)


def _from_mask(mask: Tensor, batch: int, q_len: int, k_len: int) -> _Layout:
    if mask.dim() != 2 or mask.shape[0] != batch:
        raise NotImplementedError(f"r1kernels attention takes a 2-D padding mask [batch={batch}, keys]; got shape "
                                  f"{tuple(mask.shape)} (register() installs the mask function that builds it)")
    keys = _to_host(mask).bool()[:, -k_len:]          # a static cache: only the slots the mask covers
    slots = keys.shape[1]
    if slots < q_len:
        raise ValueError(f"attention_mask covers {slots} keys, fewer than the {q_len} queries")
    queries = keys[:, -q_len:]
    lens_q, lens_k = queries.sum(1), keys.sum(1)
    device = mask.device
    q_rows = None if bool(queries.all()) else _to_device(queries.reshape(-1).nonzero().view(-1), device)
    k_rows = None if bool(keys.all()) else _to_device(keys.reshape(-1).nonzero().view(-1), device)
    return _Layout(_to_device(_cu_from_lengths(lens_q), device), _to_device(_cu_from_lengths(lens_k), device),
                   int(lens_q.max()), int(lens_k.max()), q_rows, k_rows, slots)


def _from_positions(position_ids: Tensor, batch: int, length: int) -> _Layout:
    positions = _to_host(position_ids).expand(batch, length)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    cu = torch.cat([starts.reshape(-1).nonzero().view(-1), torch.tensor([batch * length])]).to(torch.int32)
    longest = _longest(cu)
    cu = _to_device(cu, position_ids.device)
    return _Layout(cu, cu, longest, longest)


def _from_filled(position_ids: Tensor, batch: int, q_len: int, k_len: int) -> _Layout:
    """Rows whose keys are the first ``last position + 1`` of ``k_len`` cache slots (a static cache)."""
    filled = (_to_host(position_ids[:, -1]).expand(batch).to(torch.int64) + 1).clamp(min=q_len, max=k_len)
    if bool((filled == k_len).all()):
        return _dense(batch, q_len, k_len, position_ids.device)
    slots = int(filled.max())
    device = position_ids.device
    k_rows = None
    if not bool((filled == slots).all()):
        used = torch.arange(slots)[None, :] < filled[:, None]
        k_rows = _to_device(used.reshape(-1).nonzero().view(-1), device)
    cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=device)
    return _Layout(cu_q, _to_device(_cu_from_lengths(filled), device), q_len, slots, None, k_rows, slots)


def _from_offsets(cu_q: Tensor, cu_k: Tensor, max_q, max_k, total_q: int, total_k: int) -> _Layout:
    """Offsets as given. Validated once: on one host copy when the max lengths must be derived or
    host checks are on (see ``_checks.host_checks``), else by device-side asserts (no sync)."""
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    if max_q is not None and max_k is not None and not _checks.host_checks(cu_q.device):
        max_q, max_k = _validate_offsets(cu_q, cu_k, max_q, max_k, total_q, total_k, cu_q.device)
        return _Layout(cu_q, cu_k, max_q, max_k)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seq_lens_q and cu_seq_lens_k must both be [S+1], got {tuple(cu_q.shape)} and "
                         f"{tuple(cu_k.shape)}")
    host_q, host_k = _to_host(torch.stack([cu_q, cu_k])).unbind()
    max_q = _longest(host_q) if max_q is None else max_q
    max_k = _longest(host_k) if max_k is None else max_k
    max_q, max_k = _validate_offsets(host_q, host_k, max_q, max_k, total_q, total_k, host_q.device)
    return _Layout(cu_q, cu_k, max_q, max_k)


def _layout(batch: int, q_len: int, k_len: int, attention_mask, kwargs, device) -> _Layout:
    if attention_mask is not None:
        return _cached(attention_mask, (batch, q_len, k_len),
                       lambda: _from_mask(attention_mask, batch, q_len, k_len))
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k
        return _cached(cu_q, (batch, q_len, k_len), lambda: _from_offsets(
            cu_q, cu_k, kwargs.get("max_length_q"), kwargs.get("max_length_k"), batch * q_len, batch * k_len))
    position_ids = kwargs.get("position_ids")
    usable = (position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == q_len
              and position_ids.shape[0] in (1, batch))
    if usable and q_len == k_len > 1:
        return _cached(position_ids, (batch, q_len), lambda: _from_positions(position_ids, batch, q_len))
    if usable and k_len > q_len:
        return _cached(position_ids, ("filled", batch, q_len, k_len),
                       lambda: _from_filled(position_ids, batch, q_len, k_len))
    return _dense(batch, q_len, k_len, device)


def r1kernels_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                        softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers AttentionInterface: query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] -> ([B, Sq, Hq, D], None).
    ``s_aux [Hq]``: attention sinks (GPT-OSS)."""
    if dropout:
        raise NotImplementedError(f"attention dropout {dropout} is not supported by r1kernels")
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    layout = _layout(batch, q_len, k_len, attention_mask, kwargs, query.device)
    slots = k_len if layout.k_slots is None else layout.k_slots
    q = query.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
    k = key[:, :, :slots].transpose(1, 2).reshape(batch * slots, kv_heads, head_dim)
    v = value[:, :, :slots].transpose(1, 2).reshape(batch * slots, kv_heads, head_dim)
    if layout.q_rows is not None:
        q = q.index_select(0, layout.q_rows)
    if layout.k_rows is not None:
        k, v = k.index_select(0, layout.k_rows), v.index_select(0, layout.k_rows)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)
    softcap = float(softcap or 0.0)
    _validate_tensors(q, k, v, softcap, window, s_aux)
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(head_dim)
    out, _ = attend(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, scale, bool(causal), window,
                    softcap, sinks=s_aux)
    if layout.q_rows is not None:
        out = out.new_zeros(batch * q_len, heads, head_dim).index_copy(0, layout.q_rows, out)
    return out.view(batch, q_len, heads, head_dim), None


def register(name: str = NAME) -> str:
    """Register the attention function and its mask function with transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, r1kernels_attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
