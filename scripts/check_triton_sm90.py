"""Compile every Triton kernel for an H100/H200 (sm_90) without a GPU.

The Triton interpreter, which the tests use, runs kernels as NumPy code: it accepts things the
GPU compiler rejects (non-constexpr globals, unsupported atomics, dtype mismatches in loops).
This script calls each Triton launcher in r1kernels/triton/ on CPU tensors, with its GPU
configuration, and swaps the launch for ``triton.compile(..., target=sm_90)`` down to a cubin
(ptxas included), so a kernel that would not build on the GPU fails here, in CI.

Run: python scripts/check_triton_sm90.py   (TRITON_INTERPRET must be unset)
"""
from __future__ import annotations

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("check_triton_sm90: unset TRITON_INTERPRET (the interpreter does not compile)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED_BYTES = 227 * 1024           # per block on sm_90; more fails at launch with OutOfResources
POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                 torch.bool: "i1"}
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
compiled: list[tuple[str, int, float]] = []
seen: set = set()


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _compile_instead_of_launch(self: JITFunction, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    bound = dict(zip(self.arg_names, args), **kwargs)
    signature, constants = {}, {}
    for param in self.params:
        value = bound[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constants[param.name] = "constexpr", value
        else:
            signature[param.name] = _arg_type(value)
    key = (self.__name__, tuple(sorted(signature.items())), tuple(sorted(map(str, constants.items()))),
           tuple(sorted(options.items())))
    if key in seen:
        return None
    seen.add(key)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=self, signature=signature, constexprs=constants), target=TARGET,
                            options=options)
    name = f"{self.__module__.split('.')[-1]}.{self.__name__}"
    if not kernel.asm.get("cubin"):
        raise RuntimeError(f"{name}: no cubin")
    if kernel.metadata.shared > MAX_SHARED_BYTES:
        raise RuntimeError(f"{name} {constants}: needs {kernel.metadata.shared} bytes of shared memory, "
                           f"sm_90 has {MAX_SHARED_BYTES}")
    compiled.append((name, kernel.metadata.shared, time.perf_counter() - start))
    return None


def _logprobs():
    from r1kernels.triton import logprobs
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.zeros(4, 1000, dtype=dtype)
        targets = torch.zeros(4, dtype=torch.long)
        stats = logprobs.forward(logits, targets, 1.0)
        grad = torch.zeros(4)
        for grad_entropy in (None, grad):
            logprobs.backward(logits, targets, stats[2], stats[3], stats[1], grad, grad_entropy, 1.0, logits)


def _linear_logprobs():
    from r1kernels.triton import linear_logprobs
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight = torch.zeros(8, 64, dtype=dtype), torch.zeros(100, 64, dtype=dtype)
        targets = torch.zeros(8, dtype=torch.long)
        for bias in (None, torch.zeros(100, dtype=dtype)):
            stats = linear_logprobs.forward(hidden, weight, bias, targets, 1.0, False)
            grad = torch.zeros(8)
            for deterministic in (False, True):
                linear_logprobs.backward(hidden, weight, bias, targets, stats[2], stats[3], stats[1], grad, grad,
                                         1.0, deterministic=deterministic, needs_grad=(True, True, bias is not None))


def _attention():
    from r1kernels.triton import attention
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in (64, 128, 256):
            q = torch.zeros(12, 4, head_dim, dtype=dtype)
            kv = torch.zeros(12, 2, head_dim, dtype=dtype)
            for causal, window, softcap in ((True, (-1, -1), 0.0), (False, (3, 0), 30.0)):
                out, lse = attention.forward(q, kv, kv, cu, cu, 7, 7, head_dim ** -0.5, causal, window, softcap)
                attention.backward(out, q, kv, kv, out, lse, cu, cu, 7, 7, head_dim ** -0.5, causal, window,
                                   softcap)


def _advantages():
    from r1kernels.triton import advantages, advantages_by_id
    for dtype in (torch.float32, torch.float64):
        rewards = torch.zeros(64, 3, dtype=dtype)
        weights = torch.ones(3, dtype=dtype)
        ids = torch.zeros(64, dtype=torch.long)
        for scale, denominator in (("group", None), ("batch", torch.ones((), dtype=dtype))):
            for w in (None, weights):
                advantages.group_normalize(rewards, w, 8, False, scale, 1e-4, denominator)
                advantages_by_id.group_normalize_by_id(rewards, w, ids, True, scale, 1e-4, denominator, True)
        advantages_by_id.group_normalize_by_id(rewards, None, ids.int(), False, "none", 1e-4, None, False)
        advantages_by_id.group_normalize_by_id(rewards, weights, None, False, "group", 1e-4, None, True, group_size=32)


def main() -> int:
    JITFunction.run = _compile_instead_of_launch
    start = time.perf_counter()
    for check in (_logprobs, _linear_logprobs, _attention, _advantages):
        check()
    for name, shared, seconds in compiled:
        print(f"  sm_90 {name:48s} {shared:7d} B shared {seconds:6.1f} s")
    print(f"check_triton_sm90: {len(compiled)} kernel variants compiled for sm_90 with triton {triton.__version__} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
