"""GPU checks (bench/gpu_check.sh runs them with TRITON_INTERPRET=0): every Triton, CUDA and torch
kernel on the GPU at real sizes against the references, including what the interpreter cannot
reach: N x V > 2^31 logits, more than 65,535 token tiles, long packed attention batches, 2^24
advantage rows with a real multi-program grid barrier. Where the full float64 reference would not
fit, a sample of rows is checked in float64 (tests/sampled_reference.py). Tests of the CUDA C++
extension are marked ``cuda_ext`` (the check runs them once its background build is done)."""
import pytest
import torch
from conftest import assert_close_scaled, autocast_grad_errors
from sampled_reference import linear_token_logprobs_rows, sample_indices, token_logprobs_rows

import r1kernels
from r1kernels import backends
from r1kernels.reference import linear_token_logprobs_ref, token_logprobs_ref, varlen_attention_ref

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.cuda_ext), "torch"]
LINEAR_GPU_BACKENDS = GPU_BACKENDS + ["triton_tile"]        # + the fully fused Triton lm_head kernel


def _require(name):
    if name.startswith("triton") and backends.triton_interpreting():
        pytest.skip("TRITON_INTERPRET is on: run through bench/gpu_check.sh (or with TRITON_INTERPRET=0)")
    try:
        with r1kernels.use_backend(name):
            backends.resolve("logprobs", torch.device("cuda"))
    except RuntimeError as err:
        pytest.skip(f"{name} unavailable: {err}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_logprobs_cuda(backend, dtype):
    _require(backend)
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


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.cuda_ext)])
def test_token_logprobs_past_2_31_logits(backend):
    """65,536 tokens x 151,936 vocab: N*V = 9.96e9 > 2^31, so every index must be 64-bit."""
    _require(backend)
    n, v = 65536, 151936
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16).mul_(4).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[-1] = v - 1                                  # the very last logit is the target
    g_logp, g_ent = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    with r1kernels.use_backend(backend):
        logp, ent = r1kernels.token_logprobs(logits, targets, return_entropy=True)
    (logp * g_logp + ent * g_ent).sum().backward()
    rows = sample_indices(n, 1024, "cuda")
    rl, re, rd = token_logprobs_rows(logits.detach(), targets, rows, g_logp, g_ent)
    assert_close_scaled(logp[rows], rl, 2e-5, "logp")
    assert_close_scaled(ent[rows], re, 2e-5, "entropy")
    assert_close_scaled(logits.grad[rows], rd, 2e-2, "d logits")


@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_linear_token_logprobs_many_token_tiles(backend, deterministic):
    """70,000 tokens: more than 65,535 token tiles' worth of programs on a small vocabulary."""
    _require(backend)
    n, h, v = 70_000, 256, 1000
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


@pytest.fixture(scope="module")
def real_lm_head():
    """The benchmark's shape: 16,384 tokens, H = 4,096, V = 151,936 (Qwen2.5), bf16, and its
    sampled float64 reference."""
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


@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_linear_token_logprobs_real_lm_head(backend, deterministic, real_lm_head):
    _require(backend)
    hidden, weight, targets, g_logp, g_ent, rows, cols, (rl, re, rdh, rdw) = real_lm_head
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with r1kernels.use_backend(backend):
        logp, ent = r1kernels.linear_token_logprobs(x, w, targets, None, 1.0, True, deterministic=deterministic)
    (logp * g_logp + ent * g_ent).sum().backward()
    assert_close_scaled(logp[rows], rl, 2e-2, "logp")
    assert_close_scaled(ent[rows], re, 2e-2, "entropy")
    assert_close_scaled(x.grad[rows], rdh, 3e-2, "d hidden")
    assert_close_scaled(w.grad[cols], rdw, 3e-2, "d weight")


@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
def test_linear_token_logprobs_autocast_precision(backend):
    """Under torch.autocast(bf16) on the GPU, with fp32 leaves: the gradients are at least as close to
    float64 as TRL's kernel's in the same setting (the CPU test covers cpu and torch; the interpreter
    rounds bf16 by truncation, so the Triton kernels are measured here)."""
    _require(backend)
    ours, trl = autocast_grad_errors(backend, "cuda")
    assert all(1e-4 < e < 2e-2 for e in ours), f"bf16 compute expected, errors {ours}"
    if trl is None:
        pytest.skip(f"TRL is not installed (ours: {ours})")
    assert all(o <= t * 1.05 for o, t in zip(ours, trl)), (ours, trl)


def test_linear_grpo_loss_one_pass_real_lm_head(real_lm_head):
    """The one-pass route (cuBLAS chunks, gradients in the forward) against the two-pass route on
    the fully fused kernel, at the benchmark's shape."""
    _require("triton")
    hidden, weight, targets, _, _, rows, cols, _ = real_lm_head
    gen = torch.Generator(device="cuda").manual_seed(1)
    adv = torch.randn(16, device="cuda", generator=gen)
    mask = torch.ones(16, 1024, device="cuda")
    mask[:, 900:] = 0
    old = -torch.rand(16, 1024, device="cuda", generator=gen) * 3
    results = []
    for backend in ("triton", "triton_tile"):
        x, w = hidden.view(16, 1024, -1).clone().requires_grad_(), weight.clone().requires_grad_()
        with r1kernels.use_backend(backend):
            out = r1kernels.linear_grpo_loss(x, w, targets.view(16, 1024), adv, mask, old_logprobs=old,
                                             loss_type="dapo", beta=0.0, epsilon_high=0.28)
        out.loss.backward()
        results.append((out.loss.detach(), x.grad.view(-1, x.shape[-1])[rows].double(), w.grad[cols].double()))
    (loss, dh, dw), (ref_loss, ref_dh, ref_dw) = results
    assert_close_scaled(loss, ref_loss, 1e-3, "loss")
    assert_close_scaled(dh, ref_dh, 3e-2, "d hidden")
    assert_close_scaled(dw, ref_dw, 3e-2, "d weight")


def _packed(lengths, heads, kv_heads, d, dtype, gen):
    total = sum(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lengths, device="cuda").cumsum(0)
    q, k, v = (torch.randn(total, hh, d, device="cuda", generator=gen).to(dtype)
               for hh in (heads, kv_heads, kv_heads))
    return q, k, v, cu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [
    # lengths, heads, kv heads, head dim, causal, window, softcap
    ([512, 8192, 1000, 4096, 777, 2048, 3000, 6000], 16, 4, 128, True, (-1, -1), 0.0),
    ([4096, 300, 8192], 8, 8, 64, True, (1024, 0), 30.0),
    ([2048, 513], 4, 1, 256, False, (-1, -1), 0.0),
], ids=["long-causal-gqa-d128", "window-softcap-d64", "mqa-d256"])
def test_varlen_attention_long_packed_batches(dtype, case):
    """flash-attn's rule: error vs an fp32 reference at most 2x (output) / 3x (gradients) that of
    plain PyTorch in the same low precision."""
    _require("triton")
    lengths, heads, kv_heads, d, causal, window, softcap = case
    gen = torch.Generator(device="cuda").manual_seed(sum(lengths))
    q, k, v, cu = _packed(lengths, heads, kv_heads, d, dtype, gen)
    grad = torch.randn(q.shape, device="cuda", generator=gen).to(dtype)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with r1kernels.use_backend("triton"):
        out = r1kernels.varlen_attention(*leaves, cu, cu, max(lengths), max(lengths), **kw)
    grads = torch.autograd.grad(out, leaves, grad)

    def reference(ref_dtype):
        ref_leaves = [x.detach().to(ref_dtype).requires_grad_() for x in (q, k, v)]
        ref_out, _ = varlen_attention_ref(*ref_leaves, cu, cu, None, causal, window, softcap, dtype=ref_dtype)
        return ref_out, torch.autograd.grad(ref_out, ref_leaves, grad.to(ref_dtype))

    ref_out, ref_grads = reference(torch.float32)
    low_out, low_grads = reference(dtype)

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    assert err(out, ref_out) <= 2 * err(low_out, ref_out) + 1e-5
    for name, g, r, low in zip("qkv", grads, ref_grads, low_grads):
        assert err(g, r) <= 3 * err(low, r) + 1e-5, f"d{name}"


@pytest.mark.parametrize("batch", [1, 5000, 1 << 20, 1 << 24])
def test_group_advantages_by_id_cuda_one_launch_grid_barrier(batch):
    """The id-grouped Triton kernel with a real multi-program grid barrier (the interpreter runs
    one program): equal to the float64 torch path, bitwise shuffle-equivariant, barrier reset."""
    _require("triton")
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


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.cuda_ext)])
@pytest.mark.parametrize("group_size", [8, 64, 1 << 20])
def test_group_advantages_contiguous_cuda(backend, group_size):
    """Contiguous groups: Triton's tile kernel (small groups) and persistent kernel (one group of
    2^20), and the CUDA C++ kernel."""
    _require(backend)
    rewards = torch.randn(1 << 20, 3, device="cuda")
    with r1kernels.use_backend(backend):
        adv, stats = r1kernels.group_advantages(rewards, group_size=group_size, return_stats=True)
    r = rewards.double().sum(1).view(-1, group_size)
    expected = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    assert_close_scaled(adv, expected, 1e-5)
    assert_close_scaled(stats.group_std, r.std(1), 1e-5)
