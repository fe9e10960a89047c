"""Group-relative advantages from rewards: GRPO, Dr. GRPO and RLOO, in one kernel launch.

For each prompt's group of completions, with NaN or +-inf rewards (failed: unscorable) left out:
    grpo:    A_i = (r_i - mean_g) / (std_g + eps)   (scale="group"; "batch": the batch std; "none")
    dr_grpo: A_i = r_i - mean_g                      (grpo with scale="none")
    rloo:    A_i = r_i - mean_{g without i} = n/(n-1) (r_i - mean_g)   (then / scale, default none)
std is Bessel-corrected (as torch.std), from min-shifted two-pass sums in the accumulation
dtype, never E[x^2] - E[x]^2; a group of a huge range is summed on its rewards times a power of
two (``constants.GROUP_RESCALE``), so any finite fp32 reward, up to the fp32 maximum (fp64 ones up
to about 1e150), gives exact advantages. Several or weighted reward columns are combined in float64
(an fp32 reward times an fp32 weight is exact there) and each row is shifted by its group's minimum
before it is narrowed to the accumulation dtype, so a large offset the columns share (1e4 + 1e-2 in
fp32) costs nothing either; a row whose weighted sum overflows the accumulation dtype is a failed reward.
A group with fewer than two valid rewards, or all equal, gets advantages of exactly 0; failed
rewards get 0. Rewards [B, R] of several reward functions are
weighted and summed first (TRL), or, with multi_reward="normalize_then_sum" (GDPO), each is
normalised in its group, the weighted sum is taken, and the result is normalised over the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from r1kernels import _checks, backends
from r1kernels._tensors import accumulation_dtype, unit_stride
from r1kernels.advantages import torch_groups
from r1kernels.backends import Backend

# The op's backends, in auto's order (each module has the contract documented in ``torch_groups``).
BACKENDS = {
    "triton": Backend(f"{__name__}.triton_groups"),
    "cuda": Backend(f"{__name__}.cpp_groups"),
    "cpu": Backend(f"{__name__}.cpp_groups", float64=True),
    "torch": Backend(f"{__name__}.torch_groups", float64=True),
}

ESTIMATORS = ("grpo", "rloo", "dr_grpo")
SCALES = ("group", "batch", "none")
MULTI_REWARD = ("sum_then_normalize", "normalize_then_sum")


@dataclasses.dataclass
class AdvantageStats:
    group_mean: Tensor          # [G] (or [G, R] with normalize_then_sum), NaN for groups with no valid reward
    group_std: Tensor           # [G] (or [G, R]), Bessel-corrected
    zero_std_fraction: Tensor   # 0-d: share of groups whose advantages are 0 (constant, or < 2 valid rewards)
    failed_rewards: Tensor      # 0-d: reward entries that were NaN or +-inf (failed: they take no part)


@torch.library.custom_op("r1kernels::group_normalize", mutates_args=())
def _group_normalize(rewards: Tensor, weights: Optional[Tensor], group_size: int, leave_one_out: bool, scale: str,
                     eps: float, batch_denominator: Optional[Tensor], backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Contiguous groups of ``group_size`` rows: (adv [B], mean [G], std [G], constant [G])."""
    return backends.kernels("advantages", backend).group_normalize(
        rewards, weights, group_size=group_size, leave_one_out=leave_one_out, scale=scale, eps=eps,
        batch_denominator=batch_denominator)


@_group_normalize.register_fake
def _(rewards, weights, group_size, leave_one_out, scale, eps, batch_denominator, backend):
    acc = accumulation_dtype(rewards.dtype)
    groups = rewards.shape[0] // group_size
    return (rewards.new_empty(rewards.shape[0], dtype=acc), rewards.new_empty(groups, dtype=acc),
            rewards.new_empty(groups, dtype=acc), rewards.new_empty(groups, dtype=torch.bool))


@torch.library.custom_op("r1kernels::group_normalize_by_id", mutates_args=())
def _group_normalize_by_id(rewards: Tensor, weights: Optional[Tensor], group_ids: Tensor, leave_one_out: bool,
                           scale: str, eps: float, batch_denominator: Optional[Tensor], with_stats: bool, backend: str
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Arbitrary ids: (adv [B], and with_stats each row's group mean, std, constant, is_first [B])."""
    return backends.kernels("advantages", backend).group_normalize_by_id(
        rewards, weights, group_ids, leave_one_out=leave_one_out, scale=scale, eps=eps,
        batch_denominator=batch_denominator, with_stats=with_stats)


@_group_normalize_by_id.register_fake
def _(rewards, weights, group_ids, leave_one_out, scale, eps, batch_denominator, with_stats, backend):
    acc = accumulation_dtype(rewards.dtype)
    rows = rewards.shape[0] if with_stats else 0
    return (rewards.new_empty(rewards.shape[0], dtype=acc), rewards.new_empty(rows, dtype=acc),
            rewards.new_empty(rows, dtype=acc), rewards.new_empty(rows, dtype=torch.bool),
            rewards.new_empty(rows, dtype=torch.bool))


def _validate(rewards, group_size, group_ids, estimator, scale, reward_weights, multi_reward, eps):
    _checks.tensor("rewards", rewards)
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating tensor (NaN marks an unscorable completion), got {rewards.dtype}")
    if rewards.dim() not in (1, 2) or (rewards.dim() == 2 and rewards.shape[1] < 1):
        raise ValueError(f"rewards must be [B] or [B, R] with R >= 1, got shape {tuple(rewards.shape)}")
    batch = rewards.shape[0]
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if scale is not None and scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if estimator == "dr_grpo" and scale not in (None, "none"):
        raise ValueError(f"dr_grpo does not scale advantages (scale='none'), got scale={scale!r}")
    if multi_reward not in MULTI_REWARD:
        raise ValueError(f"multi_reward must be one of {MULTI_REWARD}, got {multi_reward!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (contiguous groups) or group_ids")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if batch % group_size:
            raise ValueError(f"B = {batch} rewards is not divisible by group_size = {group_size}")
    else:
        _checks.tensor("group_ids", group_ids)
        if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
            raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
        if tuple(group_ids.shape) != (batch,):
            raise ValueError(f"group_ids must have shape [B] = ({batch},), got {tuple(group_ids.shape)}")
    num_rewards = rewards.shape[1] if rewards.dim() == 2 else 1
    if reward_weights is not None:
        _checks.tensor("reward_weights", reward_weights)
        if tuple(reward_weights.shape) != (num_rewards,):
            raise ValueError(f"reward_weights must have shape [R] = ({num_rewards},), "
                             f"got {tuple(reward_weights.shape)}")
    _checks.same_device(rewards=rewards, group_ids=group_ids, reward_weights=reward_weights)
    if reward_weights is not None:
        _checks.small_all_finite("reward_weights", reward_weights)


def group_advantages(rewards: Tensor, group_size: Optional[int] = None, *, group_ids: Optional[Tensor] = None,
                     estimator: str = "grpo", scale: Optional[str] = None, eps: float = 1e-4,
                     reward_weights: Optional[Tensor] = None, multi_reward: str = "sum_then_normalize",
                     return_stats: bool = False):
    """Advantages [B] (fp32; fp64 for fp64 rewards) from rewards [B] or [B, R].

    Groups: ``group_size=G`` (contiguous runs of G rows) or ``group_ids`` [B] (any integer ids,
    groups of any sizes, in any order). Either way the Triton backend is one kernel launch
    (plus a few ops for ``scale="batch"`` and GDPO). ``scale`` defaults to "group" for grpo and
    "none" for rloo and dr_grpo.
    Returns ``adv``, or ``(adv, AdvantageStats)`` with ``return_stats=True``; with ``group_ids``
    the stats list groups in order of first appearance in the batch.
    """
    _validate(rewards, group_size, group_ids, estimator, scale, reward_weights, multi_reward, eps)
    scale = scale or ("group" if estimator == "grpo" else "none")
    leave_one_out = estimator == "rloo"
    backend = backends.resolve("advantages", rewards.device)
    rewards_2d = rewards if rewards.dim() == 2 else rewards[:, None]
    rewards_2d = unit_stride(rewards_2d)
    num_rewards = rewards_2d.shape[1]
    weights = None      # as given (the kernels widen them: several or weighted columns are summed in float64)
    if reward_weights is not None:
        weights = reward_weights.to(rewards.device, reward_weights.dtype if reward_weights.is_floating_point()
                                    else torch.float64).contiguous()
    if group_ids is not None:
        group_ids = group_ids.contiguous() if group_ids.dtype in (torch.int32, torch.int64) else group_ids.long()

    def normalise(columns, column_weights):
        """(adv, mean, std, constant, is_first): stats per group (contiguous groups; is_first None)
        or per row (group ids; is_first marks each group's first row)."""
        denominator = None
        if scale == "batch":
            denominator = torch_groups.batch_denominator(columns, column_weights, eps)
        if group_ids is None:
            return *_group_normalize(columns, column_weights, group_size, leave_one_out, scale, float(eps),
                                     denominator, backend), None
        return _group_normalize_by_id(columns, column_weights, group_ids, leave_one_out, scale, float(eps),
                                      denominator, return_stats, backend)

    if multi_reward == "normalize_then_sum" and num_rewards > 1:
        per_column = [normalise(rewards_2d[:, k:k + 1], None) for k in range(num_rewards)]
        summed = sum(out[0] if weights is None else weights[k] * out[0] for k, out in enumerate(per_column))
        summed = torch.where((~torch.isfinite(rewards_2d)).all(1), torch.nan, summed)
        # GDPO's last step: the summed advantages normalised as one group of the whole batch
        adv = torch_groups.group_normalize(summed[:, None], None, group_size=summed.shape[0], leave_one_out=False,
                                           scale="group", eps=eps)[0]
        if not return_stats:
            return adv
        mean, std, constant = (torch.stack([out[i] for out in per_column], 1) for i in (1, 2, 3))
        constant, is_first = constant.all(1), per_column[0][4]
    else:
        adv, mean, std, constant, is_first = normalise(rewards_2d, weights)
        if not return_stats:
            return adv
    if is_first is not None:                     # per-row statistics -> per group, by first appearance
        mean, std, constant = mean[is_first], std[is_first], constant[is_first]
    return adv, AdvantageStats(mean, std, constant.float().mean(), (~torch.isfinite(rewards)).sum())


def expand_to_tokens(advantages: Tensor, cu_seqlens: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                     total_tokens: Optional[int] = None) -> Tensor:
    """Sequence advantages [S] to the token layouts: packed [N] (from ``cu_seqlens``) or padded
    [B, T] (from ``mask``, zeros on masked tokens)."""
    _checks.tensor("advantages", advantages)
    if (cu_seqlens is None) == (mask is None):
        raise ValueError("give exactly one of cu_seqlens (packed) or mask (padded)")
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be [S], got shape {tuple(advantages.shape)}")
    if mask is not None:
        if _checks.tensor("mask", mask).dim() != 2 or mask.shape[0] != advantages.shape[0]:
            raise ValueError(f"mask must be [B, T] with B = {advantages.shape[0]}, got {tuple(mask.shape)}")
        return advantages[:, None] * mask.to(advantages.dtype)
    if _checks.tensor("cu_seqlens", cu_seqlens).shape != (advantages.shape[0] + 1,):
        raise ValueError(f"cu_seqlens must have shape [S+1] = ({advantages.shape[0] + 1},), "
                         f"got {tuple(cu_seqlens.shape)}")
    total = int(cu_seqlens[-1]) if total_tokens is None else total_tokens
    _checks.cu_seqlens("cu_seqlens", cu_seqlens, total)
    return torch.repeat_interleave(advantages, (cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=total)
