"""Backend choice per op: ``auto | triton | cuda | cpu | torch``, and rows only some ops have
(``flash_attn`` for attention, ``triton_tile`` for the fused lm_head). Each op's package declares its
backends in one ordered table of :class:`Backend` rows; ``OP_TABLES`` says where each table lives.

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
import dataclasses
import functools
import importlib
import os
import threading
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class Backend:
    """One row of an op's backend table (each op package declares its own, in ``auto``'s order).

    ``module`` implements the op's kernel contract (documented in the op's package) and is imported on
    first use. ``runs_on``: the technology whose availability decides whether it can run (``_why_not``),
    by default the row's own name. ``auto``: whether ``auto`` may pick it; otherwise it runs only when
    asked for. ``deterministic``: the row of the same table that ``deterministic=True`` runs instead.
    ``float64``: it computes in float64 for float64 inputs (the exact CPU paths; GPU kernels accumulate
    in fp32 and refuse them)."""
    module: str
    runs_on: Optional[str] = None
    auto: bool = True
    deterministic: Optional[str] = None
    float64: bool = False


# Where each op's table lives: (package, attribute). The tables are the one statement of which op has
# which backend; dispatch, validation, the static gate, the tests' parametrisation, the benchmarks and
# the table in docs/ops.md (scripts/generate_docs.py) read them.
OP_TABLES = {
    "logprobs": ("r1kernels.logprobs", "TOKEN_BACKENDS"),
    "linear_logprobs": ("r1kernels.logprobs", "LINEAR_BACKENDS"),
    "attention": ("r1kernels.attention", "BACKENDS"),
    "advantages": ("r1kernels.advantages", "BACKENDS"),
}
OPS = tuple(OP_TABLES)


# Tables and backend modules once loaded. A compiled graph cannot trace an import, and need not:
# ``_resolve`` runs eagerly at trace time and loads what it picks, so traced code finds it here.
_tables: dict[str, dict[str, Backend]] = {}
_modules: dict[tuple[str, str], object] = {}


def table(op: str) -> dict[str, Backend]:
    """``op``'s backend table {name: Backend}, in ``auto``'s order."""
    rows = _tables.get(op)
    if rows is None:
        package, attribute = OP_TABLES[op]
        rows = _tables[op] = getattr(importlib.import_module(package), attribute)
    return rows


def all_names() -> tuple[str, ...]:
    """Every backend name some op accepts, and ``auto``: what ``R1K_BACKEND`` and ``use_backend`` take."""
    return ("auto", *dict.fromkeys(name for op in OPS for name in table(op)))


def kernels(op: str, name: str):
    """The module that runs ``op`` on backend ``name`` (``table(op)[name].module``)."""
    module = _modules.get((op, name))
    if module is None:
        module = _modules[(op, name)] = importlib.import_module(table(op)[name].module)
    return module


def effective_backend(op: str, backend: str, deterministic: bool) -> str:
    """The backend that runs ``op`` once ``deterministic`` is taken into account."""
    swap = table(op)[backend].deterministic if deterministic else None
    return swap or backend


def runs_on(op: str, backend: str) -> str:
    """The technology ``op``'s backend ``backend`` needs (its row's ``runs_on``, else its name)."""
    return table(op)[backend].runs_on or backend


def why_not(op: str, backend: str, device: torch.device) -> Optional[str]:
    """Why ``op``'s backend ``backend`` cannot run on ``device`` here, or None when it can."""
    return _why_not(runs_on(op, backend), torch.device(device))


def auto_candidates(op: str, device: torch.device):
    """The backends ``auto`` may pick for ``op`` on ``device`` that can run there, in its order (lazily:
    ``auto`` takes the first, the benchmarks time them all): rows with ``auto``, and Triton only for
    CUDA tensors (on CPU it is the interpreter, a test tool, slower than C++ or torch)."""
    device = torch.device(device)
    for name, row in table(op).items():
        if row.auto and (runs_on(op, name) != "triton" or device.type == "cuda") and why_not(op, name, device) is None:
            yield name


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
        if name not in all_names():
            raise ValueError(f"{where}: unknown backend {name!r} in {text!r}, expected one of {all_names()}")
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
    if name == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"the triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; got {device}"
    if name == "flash_attn":
        if not flash_attn_available():
            return "flash-attn is not installed"
        return None if device.type == "cuda" else f"flash-attn needs CUDA tensors, got {device}"
    raise AssertionError(f"no availability rule for {name!r}: add one to backends._why_not")


def resolve(op: str, device: torch.device) -> str:
    """Name of the backend (a key of ``table(op)``) that runs ``op`` (one of ``OPS``) on ``device``.
    Under torch.compile the choice is made once, at trace time, and baked into the graph."""
    return _resolve(op, torch.device(device).type)


@torch.compiler.assume_constant_result
def _resolve(op: str, device_type: str) -> str:
    device = torch.device(device_type)
    rows = table(op)
    name, named_for_op = requested_backend(op)
    if name != "auto" and name not in rows:
        if named_for_op:
            raise ValueError(f"backend {name!r} does not implement {op}; it supports {tuple(rows)}")
        name = "auto"               # a plain name leaves the ops that lack it on auto
    if name == "auto":
        return _chosen(op, next(auto_candidates(op, device)))     # torch always runs
    reason = why_not(op, name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} was forced but cannot run: {reason}")
    return _chosen(op, name)


def _chosen(op: str, name: str) -> str:
    """``name``, its module (and that of its deterministic row) loaded for traced code."""
    kernels(op, name)
    swap = table(op)[name].deterministic
    if swap:
        kernels(op, swap)
    return name
