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


@pytest.mark.parametrize("batch", [1, 5000, 1 << 20, 1 << 24])
def test_group_advantages_by_id_cuda_one_launch_grid_barrier(batch):
    """The id-grouped Triton kernel with a real multi-program grid barrier (the interpreter runs
    one program): equal to the float64 torch path, bitwise shuffle-equivariant, barrier reset."""
    from r1kernels.triton.advantages_by_id import _barrier_word
    gen = torch.Generator(device="cuda").manual_seed(0)
    rewards = torch.randn(batch, 3, device="cuda", generator=gen)
    ids = torch.randint(0, max(1, batch // 8), (batch,), device="cuda", generator=gen) * 7919
    weights = torch.tensor([1.0, 0.5, 0.25], device="cuda")
    with r1kernels.use_backend("triton"):
        adv, stats = r1kernels.group_advantages(rewards, group_ids=ids, reward_weights=weights, return_stats=True)
        perm = torch.randperm(batch, device="cuda", generator=gen)
        shuffled = r1kernels.group_advantages(rewards[perm], group_ids=ids[perm], reward_weights=weights)
    with r1kernels.use_backend("torch"):
        expected, expected_stats = r1kernels.group_advantages(rewards.double(), group_ids=ids,
                                                              reward_weights=weights.double(), return_stats=True)
    assert_close_scaled(adv, expected, 1e-5)
    assert_close_scaled(stats.group_std, expected_stats.group_std, 1e-5)
    assert torch.equal(shuffled, adv[perm])
    assert _barrier_word(rewards.device)[0].item() == 0


@pytest.mark.parametrize("group_size", [8, 64, 1 << 20])
def test_group_advantages_contiguous_cuda(group_size):
    """Contiguous groups: the tile kernel (small groups) and the persistent kernel (one group of 2^20)."""
    rewards = torch.randn(1 << 20, 3, device="cuda")
    with r1kernels.use_backend("triton"):
        adv, stats = r1kernels.group_advantages(rewards, group_size=group_size, return_stats=True)
    r = rewards.double().sum(1).view(-1, group_size)
    expected = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    assert_close_scaled(adv, expected, 1e-5)
    assert_close_scaled(stats.group_std, r.std(1), 1e-5)
