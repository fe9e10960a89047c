"""linear_grpo_loss's one-pass route (gradients in the forward, no recomputed logits) against the
float64 reference, for every token-level loss option, padded and packed, with chunks small enough
that their boundaries cut through sequences; plus its promises: three GEMMs instead of four, no
gradient work under no_grad, and the memory bound at the benchmark shape."""
import pytest
import torch
from conftest import assert_close_scaled, cpu_backends, exact_backends
from peak_memory import measure
from grpo_cases import B, T, loss_batch, loss_cases, loss_options_of, reference_options, to_packed
from torch.utils._python_dispatch import TorchDispatchMode

import r1kernels
from r1kernels.grpo import LOSS_TYPES
from r1kernels.reference import grpo_loss_ref, linear_token_logprobs_ref

H, V = 16, 101
# the cases the one-pass route serves: token-level ratios, no loss type that weighs whole sequences (vespo)
TOKEN_LEVEL = [c for c in loss_cases() if c[1] == "token" and LOSS_TYPES[c[0]].sequence_weight is None]


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _inputs(dtype):
    hidden = torch.randn(B, T, H, dtype=dtype)
    weight = torch.randn(V, H, dtype=dtype) * 0.3
    bias = torch.randn(V, dtype=dtype)
    targets = torch.randint(0, V, (B, T))
    targets[0, 2] = -100
    return hidden, weight, bias, targets


def _loss(backend, leaves, targets, d, layout, entropy_coef, opts):
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = d["lengths"].cumsum(0)
    with r1kernels.use_backend(backend):
        if layout == "padded":
            return r1kernels.linear_grpo_loss(leaves[0], leaves[1], targets, d["adv"], d["mask"], bias=leaves[2],
                                              old_logprobs=d["old"], ref_logprobs=d["ref"], temperature=0.9,
                                              entropy_coef=entropy_coef, **opts)
        pack = lambda x: to_packed(x, d["lengths"])  # noqa: E731
        return r1kernels.linear_grpo_loss(pack(leaves[0]), leaves[1], pack(targets), d["adv"], bias=leaves[2],
                                          cu_seqlens=cu, old_logprobs=pack(d["old"]), ref_logprobs=pack(d["ref"]),
                                          temperature=0.9, entropy_coef=entropy_coef, **opts)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("case", TOKEN_LEVEL, ids=lambda c: "-".join(str(x) for x in c))
def test_one_pass_matches_float64(backend, layout, case, monkeypatch):
    dtype = torch.float64 if backend in exact_backends() else torch.float32
    monkeypatch.setenv("R1K_CHUNK_BYTES", str(5 * V * torch.finfo(dtype).bits // 8))   # 5-token chunks
    d = loss_batch(dtype=dtype)
    hidden, weight, bias, targets = _inputs(dtype)
    opts = loss_options_of(*case)
    entropy_coef = 0.01 if case[2] > 0 else 0.0
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = _loss(backend, leaves, targets, d, layout, entropy_coef, opts)
    assert type(out.loss.grad_fn).__name__ == "_LossWithGradientsBackward"
    out.loss.backward()
    ref_leaves = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    rlp, rent = linear_token_logprobs_ref(*ref_leaves[:2], targets, ref_leaves[2], 0.9)
    mask = d["mask"] & (targets != -100)
    ref = grpo_loss_ref(rlp, d["adv"], mask, d["old"].double(), d["ref"].double(), rent,
                        entropy_coef=entropy_coef, **reference_options(opts))
    ref.backward()
    tol = 1e-10 if dtype == torch.float64 else 5e-5
    assert_close_scaled(out.loss, ref, tol, "loss")
    for name, g, r in zip(("d hidden", "d weight", "d bias"), leaves, ref_leaves):
        assert_close_scaled(g.grad, r.grad, tol, name)
    assert out.logprobs.requires_grad is False
    assert_close_scaled(out.logprobs[mask] if layout == "padded" else out.logprobs, rlp[mask] if layout == "padded"
                        else to_packed(torch.where(mask, rlp, 0.0), d["lengths"]), tol, "logprobs")


def test_one_pass_is_three_gemms_and_nothing_under_no_grad(monkeypatch):
    """One logits GEMM per chunk (the two-pass route recomputes them in the backward); with d hidden
    and d weight, three GEMMs per chunk. Under no_grad only the logits GEMMs run and nothing is
    differentiable."""
    from r1kernels.kernels import chunked_linear
    monkeypatch.setenv("R1K_CHUNK_BYTES", str(10 * V * 4))             # 10-token chunks: 6 of them
    chunks = -(-B * T // 10)
    logits_calls = []
    original = chunked_linear._Chunks.logits
    monkeypatch.setattr(chunked_linear._Chunks, "logits", lambda *a: logits_calls.append(1) or original(*a))
    d = loss_batch(dtype=torch.float32)
    hidden, weight, _, targets = _inputs(torch.float32)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    with r1kernels.use_backend("torch"):
        for level, per_chunk in (("token", 1), ("sequence", 2)):
            logits_calls.clear()
            with _CountMatmuls() as counter:
                out = r1kernels.linear_grpo_loss(*leaves, targets, d["adv"], d["mask"], old_logprobs=d["old"],
                                                 importance_sampling_level=level)
                out.loss.backward()
            assert len(logits_calls) == per_chunk * chunks, level
            if level == "token":                    # outside custom ops, the dispatcher sees every GEMM
                assert counter.count == 3 * chunks
        logits_calls.clear()
        with torch.no_grad():
            out = r1kernels.linear_grpo_loss(*leaves, targets, d["adv"], d["mask"])
        assert len(logits_calls) == chunks and not out.loss.requires_grad


def test_frozen_lm_head_and_unknown_options():
    d = loss_batch(dtype=torch.float32)
    hidden, weight, _, targets = _inputs(torch.float32)
    x = hidden.clone().requires_grad_()
    out = r1kernels.linear_grpo_loss(x, weight, targets, d["adv"], d["mask"], loss_type="bnpo")
    out.loss.backward()
    rx = hidden.double().requires_grad_()
    rlp, _ = linear_token_logprobs_ref(rx, weight.double(), targets)
    grpo_loss_ref(rlp, d["adv"], d["mask"] & (targets != -100), loss_type="bnpo").backward()
    assert_close_scaled(x.grad, rx.grad, 5e-5, "d hidden")
    twice = r1kernels.linear_grpo_loss(x, weight, targets, d["adv"], d["mask"])
    twice.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        twice.loss.backward()
    with pytest.raises(TypeError, match="epsilon_hgh"):
        r1kernels.linear_grpo_loss(x, weight, targets, d["adv"], d["mask"], epsilon_hgh=0.3)


@pytest.mark.slow
def test_one_pass_memory_at_benchmark_shape():
    """B=4, T=1024, H=512, V=32768 fp32 (bench grpo): forward+backward peaks at most a fifth of one
    fp32 [N, V] logits tensor (102 MiB; materialising costs 1 GiB) above the inputs and the
    gradients, on the cpu backend: one 64 MiB chunk of logits, d logits in place, MKL's buffers."""
    backend = "cpu" if "cpu" in cpu_backends() else "torch"
    setup = """
        import torch, r1kernels
        torch.manual_seed(0)
        b, t, h, v = 4, 1024, 512, 32768
        hidden = torch.randn(b, t, h, requires_grad=True)
        weight = (torch.randn(v, h) * h ** -0.5).requires_grad_()
        targets = torch.randint(0, v, (b, t))
        mask = torch.ones(b, t); mask[:, 768:] = 0
        adv = torch.randn(b); old = -torch.rand(b, t) * 5; ref = old + 0.05 * torch.randn(b, t)
    """
    run = f"""
        with r1kernels.use_backend("{backend}"):
            out = r1kernels.linear_grpo_loss(hidden, weight, targets, adv, mask, old_logprobs=old, ref_logprobs=ref,
                                             beta=0.04, loss_type="grpo")
            out.loss.backward()
        extra["kept"] = hidden.grad.nbytes + weight.grad.nbytes
    """
    result = measure(setup, run)
    above = result["growth"] - result["kept"]
    assert above <= 4096 * 32768 * 4 / 5, f"{above / 2**20:.0f} MiB above the gradients"
