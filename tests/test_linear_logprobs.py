"""linear_token_logprobs (fused lm_head) against the float64 reference, plus its promises:
no [tokens, vocab] buffer, determinism and batch invariance, compile-ability."""
import pytest
import torch
from conftest import TOL, assert_close_scaled, autocast_grad_errors, cpu_backends, exact_backends
from peak_memory import measure

import r1kernels
from r1kernels.reference import linear_token_logprobs_ref


def linear_backends():
    """cpu_backends(), plus the fully fused Triton kernel under the interpreter."""
    return cpu_backends() + (["triton_tile"] if "triton" in cpu_backends() else [])


def _inputs(tokens, hidden, vocab, dtype, bias=True, scale=0.5):
    h = torch.randn(tokens, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) * scale / hidden ** 0.5 * 4).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    t = torch.randint(0, vocab, (tokens,))
    return h, w, b, t


def _check(backend, h, w, b, t, temperature=1.0, deterministic=None, tol=None):
    dtype = h.dtype
    leaves = [x.detach().clone().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    with r1kernels.use_backend(backend):
        logp, ent = r1kernels.linear_token_logprobs(leaves[0], leaves[1], t, leaves[2] if b is not None else None,
                                                    temperature, True, deterministic=deterministic)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_logp, ref_ent = linear_token_logprobs_ref(ref_leaves[0], ref_leaves[1], t,
                                                  ref_leaves[2] if b is not None else None, temperature)
    tol = tol or TOL[dtype]
    assert_close_scaled(logp, ref_logp, tol, "logp")
    assert_close_scaled(ent, ref_ent, tol, "entropy")
    g_logp, g_ent = torch.randn_like(ref_logp), torch.randn_like(ref_ent)
    grads = torch.autograd.grad((logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_ent * g_ent).sum(), ref_leaves)
    for name, g, r in zip(("d hidden", "d weight", "d bias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close_scaled(g, r, tol * 2, name)
    masked = t == -100
    assert (grads[0][masked] == 0).all()
    return logp, ent, grads


@pytest.mark.parametrize("backend", linear_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_float64_reference(backend, dtype, deterministic):
    h, w, b, t = _inputs(45, 40, 1000, dtype)
    t[::7] = -100
    # the chunked backends keep low-precision logits between matmul and softmax, like eager PyTorch
    tol = 3e-2 if dtype == torch.bfloat16 else None
    _check(backend, h, w, b, t, temperature=0.8, deterministic=deterministic, tol=tol)


@pytest.mark.parametrize("backend", linear_backends())
def test_odd_sizes_no_bias_three_d(backend):
    h, w, _, t = _inputs(2 * 19, 23, 301, torch.float32, bias=False)
    _check(backend, h.view(2, 19, 23), w, None, t.view(2, 19))


@pytest.mark.parametrize("backend", linear_backends())
def test_edge_cases(backend):
    h, w, b, t = _inputs(5, 16, 64, torch.float32)
    _check(backend, h, w, b, torch.full((5,), -100))          # all masked
    _check(backend, h[:1], w, b, t[:1])                        # one token
    _check(backend, h * 300, w, b, t)                          # logits in the thousands
    with r1kernels.use_backend(backend):
        x = torch.zeros(0, 16, requires_grad=True)
        r1kernels.linear_token_logprobs(x, w, torch.zeros(0, dtype=torch.long)).sum().backward()
    assert x.grad.shape == (0, 16)


@pytest.mark.parametrize("backend", linear_backends())
def test_frozen_weight_needs_only_hidden_grad(backend):
    h, w, b, t = _inputs(20, 32, 200, torch.float32)
    x = h.clone().requires_grad_()
    with r1kernels.use_backend(backend):
        r1kernels.linear_token_logprobs(x, w, t, b).sum().backward()
    ref = h.double().requires_grad_()
    linear_token_logprobs_ref(ref, w, t, b)[0].sum().backward()
    assert_close_scaled(x.grad, ref.grad, 2e-5)
    assert w.grad is None


@pytest.mark.parametrize("backend", exact_backends())
def test_gradcheck_float64(backend):
    h, w, b, t = _inputs(7, 6, 19, torch.float64)
    t[2] = -100
    leaves = [x.requires_grad_() for x in (h, w, b)]
    with r1kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda h, w, b: r1kernels.linear_token_logprobs(h, w, t, b, 1.7, True),
                                        leaves)


@pytest.mark.parametrize("backend", linear_backends())
def test_deterministic_mode_is_batch_invariant_and_reproducible(backend):
    """A token's logp, entropy and d hidden are bitwise the same alone or inside any batch."""
    h, w, b, t = _inputs(50, 48, 500, torch.float32)
    g = torch.randn(50)

    def run(rows):
        x = h[rows].clone().requires_grad_()
        with r1kernels.use_backend(backend):
            logp, ent = r1kernels.linear_token_logprobs(x, w, t[rows], b, 1.0, True, deterministic=True)
        (logp * g[rows]).sum().backward()
        return logp.detach(), ent.detach(), x.grad

    full = run(torch.arange(50))
    again = run(torch.arange(50))
    assert all(torch.equal(a, b) for a, b in zip(full, again)), "not reproducible"
    subset = torch.tensor([3, 17, 18, 40])
    for shuffled in (subset, subset.flip(0)):
        part = run(shuffled)
        for name, whole, piece in zip(("logp", "entropy", "d hidden"), full, part):
            assert torch.equal(whole[shuffled], piece), f"{name} changed with the batch"


def test_compile_fullgraph():
    h, w, b, t = _inputs(12, 16, 100, torch.float32)
    logits = torch.randn(12, 100)

    def f(h, w, b, logits):
        lp1, ent1 = r1kernels.linear_token_logprobs(h, w, t, b, 0.9, True)
        lp2 = r1kernels.token_logprobs(logits, t, 0.9)
        return (lp1 * 2 + ent1).sum() + lp2.sum()

    leaves = [x.clone().requires_grad_() for x in (h, w, b, logits)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [x.clone().requires_grad_() for x in (h, w, b, logits)]
    ref = f(*ref_leaves)
    ref.backward()
    assert torch.allclose(out, ref)
    for a, r in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, r.grad, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_memory_bound_at_acceptance_shape(backend):
    """N=4096, H=512, V=32768 fp32: forward+backward peaks at most a quarter of one fp32 [N, V]
    logits tensor (128 MiB) above inputs, outputs and gradients (measured as peak resident bytes)."""
    setup = """
        import torch, r1kernels
        torch.manual_seed(0)
        N, H, V = 4096, 512, 32768
        h = torch.randn(N, H, requires_grad=True)
        w = (torch.randn(V, H) * 0.02).requires_grad_()
        t = torch.randint(0, V, (N,))
    """
    run = f"""
        with r1kernels.use_backend("{backend}"):
            logp, ent = r1kernels.linear_token_logprobs(h, w, t, return_entropy=True)
            (logp.sum() + ent.sum()).backward()
        extra["kept"] = logp.nbytes + ent.nbytes + h.grad.nbytes + w.grad.nbytes
    """
    result = measure(setup, run)
    logits_bytes = 4096 * 32768 * 4
    above = result["growth"] - result["kept"]
    assert above <= logits_bytes / 4, f"{above / 2**20:.0f} MiB above outputs and grads"


# The Triton interpreter converts fp32 to bf16 by truncation (twice the error of the GPU's
# round-to-nearest), so the triton backend's bf16 precision is measured on the GPU (tests/test_cuda.py).
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b in ("cpu", "torch")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_autocast_forward_and_backward(backend, seed):
    """Inside torch.autocast (forward, and backward inside it too), fp32 leaves: the lm_head product runs
    in bf16 with fp32 accumulation, and the fp32 gradients are rounded once, from the fp32 accumulators:
    within bf16's error of float64 and at least as close to it as TRL's kernel in the same setting."""
    ours, trl = autocast_grad_errors(backend, "cpu", seed)
    assert all(1e-4 < e < 2e-2 for e in ours), f"bf16 compute expected, errors {ours}"   # not fp32, not broken
    if trl is None:
        pytest.skip(f"TRL is not installed (ours: {ours})")
    assert all(o <= t * (1 + 1e-3) for o, t in zip(ours, trl)), (ours, trl)
