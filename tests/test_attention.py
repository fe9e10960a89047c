"""varlen_attention and the packing helpers against the float64 reference, following flash-attn's own
test rule: error vs an fp32 reference <= 2x (forward) / 3x (backward) that of plain low-precision PyTorch;
the property test, bad and empty input on every backend, and long packed batches on the GPU."""
import pytest
import torch
from conftest import assert_close_scaled, cpu_backends
from gpu_cases import gpu_test, require
from hypothesis import given
from hypothesis import strategies as st
from op_cases import PROPERTY_SETTINGS, assert_empty_results, assert_rejects, empty_strided

import r1kernels
from r1kernels.flash_attn_compat import flash_attn_varlen_func
from r1kernels.reference import varlen_attention_ref

BACKENDS = [b for b in cpu_backends("attention") if b in ("triton", "torch")]


def _cu(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu


def _inputs(lens_q, lens_k, hq, hkv, d, dtype):
    q = torch.randn(sum(lens_q), hq, d).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d).to(dtype)
    return q, k, v, _cu(lens_q), _cu(lens_k)


def _run(backend, q, k, v, cu_q, cu_k, lens_q, lens_k, grad, return_lse=True, **kw):
    """(out, lse or None, (dq, dk, dv)). Without return_lse the torch backend takes its SDPA route."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with r1kernels.use_backend(backend):
        result = r1kernels.varlen_attention(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=return_lse,
                                            **kw)
    out, lse = result if return_lse else (result, None)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return out, lse, grads


def _reference(q, k, v, cu_q, cu_k, grad, dtype, **kw):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = varlen_attention_ref(*leaves, cu_q, cu_k, kw.get("softmax_scale"), kw.get("causal", False),
                                    kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0), dtype=dtype)
    return out, lse, torch.autograd.grad(out, leaves, grad.to(dtype))


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


CASES = [
    # lens_q, lens_k, hq, hkv, d, causal, window, softcap
    ([113, 1, 40], [113, 1, 40], 4, 4, 64, True, (-1, -1), 0.0),
    ([17, 0, 33], [29, 0, 45], 4, 2, 64, True, (-1, -1), 0.0),        # q shorter than k: bottom-right
    ([30, 9], [30, 9], 4, 1, 96, False, (-1, -1), 0.0),                 # MQA, head dim 96
    ([203], [203], 2, 2, 128, True, (31, -1), 0.0),                     # sliding window
    ([24, 50], [24, 50], 4, 2, 64, True, (-1, -1), 20.0),               # softcap
    ([20, 7], [12, 7], 2, 1, 256, False, (5, 3), 0.0),                  # head dim 256, two-sided window
    ([11, 5], [11, 5], 2, 2, 4, True, (-1, -1), 0.0),                   # head dim 4 (tiny test models)
    ([19], [23], 2, 1, 100, False, (-1, -1), 0.0),                      # head dim 100, padded to 128
]


# (backend, return_lse, deterministic): every backend with lse; the torch backend also without it (its
# SDPA route where that is exact); Triton's two backwards (dQ by atomic adds, or by its own kernel)
ROUTES = [(backend, True, False) for backend in BACKENDS] + [("torch", False, False)]
ROUTES += [("triton", True, True)] if "triton" in BACKENDS else []


@pytest.mark.parametrize("backend, return_lse, deterministic", ROUTES, ids=lambda r: str(r))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[0]}-k{c[1]}-h{c[2]}/{c[3]}-d{c[4]}-c{int(c[5])}")
def test_fp32_matches_float64(backend, return_lse, deterministic, case):
    lens_q, lens_k, hq, hkv, d, causal, window, softcap = case
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, hq, hkv, d, torch.float32)
    grad = torch.randn(sum(lens_q), hq, d)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    out, lse, grads = _run(backend, q, k, v, cu_q, cu_k, lens_q, lens_k, grad, return_lse=return_lse,
                           deterministic=deterministic, **kw)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, cu_q, cu_k, grad, torch.float64, **kw)
    tol = 2e-5 if softcap == 0 else 5e-5
    assert_close_scaled(out, ref_out, tol, "out")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close_scaled(g, r, tol * 3, f"d{name}")
    if not return_lse:
        return
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "queries that see no key must have lse +inf (flash-attn 2)"
    assert_close_scaled(lse[finite], ref_lse[finite], tol, "lse")


PRECISION_CONFIGS = {
    # hq, hkv, d, causal, window, softcap, extra keys per sequence (k longer than q: bottom-right)
    "causal-gqa": (4, 2, 64, True, (-1, -1), 0.0, 0),
    "mqa": (3, 1, 32, False, (-1, -1), 0.0, 0),
    "window": (2, 1, 64, True, (7, -1), 0.0, 0),
    "softcap": (2, 1, 32, True, (-1, -1), 20.0, 0),
    "unequal-lengths": (2, 1, 64, True, (-1, -1), 0.0, 9),
}
PRECISION_SEEDS = 20


def _rounding(ref, dtype):
    """flash-attn's absolute slack, 2 * |(x + 0.3 - 0.3) - x| in the low precision: about one unit in
    the last place at 0.3, taken over the whole tensor as flash-attn does (so that it also covers
    draws whose exact result is 0, such as a one-key query's dq)."""
    low = ref.to(dtype)
    return 2 * ((low + 0.3 - 0.3) - low).abs().max().item() if ref.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", list(PRECISION_CONFIGS))
def test_low_precision_flash_attn_rule(dtype, config):
    """flash-attn's acceptance rule on 20 independent random draws per configuration: each draw is
    one sequence (its own seed and length) of a packed call, and the rule must hold for each:
    error vs fp32 at most 2x (output) / 3x (each gradient) that of plain low-precision PyTorch."""
    if "triton" not in BACKENDS:
        pytest.skip("needs the Triton interpreter")
    hq, hkv, d, causal, window, softcap, extra = PRECISION_CONFIGS[config]
    lens_q, parts = [], []
    for seed in range(PRECISION_SEEDS):
        gen = torch.Generator().manual_seed(seed)
        n = int(torch.randint(1, 34, (), generator=gen))   # 1 to 3 tiles of the interpreter's 16
        lens_q.append(n)
        parts.append([torch.randn(n, hq, d, generator=gen), torch.randn(n + extra, hkv, d, generator=gen),
                      torch.randn(n + extra, hkv, d, generator=gen), torch.randn(n, hq, d, generator=gen)])
    lens_k = [n + extra for n in lens_q]
    q, k, v, grad = (torch.cat(x).to(dtype) for x in zip(*parts))
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    out, _, grads = _run("triton", q, k, v, cu_q, cu_k, lens_q, lens_k, grad, **kw)
    ref_out, _, ref_grads = _reference(q, k, v, cu_q, cu_k, grad, torch.float32, **kw)
    low_out, _, low_grads = _reference(q, k, v, cu_q, cu_k, grad, dtype, **kw)
    assert out.dtype == dtype
    slack = {name: _rounding(r, dtype) for name, r in zip(["out", "q", "k", "v"], [ref_out, *ref_grads])}
    for s in range(PRECISION_SEEDS):
        rows_q = slice(int(cu_q[s]), int(cu_q[s + 1]))
        rows_k = slice(int(cu_k[s]), int(cu_k[s + 1]))
        assert _max_err(out[rows_q], ref_out[rows_q]) <= (
            2 * _max_err(low_out[rows_q], ref_out[rows_q]) + slack["out"]), f"seed {s}: out"
        for name, g, r, low in zip("qkv", grads, ref_grads, low_grads):
            rows = rows_q if name == "q" else rows_k
            assert _max_err(g[rows], r[rows]) <= 3 * _max_err(low[rows], r[rows]) + slack[name], (
                f"seed {s}: d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_batch_invariant(backend):
    lens = [37, 5, 64]
    q, k, v, cu, _ = _inputs(lens, lens, 4, 2, 64, torch.float32)
    grad = torch.randn(sum(lens), 4, 64)
    first = _run(backend, q, k, v, cu, cu, lens, lens, grad, causal=True, deterministic=True)
    second = _run(backend, q, k, v, cu, cu, lens, lens, grad, causal=True, deterministic=True)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2])), "gradients must be bitwise reproducible"
    # the middle sequence alone gives bitwise the same output as inside the pack
    alone = slice(37, 42)
    solo = _run(backend, q[alone], k[alone], v[alone], _cu([5]), _cu([5]), [5], [5], grad[alone], causal=True)
    assert torch.equal(solo[0], first[0][alone])


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_without_keys_gives_zero(backend):
    # q longer than k with causal bottom-right alignment: the first queries see no key
    q, k, v, cu_q, cu_k = _inputs([6], [2], 2, 2, 64, torch.float32)
    with r1kernels.use_backend(backend):
        out, lse = r1kernels.varlen_attention(q, k, v, cu_q, cu_k, torch.tensor(6), torch.tensor(2), causal=True,
                                              return_lse=True)
    assert (out[:4] == 0).all() and (lse[:, :4] == float("inf")).all()
    assert (out[4:].abs() > 0).any()


NAN_CASES = [
    # lens_q, lens_k, hq, hkv, causal, window, softcap: several tiles per sequence (edge and inner ones)
    ([5, 70, 3], [5, 70, 3], 4, 2, True, (-1, -1), 0.0),
    ([40, 9], [52, 9], 2, 2, True, (7, -1), 0.0),                       # bottom-right, sliding window
    ([30, 12], [30, 12], 2, 1, False, (-1, -1), 20.0),                  # bidirectional, softcap
]


@pytest.mark.parametrize("backend, return_lse, deterministic", ROUTES, ids=lambda r: str(r))
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("case", NAN_CASES, ids=lambda c: f"q{c[0]}-k{c[1]}-w{c[5][0]}-s{int(c[6])}")
def test_a_nan_reaches_exactly_what_depends_on_it(backend, return_lse, deterministic, where, case):
    """One NaN in q, k or v: on every backend the outputs, lse and gradients that are NaN are exactly
    the float64 reference's (its rule: a NaN reaches exactly the softmaxes that include it; a query
    that cannot see its key stays finite), and every finite value matches it. Under Triton the queries
    that saw a NaN key came out as zeros with lse = +inf; under torch (SDPA) the whole sequence was NaN."""
    lens_q, lens_k, hq, hkv, causal, window, softcap = case
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, hq, hkv, 32, torch.float32)
    seq = max(len(lens_q) - 2, 0)                    # a middle token of the longest sequence
    cu, lens = (cu_q, lens_q) if where == "q" else (cu_k, lens_k)
    row = int(cu[seq]) + lens[seq] // 2
    {"q": q, "k": k, "v": v}[where][row, 0, 3] = float("nan")
    grad = torch.randn_like(q)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    out, lse, grads = _run(backend, q, k, v, cu_q, cu_k, lens_q, lens_k, grad, return_lse, deterministic=deterministic,
                           **kw)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, cu_q, cu_k, grad, torch.float64, **kw)
    pairs = [("out", out, ref_out), *zip(("dq", "dk", "dv"), grads, ref_grads)]
    pairs += [("lse", lse, ref_lse)] if lse is not None else []
    assert torch.isnan(ref_out).any() and not torch.isnan(ref_out).all(), "the case must have NaN and finite outputs"
    for name, ours, ref in pairs:
        nan = torch.isnan(ref)
        assert torch.equal(torch.isnan(ours), nan), f"{name}: NaN at {(torch.isnan(ours) ^ nan).nonzero()[:4].tolist()}"
        assert_close_scaled(ours[~nan], ref[~nan], 2e-5, name)


def test_flash_attn_compat_signature_and_errors():
    q, k, v, cu, _ = _inputs([8, 3], [8, 3], 2, 2, 64, torch.float32)
    out, lse, probs = flash_attn_varlen_func(q, k, v, cu, cu, 8, 8, causal=True, return_attn_probs=True)
    ref, ref_lse = varlen_attention_ref(q, k, v, cu, cu, causal=True)
    assert_close_scaled(out, ref, 2e-5)
    assert lse.shape == (2, 11) and probs is None
    for kwargs, words in ((dict(dropout_p=0.1), "dropout_p"), (dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
                          (dict(block_table=torch.zeros(1)), "block_table")):
        with pytest.raises(NotImplementedError, match=words):
            flash_attn_varlen_func(q, k, v, cu, cu, 8, 8, **kwargs)


@pytest.mark.parametrize("change, error, words", [
    (lambda a: dict(a, cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError, "cu_seqlens_q must be int32"),
    (lambda a: dict(a, cu_seqlens_q=torch.tensor([1, 8, 11], dtype=torch.int32)), ValueError, "must start at 0"),
    (lambda a: dict(a, cu_seqlens_k=torch.tensor([0, 9, 8, 11], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must be non-decreasing"),
    (lambda a: dict(a, cu_seqlens_q=torch.tensor([0, 8, 10], dtype=torch.int32)), ValueError, "must end at"),
    (lambda a: dict(a, k=a["k"][:, :1].repeat(1, 3, 1), v=a["v"][:, :1].repeat(1, 3, 1)), ValueError,
     "multiple of Hkv"),
    (lambda a: dict(a, q=a["q"].repeat(1, 1, 5)[..., :300], k=a["k"].repeat(1, 1, 5)[..., :300],
                    v=a["v"].repeat(1, 1, 5)[..., :300]), ValueError, "unsupported head_dim 300"),
    (lambda a: dict(a, k=a["k"].double()), TypeError, "share a dtype"),
    (lambda a: dict(a, max_seqlen_q=5), ValueError, "max_seqlen_q = 5 is smaller than the longest sequence"),
])
def test_bad_input(change, error, words):
    q, k, v, cu, _ = _inputs([8, 3], [8, 3], 2, 2, 64, torch.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=8, max_seqlen_k=8)
    with pytest.raises(error, match=words):
        r1kernels.varlen_attention(**change(args))


def test_pack_unpack_and_planner():
    seqs = [torch.arange(5), torch.arange(10, 13), torch.arange(20, 21)]
    packed = r1kernels.pack(seqs)
    assert packed.cu_seqlens.tolist() == [0, 5, 8, 9] and packed.cu_seqlens.dtype == torch.int32
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0] and packed.max_seqlen == 5
    assert all(torch.equal(a, b) for a, b in zip(r1kernels.unpack(packed.input_ids, packed.cu_seqlens), seqs))

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 4096, (64,), generator=gen).tolist()
    plan = r1kernels.plan_micro_batches(lengths, max_tokens=8192, num_ranks=4)
    seen = sorted(i for rank in plan for mb in rank for i in mb)
    assert seen == list(range(64)), "every sequence exactly once"
    assert all(sum(lengths[i] for i in mb) <= 8192 for rank in plan for mb in rank)
    loads = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert max(loads) - min(loads) <= max(lengths), "ranks balanced within the longest sequence"
    with pytest.raises(ValueError, match="longer than max_tokens"):
        r1kernels.plan_micro_batches([10, 20], max_tokens=15)


@pytest.mark.parametrize("causal, lens_k", [(False, [9, 0, 31, 1]), (True, [9, 0, 31, 1]),
                                             (False, [4, 6, 50, 0])])     # keys sliced by cu_seqlens_k
def test_torch_backend_sdpa_path_matches_reference(causal, lens_k):
    """Without return_lse the torch backend calls SDPA per sequence: same results, same gradients,
    also when the key lengths differ from the query lengths (and a query sees no key: output 0)."""
    lens = [9, 0, 31, 1]
    q, k, v, cu, cu_k = _inputs(lens, lens_k, 4, 2, 64, torch.float32)
    grad = torch.randn(sum(lens), 4, 64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with r1kernels.use_backend("torch"):
        out = r1kernels.varlen_attention(*leaves, cu, cu_k, 31, max(lens_k), causal=causal)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_out, _, ref_grads = _reference(q, k, v, cu, cu_k, grad, torch.float64, causal=causal)
    assert_close_scaled(out, ref_out, 2e-5, "out")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close_scaled(g, r, 6e-5, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, lens_q, lens_k", [(True, [13, 1, 21], [13, 1, 21]), (True, [6, 4], [2, 9]),
                                                     (False, [5, 0, 17], [8, 3, 17])])
def test_sinks_match_float64(backend, causal, lens_q, lens_k):
    """GPT-OSS attention sinks: out, lse and the gradients of q, k, v and the sinks themselves.
    (6 queries on 2 causal keys: the first 4 see no key, and their output is 0, their lse the sink's.)"""
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, 4, 2, 32, torch.float32)
    sinks = torch.randn(4) * 2
    grad = torch.randn(sum(lens_q), 4, 32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    with r1kernels.use_backend(backend):
        out, lse = r1kernels.varlen_attention(*leaves[:3], cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                              sinks=leaves[3], return_lse=True)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v, sinks)]
    ref_out, ref_lse = varlen_attention_ref(*ref_leaves[:3], cu_q, cu_k, None, causal, sinks=ref_leaves[3])
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad.double())
    assert torch.isfinite(lse).all(), "with a sink every query has a finite lse"
    assert_close_scaled(out, ref_out, 2e-5, "out")
    assert_close_scaled(lse, ref_lse, 2e-5, "lse")
    for name, g, r in zip(["dq", "dk", "dv", "dsinks"], grads, ref_grads):
        assert_close_scaled(g, r, 6e-5, name)
    plain = varlen_attention_ref(q.double(), k.double(), v.double(), cu_q, cu_k, None, causal)[0]
    assert (ref_out - plain).abs().max() > 1e-3, "the sinks must change the result"


@pytest.mark.parametrize("bad, words", [(torch.ones(3), r"sinks must be \[Hq\]"),
                                        (torch.ones(2, dtype=torch.long), "sinks must be float")])
def test_sinks_bad_input(bad, words):
    q, k, v, cu, _ = _inputs([8, 3], [8, 3], 2, 2, 16, torch.float32)
    with pytest.raises((ValueError, TypeError), match=words):
        r1kernels.varlen_attention(q, k, v, cu, cu, 8, 8, sinks=bad)


def test_offsets_checked_on_device_without_host_checks(monkeypatch):
    """R1K_CHECKS=0 (the default on GPU): no host read, one device-side assert that still names the argument."""
    monkeypatch.setenv("R1K_CHECKS", "0")
    q, k, v, cu, _ = _inputs([8, 3], [8, 3], 2, 2, 16, torch.float32)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must start at 0, be non-decreasing and end at the number"):
        r1kernels.varlen_attention(q, k, v, torch.tensor([0, 8, 10], dtype=torch.int32), cu, 8, 8)
    with pytest.raises(RuntimeError, match="no sequence longer than max_seqlen_k = 5"):
        r1kernels.varlen_attention(q, k, v, cu, cu, 8, 5)
    out = r1kernels.varlen_attention(q, k, v, cu, cu, 8, 8)
    assert_close_scaled(out, varlen_attention_ref(q, k, v, cu, cu)[0], 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_graph_rejects_bad_offsets(backend):
    """Under torch.compile the host checks are traced away; the device-side assert is not."""
    torch._dynamo.reset()
    q, k, v, cu, _ = _inputs([7, 3], [7, 3], 2, 2, 16, torch.float32)

    def attention(q, k, v, cu_q, cu_k):
        return r1kernels.varlen_attention(q, k, v, cu_q, cu_k, 7, 7, causal=True)

    compiled = torch.compile(attention, backend="eager")
    with r1kernels.use_backend(backend):
        assert_close_scaled(compiled(q, k, v, cu, cu), varlen_attention_ref(q, k, v, cu, cu, causal=True)[0], 2e-5)
        short = torch.tensor([0, 7, 9], dtype=torch.int32)        # 9 tokens claimed, 10 given
        with pytest.raises(RuntimeError, match="cu_seqlens_q must start at 0"):
            compiled(q, k, v, short, short)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "dq-kernel"])
@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)], ids=["M32-N16", "M16-N32"])
@pytest.mark.parametrize("causal, window, lens_q, lens_k", [
    (True, (-1, -1), [70, 3, 41], [70, 3, 41]), (True, (21, -1), [70, 41], [70, 41]),
    (False, (9, 13), [45, 7], [52, 7]), (True, (-1, -1), [30, 12], [61, 12])])
def test_unequal_tiles_split_edge_and_inner_key_tiles(deterministic, tiles, causal, window, lens_q, lens_k,
                                                     monkeypatch):
    """The GPU configurations have BLOCK_M != BLOCK_N (128 x 64 forward, 64 x 128 dK/dV, 128 x 64 dQ);
    the split of each block's tiles (keys of a query block, queries of a key block) into masked edge
    tiles and unmasked inner tiles must hold for them too, in both backwards."""
    if "triton" not in BACKENDS:
        pytest.skip("needs the Triton interpreter")
    from r1kernels.attention import triton_kernels as triton_attention
    block_m, block_n = tiles
    original = triton_attention._config

    def unequal(*args):
        config, launch = original(*args)
        return dict(config, BLOCK_M=block_m, BLOCK_N=block_n), launch

    monkeypatch.setattr(triton_attention, "_config", unequal)
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, 2, 1, 16, torch.float32)
    grad = torch.randn(sum(lens_q), 2, 16)
    kw = dict(causal=causal, window_size=window)
    out, lse, grads = _run("triton", q, k, v, cu_q, cu_k, lens_q, lens_k, grad, deterministic=deterministic, **kw)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, cu_q, cu_k, grad, torch.float64, **kw)
    assert_close_scaled(out, ref_out, 2e-5, "out")
    assert torch.equal(lse == float("inf"), ref_lse == float("inf"))
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close_scaled(g, r, 6e-5, f"d{name}")


@pytest.mark.parametrize("heavy", [None, "last", "first"])
def test_block_table_lists_every_block_once_heaviest_first(heavy):
    """The Triton grid's work items: each (sequence, block) exactly once, at most S empty slots (a start
    no sequence reaches) and those last, ordered by the block's work (the keys a causal query block
    sees, the queries a causal key block is seen by, else the sequence's length), heaviest first;
    built on the device without reading lengths on the host, and cached on the offsets tensor."""
    from r1kernels.attention.triton_kernels import _block_table
    lengths = [0, 5, 33, 16, 1, 70]
    cu = _cu(lengths)
    slot_seq, slot_start, bound = _block_table(cu, 16, sum(lengths), heavy)
    assert bound == len(lengths) + sum(lengths) // 16
    items = [(s, start) for s, start in zip(slot_seq.tolist(), slot_start.tolist()) if start < lengths[s]]
    expected = [(s, b * 16) for s, n in enumerate(lengths) for b in range(-(-n // 16))]
    assert sorted(items) == expected
    unused = slot_start[len(items):].tolist()
    assert unused == [1 << 30] * (bound - len(items)) and len(unused) <= len(lengths)

    def work(s, start):
        return {"last": min(start + 16, lengths[s]), "first": lengths[s] - start, None: lengths[s]}[heavy]

    works = [work(s, start) for s, start in items]
    assert works == sorted(works, reverse=True)
    assert _block_table(cu, 16, sum(lengths), heavy)[0] is slot_seq, "built once per offsets tensor"
    assert _block_table(cu, 32, sum(lengths), heavy)[0] is not slot_seq


# ---------------------------------------------------------------- property

@PROPERTY_SETTINGS
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


# ---------------------------------------------------------------- bad and empty input

def _offsets(*bounds):
    return torch.tensor(bounds, dtype=torch.int32)


# Bad input: (case, call, exception, a pattern the message must match: it names the argument);
# each row runs on every backend of the op that runs on this machine's CPU
INVALID = [
    ("offsets past total", lambda: r1kernels.varlen_attention(
        torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), _offsets(0, 3, 6), _offsets(0, 3, 6), 3, 3),
     ValueError, "cu_seqlens_q"),
    ("offsets int64", lambda: r1kernels.varlen_attention(
        torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), _offsets(0, 5).long(), _offsets(0, 5), 5, 5),
     TypeError, "cu_seqlens_q"),
    ("heads not grouped", lambda: r1kernels.varlen_attention(
        torch.randn(5, 3, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), _offsets(0, 5), _offsets(0, 5), 5, 5),
     ValueError, "Hq"),
    ("max_seqlen too small", lambda: r1kernels.varlen_attention(
        torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), _offsets(0, 5), _offsets(0, 5), 4, 5),
     ValueError, "max_seqlen_q"),
    ("head dim 300", lambda: r1kernels.varlen_attention(
        torch.randn(5, 2, 300), torch.randn(5, 2, 300), torch.randn(5, 2, 300), _offsets(0, 5), _offsets(0, 5), 5, 5),
     ValueError, "head_dim"),
    ("sinks shape", lambda: r1kernels.varlen_attention(
        torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), _offsets(0, 5), _offsets(0, 5), 5, 5,
        sinks=torch.zeros(3)), ValueError, "sinks"),
]


@pytest.mark.parametrize("case, call, error, pattern", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_inputs_name_the_argument(case, call, error, pattern):
    assert_rejects("attention", call, error, pattern)


# the packing helpers (no backends)
PACKING_INVALID = [
    ("unpack past N", lambda: r1kernels.unpack(torch.arange(5), torch.tensor([0, 3, 7])), ValueError, "cu_seqlens"),
    ("unpack decreasing", lambda: r1kernels.unpack(torch.arange(5), torch.tensor([0, 4, 2, 5])), ValueError,
     "non-decreasing"),
    ("unpack negative", lambda: r1kernels.unpack(torch.arange(5), torch.tensor([-1, 2, 5])), ValueError,
     "start at 0"),
    ("pack mixed dtypes", lambda: r1kernels.pack([torch.arange(3), torch.arange(2).int()]), TypeError,
     r"sequences\[1\]"),
    ("plan negative length", lambda: r1kernels.plan_micro_batches([3, -1], 8), ValueError, r"lengths\[1\]"),
    ("plan NaN budget", lambda: r1kernels.plan_micro_batches([3, 1], float("nan")), ValueError, "max_tokens"),
]


@pytest.mark.parametrize("case, call, error, pattern", PACKING_INVALID, ids=[c[0] for c in PACKING_INVALID])
def test_packing_helpers_name_the_argument(case, call, error, pattern):
    assert_rejects(None, call, error, pattern)


def _empty_qkv():
    return (empty_strided((0, 2, 16), (1, 0, 0)), empty_strided((0, 2, 16), (0, 1, 0)),
            empty_strided((0, 2, 16), (0, 0, 0)))


EMPTY = {
    "varlen_attention": (lambda: [*_empty_qkv(), torch.zeros(1, dtype=torch.int32)],
                         lambda q, k, v, cu: r1kernels.varlen_attention(q, k, v, cu, cu, 0, 0, causal=True)),
}


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("backend", cpu_backends("attention"))
def test_empty_inputs_with_any_strides_give_empty_results(case, backend):
    """Empty outputs (a loss of 0 over no tokens) and gradients of each input's shape, on every backend."""
    assert_empty_results(backend, *EMPTY[case])


# ---------------------------------------------------------------- on the GPU

def _packed(lengths, heads, kv_heads, d, dtype, gen):
    total = sum(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lengths, device="cuda").cumsum(0)
    q, k, v = (torch.randn(total, hh, d, device="cuda", generator=gen).to(dtype)
               for hh in (heads, kv_heads, kv_heads))
    return q, k, v, cu


@gpu_test
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
    require("triton")
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
