"""The ``cpu`` and ``cuda`` backends' row kernel: the compiled extension (csrc/), which
dispatches on the tensors' device (see ``r1kernels.logprobs`` for the contract)."""
from __future__ import annotations

import torch

import r1kernels._C  # noqa: F401  (registers torch.ops.r1k_C)


def forward(logits, targets, inv_temperature):
    return torch.ops.r1k_C.token_logprobs_forward(logits, targets.contiguous(), inv_temperature)


def backward(logits, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy, inv_temperature, out):
    stats_dtype = row_max.dtype
    grad_logp = grad_logp.to(stats_dtype).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.to(stats_dtype).contiguous()
    torch.ops.r1k_C.token_logprobs_backward(logits, targets.contiguous(), row_max, row_log_sum, entropy,
                                            grad_logp, grad_entropy, inv_temperature, out)
    return out
