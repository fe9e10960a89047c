"""token_logprobs on every CPU-runnable backend against the float64 reference: edge cases, the property
test, bad and empty input on every backend, and its GPU checks at real sizes (``cuda``-marked)."""
import pytest
import torch
from conftest import TOL, assert_close_scaled, cpu_backends, exact_backends
from gpu_cases import GPU_BACKENDS, gpu_test, require
from hypothesis import given
from hypothesis import strategies as st
from op_cases import PROPERTY_SETTINGS, assert_empty_results, assert_rejects, empty_strided, ids, random_targets
from sampled_reference import sample_indices, token_logprobs_rows

import r1kernels
from r1kernels import backends
from r1kernels.reference import token_logprobs_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(backend, logits, targets, temperature=1.0, inplace=False):
    """Forward and both gradients (log-prob and entropy, random upstream grads) against float64."""
    dtype = logits.dtype
    x = logits.detach().clone().requires_grad_()
    with r1kernels.use_backend(backend):
        logp, ent = r1kernels.token_logprobs(x, targets, temperature, return_entropy=True, inplace_backward=inplace)
    ref_x = logits.detach().double().requires_grad_()
    ref_logp, ref_ent = token_logprobs_ref(ref_x, targets, temperature)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert logp.shape == targets.shape and ent.shape == targets.shape
    tol = TOL[dtype]
    assert_close_scaled(logp, ref_logp, max(tol, 1e-5) if dtype != torch.float64 else tol, "logp")
    assert_close_scaled(ent, ref_ent, max(tol, 1e-5) if dtype != torch.float64 else tol, "entropy")
    g_logp, g_ent = torch.randn_like(ref_logp), torch.randn_like(ref_ent)
    (grad,) = torch.autograd.grad((logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_ent * g_ent).sum(), ref_x)
    assert grad.dtype == dtype
    assert_close_scaled(grad, ref_grad, tol, "d logits")
    masked = targets == -100
    assert (logp[masked] == 0).all() and (ent[masked] == 0).all()
    assert (grad[masked] == 0).all(), "masked tokens must get no gradient"


@pytest.mark.parametrize("backend", cpu_backends("logprobs"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1000, 32003, 7])
def test_matches_float64_reference(backend, dtype, vocab):
    rows = 13 if vocab > 10000 else 37
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    targets = torch.randint(0, vocab, (rows,))
    targets[::5] = -100
    _check(backend, logits, targets, temperature=0.7)


@pytest.mark.parametrize("backend", cpu_backends("logprobs"))
def test_three_d_noncontiguous_int32_targets(backend):
    base = torch.randn(6, 4, 515)
    logits = base.transpose(0, 1)[..., :500]          # [4, 6, 500], non-contiguous both ways
    targets = torch.randint(0, 500, (4, 6), dtype=torch.int32)
    _check(backend, logits, targets, temperature=1.3)


@pytest.mark.parametrize("backend", cpu_backends("logprobs"))
def test_row_strided_view_keeps_its_storage(backend):
    """A [N, V] view with row stride > V is read in place (no copy) and gives the same result."""
    padded = torch.randn(9, 300)
    view = padded[:, :257]
    targets = torch.randint(0, 257, (9,))
    _check(backend, view, targets)


@pytest.mark.parametrize("backend", cpu_backends("logprobs"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(backend, dtype):
    vocab = 300
    logits = torch.full((6, vocab), -1e4)
    logits[:, 17] = 1e4                     # one huge logit per row
    logits[1, 20] = 1e4                      # a tie
    logits[2] = torch.linspace(-1e4, 1e4, vocab)
    logits[3, ::2] = 1e4                    # many at the top
    logits[4] = 0.0                          # uniform
    logits = logits.to(dtype)
    targets = torch.tensor([17, 20, 0, 4, 5, 16])
    _check(backend, logits, targets)


def _errors_against_float64(backend, logits, targets, temperature, grads):
    """Relative max errors of (logp, entropy, d logits) against float64, for sum(g1 logp + g2 entropy)."""
    results = {}
    for name, x in (("float64", logits.double()), (backend, logits)):
        leaf = x.clone().requires_grad_()
        with r1kernels.use_backend("torch" if name == "float64" else backend):
            logp, entropy = r1kernels.token_logprobs(leaf, targets, temperature=temperature, return_entropy=True)
        ((logp * grads[0]).sum() + (entropy * grads[1]).sum()).backward()
        results[name] = (logp.double(), entropy.double(), leaf.grad.double())
    return [((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
            for ours, ref in zip(results[backend], results["float64"])]


@pytest.mark.skipif("cpu" not in cpu_backends("logprobs"), reason="needs the C++ extension")
@pytest.mark.parametrize("case", ["1e4-T0.3", "1e4-T1", "1e4-T1.3", "1e4-T2.7", "scale30-T0.3"])
def test_cpu_kernel_as_exact_as_torch_on_extreme_logits(case):
    """The vectorised C++ row kernel, fp32, forward and every gradient, within 2x the torch backend's
    error against float64: a fused multiply-add of logits * inv_t into z - max skipped the rounding
    the row's max saw (1.9e-4 relative at logits of 1e4 and temperature 1.3, against 2.6e-8)."""
    gen = torch.Generator().manual_seed(0)
    kind, temperature = case.split("-T")
    if kind == "1e4":
        logits = torch.randn(64, 1000, generator=gen)
        rows = torch.arange(64)
        logits[rows, torch.randint(0, 1000, (64,), generator=gen)] = 1e4
        logits[rows, torch.randint(0, 1000, (64,), generator=gen)] = -1e4
    else:
        logits = torch.randn(16, 32000, generator=gen) * 30
    targets = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=gen)
    grads = torch.randn(2, logits.shape[0], generator=gen)
    ours = _errors_against_float64("cpu", logits, targets, float(temperature), grads)
    theirs = _errors_against_float64("torch", logits, targets, float(temperature), grads)
    for name, a, b in zip(("logp", "entropy", "d logits"), ours, theirs):
        assert a <= 2 * b + 1e-7, f"{name}: cpu {a:.2e} against torch {b:.2e}"


@pytest.mark.parametrize("backend", cpu_backends("logprobs"))
def test_minus_infinity_logits_are_excluded_from_the_softmax(backend):
    logits = torch.randn(4, 50)
    logits[:, 25:] = float("-inf")          # e.g. padded vocabulary entries
    targets = torch.tensor([0, 3, 24, 10])
    with r1kernels.use_backend(backend):
        logp, ent = r1kernels.token_logprobs(logits, targets, return_entropy=True)
    ref_logp, ref_ent = token_logprobs_ref(logits[:, :25], targets)
    assert_close_scaled(logp, ref_logp, 1e-5, "logp")
    assert_close_scaled(ent, ref_ent, 1e-5, "entropy")


@pytest.mark.parametrize("backend", cpu_backends("logprobs"))
def test_all_masked_and_single_token_and_empty(backend):
    _check(backend, torch.randn(5, 64), torch.full((5,), -100))
    _check(backend, torch.randn(1, 64), torch.tensor([63]))
    with r1kernels.use_backend(backend):
        x = torch.randn(0, 64, requires_grad=True)
        logp = r1kernels.token_logprobs(x, torch.zeros(0, dtype=torch.long))
        logp.sum().backward()
    assert logp.shape == (0,) and x.grad.shape == (0, 64)


@pytest.mark.parametrize("backend", cpu_backends("logprobs"))
def test_inplace_backward_writes_into_the_logits(backend):
    logits = torch.randn(8, 333)
    targets = torch.randint(0, 333, (8,))
    _check(backend, logits, targets, inplace=True)
    x = logits.clone().requires_grad_()
    leaf_data = x.detach()
    with r1kernels.use_backend(backend):
        y = x * 1.0                                  # non-leaf, so its storage may be reused
        r1kernels.token_logprobs(y, targets, inplace_backward=True).sum().backward()
    assert torch.equal(leaf_data, logits), "the leaf's own data must stay untouched"


@pytest.mark.parametrize("backend", exact_backends("logprobs"))
def test_gradcheck_float64(backend):
    logits = torch.randn(3, 4, 29, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 29, (3, 4))
    targets[0, 1] = -100
    with r1kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: r1kernels.token_logprobs(x, targets, 0.6, True), (logits,))


def test_entropy_only_gradient():
    """Only the entropy feeds the loss: grad_logp is absent and must count as zero."""
    for backend in cpu_backends("logprobs"):
        logits = torch.randn(5, 40, dtype=torch.float32)
        targets = torch.randint(0, 40, (5,))
        x = logits.clone().requires_grad_()
        with r1kernels.use_backend(backend):
            _, ent = r1kernels.token_logprobs(x, targets, return_entropy=True)
        ent.sum().backward()
        ref_x = logits.double().requires_grad_()
        token_logprobs_ref(ref_x, targets)[1].sum().backward()
        assert_close_scaled(x.grad, ref_x.grad, 2e-5, backend)


def test_backends_agree_bitwise_where_they_should():
    """Same backend, same input: identical outputs run to run (no races, no uninitialised reads)."""
    logits = torch.randn(17, 999)
    targets = torch.randint(0, 999, (17,))
    for backend in cpu_backends("logprobs"):
        with r1kernels.use_backend(backend):
            a = r1kernels.token_logprobs(logits, targets, return_entropy=True)
            b = r1kernels.token_logprobs(logits, targets, return_entropy=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), backend


@pytest.mark.parametrize("backend", cpu_backends("logprobs"))
def test_nan_propagates_like_the_reference(backend):
    """A block of logits that is all NaN (more than the C++ kernel's 512-element block), or NaN rows of
    the lm_head weight, make logp and every gradient NaN where the float64 reference does: never a
    finite log-prob with a NaN gradient."""
    logits = torch.randn(3, 1300)
    logits[0, 512:1024] = float("nan")      # exactly one of the C++ kernel's blocks, the rest finite
    targets = torch.tensor([5, 7, 1299])
    with r1kernels.use_backend(backend):
        leaf = logits.clone().requires_grad_()
        logp = r1kernels.token_logprobs(leaf, targets)
        logp.sum().backward()
    expected = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None])[:, 0]
    assert torch.equal(torch.isnan(logp), torch.isnan(expected)) and torch.isnan(logp[0])
    assert torch.isnan(leaf.grad[0]).all() and torch.isfinite(leaf.grad[1:]).all()

    hidden, weight = torch.randn(4, 8), torch.randn(1300, 8)
    weight[512:1024] = float("nan")
    with r1kernels.use_backend(linear_logprobs=backend):
        h = hidden.clone().requires_grad_()
        logp = r1kernels.linear_token_logprobs(h, weight, torch.tensor([1, 2, 3, 4]))
        logp.sum().backward()
    assert torch.isnan(logp).all() and torch.isnan(h.grad).all()


def test_torch_backend_on_cuda_keeps_its_launches_in_the_hundreds(monkeypatch):
    """The torch row kernel's blocks on CUDA are the fused lm_head's chunk, not the CPU's cache-sized 4 MiB:
    at the GPU tests' 16,384 x 151,936 logits each pass takes hundreds of kernel launches, not tens of
    thousands. Launches are counted on CPU as the aten calls that make a kernel (not views, not the CPU
    scalars of torch.where), per block (one block against two) and per pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from r1kernels.logprobs import torch_rows

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += not func.is_view and func is not torch.ops.aten.scalar_tensor.default
            return func(*args, **(kwargs or {}))

    def launches(rows_per_block):
        monkeypatch.setattr(torch_rows, "block_bytes", lambda device: rows_per_block * 4 * 1000)
        logits, targets = torch.randn(8, 1000), torch.randint(0, 1000, (8,))
        with Count() as forward:
            _, ent, row_max, row_log_sum = torch_rows.forward(logits, targets, 1.0)
        with Count() as backward:
            torch_rows.backward(logits, targets, row_max, row_log_sum, ent, torch.ones(8), torch.ones(8), 1.0,
                                torch.empty_like(logits))
        return forward.calls, backward.calls

    one, two = launches(8), launches(4)
    per_block = [b - a for a, b in zip(one, two)]
    fixed = [a - p for a, p in zip(one, per_block)]
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (140 << 30, 141 << 30))
    monkeypatch.delenv("R1K_CHUNK_BYTES", raising=False)
    rows, vocab = 16384, 151936
    for device, low, high in (("cuda", 100, 1000), ("cpu", 10_000, None)):
        blocks = -(-rows // (torch_rows.block_bytes(torch.device(device)) // (4 * vocab)))
        for f, p in zip(fixed, per_block):
            assert low <= f + blocks * p and (high is None or f + blocks * p < high), (device, blocks, f, p)


# ---------------------------------------------------------------- property

@PROPERTY_SETTINGS
@given(rows=st.integers(1, 40), vocab=st.integers(2, 700), scale=st.sampled_from([1.0, 30.0, 300.0]),
       temperature=st.floats(0.3, 2.0), masked=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("backend", exact_backends("logprobs"))
def test_token_logprobs_property(backend, rows, vocab, scale, temperature, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    targets = random_targets(gen, rows, vocab, masked)
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


# ---------------------------------------------------------------- bad and empty input

def _ok():
    return torch.randn(4, 10), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("mutate, error, words", [
    (lambda x, t: (x.long(), t), TypeError, "logits"),
    (lambda x, t: ([1.0], t), TypeError, "logits"),
    (lambda x, t: (x, t.float()), TypeError, "targets"),
    (lambda x, t: (x, t[:3]), ValueError, "targets must have shape"),
    (lambda x, t: (x.unsqueeze(0), t), ValueError, "targets must have shape"),
    (lambda x, t: (x, torch.tensor([0, 1, 10, 2])), ValueError, "outside [0, 10)"),
    (lambda x, t: (x, torch.tensor([0, -1, 3, 2])), ValueError, "outside [0, 10)"),
])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_token_logprobs_rejects(mutate, error, words, backend):
    if backend == "cpu" and not backends.extension_available():
        pytest.skip("extension not built")
    x, t = mutate(*_ok())
    with r1kernels.use_backend(backend), pytest.raises(error, match=words.replace("[", r"\[").replace(")", r"\)")):
        r1kernels.token_logprobs(x, t)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature(temperature):
    x, t = _ok()
    with pytest.raises(ValueError, match="temperature"):
        r1kernels.token_logprobs(x, t, temperature=temperature)


def test_float64_on_triton_is_refused():
    if not backends.triton_interpreting():
        pytest.skip("needs the Triton interpreter")
    with r1kernels.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        r1kernels.token_logprobs(torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]))


# Bad input: (case, call, exception, a pattern the message must match: it names the argument);
# each row runs on every backend of the op that runs on this machine's CPU
INVALID = [
    ("logits int",
     lambda: r1kernels.token_logprobs(torch.ones(2, 5, dtype=torch.long), torch.tensor([0, 1])), TypeError, "logits"),
    ("target past V", lambda: r1kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 5])),
     ValueError, "targets"),
    ("temperature NaN",
     lambda: r1kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), float("nan")), ValueError,
     "temperature"),
    ("temperature inf", lambda: r1kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), float("inf")),
     ValueError, "temperature"),
    ("temperature True", lambda: r1kernels.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), True),
     TypeError, "temperature"),
    ("inplace_backward on expanded logits",
     lambda: r1kernels.token_logprobs(torch.randn(1, 5).expand(3, 5), torch.tensor([0, 1, 2]), inplace_backward=True),
     ValueError, "inplace_backward"),
]


@pytest.mark.parametrize("case, call, error, pattern", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_inputs_name_the_argument(case, call, error, pattern):
    assert_rejects("logprobs", call, error, pattern)


# (inputs, some empty with odd strides; the call). torch.randn(0, 1) * 0.1 has strides (1, 0), which the
# cpu backend's "unit vocab stride" check refused
EMPTY = {
    "token_logprobs": (lambda: [empty_strided((0, 7), (1, 0)), ids(0)],
                       lambda x, t: r1kernels.token_logprobs(x, t, return_entropy=True)),
    "token_logprobs [B, 0, V]": (lambda: [empty_strided((3, 0, 7), (0, 1, 0)), ids(3, 0)], r1kernels.token_logprobs),
}


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("backend", cpu_backends("logprobs"))
def test_empty_inputs_with_any_strides_give_empty_results(case, backend):
    """Empty outputs (a loss of 0 over no tokens) and gradients of each input's shape, on every backend."""
    assert_empty_results(backend, *EMPTY[case])


# ---------------------------------------------------------------- on the GPU

@gpu_test
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_logprobs_cuda(backend, dtype):
    require(backend)
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


@gpu_test
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.cuda_ext)])
def test_token_logprobs_past_2_31_logits(backend):
    """65,536 tokens x 151,936 vocab: N*V = 9.96e9 > 2^31, so every index must be 64-bit."""
    require(backend)
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
