"""Checkpoints with torch.distributed.checkpoint: model and optimizer (sharded under FSDP2), LR
scheduler, step (the data position: every batch is a function of the seed and the step), RNG
states and the run's config. Written to ``<phase>_step_N.tmp`` with a SHA-256 of every file
(``checksums.json``, written last: its presence marks a complete checkpoint), renamed once complete,
and ``latest`` is replaced atomically after that, so a crash during a save leaves the previous
checkpoint usable. Loading verifies the checksums; a dangling or empty ``latest`` falls back to the
newest complete checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)


PHASES = ("pretrain", "sft", "grpo")
CHECKSUMS = "checksums.json"
CONFIG = "config.json"
_NAME = re.compile(rf"({'|'.join(PHASES)})_step_(\d+)")


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


def save(directory: str, phase: str, step: int, model, optimizer, scheduler, world, config=None) -> str:
    """``config``: the run's config as a dict, compared on resume (see ``saved_config``)."""
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
        if config is not None:
            with open(os.path.join(tmp, CONFIG), "w") as f:
                json.dump(config, f, indent=1, sort_keys=True)
        sums = {name: _sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, CHECKSUMS), "w") as f:
            json.dump(sums, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = os.path.join(directory, "latest.tmp")
        with open(pointer, "w") as f:
            f.write(os.path.basename(final))
        os.replace(pointer, os.path.join(directory, "latest"))
    world.barrier()
    return final


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run_order(phase: str, step: int) -> tuple:
    """A sort key of (phase, step) points of a run: pretraining, SFT, GRPO, then by step."""
    return PHASES.index(phase), step


def phase_and_step(path: str):
    """(phase, step) of a checkpoint directory, from its name; None for another name."""
    match = _NAME.fullmatch(os.path.basename(path))
    return (match[1], int(match[2])) if match else None


def _complete(directory: str) -> list:
    """Complete checkpoints (with their checksums) in run order."""
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        point = phase_and_step(name)
        if point and os.path.isfile(os.path.join(directory, name, CHECKSUMS)):
            found.append((run_order(*point), os.path.join(directory, name)))
    return [path for _, path in sorted(found)]


def latest(directory: str):
    """The checkpoint ``latest`` names; when it is dangling, empty or unreadable, the newest complete
    checkpoint (with a message), or an error when there is none. None when nothing was ever saved."""
    pointer = os.path.join(directory, "latest")
    complete = _complete(directory)
    if not os.path.exists(pointer):
        return complete[-1] if complete else None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(directory, name)
    if name and os.path.isfile(os.path.join(path, CHECKSUMS)):
        return path
    if not complete:
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a complete checkpoint, and {directory} "
                                "holds none to fall back to")
    print(f"{pointer} names {name!r}, which is not a complete checkpoint: resuming from {complete[-1]}, the newest "
          "complete one")
    return complete[-1]


def verify(path: str) -> None:
    """Every file of the checkpoint against its recorded SHA-256; a mismatch names the file."""
    with open(os.path.join(path, CHECKSUMS)) as f:
        sums = json.load(f)
    for name, digest in sums.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise RuntimeError(f"checkpoint file {file} is missing")
        if _sha256(file) != digest:
            raise RuntimeError(f"checkpoint file {file} does not match its recorded SHA-256: the checkpoint is corrupt")


def saved_config(path: str):
    """The config dict saved with the checkpoint (None for one saved without it)."""
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def load_model(checkpoint_dir: str, model) -> None:
    """The model weights of a checkpoint only (e.g. the reference model: the policy at a phase's end)."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} is missing: the reference model is the policy "
                                "saved there at the end of the last phase before GRPO")
    verify(checkpoint_dir)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(model, state["model"])


def load(path: str, model, optimizer, scheduler, world) -> tuple:
    """Restores everything saved, after verifying the checksums; returns (phase, step) of the checkpoint."""
    verify(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    extra = torch.load(os.path.join(path, f"extra_rank{world.rank}.pt"), weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return extra["phase"], extra["step"]


class Checkpointer:
    """The built-in checkpointer (``checkpoint.checkpointer = "dcp"``): the functions above, bound to
    the run's directory and world. The trainer calls only these methods, so your own class by import
    path (built as ``Class(checkpoint_config, world)``) replaces it: a handle is whatever ``latest``
    returns and ``load``, ``phase_and_step`` and ``saved_config`` take."""

    def __init__(self, checkpoint_cfg, world):
        self.directory, self.world = checkpoint_cfg.dir, world

    def save(self, phase: str, step: int, model, optimizer, scheduler, config: dict):
        return save(self.directory, phase, step, model, optimizer, scheduler, self.world, config=config)

    def latest(self):
        return latest(self.directory)

    def phase_and_step(self, handle) -> tuple:
        return phase_and_step(handle)

    def saved_config(self, handle):
        return saved_config(handle)

    def load(self, handle, model, optimizer, scheduler) -> tuple:
        return load(handle, model, optimizer, scheduler, self.world)

    def load_model(self, phase: str, step: int, model) -> None:
        load_model(path(self.directory, phase, step), model)
