"""The plain PyTorch a trainer writes without r1kernels: the baseline that the trainer's ``naive``
kernels and the benchmarks run against ours."""
from __future__ import annotations

import torch


def naive_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full fp32 log-softmax of the materialised logits, then gather (targets in range; any leading shape)."""
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
