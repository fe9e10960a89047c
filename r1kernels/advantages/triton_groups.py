"""Triton group advantage normalisation for contiguous groups: the whole batch in one launch.

Each program owns GROUPS_PER_PROGRAM groups as the rows of a [groups, BLOCK] tile and sweeps
their rewards four times (count/min/max, shifted sum, shifted squared deviations, write), the
same passes as csrc/include/r1k/group_stats.h, finished by group_stats.finish_group. Small groups fit
one tile, so after the first pass the sweeps hit L1/L2 and HBM sees one read of the rewards and one
write of the advantages.
Groups longer than LARGE_GROUP rows (few groups, so few programs here) and arbitrary group ids go
to the persistent kernel of ``triton_by_id``, which spreads any group over every SM. This module is
the triton backend of the op (the contract of ``torch_groups``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1kernels.constants import SCALE_CODES
from r1kernels._tensors import accumulation_dtype
from r1kernels.advantages import triton_by_id
from r1kernels.advantages.triton_group_stats import (INF, combined_rewards, finish_group, group_unit, shifted_reward,
                                                     wide_dtype)

LARGE_GROUP = 4096


@triton.jit
def _reward_chunk(rewards_ptr, row_stride, weights_ptr, start, length, c0, NUM_REWARDS: tl.constexpr,
                  HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr):
    """Combined rewards of members c0..c0+BLOCK of each group (NaN past the group's end), their rows, the mask."""
    j = c0 + tl.arange(0, BLOCK)
    in_group = j[None, :] < length[:, None]
    rows = start[:, None] + j[None, :]
    x = combined_rewards(rewards_ptr, rows, in_group, row_stride, weights_ptr, NUM_REWARDS, HAS_WEIGHTS, ACC, WIDE)
    return x, rows, in_group


@triton.jit
def _r1k_advantages_grouped(rewards_ptr, row_stride, weights_ptr, batch_denominator_ptr,
                             adv_ptr, mean_ptr, std_ptr, constant_ptr, num_groups, group_size, eps,
                             NUM_REWARDS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, LEAVE_ONE_OUT: tl.constexpr,
                             SCALE: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr,
                             ACC: tl.constexpr, WIDE: tl.constexpr):
    groups = tl.program_id(0).to(tl.int64) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    group_mask = groups < num_groups
    start = groups * group_size
    length = tl.where(group_mask, group_size, 0).to(tl.int64)
    count = tl.zeros([GROUPS_PER_PROGRAM], ACC)
    lo = tl.full([GROUPS_PER_PROGRAM], INF, WIDE)
    hi = tl.full([GROUPS_PER_PROGRAM], -INF, WIDE)
    for c0 in range(0, group_size, BLOCK):                       # pass 1: count, min, max
        x, rows, in_group = _reward_chunk(rewards_ptr, row_stride, weights_ptr, start, length, c0,
                                          NUM_REWARDS, HAS_WEIGHTS, BLOCK, ACC, WIDE)
        ok = x == x
        count += tl.sum(ok.to(ACC), axis=1)
        lo = tl.minimum(lo, tl.min(tl.where(ok, x, INF), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(ok, x, -INF), axis=1))
    unit = group_unit(lo, hi, ACC)
    lo_scaled = lo * unit
    shifted_sum = tl.zeros([GROUPS_PER_PROGRAM], ACC)
    for c0 in range(0, group_size, BLOCK):                       # pass 2: sum of (r - min) * unit
        x, rows, in_group = _reward_chunk(rewards_ptr, row_stride, weights_ptr, start, length, c0,
                                          NUM_REWARDS, HAS_WEIGHTS, BLOCK, ACC, WIDE)
        shifted_sum += tl.sum(tl.where(x == x, shifted_reward(x, unit[:, None], lo_scaled[:, None], ACC), 0.0), axis=1)
    shifted_mean = tl.where(count > 0, shifted_sum / tl.maximum(count, 1.0), 0.0)
    m2 = tl.zeros([GROUPS_PER_PROGRAM], ACC)
    for c0 in range(0, group_size, BLOCK):                       # pass 3: squared deviations
        x, rows, in_group = _reward_chunk(rewards_ptr, row_stride, weights_ptr, start, length, c0,
                                          NUM_REWARDS, HAS_WEIGHTS, BLOCK, ACC, WIDE)
        d = shifted_reward(x, unit[:, None], lo_scaled[:, None], ACC) - shifted_mean[:, None]
        m2 += tl.sum(tl.where(x == x, d * d, 0.0), axis=1)
    mean, std, constant, factor = finish_group(count, lo, hi, unit, shifted_mean, m2, eps, batch_denominator_ptr,
                                               LEAVE_ONE_OUT, SCALE)
    for c0 in range(0, group_size, BLOCK):                       # pass 4: advantages
        x, rows, in_group = _reward_chunk(rewards_ptr, row_stride, weights_ptr, start, length, c0,
                                          NUM_REWARDS, HAS_WEIGHTS, BLOCK, ACC, WIDE)
        adv = (shifted_reward(x, unit[:, None], lo_scaled[:, None], ACC) - shifted_mean[:, None]) * factor[:, None]
        use = (x == x) & ~constant[:, None]
        tl.store(adv_ptr + rows, tl.where(use, adv, 0.0), mask=in_group)
    tl.store(mean_ptr + groups, mean, mask=group_mask)
    tl.store(std_ptr + groups, std, mask=group_mask)
    tl.store(constant_ptr + groups, constant, mask=group_mask)


group_normalize_by_id = triton_by_id.group_normalize_by_id


def group_normalize(rewards, weights, *, group_size, leave_one_out, scale, eps, batch_denominator=None):
    """Contiguous groups of ``group_size`` rows; see ``torch_groups.group_normalize`` for the contract
    (``weights`` may be None: all ones)."""
    if group_size > LARGE_GROUP:
        # few long groups would be few programs of the tile kernel: the persistent kernel spreads
        # each group over every SM (its slot of a row is row // group_size, no hashing)
        adv, mean, std, constant, _ = triton_by_id.group_normalize_by_id(
            rewards, weights, None, leave_one_out=leave_one_out, scale=scale, eps=eps,
            batch_denominator=batch_denominator, with_stats=True, group_size=group_size)
        return adv, mean, std, constant
    batch, num_rewards = rewards.shape
    acc = accumulation_dtype(rewards.dtype)
    groups = batch // group_size
    device = rewards.device
    adv = torch.empty(batch, dtype=acc, device=device)
    mean, std = torch.empty(groups, dtype=acc, device=device), torch.empty(groups, dtype=acc, device=device)
    constant = torch.empty(groups, dtype=torch.bool, device=device)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    block = min(triton.next_power_of_2(group_size), 1024)
    per_program = max(1, min(2048 // block, triton.next_power_of_2(groups)))
    _r1k_advantages_grouped[(triton.cdiv(groups, per_program),)](
        rewards, rewards.stride(0), weights if weights is not None else adv,
        batch_denominator if batch_denominator is not None else adv, adv, mean, std, constant, groups,
        group_size, eps, NUM_REWARDS=num_rewards, HAS_WEIGHTS=weights is not None, LEAVE_ONE_OUT=leave_one_out,
        SCALE=SCALE_CODES[scale], GROUPS_PER_PROGRAM=per_program, BLOCK=block,
        ACC=acc_tl, WIDE=wide_dtype(acc_tl, num_rewards, weights is not None))
    return adv, mean, std, constant
