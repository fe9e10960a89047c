"""Spec of the vocabulary ops: log-softmax at the target id, and the softmax entropy."""
from __future__ import annotations

import torch

from r1kernels.constants import IGNORE_INDEX


def token_logprobs_ref(logits, targets, temperature=1.0, dtype=torch.float64):
    """``logp = log_softmax(logits / T)[target]``, ``entropy = -sum_v p_v log p_v``.

    Tokens whose target is IGNORE_INDEX get 0 for both. Differentiable by autograd.
    """
    logp_all = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0).long()
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = logp.new_zeros(())
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def linear_token_logprobs_ref(hidden, weight, targets, bias=None, temperature=1.0, dtype=torch.float64):
    """The same on ``logits = hidden @ weight.T + bias``, materialised in ``dtype``."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_logprobs_ref(logits, targets, temperature, dtype)
