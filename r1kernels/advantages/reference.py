"""Spec of group_advantages: one explicit loop over groups, in float64."""
from __future__ import annotations

import math

import torch


def _normalise_groups(r, groups, estimator, scale, eps):
    """r [B] float64 with NaNs; groups: list of index lists. Returns advantages [B]."""
    valid_all = r[~torch.isnan(r)]
    batch_std = valid_all.std().item() if valid_all.numel() > 1 else 0.0
    adv = torch.zeros_like(r)
    for idx in groups:
        vals = r[idx]
        ok = ~torch.isnan(vals)
        good = vals[ok]
        n = good.numel()
        if n <= 1 or bool((good == good[0]).all()):
            continue
        mean = good.mean().item()
        centred = (vals - mean) * (n / (n - 1) if estimator == "rloo" else 1.0)
        if scale == "group":
            centred = centred / (good.std().item() + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        adv[idx] = torch.where(ok, centred, torch.zeros_like(centred))
    return adv


def group_advantages_ref(rewards, groups, estimator="grpo", scale="group", eps=1e-4, reward_weights=None,
                         multi_reward="sum_then_normalize"):
    """``groups``: a list of lists of row indices. rewards [B] or [B, R]."""
    r = rewards.double()
    if r.dim() == 1:            # one reward column ([B]); weights, if any, are its [1]
        if reward_weights is None:
            return _normalise_groups(r, groups, estimator, scale, eps)
        r = r[:, None]
    weights = torch.ones(r.shape[1], dtype=torch.float64) if reward_weights is None else reward_weights.double()
    if multi_reward == "sum_then_normalize":
        combined = torch.tensor([
            math.nan if all(math.isnan(x) for x in row)
            else sum(w * x for w, x in zip(weights.tolist(), row) if not math.isnan(x))
            for row in r.tolist()], dtype=torch.float64)
        return _normalise_groups(combined, groups, estimator, scale, eps)
    per_column = [_normalise_groups(r[:, k], groups, estimator, scale, eps) for k in range(r.shape[1])]
    summed = sum(w * a for w, a in zip(weights, per_column))
    all_nan = torch.isnan(r).all(1)
    summed = torch.where(all_nan, torch.full_like(summed, math.nan), summed)
    ok = ~all_nan
    mean, std = summed[ok].mean(), summed[ok].std() if int(ok.sum()) > 1 else torch.tensor(0.0, dtype=torch.float64)
    return torch.where(ok, (summed - mean) / (std + eps), torch.zeros_like(summed))
