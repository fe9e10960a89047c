"""``python -m bench advantages``: group_advantages against TRL's PyTorch sequence and verl's
per-uid Python loop. Small batches are launch-bound (the launch count, from the PyTorch profiler,
is reported: CUDA kernels on GPU, top-level ATen/custom ops on CPU); large ones bandwidth-bound:
the floor is one read of the [B, R] rewards and one write of the [B] advantages.
"""
from __future__ import annotations

import collections
import functools

import torch
from torch.profiler import ProfilerActivity, profile

import r1kernels
from bench.common import Row, measure_ceilings, median_time, print_table, save, try_case

BATCHES = (256, 4096, 1_048_576)
GROUP_SIZES = (8, 64)
NUM_REWARDS = 3
VERL_MAX_BATCH = 65_536   # its Python loop takes minutes beyond this
QUICK_VERL_MAX_BATCH = 4096


def trl_advantages(rewards, weights, group_size):
    """TRL GRPOTrainer's sequence (scale_rewards="group")."""
    combined = (rewards * weights).nansum(dim=1)
    grouped = combined.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    std = grouped.std(dim=1).repeat_interleave(group_size)
    return (combined - mean) / (std + 1e-4)


def verl_advantages(rewards, weights, uids, eps=1e-6):
    """verl's compute_grpo_outcome_advantage: a Python loop grouping by uid."""
    scores = (rewards * weights).nansum(dim=1)
    by_uid = collections.defaultdict(list)
    for i, uid in enumerate(uids.tolist()):
        by_uid[uid].append(scores[i])
    stats = {}
    for uid, values in by_uid.items():
        stacked = torch.stack(values)
        stats[uid] = (stacked.mean(), stacked.std() if len(values) > 1 else torch.tensor(1.0, device=scores.device))
    out = scores.clone()
    for i, uid in enumerate(uids.tolist()):
        mean, std = stats[uid]
        out[i] = (scores[i] - mean) / (std + eps)
    return out


def count_launches(fn, device) -> int:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.cpu_parent is None and "::" in e.name)


def run(device: torch.device, quick: bool = False) -> list[Row]:
    ceilings = measure_ceilings(device, torch.float32)
    weights = torch.tensor([1.0, 0.5, 0.25], device=device)
    rows = []
    for batch in BATCHES:
        for size in GROUP_SIZES:
            rewards = torch.randn(batch, NUM_REWARDS, device=device)
            uids = torch.arange(batch, device=device) // size
            work = batch * NUM_REWARDS * 4 + batch * 4
            shape = f"B={batch} G={size} R={NUM_REWARDS}"
            impls = {
                "ours group_advantages(group_size)": functools.partial(
                    r1kernels.group_advantages, rewards, group_size=size, reward_weights=weights),
                "ours group_advantages(group_ids)": functools.partial(
                    r1kernels.group_advantages, rewards, group_ids=uids, reward_weights=weights),
                "TRL torch sequence": functools.partial(trl_advantages, rewards, weights, size),
            }
            if batch <= (QUICK_VERL_MAX_BATCH if quick else VERL_MAX_BATCH):
                impls["verl per-uid Python loop"] = functools.partial(verl_advantages, rewards, weights, uids)
            for name, fn in impls.items():
                slow = name.startswith("verl")

                def case(fn=fn, slow=slow):
                    repeats = 1 if slow else (5 if quick else 20)
                    seconds = median_time(fn, device, warmup=0 if slow else 3, repeats=repeats)
                    return seconds, count_launches(fn, device) if not slow else None

                result, note = try_case(case)
                seconds, launches = result or (None, None)
                note = note or (f"{launches} launches" if launches is not None else "Python loop")
                rows.append(Row(name, shape, seconds, None, work, ceilings.bandwidth, note, bound="bandwidth"))
    print_table("advantages", rows, ceilings)
    print("fraction: (B*R*4 + B*4) bytes vs measured copy bandwidth; launches: CUDA kernels (GPU) "
          "or top-level ops (CPU)")
    print("wrote", save("advantages", rows, ceilings, device, quick=quick))
    return rows
