"""Process group and FSDP2 (ZeRO-3) sharding: ``fully_shard`` on each decoder block, then the root."""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def all_reduce_max(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        """Wait for every rank, then tear the process group down (a rank that tears down while
        another is still talking to it can abort in gloo)."""
        if self.distributed:
            dist.barrier()
            dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a torchrun rank after ``World.close()`` without interpreter finalization. FSDP2 keeps the
    gloo process group alive past ``destroy_process_group`` and past the model (a reference Python
    cannot release: not the registry, not a Python object gc can see), so finalization destroys it,
    and gloo torn down there can abort the rank at exit ("terminate called without an active
    exception", as PyTorch's own gloo tests did from ``_PyModule_ClearDict``). Every file the trainer
    writes is closed by then; what the rank printed is flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def backend_spec(use_cuda: bool) -> str:
    """The process group's backends by device: FSDP2's collectives on CUDA tensors go to NCCL, and the
    trainer's host-side counts and metrics (CPU tensors, which NCCL rejects) to gloo."""
    return "cpu:gloo,cuda:nccl" if use_cuda and dist.is_nccl_available() else "cpu:gloo"


def launcher_environment(world: World) -> None:
    """What an engine started by an external launcher (vLLM's ``external_launcher``) reads: RANK,
    LOCAL_RANK and WORLD_SIZE, and a default process group. torchrun provides both; a single process
    gets a process group of one on localhost, ours (gloo for CPU tensors), since the engine would
    otherwise create an NCCL-only default group that the trainer's host-side collectives would then use."""
    local_rank = world.device.index if world.device.type == "cuda" and world.device.index is not None else 0
    for key, value in (("RANK", world.rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world.size)):
        os.environ.setdefault(key, str(value))
    if not dist.is_initialized():
        if world.size > 1:
            raise RuntimeError(f"rank {world.rank} of {world.size} has no process group: launch with torchrun")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as probe:           # a free port (the launcher's rendezvous)
                probe.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
        dist.init_process_group(backend_spec(world.device.type == "cuda"), rank=0, world_size=1)


def init_world() -> World:
    """torchrun sets RANK/WORLD_SIZE: one process group with gloo for CPU tensors and, on GPU, NCCL
    for CUDA tensors. A plain ``python -m trainer`` is one process."""
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ and not dist.is_initialized():
        return World(0, 1, torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    if not dist.is_initialized():
        dist.init_process_group(backend_spec(use_cuda))
    rank, size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return World(rank, size, device)


def shard_model(model, layers, world: World, fsdp: str, mixed_precision: str):
    """Apply FSDP2 when asked (or automatically when world size > 1)."""
    if fsdp == "off" or (fsdp == "auto" and world.size == 1):
        return model
    if not world.distributed:
        raise RuntimeError("parallel.fsdp = 'on' needs a process group: launch with torchrun")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    use_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and world.device.type == "cuda")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16 \
        else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
