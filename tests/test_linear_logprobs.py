"""linear_token_logprobs (fused lm_head) against the float64 reference, plus its promises:
no [tokens, vocab] buffer, determinism and batch invariance, compile-ability; its property test, bad and
empty input on every backend, and its GPU checks at real sizes (``cuda``-marked)."""
import math

import pytest
import torch
from conftest import TOL, assert_close_scaled, autocast_grad_errors, cpu_backends, exact_backends
from gpu_cases import LINEAR_GPU_BACKENDS, gpu_test, real_lm_head, require
from hypothesis import given
from hypothesis import strategies as st
from op_cases import PROPERTY_SETTINGS, assert_empty_results, assert_rejects, empty_strided, ids, random_targets
from peak_memory import measure

import r1kernels
from r1kernels.reference import linear_token_logprobs_ref


def linear_backends():
    """Every row of the op's table that runs here, the fully fused Triton kernel included."""
    return cpu_backends("linear_logprobs", on_request=True)


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


@pytest.mark.parametrize("backend", exact_backends("linear_logprobs"))
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


@pytest.mark.parametrize("backend", [b for b in cpu_backends("linear_logprobs") if b != "triton"])
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
# round-to-nearest), so the triton backend's bf16 precision is measured on the GPU (below, ``cuda``-marked).
@pytest.mark.parametrize("backend", exact_backends("linear_logprobs"))
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


# ---------------------------------------------------------------- property

@PROPERTY_SETTINGS
@given(rows=st.integers(1, 33), hidden=st.integers(0, 40), vocab=st.integers(2, 600), bias=st.booleans(),
       temperature=st.floats(0.5, 1.5), masked=st.floats(0.0, 0.5), scale=st.sampled_from([1.0, 30.0]),
       seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", cpu_backends("linear_logprobs"))
def test_linear_token_logprobs_property(backend, rows, hidden, vocab, bias, temperature, masked, scale, seed):
    """Any shape (hidden size 0: the bias's log-probs), masked targets, logits of unit or 30x scale:
    log-probs, d hidden and d weight against the float64 reference."""
    dtype = torch.float64 if backend in exact_backends("linear_logprobs") else torch.float32
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen, dtype=dtype) * scale / max(hidden, 1) ** 0.5).requires_grad_()
    b = (torch.randn(vocab, generator=gen, dtype=dtype) if bias else None)
    targets = random_targets(gen, rows, vocab, masked)
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


# ---------------------------------------------------------------- bad and empty input

def test_linear_rejects():
    h, w, t = torch.randn(4, 3), torch.randn(10, 3), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="weight must have shape"):
        r1kernels.linear_token_logprobs(h, torch.randn(10, 4), t)
    with pytest.raises(TypeError, match="weight dtype"):
        r1kernels.linear_token_logprobs(h, w.double(), t)
    with pytest.raises(ValueError, match="bias must have shape"):
        r1kernels.linear_token_logprobs(h, w, t, bias=torch.randn(9))
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        r1kernels.linear_token_logprobs(h, w, torch.tensor([0, 1, 2, 11]))
    with pytest.raises(ValueError, match="targets must have shape"):
        r1kernels.linear_token_logprobs(h, w, t[:2])
    with pytest.raises(TypeError, match="hidden"):
        r1kernels.linear_token_logprobs(h.int(), w, t)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        r1kernels.linear_token_logprobs(torch.randn(4, 3), torch.randn(10, 3), torch.randint(0, 10, (4,)),
                                        temperature=temperature)


# Bad input: (case, call, exception, a pattern the message must match: it names the argument);
# each row runs on every backend of the op that runs on this machine's CPU
INVALID = [
    ("weight shape", lambda: r1kernels.linear_token_logprobs(torch.randn(2, 4), torch.randn(6, 3),
                                                             torch.tensor([0, 1])),
     ValueError, "weight"),
    ("bias shape", lambda: r1kernels.linear_token_logprobs(torch.randn(2, 4), torch.randn(6, 4), torch.tensor([0, 1]),
                                                           torch.randn(5)),
     ValueError, "bias"),
    ("targets shape", lambda: r1kernels.linear_token_logprobs(torch.randn(2, 4), torch.randn(6, 4), torch.tensor([0])),
     ValueError, "targets"),
    ("bias dtype", lambda: r1kernels.linear_token_logprobs(torch.randn(2, 4), torch.randn(6, 4), torch.tensor([0, 1]),
                                                          bias=torch.randn(6, dtype=torch.float64)),
     TypeError, "bias dtype"),
]


@pytest.mark.parametrize("case, call, error, pattern", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_inputs_name_the_argument(case, call, error, pattern):
    assert_rejects("linear_logprobs", call, error, pattern)


def _released(tensor):
    """The tensor as an engine leaves a parameter it released: FSDP2 resizes the unsharded storage to 0
    bytes when it reshards, ZeRO-3 frees what it gathered; the shape stays."""
    tensor.untyped_storage().resize_(0)
    return tensor


RELEASED = "has been released: its storage holds 0 bytes.*run the op inside the forward of the module that owns it"


@pytest.mark.parametrize("backend", linear_backends())
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_a_released_parameter_is_refused_in_each_pass(backend, which):
    """Released before the forward (read outside its module's forward) or between the passes (gathered
    for the forward only): a clear error from the op, also through linear_grpo_loss's one-pass route,
    never a read of the freed memory (on a GPU: whatever lies there)."""
    h, w, b, t = _inputs(6, 8, 11, torch.float32)
    leaves = {"weight": w.requires_grad_(), "bias": b.requires_grad_()}
    with r1kernels.use_backend(linear_logprobs=backend):
        logp = r1kernels.linear_token_logprobs(h, w, t, b)
        _released(leaves[which])
        with pytest.raises(RuntimeError, match=f"^{which} {RELEASED}"):
            logp.sum().backward()
        with pytest.raises(RuntimeError, match=f"^{which} {RELEASED}"):
            r1kernels.linear_token_logprobs(h, w, t, b)
        with pytest.raises(RuntimeError, match=f"^{which} {RELEASED}"):
            r1kernels.linear_grpo_loss(h[None], w, t[None], torch.ones(1), bias=b)


def test_a_released_weight_is_refused_in_a_compiled_graph():
    """Compiled, the Python checks are traced away; the custom op checks the storage it is handed."""
    h, w, b, t = _inputs(6, 8, 11, torch.float32)
    compiled = torch.compile(lambda h, w: r1kernels.linear_token_logprobs(h, w, t, b), fullgraph=True,
                             backend="aot_eager")
    assert compiled(h, w).shape == (6,)
    with pytest.raises(RuntimeError, match=f"^weight {RELEASED}"):
        compiled(h, _released(w.clone()))


_SHARD_SCRIPT = """
import os, torch, torch.distributed as dist, r1kernels
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:%d")
head = fully_shard(torch.nn.Linear(8, 11))
try:
    r1kernels.linear_token_logprobs(torch.randn(3, 8), head.weight, torch.tensor([1, 2, 3]), head.bias)
except TypeError as error:
    print(error)
dist.destroy_process_group()
"""


def test_an_fsdp2_shard_is_refused_with_what_to_do():
    """A DTensor weight (an FSDP2 parameter outside its module's forward, as fully_shard leaves it):
    refused, naming the cause and the fix, not gathered behind the caller's back (its gradient would
    have to be reduced across ranks as the engine does, which the op cannot know)."""
    import socket
    import subprocess
    import sys
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT % port], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("weight is a DTensor (placements (Shard(dim=0),)"), done.stdout
    assert "run the op inside the forward of the module that owns it" in done.stdout


EMPTY = {
    "linear_token_logprobs": (lambda: [empty_strided((0, 5), (1, 0)), torch.randn(7, 5, requires_grad=True), ids(0)],
                              r1kernels.linear_token_logprobs),
}


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("backend", cpu_backends("linear_logprobs"))
def test_empty_inputs_with_any_strides_give_empty_results(case, backend):
    """Empty outputs (a loss of 0 over no tokens) and gradients of each input's shape, on every backend."""
    assert_empty_results(backend, *EMPTY[case])


# ---------------------------------------------------------------- on the GPU

@gpu_test
@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_linear_token_logprobs_many_token_tiles(backend, deterministic):
    """70,000 tokens: more than 65,535 token tiles' worth of programs on a small vocabulary."""
    require(backend)
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


@gpu_test
@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_linear_token_logprobs_real_lm_head(backend, deterministic):
    require(backend)
    hidden, weight, targets, g_logp, g_ent, rows, cols, (rl, re, rdh, rdw) = real_lm_head()
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with r1kernels.use_backend(backend):
        logp, ent = r1kernels.linear_token_logprobs(x, w, targets, None, 1.0, True, deterministic=deterministic)
    (logp * g_logp + ent * g_ent).sum().backward()
    assert_close_scaled(logp[rows], rl, 2e-2, "logp")
    assert_close_scaled(ent[rows], re, 2e-2, "entropy")
    assert_close_scaled(x.grad[rows], rdh, 3e-2, "d hidden")
    assert_close_scaled(w.grad[cols], rdw, 3e-2, "d weight")


@gpu_test
@pytest.mark.parametrize("backend", LINEAR_GPU_BACKENDS)
def test_linear_token_logprobs_autocast_precision(backend):
    """Under torch.autocast(bf16) on the GPU, with fp32 leaves: the gradients are at least as close to
    float64 as TRL's kernel's in the same setting (the CPU test covers cpu and torch; the interpreter
    rounds bf16 by truncation, so the Triton kernels are measured here)."""
    require(backend)
    ours, trl = autocast_grad_errors(backend, "cuda")
    assert all(1e-4 < e < 2e-2 for e in ours), f"bf16 compute expected, errors {ours}"
    if trl is None:
        pytest.skip(f"TRL is not installed (ours: {ours})")
    assert all(o <= t * 1.05 for o, t in zip(ours, trl)), (ours, trl)


def test_hidden_size_zero_gives_the_log_probs_of_the_bias_alone():
    """H = 0: hidden @ weight.T is all zeros, so the logits are the bias (uniform without one); before, a
    reshape failed. Log-probs, entropy and the bias's gradient against float64."""
    hidden = torch.randn(2, 3, 0, requires_grad=True)
    weight = torch.randn(5, 0, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64).float().requires_grad_(True)
    targets = torch.tensor([[0, 1, -100], [4, 2, 3]])
    logp, entropy = r1kernels.linear_token_logprobs(hidden, weight, targets, bias, temperature=0.5,
                                                    return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    b = bias.detach().double().requires_grad_(True)
    log_softmax = torch.log_softmax(b / 0.5, -1)
    ref_logp = torch.where(targets == -100, 0.0, log_softmax[targets.clamp(min=0)])
    ref_entropy = torch.where(targets == -100, 0.0, -(log_softmax.exp() * log_softmax).sum())   # masked: 0
    (ref_logp.sum() + ref_entropy.sum()).backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias.grad.double(), b.grad, atol=1e-5, rtol=0)
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    uniform = r1kernels.linear_token_logprobs(hidden, weight, targets)
    assert torch.allclose(uniform[targets != -100], torch.tensor(-math.log(5.0)))
