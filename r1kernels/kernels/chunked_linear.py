"""Fused lm_head + log-prob on any row kernel, a block of tokens at a time.

Used by the ``torch``, ``cpu`` and ``cuda`` backends (Triton has its own tiled kernel).
Only one [block, vocab] logits buffer is alive at once, in forward and in backward
(where it is recomputed and then overwritten in place by d logits), so memory stays
O(block * vocab) instead of O(tokens * vocab). Matmuls go to torch (MKL / cuBLAS).
"""
from __future__ import annotations

import torch

from r1kernels.kernels import accumulation_dtype

# Size of one block's logits buffer; a quarter of the [N, V] fp32 logits at the
# acceptance shape (N=4096, V=32768) is 128 MiB, so 16 MiB leaves ample room.
BLOCK_BYTES = 16 << 20


def _token_blocks(tokens: int, vocab: int, element_size: int):
    step = max(1, BLOCK_BYTES // (element_size * max(vocab, 1)))
    for start in range(0, tokens, step):
        yield slice(start, min(tokens, start + step))


def _logits_block(hidden, weight, bias, block):
    if bias is None:
        return hidden[block] @ weight.T
    return torch.addmm(bias, hidden[block], weight.T)


def forward(rows, hidden, weight, bias, targets, inv_temperature):
    """(logp, entropy, row_max, row_log_sum) per token; ``rows`` is a backend's row-kernel module."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    outputs = tuple(hidden.new_empty(tokens, dtype=accumulation_dtype(hidden.dtype)) for _ in range(4))
    for block in _token_blocks(tokens, vocab, hidden.element_size()):
        block_out = rows.forward(_logits_block(hidden, weight, bias, block), targets[block], inv_temperature)
        for full, part in zip(outputs, block_out):
            full[block] = part
    return outputs


def backward(rows, hidden, weight, bias, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy,
             inv_temperature, needs_grad):
    """(d hidden, d weight, d bias), each None unless ``needs_grad`` asks for it."""
    need_hidden, need_weight, need_bias = needs_grad
    tokens, vocab = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    # Low-precision weights accumulate their gradient over blocks in fp32.
    wide = accumulation_dtype(weight.dtype)
    grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=wide, device=weight.device) if need_bias else None
    for block in _token_blocks(tokens, vocab, hidden.element_size()):
        logits = _logits_block(hidden, weight, bias, block)
        grad_entropy_block = None if grad_entropy is None else grad_entropy[block]
        dlogits = rows.backward(logits, targets[block], row_max[block], row_log_sum[block], entropy[block],
                                grad_logp[block], grad_entropy_block, inv_temperature, out=logits)
        if need_hidden:
            torch.mm(dlogits, weight, out=grad_hidden[block])
        if need_weight:
            if grad_weight.dtype == dlogits.dtype:
                grad_weight.addmm_(dlogits.T, hidden[block])
            else:
                grad_weight += dlogits.T @ hidden[block]
        if need_bias:
            grad_bias += dlogits.sum(0, dtype=wide)
    return grad_hidden, _cast(grad_weight, weight.dtype), _cast(grad_bias, (weight if bias is None else bias).dtype)


def _cast(grad, dtype):
    return None if grad is None else grad.to(dtype)
