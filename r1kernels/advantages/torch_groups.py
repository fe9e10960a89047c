"""The ``torch`` backend of group advantage normalisation: the torch copy of the group statistics.

Contract of ``group_normalize(rewards [B, R], weights [R], *, group_size, offsets, perm,
leave_one_out, scale, eps, batch_denominator)`` (keyword-only after the tensors): groups are
contiguous runs of ``group_size`` rows, or (``offsets`` given) the segments
``perm[offsets[g]:offsets[g+1]]``. Each row's reward is the weighted sum of its R rewards (NaNs
skipped, NaN if all are), in float64 unless there is one unweighted column (``combine_rewards``),
and shifted by its group's minimum before it is narrowed to the accumulation dtype, so that an
offset the columns share (1e4 + 1e-2 in fp32) costs no precision. Per group, with min-shifted
two-pass statistics: adv = (r - mean) *
factor / denom, 0 for NaN rewards and for groups with fewer than two valid or all-equal rewards
(factor n/(n-1) for RLOO; denom std + eps, ``batch_denominator`` / GROUP_RESCALE, or 1), computed
on the rewards times GROUP_RESCALE where the group's half range exceeds GROUP_RESCALE_ABOVE
(r1kernels/constants.py). Returns (adv [B], mean [G], std [G], constant [G]).

``group_normalize_by_id(rewards, weights, group_ids [B], *, leave_one_out, scale, eps,
batch_denominator, with_stats)`` is the same for arbitrary integer ids, with each row's group
statistics: (adv [B], mean [B], std [B], constant [B], is_first [B]), the last four empty
without ``with_stats``; ``is_first`` marks each group's first row. The Triton backend does it in
one launch (``triton_by_id``), the ``cpu`` backend in one C++ call (``cpp_groups``); ``torch`` and
``cuda`` sort the ids into segments first.
"""
from __future__ import annotations

from typing import Optional

import torch

from r1kernels.constants import GROUP_RESCALE, GROUP_RESCALE_ABOVE
from r1kernels._tensors import accumulation_dtype


def combine_rewards(rewards: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Weighted sum over the R rewards of each row (weights None: all ones), failed rewards (NaN, +-inf)
    skipped; NaN where all R failed or the sum overflows the accumulation dtype. One unweighted column
    stays in the accumulation dtype; otherwise the sum is float64 (an fp32 reward times an fp32 weight
    is exact there)."""
    acc = accumulation_dtype(rewards.dtype)
    if rewards.shape[1] == 1 and weights is None:
        return torch.where(torch.isfinite(rewards[:, 0]), rewards[:, 0].to(acc), torch.nan)
    x = rewards.double()
    ok = torch.isfinite(x)
    total = torch.where(ok, x if weights is None else x * weights.double(), 0.0).sum(1)
    fits = torch.isfinite(total.to(acc))
    return torch.where(ok.any(1) & fits, total, torch.nan)     # an overflowed sum fails too


def group_normalize(rewards, weights, *, group_size=0, offsets=None, perm=None, leave_one_out, scale, eps,
                    batch_denominator=None):
    r = combine_rewards(rewards, weights)
    acc = accumulation_dtype(rewards.dtype)
    batch = r.shape[0]
    if offsets is None:
        groups = batch // group_size
        group_of_row = torch.arange(batch, device=r.device) // group_size
    else:
        groups = offsets.numel() - 1
        group_of_row = torch.empty(batch, dtype=torch.long, device=r.device)
        group_of_row[perm] = torch.repeat_interleave(torch.arange(groups, device=r.device), offsets.diff(),
                                                     output_size=batch)
    ok = ~torch.isnan(r)
    zeros = r.new_zeros(groups, dtype=acc)
    count = zeros.index_add(0, group_of_row, ok.to(acc))
    lo = r.new_full((groups,), torch.inf).scatter_reduce(0, group_of_row, torch.where(ok, r, torch.inf), "amin")
    hi = r.new_full((groups,), -torch.inf).scatter_reduce(0, group_of_row, torch.where(ok, r, -torch.inf), "amax")
    half_range = hi * 0.5 - lo * 0.5                           # never overflows
    unit = torch.where(half_range > GROUP_RESCALE_ABOVE, GROUP_RESCALE, 1.0).to(acc)
    lo_scaled = lo * unit
    shifted = (r * unit[group_of_row] - lo_scaled[group_of_row]).to(acc)
    shifted_mean = zeros.index_add(0, group_of_row, torch.where(ok, shifted, 0.0)) / count.clamp(min=1)
    deviation = shifted - shifted_mean[group_of_row]
    m2 = zeros.index_add(0, group_of_row, torch.where(ok, deviation * deviation, 0.0))
    std_scaled = torch.where(count > 1, (m2 / (count - 1).clamp(min=1)).sqrt(), 0.0)
    constant = (count <= 1) | (hi == lo)
    factor = torch.where(count > 1, count / (count - 1).clamp(min=1), 1.0) if leave_one_out else torch.ones_like(m2)
    if scale == "group":
        factor = factor / (std_scaled + eps * unit)
    elif scale == "batch":
        factor = factor / (batch_denominator.to(acc) * (unit / GROUP_RESCALE))
    else:
        factor = factor / unit
    adv = torch.where(ok & ~constant[group_of_row], deviation * factor[group_of_row], 0.0)
    mean = torch.where(count > 0, (lo_scaled + shifted_mean) / unit, torch.nan).to(acc)
    std = std_scaled / unit
    return adv, mean, std, constant


def batch_denominator(rewards: torch.Tensor, weights: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """std (Bessel) over the whole batch of the rows' combined rewards (``combine_rewards``, NaN left
    out), plus eps, times GROUP_RESCALE (as every kernel takes it: finite for any fp32 rewards):
    ``group_normalize``'s statistics of one group of B rows, in float64, as a 0-d tensor in the
    accumulation dtype (no host sync)."""
    values = combine_rewards(rewards, weights)
    std = group_normalize(values.double()[:, None], None, group_size=values.shape[0], leave_one_out=False,
                          scale="none", eps=0.0)[2]
    return ((std[0] + eps) * GROUP_RESCALE).to(accumulation_dtype(rewards.dtype))


def group_normalize_by_id(rewards, weights, group_ids, *, leave_one_out, scale, eps, batch_denominator, with_stats,
                          segment_kernel=None):
    """``group_normalize_by_id`` through a stable sort into segments and ``segment_kernel`` (a backend's
    ``group_normalize``, by default this module's)."""
    segment_kernel = segment_kernel or group_normalize
    batch = rewards.shape[0]
    sorted_ids, perm = torch.sort(group_ids, stable=True)
    _, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    adv, mean, std, constant = segment_kernel(rewards, weights, offsets=offsets, perm=perm, leave_one_out=leave_one_out,
                                              scale=scale, eps=eps, batch_denominator=batch_denominator)
    if not with_stats:
        return adv, adv.new_empty(0), adv.new_empty(0), *(adv.new_empty(0, dtype=torch.bool) for _ in range(2))
    group_of_row = torch.empty(batch, dtype=torch.long, device=rewards.device)
    group_of_row[perm] = torch.repeat_interleave(torch.arange(counts.numel(), device=rewards.device), counts,
                                                 output_size=batch)
    is_first = torch.zeros(batch, dtype=torch.bool, device=rewards.device)
    is_first[perm[offsets[:-1]]] = True          # the stable sort keeps each group's first row first
    return adv, mean[group_of_row], std[group_of_row], constant[group_of_row], is_first
