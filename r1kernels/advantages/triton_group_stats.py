"""The group-statistics math of the Triton advantage kernels, written once for both of them.

The tile kernel (triton_groups.py) and the persistent kernel (triton_by_id.py) gather a group's
sums differently, but both combine each row's rewards and finish a group the same way, the way
csrc/include/r1k/group_stats.h does for C++ and torch_groups.py for torch:
with n valid rewards, min ``lo``, max ``hi``, the group's ``unit`` (``group_unit``: 1, or
GROUP_RESCALE where the half range exceeds GROUP_RESCALE_ABOVE, so that squares cannot overflow),
scaled shifted rewards s = (r - lo) * unit, their mean m' and m2 = sum (s - m')^2,

    mean = (lo * unit + m') / unit     (NaN when n = 0)
    std  = sqrt(m2 / (n - 1)) / unit   (0 when n < 2; Bessel-corrected, as torch.std)
    constant = n < 2 or hi == lo       (the group's advantages are exactly 0)
    factor = n / (n - 1) for RLOO, else 1; divided, in the unit, by std + eps (scale "group"), by the
             batch denominator (scale "batch"; it arrives times GROUP_RESCALE) or by 1 (scale "none")

and a valid row's advantage is (s - m') * factor. The rows' rewards r, lo and hi are in WIDE: the
accumulation dtype for one unweighted column, float64 when several or weighted columns are combined
(``wide_dtype``), so that s is formed before the shared offset is rounded away (1e4 + 1e-2 in fp32).
"""
from __future__ import annotations

import triton
import triton.language as tl

from r1kernels import constants

SCALE_GROUP = tl.constexpr(constants.SCALE_GROUP)
SCALE_BATCH = tl.constexpr(constants.SCALE_BATCH)
RESCALE_ABOVE = tl.constexpr(constants.GROUP_RESCALE_ABOVE)
RESCALE = tl.constexpr(constants.GROUP_RESCALE)
INF = tl.constexpr(float("inf"))


def wide_dtype(acc: tl.dtype, num_rewards: int, has_weights: bool) -> tl.dtype:
    """The dtype rows' combined rewards are formed in: float64 for several or weighted columns (an fp32
    reward times an fp32 weight is exact there), else the accumulation dtype."""
    return tl.float64 if num_rewards > 1 or has_weights else acc


@triton.jit
def combined_rewards(rewards_ptr, rows, mask, row_stride, weights_ptr, NUM_REWARDS: tl.constexpr,
                     HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr):
    """Weighted sum of each row's R rewards in WIDE (weights 1 without HAS_WEIGHTS), failed rewards
    (NaN, +-inf) skipped; NaN where all failed or are masked, or the sum overflows ACC."""
    total = tl.zeros(rows.shape, WIDE)
    seen = mask & False
    for k in tl.static_range(NUM_REWARDS):
        x = tl.load(rewards_ptr + rows * row_stride + k, mask=mask, other=float("nan")).to(WIDE)
        ok = tl.abs(x) < INF
        if HAS_WEIGHTS:
            x = tl.load(weights_ptr + k).to(WIDE) * x
        total += tl.where(ok, x, 0.0)
        seen = seen | ok
    fits = tl.abs(total.to(ACC)) < INF
    return tl.where(seen & fits, total, float("nan"))       # an overflowed sum fails too


@triton.jit
def group_unit(lo, hi, ACC: tl.constexpr):
    """Each group's unit (see the module docstring) from its min and max: the half range never overflows."""
    return tl.where(hi * 0.5 - lo * 0.5 > RESCALE_ABOVE, RESCALE, 1.0).to(ACC)


@triton.jit
def shifted_reward(x, unit, lo_scaled, ACC: tl.constexpr):
    """s = (r - lo) * unit, formed in r's dtype (WIDE) and narrowed to ACC."""
    return (x * unit - lo_scaled).to(ACC)


@triton.jit
def finish_group(count, lo, hi, unit, shifted_mean, m2, eps, batch_denominator_ptr, LEAVE_ONE_OUT: tl.constexpr,
                 SCALE: tl.constexpr):
    """(mean, std, constant, factor) of groups from their count, min, max (WIDE), unit, and the scaled
    shifted mean and m2 (in the accumulation dtype; the module docstring has the math)."""
    one = tl.full(count.shape, 1.0, shifted_mean.dtype)
    n = count.to(shifted_mean.dtype)
    mean = tl.where(count > 0, (lo * unit + shifted_mean) / unit, float("nan")).to(shifted_mean.dtype)
    std_scaled = tl.where(count > 1, tl.sqrt(m2 / tl.maximum(n - 1, one)), 0.0)
    constant = (count <= 1) | (hi == lo)
    factor = one
    if LEAVE_ONE_OUT:
        factor = tl.where(count > 1, n / tl.maximum(n - 1, one), one)
    if SCALE == SCALE_GROUP:
        factor = factor / (std_scaled + eps * unit)
    elif SCALE == SCALE_BATCH:
        factor = factor / (tl.load(batch_denominator_ptr).to(shifted_mean.dtype) * (unit / RESCALE))
    else:
        factor = factor / unit
    return mean, std_scaled / unit, constant, factor
