"""Property tests: each op against its float64 reference on random valid inputs drawn by hypothesis
(shapes that are no multiple of any block, masked targets, extreme logits, every loss type and
layout), on every backend that runs on this machine's CPU. A failing draw is shrunk to the
smallest input that still fails, which is what these tests are for."""
import pytest
import torch
from conftest import TOL, assert_close_scaled, cpu_backends, exact_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import r1kernels
from r1kernels.grpo import LOSS_TYPES
from r1kernels.reference import (grpo_loss_ref, linear_token_logprobs_ref, token_logprobs_ref,
                                 varlen_attention_ref)

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _targets(gen, rows, vocab, masked_fraction):
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < masked_fraction] = -100
    return targets


@SETTINGS
@given(rows=st.integers(1, 40), vocab=st.integers(2, 700), scale=st.sampled_from([1.0, 30.0, 300.0]),
       temperature=st.floats(0.3, 2.0), masked=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", exact_backends())
def test_token_logprobs_property(backend, rows, vocab, scale, temperature, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    targets = _targets(gen, rows, vocab, masked)
    grad_logp, grad_ent = torch.randn(rows, generator=gen, dtype=torch.float64), torch.randn(rows, generator=gen,
                                                                                             dtype=torch.float64)
    with r1kernels.use_backend(backend):
        logp, ent = r1kernels.token_logprobs(logits, targets, temperature, return_entropy=True)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_logp, ref_ent = token_logprobs_ref(ref_logits, targets, temperature)
    assert_close_scaled(logp, ref_logp, TOL[torch.float64], "logp")
    assert_close_scaled(ent, ref_ent, TOL[torch.float64], "entropy")
    (grad,) = torch.autograd.grad((logp * grad_logp + ent * grad_ent).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_logp * grad_logp + ref_ent * grad_ent).sum(), ref_logits)
    assert_close_scaled(grad, ref_grad, 1e-9, "d logits")


@SETTINGS
@given(rows=st.integers(1, 33), hidden=st.integers(1, 40), vocab=st.integers(2, 600), bias=st.booleans(),
       temperature=st.floats(0.5, 1.5), masked=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", cpu_backends())
def test_linear_token_logprobs_property(backend, rows, hidden, vocab, bias, temperature, masked, seed):
    dtype = torch.float64 if backend in exact_backends() else torch.float32
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen, dtype=dtype) / hidden ** 0.5).requires_grad_()
    b = (torch.randn(vocab, generator=gen, dtype=dtype) if bias else None)
    targets = _targets(gen, rows, vocab, masked)
    grad = torch.randn(rows, generator=gen, dtype=dtype)
    with r1kernels.use_backend(backend):
        logp = r1kernels.linear_token_logprobs(h, w, targets, b, temperature)
    dh, dw = torch.autograd.grad((logp * grad).sum(), (h, w))
    leaves = [x.detach().double().requires_grad_() for x in (h, w)]
    ref, _ = linear_token_logprobs_ref(*leaves, targets, None if b is None else b.double(), temperature)
    ref_dh, ref_dw = torch.autograd.grad((ref * grad.double()).sum(), leaves)
    tol = TOL[dtype] * 5
    assert_close_scaled(logp, ref, tol, "logp")
    assert_close_scaled(dh, ref_dh, tol, "d hidden")
    assert_close_scaled(dw, ref_dw, tol, "d weight")


@SETTINGS
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6), loss_type=st.sampled_from(sorted(LOSS_TYPES)),
       level=st.sampled_from(["token", "sequence"]), beta=st.sampled_from([0.0, 0.05]),
       spread=st.floats(0.0, 2.0), seed=st.integers(0, 2**16))
def test_policy_loss_property(lengths, loss_type, level, beta, spread, seed):
    """Any loss type, level and KL weight on a padded batch of random lengths (empty rows included),
    ratios spread up to e^±6: loss and d logp against the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    batch, width = len(lengths), max(max(lengths), 1)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    logp = (-torch.rand(batch, width, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    old = logp.detach() + torch.randn(batch, width, generator=gen, dtype=torch.float64) * spread
    ref_lp = logp.detach() + torch.randn(batch, width, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    options = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta)
    if "epsilon_high" in LOSS_TYPES[loss_type].needs:
        options["epsilon_high"] = 4.0
    if LOSS_TYPES[loss_type].needs_max_completion_length:
        options["max_completion_length"] = width + 3
    out = r1kernels.policy_loss(logp, adv, mask, old_logprobs=old, ref_logprobs=ref_lp if beta else None, **options)
    (grad,) = torch.autograd.grad(out.loss, logp)
    leaf = logp.detach().clone().requires_grad_()
    ref = grpo_loss_ref(leaf, adv, mask, old, ref_lp if beta else None, **options)
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(lengths=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 6)), min_size=1, max_size=4),
       heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]), head_dim=st.sampled_from([4, 16, 24]),
       causal=st.booleans(), window=st.sampled_from([(-1, -1), (3, -1), (2, 1)]),
       softcap=st.sampled_from([0.0, 5.0]), seed=st.integers(0, 2**16))
def test_varlen_attention_torch_backend_property(lengths, heads, head_dim, causal, window, softcap, seed):
    """The torch backend (the CPU default) on random packed layouts: q and k lengths differ (k = q +
    extra), empty sequences, windows, softcap; output and every gradient against float64."""
    gen = torch.Generator().manual_seed(seed)
    lens_q = [q for q, _ in lengths]
    lens_k = [q + extra for q, extra in lengths]
    hq, hkv = heads
    q = torch.randn(sum(lens_q), hq, head_dim, generator=gen).requires_grad_()
    k = torch.randn(sum(lens_k), hkv, head_dim, generator=gen).requires_grad_()
    v = torch.randn(sum(lens_k), hkv, head_dim, generator=gen).requires_grad_()
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    with r1kernels.use_backend("torch"):
        out = r1kernels.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
    grad = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad) if out.numel() else (torch.zeros_like(q),) * 3
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, _ = varlen_attention_ref(*leaves, cu_q, cu_k, None, causal, window, softcap)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double()) if ref.numel() else (torch.zeros_like(q),) * 3
    assert_close_scaled(out, ref, 5e-5, "out")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close_scaled(g, r, 2e-4, f"d{name}")
