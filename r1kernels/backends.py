"""Backend choice per op: ``auto | triton | cuda | cpu | torch`` (and, for single ops,
``flash_attn`` and ``triton_tile``, the fully fused Triton lm_head kernel).

``auto`` picks per call from the tensors' device: CUDA tensors use Triton (falling back to
the CUDA C++ extension, then plain torch), CPU tensors use the C++ extension when it was
built, else torch. ``R1K_BACKEND`` or :func:`use_backend` force a choice:

- a plain name (``R1K_BACKEND=cpu``, ``use_backend("cpu")``) forces every op that has that
  backend and leaves the others on ``auto``;
- ``op:name`` pairs (``R1K_BACKEND=attention:flash_attn,logprobs:cuda``,
  ``use_backend(attention="flash_attn")``) force one op; an op forced by name to a backend it
  lacks raises. Both combine: ``R1K_BACKEND=triton,attention:torch``.

A forced backend that cannot run on the given tensors raises instead of silently falling back.
The innermost ``use_backend`` replaces any outer one and the environment.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch", "flash_attn", "triton_tile")
# Each op's backends, in ``auto``'s order of preference (auto skips flash_attn and triton_tile, which
# must be asked for): the one table dispatch, validation, the tests' parametrisation and the README's
# backend table (scripts/generate_docs.py) read.
OP_BACKENDS = {
    "logprobs": ("triton", "cuda", "cpu", "torch"),
    "linear_logprobs": ("triton", "cuda", "cpu", "torch", "triton_tile"),
    "attention": ("triton", "flash_attn", "torch"),
    "advantages": ("triton", "cuda", "cpu", "torch"),
}
OPS = tuple(OP_BACKENDS)
# What ``deterministic=True`` runs instead of a backend, per op: the triton lm_head's cuBLAS chunks are
# reproducible, but their sums may change with the chunk's row count, which batch invariance forbids,
# so the fused tile kernel's atomic-free mode runs.
DETERMINISTIC_BACKENDS = {"linear_logprobs": {"triton": "triton_tile"}}


def effective_backend(op: str, backend: str, deterministic: bool) -> str:
    """The backend that runs ``op`` once ``deterministic`` is taken into account."""
    return DETERMINISTIC_BACKENDS.get(op, {}).get(backend, backend) if deterministic else backend

_local = threading.local()


@functools.cache
def extension_available() -> bool:
    """True when the compiled ``r1kernels._C`` extension (C++ CPU kernels) imports."""
    try:
        importlib.import_module("r1kernels._C")
    except ImportError:
        return False
    return True


@functools.cache
def cuda_extension_available() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return extension_available() and torch.ops.r1k_C.built_with_cuda()


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@functools.cache
def flash_attn_available() -> bool:
    try:
        importlib.import_module("flash_attn")
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """The Triton interpreter runs kernels on CPU tensors (how the tests check Triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=16)
def _parse(text: str, where: str) -> dict[str, str]:
    """``"name"``, ``"op:name,op:name"`` or both -> {op, or "*" for every op: backend name}. Cached:
    every op call reads R1K_BACKEND; the dict returned is shared and never modified."""
    spec = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        op, _, name = part.rpartition(":")
        op = op or "*"
        if op != "*" and op not in OPS:
            raise ValueError(f"{where}: unknown op {op!r} in {text!r}, expected one of {OPS}")
        if name not in BACKENDS:
            raise ValueError(f"{where}: unknown backend {name!r} in {text!r}, expected one of {BACKENDS}")
        spec[op] = name
    return spec


def requested_backend(op: str) -> tuple[str, bool]:
    """(the backend asked for ``op``, whether it was named for this op rather than for all)."""
    spec = getattr(_local, "forced", None)
    if spec is None:
        spec = _parse(os.environ.get("R1K_BACKEND", ""), "R1K_BACKEND")
    if op in spec:
        return spec[op], True
    return spec.get("*", "auto"), False


@contextlib.contextmanager
def use_backend(name: str | None = None, **per_op: str):
    """Force backends inside a ``with`` block: ``use_backend("cpu")`` for every op that has it,
    ``use_backend(attention="flash_attn")`` for one op, or both. Thread-local; the innermost wins."""
    text = ",".join(([name] if name is not None else []) + [f"{op}:{b}" for op, b in per_op.items()])
    spec = _parse(text, "use_backend")
    previous = getattr(_local, "forced", None)
    _local.forced = spec
    try:
        yield
    finally:
        _local.forced = previous


def _why_not(name: str, device: torch.device) -> str | None:
    """Reason the backend cannot run on ``device``, or None when it can."""
    if name == "torch":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device}"
        if not extension_available():
            return "the C++ extension r1kernels._C is not built (reinstall without R1K_SKIP_EXTENSION)"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device}"
        if not cuda_extension_available():
            return "the C++ extension was built without CUDA kernels"
        return None
    if name in ("triton", "triton_tile"):
        if not triton_available():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"the triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; got {device}"
    if name == "flash_attn":
        if not flash_attn_available():
            return "flash-attn is not installed"
        return None if device.type == "cuda" else f"flash-attn needs CUDA tensors, got {device}"
    raise AssertionError(name)


def resolve(op: str, device: torch.device) -> str:
    """Name of the backend that runs ``op`` (one of ``OPS``) on ``device``, from ``OP_BACKENDS[op]``.
    Under torch.compile the choice is made once, at trace time, and baked into the graph."""
    return _resolve(op, torch.device(device).type, OP_BACKENDS[op])


@torch.compiler.assume_constant_result
def _resolve(op: str, device_type: str, supported: tuple[str, ...]) -> str:
    device = torch.device(device_type)
    name, named_for_op = requested_backend(op)
    if name != "auto" and name not in supported:
        if named_for_op:
            raise ValueError(f"backend {name!r} does not implement {op}; it supports {supported}")
        name = "auto"               # a plain name leaves the ops that lack it on auto
    if name == "auto":
        # auto never picks flash_attn (ours is the default; flash-attn must be asked for) nor the
        # fully fused Triton lm_head kernel (cuBLAS chunks are faster; it is the memory-minimal option)
        order = [b for b in supported
                 if (b != "triton" or device.type == "cuda") and b not in ("flash_attn", "triton_tile")]
        for candidate in order:
            if _why_not(candidate, device) is None:
                return candidate
        raise AssertionError("the torch backend always runs")
    reason = _why_not(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} was forced but cannot run: {reason}")
    return name
