"""Triton row kernels over materialised logits (the row-kernel contract of ``r1kernels.logprobs``).

One program per row, streaming the row in BLOCK_V tiles: forward reads the logits once,
backward reads them once and writes d logits once (into the logits' own storage when asked).
The grid is 1-D over rows (axis 0 holds 2^31 - 1 programs) and offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1kernels import constants

from r1kernels.logprobs.triton_softmax import NEG_INF, logit_grad, merge_stats, tile_stats

IGNORE_INDEX = tl.constexpr(constants.IGNORE_INDEX)


@triton.jit
def _r1k_logprobs_forward(logits_ptr, row_stride, targets_ptr, logp_ptr, entropy_ptr, max_ptr, log_sum_ptr,
                    vocab, inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    row_max = tl.full([1], NEG_INF, tl.float32)
    row_sum = tl.zeros([1], tl.float32)
    row_tilted = tl.zeros([1], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols[None, :], mask=cols[None, :] < vocab, other=NEG_INF).to(tl.float32)
        z = z * inv_temperature
        tile_max, tile_sum, tile_tilted = tile_stats(z)
        row_max, row_sum, row_tilted = merge_stats(row_max, row_sum, row_tilted, tile_max, tile_sum, tile_tilted)
    target = tl.load(targets_ptr + row + tl.arange(0, 1)).to(tl.int64)
    valid = target != IGNORE_INDEX
    z_target = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32) * inv_temperature
    log_sum = tl.log(row_sum)
    out = row + tl.arange(0, 1)
    tl.store(logp_ptr + out, tl.where(valid, (z_target - row_max) - log_sum, 0.0))
    tl.store(entropy_ptr + out, tl.where(valid, log_sum - row_tilted / row_sum, 0.0))
    tl.store(max_ptr + out, row_max)
    tl.store(log_sum_ptr + out, log_sum)


@triton.jit
def _r1k_logprobs_backward(logits_ptr, row_stride, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr, grad_logp_ptr,
                     grad_entropy_ptr, out_ptr, out_row_stride, vocab, inv_temperature, HAS_GRAD_ENTROPY: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    one = row + tl.arange(0, 1)
    target = tl.load(targets_ptr + one).to(tl.int64)
    valid = target != IGNORE_INDEX
    grad_logp = tl.where(valid, tl.load(grad_logp_ptr + one), 0.0)
    grad_entropy = tl.zeros([1], tl.float32)
    if HAS_GRAD_ENTROPY:
        grad_entropy = tl.where(valid, tl.load(grad_entropy_ptr + one), 0.0)
    row_max = tl.load(max_ptr + one)
    log_sum = tl.load(log_sum_ptr + one)
    entropy = tl.load(entropy_ptr + one)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols[None, :] < vocab
        z = tl.load(logits_ptr + row * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dz = logit_grad(z * inv_temperature - row_max[:, None], log_sum, entropy, cols[None, :] == target[:, None],
                        grad_logp, grad_entropy)
        tl.store(out_ptr + row * out_row_stride + cols[None, :], (dz * inv_temperature).to(out_ptr.dtype.element_ty),
                 mask=mask)


def _block_v(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), 4096)


def forward(logits, targets, inv_temperature):
    rows, vocab = logits.shape
    logp, entropy, row_max, row_log_sum = (torch.empty(rows, dtype=torch.float32, device=logits.device)
                                           for _ in range(4))
    if rows:
        _r1k_logprobs_forward[(rows,)](logits, logits.stride(0), targets.contiguous(), logp, entropy, row_max,
                                       row_log_sum, vocab, inv_temperature, BLOCK_V=_block_v(vocab), num_warps=8)
    return logp, entropy, row_max, row_log_sum


def backward(logits, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy, inv_temperature, out):
    rows, vocab = logits.shape
    if rows:
        grad_logp = grad_logp.float().contiguous()
        has_grad_entropy = grad_entropy is not None
        grad_entropy = grad_entropy.float().contiguous() if has_grad_entropy else grad_logp
        _r1k_logprobs_backward[(rows,)](logits, logits.stride(0), targets.contiguous(), row_max, row_log_sum, entropy,
                                        grad_logp, grad_entropy, out, out.stride(0), vocab, inv_temperature,
                                        HAS_GRAD_ENTROPY=has_grad_entropy, BLOCK_V=_block_v(vocab), num_warps=8)
    return out
