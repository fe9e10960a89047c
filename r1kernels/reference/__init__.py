"""Plain PyTorch references: the executable spec of every op, float64-capable.

They materialise everything and favour obviousness over speed; tests compare every
backend against them in float64.
"""
from r1kernels.reference.advantages import group_advantages_ref
from r1kernels.reference.attention import varlen_attention_ref
from r1kernels.reference.grpo import grpo_loss_ref
from r1kernels.reference.logprobs import linear_token_logprobs_ref, token_logprobs_ref

__all__ = ["token_logprobs_ref", "linear_token_logprobs_ref", "grpo_loss_ref", "group_advantages_ref",
           "varlen_attention_ref"]
