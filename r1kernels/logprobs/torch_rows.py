"""The ``torch`` backend's row kernel: plain PyTorch, processed in row blocks so that the
fp32 temporaries stay bounded whatever the logits' size (see ``r1kernels.logprobs``)."""
from __future__ import annotations

import torch

from r1kernels.constants import IGNORE_INDEX
from r1kernels._tensors import accumulation_dtype
from r1kernels.logprobs.chunked import chunk_bytes

# Each block of rows makes a few fp32 copies of itself. On CPU, 4 MiB per copy keeps them cache-sized. On
# CUDA a block is the fused lm_head's chunk (min(1 GiB, free / 16)): each block costs about a dozen kernel
# launches, and at V = 151,936 a 4 MiB block is 6 rows, so 65,536 rows took some 33,000 launches per pass.
CPU_BLOCK_BYTES = 4 << 20


def block_bytes(device: torch.device) -> int:
    return chunk_bytes(device) if device.type == "cuda" else CPU_BLOCK_BYTES


def _row_blocks(logits: torch.Tensor):
    rows, vocab = logits.shape
    step = max(1, block_bytes(logits.device) // (4 * max(vocab, 1)))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def forward(logits, targets, inv_temperature):
    rows = logits.shape[0]
    acc = accumulation_dtype(logits.dtype)
    logp, entropy, row_max, row_log_sum = (logits.new_empty(rows, dtype=acc) for _ in range(4))
    for block in _row_blocks(logits):
        z = logits[block].to(acc) * inv_temperature
        z_max = z.amax(dim=-1)
        shifted = z - z_max[:, None]
        exp_shifted = shifted.exp()
        log_sum = exp_shifted.sum(-1).log()
        # p * (z - max) with 0 where p == 0, so -inf logits contribute nothing instead of NaN.
        tilted = torch.where(exp_shifted > 0, exp_shifted * shifted, 0.0).sum(-1)
        valid = targets[block] != IGNORE_INDEX
        target_shifted = shifted.gather(1, torch.where(valid, targets[block], 0).long()[:, None])[:, 0]
        logp[block] = torch.where(valid, target_shifted - log_sum, 0.0)
        entropy[block] = torch.where(valid, log_sum - tilted / log_sum.exp(), 0.0)
        row_max[block] = z_max
        row_log_sum[block] = log_sum
    return logp, entropy, row_max, row_log_sum


def backward(logits, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy, inv_temperature, out):
    acc = accumulation_dtype(logits.dtype)
    for block in _row_blocks(logits):
        z = logits[block].to(acc) * inv_temperature
        log_p = (z - row_max[block][:, None]) - row_log_sum[block][:, None]
        p = log_p.exp()
        valid = targets[block] != IGNORE_INDEX
        g_logp = torch.where(valid, grad_logp[block].to(acc), 0.0)
        dz = -p * g_logp[:, None]
        dz.scatter_add_(1, torch.where(valid, targets[block], 0).long()[:, None], g_logp[:, None])
        if grad_entropy is not None:
            g_ent = torch.where(valid, grad_entropy[block].to(acc), 0.0)
            dz -= g_ent[:, None] * torch.where(p > 0, p * (log_p + entropy[block][:, None]), 0.0)
        out[block] = (dz * inv_temperature).to(out.dtype)
    return out
