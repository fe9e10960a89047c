"""Packed-sequence (varlen) attention with flash-attn's calling convention, and packing helpers.

``varlen_attention(q [total_q, Hq, D], k, v [total_k, Hkv, D], cu_seqlens_q, cu_seqlens_k, ...)``
computes, for each sequence s separately, softmax(q k^T * scale, masked) v with the semantics of
``flash_attn_varlen_func`` (see ``r1kernels.reference.attention``): bottom-right causal alignment,
inclusive sliding window, softcap, zeros for queries that see no key, GQA/MQA by head groups.
Backends: ``triton`` (FA2 forward and backward), ``torch`` (the float32 reference math, one
sequence at a time; CPU training), ``flash_attn`` (when installed and asked for).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from r1kernels import _checks, backends
from r1kernels.backends import Backend

# The op's backends, in auto's order; each module has ``attend(q, k, v, cu_q, cu_k, max_q, max_k, scale,
# causal, window, softcap, sinks, deterministic, need_lse) -> (out, lse or None)`` on checked arguments.
# flash_attn runs only when asked for: ours is the default.
BACKENDS = {
    "triton": Backend(f"{__name__}.triton_backend"),
    "flash_attn": Backend(f"{__name__}.flash_attn_backend", auto=False),
    "torch": Backend(f"{__name__}.torch_backend", float64=True),
}


def _as_int(name: str, value) -> int:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be an int or a 0-d tensor, got shape {tuple(value.shape)}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or a 0-d tensor, got {type(value).__name__}")
    return value


def _validate_tensors(q, k, v, softcap, window_size, sinks):
    """Checks that read no tensor values (no host sync)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.floating(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name} must be [total, heads, head_dim], got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must share a device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[2]
    if k.shape[2] != head_dim:
        raise ValueError(f"q and k head dims differ: {head_dim} and {k.shape[2]}")
    if not 1 <= head_dim <= 256:
        raise ValueError(f"unsupported head_dim {head_dim}: expected 1 to 256 (other sizes are padded internally)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"Hq = {q.shape[1]} must be a multiple of Hkv = {k.shape[1]}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < math.inf:
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap!r}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"window_size must be (left, right) with -1 for unbounded, got {window_size}")
    if sinks is not None:
        _checks.floating("sinks", sinks)
        if sinks.shape != (q.shape[1],):
            raise ValueError(f"sinks must be [Hq] = [{q.shape[1]}], got shape {tuple(sinks.shape)}")
        if sinks.device != q.device:
            raise ValueError(f"sinks must be on the device of q ({q.device}), got {sinks.device}")


def _validate_offsets(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q, total_k, device):
    """cu_seqlens and max lengths: on the host for CPU tensors or with R1K_CHECKS=1, else one
    device-side assert per offsets tensor (see ``_checks.host_checks``)."""
    max_q, max_k = _as_int("max_seqlen_q", max_seqlen_q), _as_int("max_seqlen_k", max_seqlen_k)
    for name, cu, total, max_len, max_name in (("cu_seqlens_q", cu_seqlens_q, total_q, max_q, "max_seqlen_q"),
                                              ("cu_seqlens_k", cu_seqlens_k, total_k, max_k, "max_seqlen_k")):
        _checks.tensor(name, cu)
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (flash-attn convention), got {cu.dtype}")
        if cu.device != device:
            raise ValueError(f"{name} must be on the device of q ({device}), got {cu.device}")
        _checks.cu_seqlens(name, cu, total, max_len, max_name)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [S+1], got {tuple(cu_seqlens_q.shape)} "
                         f"and {tuple(cu_seqlens_k.shape)}")
    return max_q, max_k


def attend(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float,
           causal: bool, window: tuple[int, int], softcap: float, sinks: Optional[Tensor] = None,
           deterministic: bool = False, need_lse: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``varlen_attention`` on arguments already checked (offsets included), with the scale and
    window resolved: the per-layer entry of integrations that validate a micro-batch's offsets once."""
    backend = backends.resolve("attention", q.device)
    _checks.backend_dtype("attention", backend, "q", q)
    return backends.kernels("attention", backend).attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window,
                                                        softcap, sinks, deterministic, need_lse)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q,
                     max_seqlen_k, *, softmax_scale: Optional[float] = None, causal: bool = False,
                     window_size=(-1, -1), softcap: float = 0.0, sinks: Optional[Tensor] = None,
                     deterministic: bool = False, return_lse: bool = False):
    """Attention within each packed sequence; returns ``out [total_q, Hq, D]`` (and fp32 ``lse [Hq, total_q]``,
    not differentiable; +inf for a query that sees no key and has no sink, as in flash-attn 2).

    ``sinks [Hq]`` (optional, differentiable): GPT-OSS's attention sinks, one extra logit per head
    in each softmax denominator. ``deterministic`` (flash-attn's switch, off by default as there):
    the Triton backward adds dQ atomically in one 6-GEMM kernel unless it is set, and then runs a dK/dV
    kernel and a dQ kernel that each write every output once (8 GEMMs; also the path for softcap at
    head dim 128 and for head dim 256, where the one kernel does not fit); the torch backend always is.
    """
    _validate_tensors(q, k, v, softcap, window_size, sinks)
    max_q, max_k = _validate_offsets(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0], k.shape[0],
                                     q.device)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    window = (int(window_size[0]), int(window_size[1]))
    out, lse = attend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, bool(causal), window, float(softcap),
                      sinks, deterministic, need_lse=return_lse)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------ packing


@dataclasses.dataclass
class Packed:
    input_ids: Tensor      # [N]
    position_ids: Tensor   # [N], restarting at 0 in each sequence
    cu_seqlens: Tensor     # [S+1] int32
    max_seqlen: int


def pack(sequences: Sequence[Tensor]) -> Packed:
    """Concatenate 1-D token sequences into one row, with position ids and cu_seqlens."""
    if not sequences:
        raise ValueError("pack needs at least one sequence")
    for i, s in enumerate(sequences):
        _checks.tensor(f"sequences[{i}]", s)
        if s.dim() != 1:
            raise ValueError(f"sequences[{i}] must be 1-D, got shape {tuple(s.shape)}")
        if s.dtype != sequences[0].dtype or s.device != sequences[0].device:
            raise TypeError(f"sequences[{i}] is {s.dtype} on {s.device}, sequences[0] {sequences[0].dtype} on "
                            f"{sequences[0].device}: every sequence must share them")
    lengths = [int(s.shape[0]) for s in sequences]
    device = sequences[0].device
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor(lengths, device=device).cumsum(0)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    return Packed(torch.cat(list(sequences)), positions, cu, max(lengths))


def unpack(packed_values: Tensor, cu_seqlens: Tensor) -> list[Tensor]:
    """Split a packed [N, ...] tensor back into its sequences."""
    _checks.tensor("packed_values", packed_values)
    _checks.tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D int32/int64 [S+1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()                 # unpack reads the offsets on the host anyway
    total = packed_values.shape[0] if packed_values.dim() else 0
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at packed_values.shape[0] = "
                         f"{total}, got {bounds[:8]}{'...' if len(bounds) > 8 else ''}")
    return [packed_values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, num_ranks: int = 1) -> list[list[list[int]]]:
    """Split sequences into micro-batches of at most ``max_tokens`` tokens, balanced over ranks.

    First-fit decreasing: sequences sorted longest first go to the rank with the fewest tokens,
    then, within each rank, into the first micro-batch with room (a new one when none has).
    Returns ``plan[rank][micro_batch] = [sequence indices]``. Balance: the rank loads differ by
    at most the longest sequence (greedy longest-first, the LPT bound: the heaviest rank carries at
    most 4/3 of the optimum); each rank uses at most 11/9 OPT + 6/9 micro-batches (FFD's bound).
    Every rank gets at least one micro-batch (possibly empty) so that ranks step together.
    """
    for name, value in (("max_tokens", max_tokens), ("num_ranks", num_ranks)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    bad = [i for i, n in enumerate(lengths) if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0]
    if bad:
        raise ValueError(f"lengths must be ints >= 0; lengths[{bad[0]}] = {lengths[bad[0]]!r}")
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        raise ValueError(f"sequences {too_long[:5]} are longer than max_tokens={max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rank_tokens = [0] * num_ranks
    rank_seqs: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in order:
        rank = min(range(num_ranks), key=lambda r: rank_tokens[r])
        rank_tokens[rank] += lengths[i]
        rank_seqs[rank].append(i)
    plan = []
    for seqs in rank_seqs:
        bins: list[list[int]] = []
        loads: list[int] = []
        for i in seqs:
            for b, load in enumerate(loads):
                if load + lengths[i] <= max_tokens:
                    bins[b].append(i)
                    loads[b] += lengths[i]
                    break
            else:
                bins.append([i])
                loads.append(lengths[i])
        plan.append(bins or [[]])
    return plan
