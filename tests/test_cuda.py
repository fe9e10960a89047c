"""GPU checks (run by bench/gpu_check.sh): every CUDA backend against float64 at realistic sizes."""
import pytest
import torch
from conftest import assert_close_scaled

import r1kernels
from r1kernels import backends
from r1kernels.reference import linear_token_logprobs_ref, token_logprobs_ref

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = ["triton", "cuda", "torch"]


def _usable(name):
    try:
        with r1kernels.use_backend(name):
            backends.resolve(torch.device("cuda"))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_logprobs_cuda(backend, dtype):
    if not _usable(backend):
        pytest.skip(f"{backend} unavailable")
    n, v = 4099, 151936
    logits = (torch.randn(n, v, device="cuda") * 4).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[::11] = -100
    x = logits.clone().requires_grad_()
    with r1kernels.use_backend(backend):
        logp, ent = r1kernels.token_logprobs(x, targets, 0.9, return_entropy=True)
    g = torch.randn(n, device="cuda")
    (logp * g + ent * g.flip(0)).sum().backward()
    ref_x = logits.double().requires_grad_()
    rl, re = token_logprobs_ref(ref_x, targets, 0.9)
    (rl * g + re * g.flip(0)).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert_close_scaled(logp, rl, 2e-5, "logp")
    assert_close_scaled(ent, re, 2e-5, "entropy")
    assert_close_scaled(x.grad, ref_x.grad, tol, "d logits")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_linear_token_logprobs_cuda(backend, deterministic):
    if not _usable(backend):
        pytest.skip(f"{backend} unavailable")
    n, h, v = 70_000, 256, 1000   # past 65,536 tokens: no grid axis may overflow
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") / 16).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    with r1kernels.use_backend(backend):
        logp, ent = r1kernels.linear_token_logprobs(hidden, weight, targets, None, 1.0, True,
                                                    deterministic=deterministic)
    (logp.sum() + ent.sum()).backward()
    rh, rw = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    rl, re = linear_token_logprobs_ref(rh, rw, targets)
    (rl.sum() + re.sum()).backward()
    assert_close_scaled(logp, rl, 2e-2, "logp")
    assert_close_scaled(hidden.grad, rh.grad, 3e-2, "d hidden")
    assert_close_scaled(weight.grad, rw.grad, 3e-2, "d weight")
