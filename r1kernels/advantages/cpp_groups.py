"""The ``cpu`` and ``cuda`` backends of group advantage normalisation: the compiled extension
(csrc/*/group_advantages*, through csrc/include/r1k/group_stats.h), with the contract of
``torch_groups``. Weights go in as float64 (R numbers; several or weighted columns are combined in
double). The CUDA kernel reads fp32 rewards and has no id hashing: on CUDA the ids are sorted into
segments by torch first."""
from __future__ import annotations

import torch

import r1kernels._C  # noqa: F401  (registers torch.ops.r1k_C)
from r1kernels.constants import SCALE_CODES
from r1kernels._tensors import accumulation_dtype
from r1kernels.advantages import torch_groups


def _explicit_inputs(rewards, weights, batch_denominator):
    """What the C++ ops take: fp32 rewards on CUDA, float64 weights (or None), a denominator of 1 when
    not given."""
    if rewards.is_cuda:
        rewards = rewards.float()
    if weights is not None:
        weights = weights.to(torch.float64).contiguous()
    if batch_denominator is None:
        batch_denominator = torch.ones((), dtype=accumulation_dtype(rewards.dtype), device=rewards.device)
    return rewards, weights, batch_denominator


def group_normalize(rewards, weights, *, group_size=0, offsets=None, perm=None, leave_one_out, scale, eps,
                    batch_denominator=None):
    """Contiguous groups or sorted segments, on the tensors' device."""
    rewards, weights, batch_denominator = _explicit_inputs(rewards, weights, batch_denominator)
    empty = torch.empty(0, dtype=torch.long, device=rewards.device)
    return torch.ops.r1k_C.group_advantages(rewards, weights, group_size or 0,
                                            empty if offsets is None else offsets,
                                            empty if perm is None else perm, int(leave_one_out),
                                            SCALE_CODES[scale], eps, batch_denominator)


def group_normalize_by_id(rewards, weights, group_ids, *, leave_one_out, scale, eps, batch_denominator, with_stats):
    """On CPU, ids hashed into groups and normalised in one C++ call; on CUDA, torch's segments."""
    if rewards.is_cuda:
        return torch_groups.group_normalize_by_id(rewards, weights, group_ids, leave_one_out=leave_one_out, scale=scale,
                                                  eps=eps, batch_denominator=batch_denominator, with_stats=with_stats,
                                                  segment_kernel=group_normalize)
    rewards, weights, batch_denominator = _explicit_inputs(rewards, weights, batch_denominator)
    return torch.ops.r1k_C.group_advantages_by_id(rewards, weights, group_ids, int(leave_one_out),
                                                  SCALE_CODES[scale], eps, batch_denominator, with_stats)
