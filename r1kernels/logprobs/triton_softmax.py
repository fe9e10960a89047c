"""@triton.jit helpers shared by every vocabulary kernel: the same statistics as
csrc/include/r1k/softmax_stats.h, on tiles of shape [rows, cols] reduced along cols.

Per row we carry, relative to the running max m: s = sum exp(z - m) and
t = sum exp(z - m) (z - m); then log p = (z - m) - log s and H = log s - t / s.
"""
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def tile_stats(z):
    """(max, sum, tilted) of each row of a [R, C] fp32 tile; -inf entries contribute nothing."""
    tile_max = tl.max(z, axis=1)
    shift = tl.where(tile_max > NEG_INF, tile_max, 0.0)
    d = z - shift[:, None]
    e = tl.exp(d)
    tile_sum = tl.sum(e, axis=1)
    tile_tilted = tl.sum(e * tl.where(e > 0, d, 0.0), axis=1)  # 0 * -inf would be NaN
    return tile_max, tile_sum, tile_tilted


@triton.jit
def merge_stats(max_a, sum_a, tilted_a, max_b, sum_b, tilted_b):
    """Statistics of the union of two disjoint sets of elements (empty sets have sum 0)."""
    new_max = tl.maximum(max_a, max_b)
    shift_a = tl.where(sum_a > 0, max_a - new_max, 0.0)
    shift_b = tl.where(sum_b > 0, max_b - new_max, 0.0)
    scale_a = tl.where(sum_a > 0, tl.exp(shift_a), 0.0)
    scale_b = tl.where(sum_b > 0, tl.exp(shift_b), 0.0)
    new_sum = scale_a * sum_a + scale_b * sum_b
    new_tilted = scale_a * (tilted_a + shift_a * sum_a) + scale_b * (tilted_b + shift_b * sum_b)
    return new_max, new_sum, new_tilted


@triton.jit
def logit_grad(z_minus_max, row_log_sum, entropy, is_target, grad_logp, grad_entropy):
    """d(g_logp logp + g_ent H)/dz on a [R, C] tile: g_logp (1[v=t] - p) - g_ent p (log p + H)."""
    log_p = z_minus_max - row_log_sum[:, None]
    p = tl.exp(log_p)
    dz = tl.where(is_target, grad_logp[:, None], 0.0) - grad_logp[:, None] * p
    return dz - grad_entropy[:, None] * p * (tl.where(p > 0, log_p, 0.0) + entropy[:, None])
