"""The group-statistics math of the Triton advantage kernels, written once for both of them.

The tile kernel (advantages.py) and the persistent kernel (advantages_by_id.py) gather a group's
sums differently, but both combine each row's rewards and finish a group the same way, the way
csrc/include/r1k/group_stats.h does for C++ and r1kernels/kernels/torch_advantages.py for torch:
with n valid rewards, min ``lo``, max ``hi``, shifted mean m' = mean(r - lo) and
m2 = sum((r - lo) - m')^2,

    mean = lo + m'                     (NaN when n = 0)
    std  = sqrt(m2 / (n - 1))          (0 when n < 2; Bessel-corrected, as torch.std)
    constant = n < 2 or hi == lo       (the group's advantages are exactly 0)
    factor = n / (n - 1) for RLOO, else 1; divided by std + eps (scale "group"), by the batch
             denominator (scale "batch") or by 1 (scale "none")

and a valid row's advantage is ((r - lo) - m') * factor.
"""
from __future__ import annotations

import triton
import triton.language as tl

from r1kernels import constants

SCALE_GROUP = tl.constexpr(constants.SCALE_GROUP)
SCALE_BATCH = tl.constexpr(constants.SCALE_BATCH)
INF = tl.constexpr(float("inf"))


@triton.jit
def combined_rewards(rewards_ptr, rows, mask, row_stride, weights_ptr, NUM_REWARDS: tl.constexpr,
                     HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr):
    """Weighted sum of each row's R rewards (weights 1 without HAS_WEIGHTS), failed rewards (NaN,
    +-inf) skipped; NaN where all failed or are masked."""
    total = tl.zeros(rows.shape, ACC)
    seen = mask & False
    for k in tl.static_range(NUM_REWARDS):
        x = tl.load(rewards_ptr + rows * row_stride + k, mask=mask, other=float("nan")).to(ACC)
        ok = tl.abs(x) < INF
        if HAS_WEIGHTS:
            x = tl.load(weights_ptr + k).to(ACC) * x
        total += tl.where(ok, x, 0.0)
        seen = seen | ok
    return tl.where(seen, total, float("nan"))


@triton.jit
def finish_group(count, lo, hi, shifted_mean, m2, eps, batch_denominator_ptr, LEAVE_ONE_OUT: tl.constexpr,
                 SCALE: tl.constexpr):
    """(mean, std, constant, factor) of groups from their count, min, max, shifted mean and m2
    (all in the accumulation dtype; the module docstring has the math)."""
    one = tl.full(count.shape, 1.0, shifted_mean.dtype)
    n = count.to(shifted_mean.dtype)
    mean = tl.where(count > 0, lo + shifted_mean, float("nan"))
    std = tl.where(count > 1, tl.sqrt(m2 / tl.maximum(n - 1, one)), 0.0)
    constant = (count <= 1) | (hi == lo)
    factor = one
    if LEAVE_ONE_OUT:
        factor = tl.where(count > 1, n / tl.maximum(n - 1, one), one)
    if SCALE == SCALE_GROUP:
        factor = factor / (std + eps)
    elif SCALE == SCALE_BATCH:
        factor = factor / tl.load(batch_denominator_ptr).to(shifted_mean.dtype)
    return mean, std, constant, factor
