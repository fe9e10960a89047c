"""Checkpoints with torch.distributed.checkpoint: model and optimizer (sharded under FSDP2), LR
scheduler, step (the data position: every batch is a function of the seed and the step) and RNG
states. Written to ``step_N.tmp`` and renamed once complete, and ``latest`` is replaced
atomically after that, so a crash during a save leaves the previous checkpoint usable."""
from __future__ import annotations

import os
import random
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)


def _rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


def path(directory: str, phase: str, step: int) -> str:
    return os.path.join(directory, f"{phase}_step_{step:06d}")


def save(directory: str, step: int, phase: str, model, optimizer, scheduler, world) -> str:
    final = path(directory, phase, step)
    tmp = final + ".tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    world.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    torch.save({"step": step, "phase": phase, "scheduler": scheduler.state_dict(), "rng": _rng_state()},
               os.path.join(tmp, f"extra_rank{world.rank}.pt"))
    world.barrier()
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = os.path.join(directory, "latest.tmp")
        with open(pointer, "w") as f:
            f.write(os.path.basename(final))
        os.replace(pointer, os.path.join(directory, "latest"))
    world.barrier()
    return final


def latest(directory: str):
    pointer = os.path.join(directory, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(directory, f.read().strip())
    return path if os.path.isdir(path) else None


def load_model(checkpoint_dir: str, model) -> None:
    """The model weights of a checkpoint only (e.g. the reference model: the policy at a phase's end)."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} is missing: the reference model is the policy "
                                "saved there at the end of SFT")
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(model, state["model"])


def load(path: str, model, optimizer, scheduler, world) -> tuple:
    """Restores everything saved; returns (phase, step) of the checkpoint."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    extra = torch.load(os.path.join(path, f"extra_rank{world.rank}.pt"), weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return extra["phase"], extra["step"]
