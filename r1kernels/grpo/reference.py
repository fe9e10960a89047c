"""Spec of the GRPO-family losses, written straight from TRL's formulas (and verl's dual-clip
and KL estimators) with one explicit loop per sequence, independently of ``r1kernels.grpo``.
Padded layout only: logp, old, ref, entropy [B, T], mask [B, T], advantages [B] or [B, T]."""
from __future__ import annotations

import math

import torch


def grpo_loss_ref(logp, advantages, mask, old=None, ref=None, entropy=None, *, loss_type="grpo",
                  importance_sampling_level="token", epsilon_low=0.2, epsilon_high=None, delta=None, beta=0.0,
                  num_items_in_batch=None, max_completion_length=None, is_ratio=None, clip_ratio_c=None,
                  kl_estimator="k3", entropy_coef=0.0, tau_pos=1.0, tau_neg=1.05, use_bias_correction_kl=True,
                  off_policy_mask_threshold=None, top_entropy_quantile=1.0, sampling=None, vespo_k_pos=2.0,
                  vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    """Scalar loss in the inputs' dtype (use float64). ``is_ratio``: [B, T] per token, or [B] / [B, 1]
    one per sequence (multiplying each of its tokens' loss; vespo counts it once in the sequence's ratio)."""
    batch, length = logp.shape
    per_sequence_is = is_ratio is not None and tuple(is_ratio.shape) != (batch, length)
    if per_sequence_is:
        is_ratio = is_ratio.reshape(batch)
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    old = logp.detach() if old is None else old
    high_entropy = torch.ones_like(mask, dtype=torch.bool)
    if top_entropy_quantile < 1.0:      # TRL's get_high_entropy_mask on one process
        active = entropy.detach()[mask.bool()]
        threshold = torch.quantile(active.float(), 1 - top_entropy_quantile) if active.numel() else None
        high_entropy = ((entropy.detach() * mask >= threshold) & mask.bool()) if threshold is not None \
            else torch.zeros_like(mask, dtype=torch.bool)
    seq_totals, seq_counts = [], []
    for b in range(batch):
        m = mask[b].to(logp.dtype)
        a = advantages[b]  # a scalar ([B] advantages) or a row ([B, T])
        lr = logp[b] - old[b]
        if importance_sampling_level == "sequence":
            lr = ((lr * m).sum() / max(m.sum().item(), 1.0)).expand_as(lr)
        r = torch.exp(lr)
        if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            unclipped = (r if delta is None else torch.clamp(r, max=delta)) * a
            clipped = torch.clamp(r, 1 - epsilon_low, 1 + eps_high) * a
            loss = -torch.minimum(unclipped, clipped)
            if clip_ratio_c is not None:
                a_full = a * torch.ones_like(loss)
                loss = torch.where(a_full < 0, torch.minimum(loss, -clip_ratio_c * a_full), loss)
        elif loss_type == "cispo":
            loss = -torch.clamp(r, max=eps_high).detach() * a * logp[b]
        elif loss_type == "vespo":      # TRL's get_gamma_weights: phi(w) of the sequence's ratio, detached
            floor = math.log(1e-8)
            log_w = (torch.clamp((logp[b] - old[b]).detach(), -20, 20) * m).sum()
            if is_ratio is not None and per_sequence_is:      # the sequence's ratio, counted once
                log_w = log_w + torch.clamp(torch.log(is_ratio[b]), floor, 20)
            elif is_ratio is not None:                         # per token: the sum of their logs
                log_w = log_w + (torch.clamp(torch.log(is_ratio[b]), floor, 20) * m).sum()
            log_w = torch.clamp(log_w, floor, 20)
            a_full = a * torch.ones_like(r)
            k = torch.where(a_full >= 0, torch.full_like(r, vespo_k_pos), torch.full_like(r, vespo_k_neg))
            lam = torch.where(a_full >= 0, torch.full_like(r, vespo_lambda_pos),
                              torch.full_like(r, vespo_lambda_neg)).clamp(min=1e-4)
            phi = torch.nan_to_num(torch.exp(lam + k * log_w - lam * torch.exp(log_w)), nan=0.0, posinf=0.0,
                                   neginf=0.0)
            loss = -phi * a_full * logp[b]
        elif loss_type == "sapo":
            a_full = a * torch.ones_like(r)
            tau = torch.where(a_full > 0, torch.full_like(r, tau_pos), torch.full_like(r, tau_neg))
            loss = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a_full
        else:
            raise ValueError(loss_type)
        if off_policy_mask_threshold is not None:     # TRL's get_off_policy_mask (DeepSeek-V3.2)
            drift = torch.nan_to_num((old[b] if sampling is None else sampling[b]) - logp[b].detach(), nan=0.0)
            seq_drift = (drift * m).sum() / max(m.sum().item(), 1.0)
            loss = loss * ((a >= 0) | (seq_drift <= off_policy_mask_threshold)).to(loss.dtype)
        loss = loss * high_entropy[b].to(loss.dtype)
        if is_ratio is not None and loss_type != "vespo":       # vespo folds it into phi
            loss = loss * is_ratio[b]
        if beta:
            d = ref[b] - logp[b]
            if kl_estimator == "k1":
                kl = logp[b] - ref[b]
            elif kl_estimator == "k2":
                kl = 0.5 * (logp[b] - ref[b]) ** 2
            else:
                kl = torch.exp(d) - d - 1
                if kl_estimator == "k3_clamped":
                    kl = torch.clamp(kl, -10, 10)
            if use_bias_correction_kl:       # TRL's default: the KL term times the importance ratio
                kl = kl * r
            loss = loss + beta * kl
        seq_totals.append((loss * m).sum())
        seq_counts.append(m.sum())
    total = torch.stack(seq_totals).sum()
    count = torch.stack(seq_counts).sum()
    if loss_type in ("grpo", "sapo"):
        loss = sum(t / max(c.item(), 1.0) for t, c in zip(seq_totals, seq_counts)) / batch
    elif loss_type == "bnpo":
        loss = total / max(count.item(), 1.0)
    elif loss_type == "dr_grpo":
        loss = total / (batch * max_completion_length)
    elif loss_type == "luspo":
        loss = total / batch
    else:
        loss = total / (max(count.item(), 1.0) if num_items_in_batch is None else num_items_in_batch)
    if entropy_coef:       # TRL: minus coef times the token mean of the entropy over the effective mask
        effective = mask.to(logp.dtype) * high_entropy.to(logp.dtype)
        loss = loss - entropy_coef * (entropy * effective).sum() / max(effective.sum().item(), 1.0)
    return loss
