"""One GRPO update on fixed rollouts: as one process (no FSDP), or as a rank under torchrun with FSDP2
(each rank holding half of the sequences). Writes the loss and a few updated parameters as JSON."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer_helpers import fixed_rollouts, tiny_config  # noqa: E402

import torch.distributed as dist  # noqa: E402

from trainer.parallel import backend_spec, exit_rank  # noqa: E402
from trainer.train import Trainer  # noqa: E402

TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                      "reduce_scatter", "reduce", "gather", "scatter", "all_to_all_single")


def check_collective_devices(spec: str) -> list:
    """Wrap torch.distributed's tensor collectives: each tensor's device type must have a backend in
    ``spec`` (here the GPU run's spec, so that a CPU tensor bound for an NCCL-only group fails on
    CPU too). Returns the list the wrappers append each checked call's name to."""
    covered = {part.split(":")[0] for part in spec.split(",")}
    calls = []

    def wrap(name, original):
        def checked(*args, **kwargs):
            tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
            tensors += [t for x in (*args, *kwargs.values()) if isinstance(x, (list, tuple))
                        for t in x if isinstance(t, torch.Tensor)]
            for t in tensors:
                if t.device.type not in covered:
                    raise AssertionError(f"dist.{name} on a {t.device.type} tensor: no backend for it in {spec!r}")
            calls.append(name)
            return original(*args, **kwargs)
        return checked

    for name in TENSOR_COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))
    return calls


def main(out_path):
    distributed = "RANK" in os.environ
    calls = check_collective_devices(backend_spec(use_cuda=True)) if distributed else []
    cfg = tiny_config(os.path.dirname(out_path), grpo={"loss_type": "dapo", "micro_batch_tokens": 20},
                      parallel={"fsdp": "on" if distributed else "off"})
    trainer = Trainer(cfg)
    prompts, completions, adv = fixed_rollouts(num=12, seed=5)
    rows = list(range(trainer.world.rank, 12, trainer.world.size))
    optimizer, scheduler = trainer._optimizer(1e-2, 10, 0, "constant")
    row = trainer.update([prompts[r] for r in rows], [completions[r] for r in rows], [adv[r] for r in rows],
                         optimizer, scheduler)
    state = {}
    for name, p in trainer.model.named_parameters():
        if name.endswith(("layers.0.self_attn.q_proj.weight", "norm.weight", "embed_tokens.weight")):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = full.detach()[:4].tolist()
    if trainer.world.is_main:
        with open(out_path, "w") as f:
            json.dump({"loss": row["loss"], "params": state, "fsdp": distributed, "collectives": sorted(set(calls))},
                      f)
    trainer.close()
    if distributed:
        exit_rank(0)


if __name__ == "__main__":
    main(sys.argv[1])
