"""Backend choice: ``auto | triton | cuda | cpu | torch`` (and, for single ops, ``flash_attn`` and
``triton_tile``, the fully fused Triton lm_head kernel).

``auto`` picks per call from the tensors' device: CUDA tensors use Triton (falling back to
the CUDA C++ extension, then plain torch), CPU tensors use the C++ extension when it was
built, else torch. ``R1K_BACKEND`` or :func:`use_backend` force one; a forced backend that
cannot run on the given tensors raises instead of silently falling back.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch", "flash_attn", "triton_tile")

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


def requested_backend() -> str:
    forced = getattr(_local, "forced", None)
    name = forced if forced is not None else os.environ.get("R1K_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"R1K_BACKEND/use_backend: unknown backend {name!r}, expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (thread-local; nests)."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}, expected one of {BACKENDS}")
    previous = getattr(_local, "forced", None)
    _local.forced = name
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


def resolve(device: torch.device, supported: tuple[str, ...] = ("triton", "cuda", "cpu", "torch")) -> str:
    """Name of the backend that runs an op on ``device``.

    ``supported`` lists the backends that implement the op, in order of preference for ``auto``.
    Under torch.compile the choice is made once, at trace time, and baked into the graph.
    """
    return _resolve(torch.device(device).type, supported)


@torch.compiler.assume_constant_result
def _resolve(device_type: str, supported: tuple[str, ...]) -> str:
    device = torch.device(device_type)
    name = requested_backend()
    if name == "auto":
        # auto never picks flash_attn (ours is the default; flash-attn must be asked for) nor the
        # fully fused Triton lm_head kernel (cuBLAS chunks are faster; it is the memory-minimal option)
        order = [b for b in supported
                 if (b != "triton" or device.type == "cuda") and b not in ("flash_attn", "triton_tile")]
        for candidate in order:
            if _why_not(candidate, device) is None:
                return candidate
        raise AssertionError("the torch backend always runs")
    if name not in supported:
        raise ValueError(f"backend {name!r} does not implement this op; it supports {supported}")
    reason = _why_not(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} was forced but cannot run: {reason}")
    return name
