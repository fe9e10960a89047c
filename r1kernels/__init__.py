"""r1kernels: fused GPU kernels for GRPO training (public API)."""
from r1kernels.advantages import AdvantageStats, expand_to_tokens, group_advantages
from r1kernels.attention import Packed, pack, plan_micro_batches, unpack, varlen_attention
from r1kernels.backends import use_backend
from r1kernels.grpo import (GRPOLoss, GRPOLossOutput, LinearGRPOLoss, LossOptions, grpo_loss, linear_grpo_loss,
                            loss_normaliser, policy_loss)
from r1kernels.logprobs import linear_token_logprobs, token_logprobs

__all__ = [
    "token_logprobs", "linear_token_logprobs", "policy_loss", "grpo_loss", "linear_grpo_loss", "GRPOLossOutput",
    "loss_normaliser", "LossOptions", "GRPOLoss", "LinearGRPOLoss", "group_advantages", "expand_to_tokens",
    "AdvantageStats", "varlen_attention", "pack", "unpack", "Packed", "plan_micro_batches", "use_backend",
]
__version__ = "0.1.0"
