"""What the GPU checks of every op share (bench/gpu_check.sh runs the ``cuda``-marked tests of each op's
module with TRITON_INTERPRET=0): every Triton, CUDA and torch kernel on the GPU at real sizes against
the references, including what the interpreter cannot reach (N x V > 2^31 logits, more than 65,535
token tiles, long packed attention batches, 2^24 advantage rows with a real multi-program grid
barrier). Where the full float64 reference would not fit, a sample of rows is checked in float64
(tests/sampled_reference.py). Tests of the CUDA C++ extension are marked ``cuda_ext`` (the check runs
them once its background build is done)."""
import functools

import pytest
import torch
from sampled_reference import linear_token_logprobs_rows, sample_indices

import r1kernels
from r1kernels import backends

# the marks of a GPU test: selected by ``-m cuda``, skipped without a CUDA device
ON_GPU = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.cuda_ext), "torch"]
LINEAR_GPU_BACKENDS = GPU_BACKENDS + ["triton_tile"]        # + the fully fused Triton lm_head kernel


def gpu_test(fn):
    for mark in ON_GPU:
        fn = mark(fn)
    return fn


def require(name):
    """Skip unless backend ``name`` runs on this GPU (and not under the interpreter)."""
    if name.startswith("triton") and backends.triton_interpreting():
        pytest.skip("TRITON_INTERPRET is on: run through bench/gpu_check.sh (or with TRITON_INTERPRET=0)")
    try:
        with r1kernels.use_backend(name):
            backends.resolve("logprobs", torch.device("cuda"))
    except RuntimeError as err:
        pytest.skip(f"{name} unavailable: {err}")


@functools.cache
def real_lm_head():
    """The benchmark's shape: 16,384 tokens, H = 4,096, V = 151,936 (Qwen2.5), bf16, and its
    sampled float64 reference (built once per process: the lm_head and the loss tests share it)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 16384, 4096, 151936
    hidden = torch.randn(n, h, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=gen) * h ** -0.5 * 2).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[::7] = -100
    g_logp, g_ent = torch.randn(n, device="cuda", generator=gen), torch.randn(n, device="cuda", generator=gen)
    rows, cols = sample_indices(n, 256, "cuda"), sample_indices(v, 256, "cuda")
    reference = linear_token_logprobs_rows(hidden, weight, targets, rows, cols, g_logp, g_ent)
    return hidden, weight, targets, g_logp, g_ent, rows, cols, reference
