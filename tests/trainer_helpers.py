"""Shared pieces of the trainer tests: a tiny config and fixed synthetic rollouts."""
import torch

from trainer.config import from_dict


def tiny_config(directory, **sections):
    base = {"sft": {"steps": 2, "batch_size": 8}, "grpo": {"steps": 2, "prompts_per_step": 4, "num_generations": 4,
                                                           "warmup_steps": 1},
            "rollout": {"max_new_tokens": 12, "eval_max_new_tokens": 12}, "data": {"eval_size": 8},
            "checkpoint": {"dir": str(directory), "export": False}, "log": {"progress": False, "plot": False}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return from_dict(base)


def fixed_rollouts(num=8, vocab=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(8, vocab, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(num)]
    completions = [torch.randint(8, vocab, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(num)]
    advantages = torch.randn(num, generator=gen).tolist()
    return prompts, completions, advantages
