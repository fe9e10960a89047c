"""Plain PyTorch references: the executable spec of every op, float64-capable.

Each lives in its op's package (r1kernels/<op>/reference.py); this module gathers them. They
materialise everything and favour obviousness over speed; tests compare every
backend against them in float64.
"""
from r1kernels.advantages.reference import group_advantages_ref
from r1kernels.attention.reference import varlen_attention_ref
from r1kernels.grpo.reference import grpo_loss_ref
from r1kernels.logprobs.reference import linear_token_logprobs_ref, token_logprobs_ref

__all__ = ["token_logprobs_ref", "linear_token_logprobs_ref", "grpo_loss_ref", "group_advantages_ref",
           "varlen_attention_ref"]
