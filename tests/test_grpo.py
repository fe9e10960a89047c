"""policy_loss / grpo_loss / linear_grpo_loss against the independent float64 reference: every loss
type and layout, the one-pass route of the fused lm_head, the property test, bad and empty input, and
the GPU check of the one-pass route (``cuda``-marked)."""
import pytest
import torch
from conftest import assert_close_scaled, cpu_backends, exact_backends
from gpu_cases import gpu_test, real_lm_head, require
from grpo_cases import B, T, loss_batch, loss_cases, loss_options_of, reference_options, to_packed
from hypothesis import given
from hypothesis import strategies as st
from op_cases import PROPERTY_SETTINGS, assert_empty_results, assert_rejects, empty_strided, ids
from peak_memory import measure
from torch.utils._python_dispatch import TorchDispatchMode

import r1kernels
from r1kernels.grpo import LOSS_TYPES
from r1kernels.reference import grpo_loss_ref, linear_token_logprobs_ref, token_logprobs_ref


@pytest.mark.parametrize("case", list(loss_cases()), ids=lambda c: "-".join(str(x) for x in c))
def test_policy_loss_matches_reference_padded_and_packed(case):
    d = loss_batch()
    opts = loss_options_of(*case)
    lp = d["logp"].clone().requires_grad_()
    ent = d["entropy"].clone().requires_grad_()
    out = r1kernels.policy_loss(lp, d["adv"], d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"], entropy=ent,
                                entropy_coef=0.01, **opts)
    out.loss.backward()
    ref_lp = d["logp"].clone().requires_grad_()
    ref_ent = d["entropy"].clone().requires_grad_()
    ref = grpo_loss_ref(ref_lp, d["adv"], d["mask"], d["old"], d["ref"], ref_ent, entropy_coef=0.01,
                        **reference_options(opts))
    ref.backward()
    assert_close_scaled(out.loss, ref, 1e-12, "loss")
    assert_close_scaled(lp.grad, ref_lp.grad, 1e-12, "d logprobs")
    assert_close_scaled(ent.grad, ref_ent.grad, 1e-12, "d entropy")
    assert (lp.grad[~d["mask"]] == 0).all()

    # packed: the same tokens, cu_seqlens from the lengths (the empty row is a zero-length sequence)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = d["lengths"].cumsum(0)
    packed_lp = to_packed(d["logp"], d["lengths"]).requires_grad_()
    packed = r1kernels.policy_loss(packed_lp, d["adv"], cu_seqlens=cu,
                                   old_logprobs=to_packed(d["old"], d["lengths"]),
                                   ref_logprobs=to_packed(d["ref"], d["lengths"]),
                                   entropy=to_packed(d["entropy"], d["lengths"]), entropy_coef=0.01, **opts)
    packed.loss.backward()
    assert_close_scaled(packed.loss, ref, 1e-12, "packed loss")
    assert_close_scaled(packed_lp.grad, to_packed(ref_lp.grad, d["lengths"]), 1e-12, "packed d logprobs")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k3_clamped"])
def test_kl_estimators_and_per_token_advantages_and_is_ratio(estimator):
    d = loss_batch()
    d["ref"] = d["logp"] + torch.randn(B, T, dtype=torch.float64) * 4   # large gaps: k3 clamp bites
    adv_tokens = torch.randn(B, T, dtype=torch.float64)
    is_ratio = torch.rand(B, dtype=torch.float64) + 0.5
    lp = d["logp"].clone().requires_grad_()
    out = r1kernels.policy_loss(lp, adv_tokens, d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"], beta=0.1,
                                kl_estimator=estimator, is_ratio=is_ratio, loss_type="bnpo")
    out.loss.backward()
    ref_lp = d["logp"].clone().requires_grad_()
    ref = grpo_loss_ref(ref_lp, adv_tokens, d["mask"], d["old"], d["ref"], loss_type="bnpo", beta=0.1,
                        kl_estimator=estimator, is_ratio=is_ratio[:, None].expand(B, T))
    ref.backward()
    assert_close_scaled(out.loss, ref, 1e-12)
    assert_close_scaled(lp.grad, ref_lp.grad, 1e-12)


# is_ratio as the samplers' corrections hand it: per token (TRL's token_* modes, verl's token-level weights),
# one per sequence as [B, 1] (TRL's sequence_* modes) or [B]; packed [N], [S] or [S, 1]
IS_SHAPES = ("per token", "per sequence [B, 1]", "per sequence [B]")


@pytest.mark.parametrize("shape", IS_SHAPES)
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_is_ratio_in_every_shape_matches_reference_padded_and_packed(loss_type, shape):
    """Loss and gradient against the float64 reference, padded and packed (where a per-sequence ratio
    is given as [S] or [S, 1]), with ratios that a mask mode zeroed (0) and a truncation capped (3.0)."""
    d = loss_batch()
    opts = loss_options_of(loss_type, "sequence" if loss_type == "luspo" else "token", 0.04, None, None)
    gen = torch.Generator().manual_seed(3)
    is_ratio = (torch.rand(B, T, generator=gen, dtype=torch.float64) * 1.5 + 0.3) if shape == "per token" else \
        torch.rand(B, 1, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    is_ratio[0, 0], is_ratio[5, 0] = 0.0, 3.0
    if shape == "per sequence [B]":
        is_ratio = is_ratio[:, 0]
    lp = d["logp"].clone().requires_grad_()
    out = r1kernels.policy_loss(lp, d["adv"], d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"],
                                is_ratio=is_ratio, **opts)
    ref_lp = d["logp"].clone().requires_grad_()
    ref = grpo_loss_ref(ref_lp, d["adv"], d["mask"], d["old"], d["ref"], is_ratio=is_ratio, **reference_options(opts))
    (grad,), (ref_grad,) = torch.autograd.grad(out.loss, lp), torch.autograd.grad(ref, ref_lp)
    assert_close_scaled(out.loss, ref, 1e-12, "loss")
    assert_close_scaled(grad, ref_grad, 1e-12, "d logprobs")

    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = d["lengths"].cumsum(0)
    packed_lp = to_packed(d["logp"], d["lengths"]).requires_grad_()
    packed_is = to_packed(is_ratio, d["lengths"]) if shape == "per token" else is_ratio
    packed = r1kernels.policy_loss(packed_lp, d["adv"], to_packed(d["mask"], d["lengths"]), cu_seqlens=cu,
                                   old_logprobs=to_packed(d["old"], d["lengths"]),
                                   ref_logprobs=to_packed(d["ref"], d["lengths"]), is_ratio=packed_is, **opts)
    assert_close_scaled(packed.loss, ref, 1e-12, "packed loss")
    assert_close_scaled(torch.autograd.grad(packed.loss, packed_lp)[0], to_packed(ref_grad, d["lengths"]), 1e-12,
                        "packed d logprobs")


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_a_sequence_ratio_means_its_tokens_ratio_product(loss_type):
    """What one ratio per sequence means, without the reference: for the types that scale each token's
    loss, the ratio on every token (TRL's [B, 1] broadcast); for vespo, whose weight is the sequence's
    ratio, the ratio counted once: the same as a per-token ratio holding it on one token and 1 elsewhere
    (not r^L, which spreading it over the tokens would give)."""
    d = loss_batch()
    opts = loss_options_of(loss_type, "sequence" if loss_type == "luspo" else "token", 0.0, None, None)
    per_seq = torch.rand(B, 1, dtype=torch.float64) + 0.5
    if LOSS_TYPES[loss_type].whole_sequence:
        per_token = torch.ones(B, T, dtype=torch.float64)
        per_token[:, :1] = per_seq       # every non-empty sequence's first token is unmasked
    else:
        per_token = per_seq.expand(B, T)
    lp = d["logp"].clone().requires_grad_()

    def loss(is_ratio):
        out = r1kernels.policy_loss(lp, d["adv"], d["mask"], old_logprobs=d["old"], is_ratio=is_ratio, **opts)
        return out.loss, torch.autograd.grad(out.loss, lp)[0], out.metrics

    (seq_loss, seq_grad, seq_metrics), (tok_loss, tok_grad, tok_metrics) = loss(per_seq), loss(per_token)
    assert_close_scaled(seq_loss, tok_loss, 1e-12, "loss")
    assert_close_scaled(seq_grad, tok_grad, 1e-12, "d logprobs")
    if LOSS_TYPES[loss_type].whole_sequence:
        spread = loss(per_seq.expand(B, T))
        assert not torch.allclose(spread[0], seq_loss), "r counted once per token must differ from r counted once"
        torch.testing.assert_close(seq_metrics["sequence_weight_mean"], tok_metrics["sequence_weight_mean"])


def test_advantages_of_shape_b_1_are_per_sequence():
    """TRL unsqueezes its (B,) advantages to (B, 1): that shape means one value per sequence too."""
    d = loss_batch()
    lp = d["logp"].clone().requires_grad_()
    flat = r1kernels.policy_loss(lp, d["adv"], d["mask"], old_logprobs=d["old"])
    column = r1kernels.policy_loss(lp, d["adv"][:, None], d["mask"], old_logprobs=d["old"])
    assert_close_scaled(column.loss, flat.loss, 1e-12, "loss")
    assert_close_scaled(torch.autograd.grad(column.loss, lp)[0], torch.autograd.grad(flat.loss, lp)[0], 1e-12,
                        "d logprobs")


def test_is_ratio_of_a_wrong_shape_names_the_shapes():
    with pytest.raises(ValueError, match=r"is_ratio must have shape \(2, 3\), \(2,\) or \(2, 1\), got \(2, 2\)"):
        r1kernels.policy_loss(torch.randn(2, 3), torch.randn(2), is_ratio=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"is_ratio must have shape \(2,\) or \(2, 1\) with per_sequence=True"):
        r1kernels.policy_loss(torch.randn(2, 3), torch.randn(2), is_ratio=torch.ones(2, 3), per_sequence=True)


def test_on_policy_ratio_is_one_and_gradient_flows():
    d = loss_batch()
    lp = d["logp"].clone().requires_grad_()
    out = r1kernels.policy_loss(lp, d["adv"], d["mask"])
    out.loss.backward()
    assert out.metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert out.metrics["clip_ratio_region"].item() == 0.0
    # grpo on-policy: d loss / d logp_bt = -A_b / (B * len_b) on active tokens
    lengths = d["mask"].sum(1).clamp(min=1).double()
    expected = -(d["adv"] / (B * lengths))[:, None].expand(B, T) * d["mask"]
    assert_close_scaled(lp.grad, expected, 1e-12)
    # old_logprobs equal to the current ones is the same thing
    lp2 = d["logp"].clone().requires_grad_()
    r1kernels.policy_loss(lp2, d["adv"], d["mask"], old_logprobs=d["logp"].clone()).loss.backward()
    assert_close_scaled(lp2.grad, expected, 1e-12)


def test_zero_advantages_give_zero_policy_gradient():
    d = loss_batch()
    lp = d["logp"].clone().requires_grad_()
    r1kernels.policy_loss(lp, torch.zeros(B, dtype=torch.float64), d["mask"], old_logprobs=d["old"]).loss.backward()
    assert (lp.grad == 0).all()


def test_metrics_match_their_definitions():
    d = loss_batch(spread=1.0)
    out = r1kernels.policy_loss(d["logp"], d["adv"], d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"],
                                entropy=d["entropy"], epsilon_low=0.2, epsilon_high=0.28)
    m = d["mask"]
    r = torch.exp(d["logp"] - d["old"])[m]
    a = d["adv"][:, None].expand(B, T)[m]
    low = ((r < 0.8) & (a < 0)).double().mean()
    high = ((r > 1.28) & (a > 0)).double().mean()
    assert out.metrics["clip_ratio_low"].item() == pytest.approx(low.item())
    assert out.metrics["clip_ratio_high"].item() == pytest.approx(high.item())
    assert out.metrics["clip_ratio_region"].item() == pytest.approx((low + high).item())
    assert out.metrics["ratio_min"].item() == pytest.approx(r.min().item())
    assert out.metrics["ratio_max"].item() == pytest.approx(r.max().item())
    assert out.metrics["entropy_mean"].item() == pytest.approx(d["entropy"][m].mean().item())
    dd = d["ref"] - d["logp"]
    assert out.metrics["kl_mean"].item() == pytest.approx((torch.exp(dd) - dd - 1)[m].mean().item())
    assert low.item() > 0 and high.item() > 0, "the batch must exercise both clip sides"


def test_grpo_loss_names_a_mask_of_the_wrong_shape():
    """Before: torch's broadcast error from inside the loss (policy_loss checked it, grpo_loss did not)."""
    with pytest.raises(ValueError, match="mask must have the targets' shape"):
        r1kernels.grpo_loss(torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)), torch.randn(2),
                            torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("route", ["policy_loss", "linear_grpo_loss"])
def test_ratio_extremes_are_nan_when_every_token_is_masked(route):
    """No token, no extreme: NaN, not float32's max as a sentinel (3.4e38, before); the means stay 0."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
    targets, mask, adv = torch.randint(0, 11, (2, 3)), torch.zeros(2, 3, dtype=torch.bool), torch.randn(2)
    if route == "policy_loss":
        out = r1kernels.policy_loss(torch.randn(2, 3), adv, mask)
    else:
        out = r1kernels.linear_grpo_loss(hidden, weight, targets.masked_fill(~mask, -100), adv, mask)
    assert out.metrics["ratio_min"].isnan() and out.metrics["ratio_max"].isnan()
    assert out.metrics["ratio_mean"].item() == 0.0 and out.loss.item() == 0.0


def test_packed_length_one_sequences():
    n = 7
    lp = -torch.rand(n, dtype=torch.float64, requires_grad=True)
    cu = torch.arange(n + 1, dtype=torch.int32)
    adv = torch.randn(n, dtype=torch.float64)
    old = lp.detach() + torch.randn(n, dtype=torch.float64)
    out = r1kernels.policy_loss(lp, adv, cu_seqlens=cu, old_logprobs=old, importance_sampling_level="sequence")
    ref = grpo_loss_ref(lp[:, None], adv, torch.ones(n, 1, dtype=torch.bool), old[:, None],
                        importance_sampling_level="sequence")
    assert_close_scaled(out.loss, ref, 1e-12)


@pytest.mark.parametrize("route", ["policy_loss", "linear_grpo_loss"])
def test_packed_batch_with_as_many_tokens_as_sequences(route):
    """Lengths (2, 0, 1): 3 tokens, 3 sequences, so shape cannot say what advantages [3] are. Before, both
    readings were refused, and the advice (expand_to_tokens) gave the same shape and the same error;
    per_sequence says which, and each reading equals the float64 reference of the padded batch."""
    cu = torch.tensor([0, 2, 2, 3], dtype=torch.int32)
    per_seq = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    per_token = r1kernels.expand_to_tokens(per_seq, cu)                       # [0.7, 0.7, 0.4]
    old = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    padded_mask = torch.tensor([[1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(3, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), \
        torch.tensor([1, 5, 2])

    def loss(adv, per_sequence):
        x = hidden.clone().requires_grad_(True)
        if route == "policy_loss":
            lp = r1kernels.linear_token_logprobs(x, weight, targets)
            out = r1kernels.policy_loss(lp, adv, cu_seqlens=cu, old_logprobs=old, per_sequence=per_sequence)
        else:
            out = r1kernels.linear_grpo_loss(x, weight, targets, adv, cu_seqlens=cu, old_logprobs=old,
                                             per_sequence=per_sequence)
        out.loss.backward()
        return out.loss.detach(), x.grad

    x = hidden.clone().requires_grad_(True)
    lp = torch.log_softmax(x @ weight.T, -1).gather(-1, targets[:, None])[:, 0]

    def padded(v):      # the packed [3] as rows of lengths 2, 0, 1
        return torch.stack([v[0:2], v.new_zeros(2), torch.cat([v[2:3], v.new_zeros(1)])])

    reference = grpo_loss_ref(padded(lp), per_seq, padded_mask, padded(old))
    reference.backward()
    for adv, per_sequence in ((per_seq, True), (per_token, False)):
        value, grad = loss(adv, per_sequence)
        assert_close_scaled(value, reference.detach(), 1e-12)
        torch.testing.assert_close(grad, x.grad, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="say which with per_sequence"):
        loss(per_seq, None)
    assert x.grad.abs().max() > 1e-3


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
@pytest.mark.parametrize("backend", cpu_backends("linear_logprobs"))
def test_grpo_loss_from_logits_gradients(loss_type, backend):
    dtype = torch.float64 if backend in exact_backends("linear_logprobs") else torch.float32
    d = loss_batch(dtype=dtype)
    vocab = 53
    logits = torch.randn(B, T, vocab, dtype=dtype) * 2
    targets = torch.randint(0, vocab, (B, T))
    targets[~d["mask"]] = -100
    opts = loss_options_of(loss_type, "token", 0.04, None, None)
    x = logits.clone().requires_grad_()
    with r1kernels.use_backend(backend):
        out = r1kernels.grpo_loss(x, targets, d["adv"], old_logprobs=d["old"], ref_logprobs=d["ref"],
                                  temperature=0.8, entropy_coef=0.01, **opts)
    out.loss.backward()
    rx = logits.double().requires_grad_()
    rlp, rent = token_logprobs_ref(rx, targets, 0.8)
    ref = grpo_loss_ref(rlp, d["adv"], d["mask"], d["old"].double(), d["ref"].double(), rent, entropy_coef=0.01,
                        **reference_options(opts))
    ref.backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close_scaled(out.loss, ref, tol, "loss")
    assert_close_scaled(x.grad, rx.grad, tol, "d logits")
    assert out.logprobs.requires_grad is False
    assert out.metrics["entropy_mean"].item() == pytest.approx(rent[d["mask"]].mean().item(), rel=1e-5)


@pytest.mark.parametrize("backend", cpu_backends("linear_logprobs"))
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_linear_grpo_loss_gradients(backend, layout):
    dtype = torch.float64 if backend in exact_backends("linear_logprobs") else torch.float32
    d = loss_batch(dtype=dtype)
    hidden_size, vocab = 24, 101
    hidden = torch.randn(B, T, hidden_size, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, dtype=dtype) * 0.3
    bias = torch.randn(vocab, dtype=dtype)
    targets = torch.randint(0, vocab, (B, T))
    opts = dict(loss_type="dr_grpo", max_completion_length=T, beta=0.04, importance_sampling_level="sequence",
                delta=2.0, epsilon_low=0.2, clip_ratio_c=3.0)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with r1kernels.use_backend(backend):
        if layout == "padded":
            out = r1kernels.linear_grpo_loss(leaves[0], leaves[1], targets, d["adv"], d["mask"], bias=leaves[2],
                                             old_logprobs=d["old"], ref_logprobs=d["ref"], **opts)
        else:
            cu = torch.zeros(B + 1, dtype=torch.int32)
            cu[1:] = d["lengths"].cumsum(0)
            pack = lambda x: to_packed(x, d["lengths"])  # noqa: E731
            out = r1kernels.linear_grpo_loss(pack(leaves[0]), leaves[1], pack(targets), d["adv"], bias=leaves[2],
                                             cu_seqlens=cu, old_logprobs=pack(d["old"]),
                                             ref_logprobs=pack(d["ref"]), **opts)
    out.loss.backward()
    ref_leaves = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    rlp, _ = linear_token_logprobs_ref(*ref_leaves[:2], targets, ref_leaves[2])
    ref = grpo_loss_ref(rlp, d["adv"], d["mask"], d["old"].double(), d["ref"].double(), **opts)
    ref.backward()
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    assert_close_scaled(out.loss, ref, tol, "loss")
    for name, g, r in zip(("d hidden", "d weight", "d bias"), leaves, ref_leaves):
        assert_close_scaled(g.grad, r.grad, tol, name)


def test_modules_hold_options():
    d = loss_batch(dtype=torch.float32)
    logits = torch.randn(B, T, 30)
    targets = torch.randint(0, 30, (B, T))
    module = r1kernels.GRPOLoss(temperature=0.7, loss_type="bnpo", beta=0.0)
    direct = r1kernels.grpo_loss(logits, targets, d["adv"], d["mask"], temperature=0.7, loss_type="bnpo")
    assert torch.equal(module(logits, targets, d["adv"], d["mask"]).loss, direct.loss)
    hidden, weight = torch.randn(B, T, 8), torch.randn(30, 8)
    lin = r1kernels.LinearGRPOLoss(loss_type="sapo")
    direct = r1kernels.linear_grpo_loss(hidden, weight, targets, d["adv"], d["mask"], loss_type="sapo")
    assert torch.equal(lin(hidden, weight, targets, d["adv"], d["mask"]).loss, direct.loss)


def test_compile_fullgraph_grpo_loss():
    d = loss_batch(dtype=torch.float32)
    logits = torch.randn(B, T, 40)
    targets = torch.randint(0, 40, (B, T))

    def f(x):
        return r1kernels.grpo_loss(x, targets, d["adv"], d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"],
                                   beta=0.04, loss_type="dapo").loss

    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager = f(x1)
    eager.backward()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x2)
    compiled.backward()
    assert torch.allclose(eager, compiled, atol=1e-6)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(beta=-0.1, ref_logprobs=True), ValueError, "beta must be >= 0"),
    (dict(beta=0.1), ValueError, "beta > 0 needs ref_logprobs"),
    (dict(epsilon_low=1.0), ValueError, "epsilon_low must be in"),
    (dict(loss_type="sapo", delta=2.0), ValueError, "delta applies to"),
    (dict(loss_type="sapo", epsilon_low=0.2), ValueError, "epsilon_low applies to"),
    (dict(loss_type="grpo", num_items_in_batch=10), ValueError, "num_items_in_batch applies to"),
    (dict(loss_type="bnpo", max_completion_length=10), ValueError, "max_completion_length applies to"),
    (dict(loss_type="dr_grpo"), ValueError, "dr_grpo needs max_completion_length"),
    (dict(loss_type="cispo"), ValueError, "cispo needs epsilon_high"),
    (dict(loss_type="grpo", sapo_temperature_pos=1.0), ValueError, "sapo_temperature_pos applies to"),
    (dict(delta=0.9), ValueError, "delta must be > 1"),
    (dict(importance_sampling_level="batch"), ValueError, "importance_sampling_level"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator"),
    (dict(old_logprobs=torch.zeros(B, T + 1)), ValueError, "old_logprobs must have shape"),
    (dict(advantages=torch.zeros(B + 1)), ValueError, "advantages must have shape"),
    (dict(mask=torch.ones(B, T - 1)), ValueError, "mask must have"),
    (dict(entropy_coef=0.1), ValueError, "entropy_coef > 0 needs entropy"),
])
def test_bad_options_raise(kwargs, error, words):
    d = loss_batch()
    kwargs = dict(kwargs)
    if kwargs.get("ref_logprobs") is True:
        kwargs["ref_logprobs"] = d["ref"]
    adv = kwargs.pop("advantages", d["adv"])
    mask = kwargs.pop("mask", d["mask"])
    with pytest.raises(error, match=words):
        r1kernels.policy_loss(d["logp"], adv, mask, **kwargs)


@pytest.mark.parametrize("cu, words", [
    ([1, 3, 5], "must start at 0"),
    ([0, 4, 3, 5], "non-decreasing"),
    ([0, 2, 4], "must end at the number of tokens 5"),
])
def test_bad_cu_seqlens(cu, words):
    with pytest.raises(ValueError, match=words):
        r1kernels.policy_loss(torch.zeros(5), torch.zeros(len(cu) - 1), cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        r1kernels.policy_loss(torch.zeros(5), torch.zeros(2), cu_seqlens=torch.tensor([0, 2, 5.0]))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bias_corrected_kl_is_trls_formula(level):
    """use_bias_correction_kl (TRL's default): the k3 KL term times the importance ratio
    exp(logp - old) (per sequence for GSPO), loss and gradient, as TRL's _compute_loss writes it."""
    d = loss_batch()
    m = d["mask"].double()
    results = {}
    for corrected in (True, False):
        logp = d["logp"].clone().requires_grad_()
        out = r1kernels.policy_loss(logp, d["adv"], d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"],
                                    beta=0.1, importance_sampling_level=level, use_bias_correction_kl=corrected)
        results[corrected] = (out.loss, torch.autograd.grad(out.loss, logp)[0])
    logp = d["logp"].clone().requires_grad_()          # TRL 1.16's lines, written out
    log_ratio = logp - d["old"]
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 0.8, 1.2)
    per_token_kl = (torch.exp(d["ref"] - logp) - (d["ref"] - logp) - 1) * coef_1
    per_token_loss = -torch.min(coef_1 * d["adv"][:, None], coef_2 * d["adv"][:, None]) + 0.1 * per_token_kl
    trl = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    torch.testing.assert_close(results[True][0], trl)
    torch.testing.assert_close(results[True][1], torch.autograd.grad(trl, logp)[0])
    assert not torch.allclose(results[True][1], results[False][1]), "the correction must change the gradient"


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_loss_sum_over_summed_normalisers_is_the_whole_batch_loss(loss_type):
    """Micro-batches normalised once: sum of loss_sum / sum of loss_normaliser counts = the loss of
    the batch in one call, and each output's loss = loss_sum / normaliser."""
    b = loss_batch()
    opts = dict(loss_type=loss_type, beta=0.04)
    if "epsilon_high" in LOSS_TYPES[loss_type].needs:
        opts["epsilon_high"] = 1.5
    if LOSS_TYPES[loss_type].needs_max_completion_length:
        opts["max_completion_length"] = 12

    def call(rows):
        return r1kernels.policy_loss(b["logp"][rows], b["adv"][rows], b["mask"][rows], old_logprobs=b["old"][rows],
                                     ref_logprobs=b["ref"][rows], **opts)

    whole = call(slice(None))
    parts = [call(slice(0, 2)), call(slice(2, B))]
    counts = [r1kernels.loss_normaliser(loss_type, rows.stop - rows.start, int(b["mask"][rows].sum()), 12)
              for rows in (slice(0, 2), slice(2, B))]
    combined = sum(p.loss_sum for p in parts) / sum(counts)
    torch.testing.assert_close(combined, whole.loss, rtol=1e-12, atol=1e-14)
    for out in (whole, *parts):
        torch.testing.assert_close(out.loss_sum / out.normaliser, out.loss, rtol=1e-12, atol=0)
    assert parts[0].loss.item() != pytest.approx(whole.loss.item()), "the split must change the per-part loss"


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("options", [dict(off_policy_mask_threshold=0.05), dict(top_entropy_quantile=0.4),
                                     dict(off_policy_mask_threshold=0.0, top_entropy_quantile=0.7, beta=0.04)],
                         ids=["off-policy-mask", "top-entropy", "both+kl"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_batch_wide_masks_and_entropy_bonus_match_reference(loss_type, options, layout):
    """off_policy_mask_threshold (sequences with A < 0 that drifted more than the threshold lose
    their policy term), top_entropy_quantile (only the batch's high-entropy tokens keep it) and the
    entropy bonus on the same tokens, against the float64 reference, loss and gradients."""
    d = loss_batch(spread=0.3)
    sampling = d["old"] + torch.randn(B, T, dtype=torch.float64) * 0.1
    logp = d["logp"].clone().requires_grad_()
    ent = d["entropy"].clone().requires_grad_()
    kw = dict(loss_type=loss_type, entropy_coef=0.02, **options)
    ref = grpo_loss_ref(logp, d["adv"], d["mask"], d["old"], d["ref"], ent, sampling=sampling, **kw)
    ref_grads = torch.autograd.grad(ref, (logp, ent))
    if layout == "padded":
        out = r1kernels.policy_loss(logp, d["adv"], d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"],
                                    entropy=ent, sampling_logprobs=sampling, **kw)
        grads = torch.autograd.grad(out.loss, (logp, ent))
    else:
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = d["lengths"].cumsum(0)
        packed = [to_packed(x, d["lengths"]) for x in (logp, d["old"], d["ref"], ent, sampling)]
        out = r1kernels.policy_loss(packed[0], d["adv"], cu_seqlens=cu, old_logprobs=packed[1], ref_logprobs=packed[2],
                                    entropy=packed[3], sampling_logprobs=packed[4], **kw)
        grads = torch.autograd.grad(out.loss, (logp, ent))
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-14)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)
    plain = r1kernels.policy_loss(logp, d["adv"], d["mask"], old_logprobs=d["old"], ref_logprobs=d["ref"],
                                  entropy=ent, loss_type=loss_type, entropy_coef=0.02, beta=options.get("beta", 0.0))
    assert out.loss.item() != pytest.approx(plain.loss.item()), "the option must change the loss on this batch"


def test_entropy_bonus_is_trls_token_mean_whatever_the_loss_type():
    """TRL 1.16: loss = L_policy - coef * sum(H m) / sum(m), not the loss type's normaliser."""
    d = loss_batch()
    m = d["mask"].double()
    for loss_type in ("grpo", "dr_grpo"):
        ent = d["entropy"].clone().requires_grad_()
        extra = dict(max_completion_length=12) if loss_type == "dr_grpo" else {}
        bonus = r1kernels.policy_loss(d["logp"], d["adv"], d["mask"], entropy=ent, entropy_coef=0.1,
                                      loss_type=loss_type, **extra).loss
        base = r1kernels.policy_loss(d["logp"], d["adv"], d["mask"], loss_type=loss_type, **extra).loss
        torch.testing.assert_close(bonus - base, -0.1 * (ent * m).sum() / m.sum())
        torch.testing.assert_close(torch.autograd.grad(bonus, ent)[0], -0.1 * m / m.sum())


@pytest.mark.parametrize("backend", exact_backends("linear_logprobs"))
def test_linear_grpo_loss_batch_wide_options_take_the_two_pass_route(backend):
    """A token's gradient under these options depends on its whole batch: linear_grpo_loss must not
    use its one-pass route, and still matches the reference (loss and d hidden)."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(B * T, 16, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(40, 16, generator=gen, dtype=torch.float64) * 0.3
    targets = torch.randint(0, 40, (B, T), generator=gen)
    d = loss_batch()
    kw = dict(loss_type="dapo", top_entropy_quantile=0.5, off_policy_mask_threshold=0.02, entropy_coef=0.05)
    with r1kernels.use_backend(backend):
        out = r1kernels.linear_grpo_loss(hidden.view(B, T, 16), weight, targets, d["adv"], d["mask"],
                                         old_logprobs=d["old"], **kw)
    (d_hidden,) = torch.autograd.grad(out.loss, hidden)
    h = hidden.detach().clone().requires_grad_()
    lp, ent = linear_token_logprobs_ref(h.view(B, T, 16), weight, targets)
    ref = grpo_loss_ref(lp, d["adv"], d["mask"], d["old"], None, ent, **kw)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_hidden, torch.autograd.grad(ref, h)[0], rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- property

@PROPERTY_SETTINGS
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6), loss_type=st.sampled_from(sorted(LOSS_TYPES)),
       level=st.sampled_from(["token", "sequence"]), beta=st.sampled_from([0.0, 0.05]),
       spread=st.floats(0.0, 2.0), seed=st.integers(0, 2**16), packed=st.booleans())
def test_policy_loss_property(lengths, loss_type, level, beta, spread, seed, packed):
    """Any loss type, level and KL weight on a batch of random lengths (empty and length-1 sequences, and
    packed batches with as many tokens as sequences, among them), padded or packed, ratios spread up to
    e^±6: loss and d logp against the float64 reference of the padded batch."""
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
    if packed:      # the same tokens as [N] with cu_seqlens; per_sequence says what advantages [S] are
        cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
        out = r1kernels.policy_loss(logp[mask], adv, cu_seqlens=cu, old_logprobs=old[mask],
                                    ref_logprobs=ref_lp[mask] if beta else None, per_sequence=True, **options)
    else:
        out = r1kernels.policy_loss(logp, adv, mask, old_logprobs=old, ref_logprobs=ref_lp if beta else None,
                                    **options)
    (grad,) = torch.autograd.grad(out.loss, logp)
    leaf = logp.detach().clone().requires_grad_()
    ref = grpo_loss_ref(leaf, adv, mask, old, ref_lp if beta else None, **options)
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@PROPERTY_SETTINGS
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=4), loss_type=st.sampled_from(sorted(LOSS_TYPES)),
       scale=st.sampled_from([1.0, 1e3]), fused_head=st.booleans(), packed=st.booleans(),
       temperature=st.sampled_from([1.0, 0.7]), seed=st.integers(0, 2**16))
def test_fused_losses_property(lengths, loss_type, scale, fused_head, packed, temperature, seed):
    """grpo_loss (logits) and linear_grpo_loss (hidden and lm_head) on every CPU backend: batches with empty
    and length-1 sequences, packed ones with as many tokens as sequences among them, logits up to +-1e3
    (tokens sampled from them), any loss type, an entropy bonus: loss and every gradient against the
    float64 reference (fp64 where the backend takes it, else fp32 to its rounding of logits that large).
    token_logprobs' own property test covers unlikely tokens of extreme logits (log-probs of -1e3)."""
    gen = torch.Generator().manual_seed(seed)
    batch, width, vocab, hidden_size = len(lengths), max(max(lengths), 1), 37, 12
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    hidden = torch.randn(batch, width, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * scale / hidden_size ** 0.5
    logits = hidden @ weight.T if fused_head else torch.randn(batch, width, vocab, generator=gen,
                                                               dtype=torch.float64) * scale
    # tokens sampled from the policy, as in a rollout (with logits of 1e3, nearly always the argmax)
    probs = torch.softmax(logits.view(-1, vocab) / temperature, -1)
    targets = torch.multinomial(probs, 1, generator=gen).view(batch, width).masked_fill(~mask, -100)
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    inputs = (hidden, weight) if fused_head else (logits,)
    old_noise = torch.randn(batch, width, generator=gen, dtype=torch.float64) * 0.5
    options = dict(loss_type=loss_type, entropy_coef=0.01)
    if "epsilon_high" in LOSS_TYPES[loss_type].needs:
        options["epsilon_high"] = 4.0
    if LOSS_TYPES[loss_type].needs_max_completion_length:
        options["max_completion_length"] = width + 3

    def reference(dtype):
        """The float64 loss and gradients of the inputs as a ``dtype`` backend sees them; old log-probs
        near the policy's (their ratios within e^+-1.5, not e^+-1000)."""
        leaves = [x.to(dtype).double().requires_grad_() for x in inputs]
        lp, ent = (linear_token_logprobs_ref(*leaves, targets, None, temperature) if fused_head
                   else token_logprobs_ref(*leaves, targets, temperature))
        old = (lp.detach() + old_noise).to(dtype)
        loss = grpo_loss_ref(lp, adv, mask, old.double(), None, ent, **options)
        return old, loss, torch.autograd.grad(loss, leaves)

    op_name = "linear_logprobs" if fused_head else "logprobs"
    for backend in cpu_backends(op_name):
        dtype = torch.float64 if backend in exact_backends(op_name) else torch.float32
        tol = 1e-9 if dtype == torch.float64 else 1e-5 * max(1.0, scale / 10)   # fp32 logits of 1e3: 6e-5 apart
        old, ref, ref_grads = reference(dtype)
        xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
        layout = dict(mask=mask, old=old, targets=targets, xs=xs)
        if packed:
            cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
            layout = dict(mask=None, old=old[mask], targets=targets[mask], xs=[xs[0][mask]] + xs[1:], cu_seqlens=cu,
                          per_sequence=True)
        extra = {k: layout[k] for k in ("cu_seqlens", "per_sequence") if k in layout}
        with r1kernels.use_backend(**{op_name: backend}):
            if fused_head:
                out = r1kernels.linear_grpo_loss(*layout["xs"], layout["targets"], adv.to(dtype), layout["mask"],
                                                 temperature=temperature, old_logprobs=layout["old"], **extra,
                                                 **options)
            else:
                out = r1kernels.grpo_loss(*layout["xs"], layout["targets"], adv.to(dtype), layout["mask"],
                                          temperature=temperature, old_logprobs=layout["old"], **extra, **options)
        grads = torch.autograd.grad(out.loss, xs, allow_unused=True)
        assert_close_scaled(out.loss, ref, tol, f"{backend} loss")
        for x, g, r in zip(xs, grads, ref_grads):
            assert_close_scaled(torch.zeros_like(x) if g is None else g, r, tol, f"{backend} gradient")


# ---------------------------------------------------------------- bad and empty input

# Bad input: (case, call, exception, a pattern the message must match: it names the argument);
# each row runs on every backend of the op that runs on this machine's CPU
INVALID = [
    ("num_items_in_batch 0", lambda: r1kernels.policy_loss(torch.randn(2, 3), torch.randn(2), loss_type="dapo",
                                                           num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ("num_items_in_batch -3 tensor", lambda: r1kernels.policy_loss(torch.randn(2, 3), torch.randn(2), loss_type="dapo",
                                                                   num_items_in_batch=torch.tensor(-3.0)),
     ValueError, "num_items_in_batch"),
    ("per-token or per-sequence advantages", lambda: r1kernels.policy_loss(
        torch.randn(3), torch.randn(3), cu_seqlens=torch.tensor([0, 2, 2, 3], dtype=torch.int32)),
     ValueError, "advantages has 3 values.*say which with per_sequence"),
    ("per_sequence given, wrong shape", lambda: r1kernels.policy_loss(
        torch.randn(3), torch.randn(2), cu_seqlens=torch.tensor([0, 2, 2, 3], dtype=torch.int32), per_sequence=False),
     ValueError, r"advantages must have shape \(3,\) with per_sequence=False"),
    ("per_sequence not a bool", lambda: r1kernels.policy_loss(torch.randn(2, 3), torch.randn(2), per_sequence="yes"),
     TypeError, "per_sequence must be True, False or None"),
]


@pytest.mark.parametrize("case, call, error, pattern", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_inputs_name_the_argument(case, call, error, pattern):
    assert_rejects(None, call, error, pattern)


# B = 0 broke the losses' per-sequence sums
EMPTY = {
    "grpo_loss, B = 0": (lambda: [empty_strided((0, 3, 7), (0, 0, 0)), ids(0, 3), torch.zeros(0)],
                         r1kernels.grpo_loss),
    "grpo_loss, T = 0": (lambda: [empty_strided((2, 0, 7), (1, 0, 1)), ids(2, 0), torch.ones(2)], r1kernels.grpo_loss),
    "linear_grpo_loss": (lambda: [empty_strided((0, 3, 5), (1, 0, 0)), torch.randn(7, 5, requires_grad=True),
                                  ids(0, 3), torch.zeros(0)], r1kernels.linear_grpo_loss),
    "policy_loss": (lambda: [empty_strided((0, 3), (1, 0)), torch.zeros(0)],
                    lambda logp, adv: r1kernels.policy_loss(logp, adv, loss_type="dapo")),
}


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("backend", cpu_backends("logprobs"))
def test_empty_inputs_with_any_strides_give_empty_results(case, backend):
    """Empty outputs (a loss of 0 over no tokens) and gradients of each input's shape, on every backend."""
    assert_empty_results(backend, *EMPTY[case])


# ---------------------------------------------------------------- the one-pass route
# linear_grpo_loss's one-pass route (gradients in the forward, no recomputed logits) against the
# float64 reference, for every token-level loss option, padded and packed, with chunks small enough
# that their boundaries cut through sequences; plus its promises: three GEMMs instead of four, no
# gradient work under no_grad, and the memory bound at the benchmark shape.

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


@pytest.mark.parametrize("backend", cpu_backends("linear_logprobs"))
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("case", TOKEN_LEVEL, ids=lambda c: "-".join(str(x) for x in c))
def test_one_pass_matches_float64(backend, layout, case, monkeypatch):
    dtype = torch.float64 if backend in exact_backends("linear_logprobs") else torch.float32
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


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "vespo"])
@pytest.mark.parametrize("backend", cpu_backends("linear_logprobs"))
def test_linear_grpo_loss_takes_a_sequence_ratio_of_shape_b_1(backend, loss_type, monkeypatch):
    """TRL's (B, 1) importance-sampling ratio through the fused lm_head + loss, on the one-pass route (dapo,
    grpo) and the two-pass one (vespo): loss and d hidden / d weight / d bias against the float64 reference."""
    dtype = torch.float64 if backend in exact_backends("linear_logprobs") else torch.float32
    monkeypatch.setenv("R1K_CHUNK_BYTES", str(5 * V * torch.finfo(dtype).bits // 8))   # 5-token chunks
    d = loss_batch(dtype=dtype)
    hidden, weight, bias, targets = _inputs(dtype)
    is_ratio = torch.rand(B, 1, dtype=dtype) * 1.5 + 0.3
    opts = loss_options_of(loss_type, "token", 0.04, None, None)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with r1kernels.use_backend(backend):
        out = r1kernels.linear_grpo_loss(leaves[0], leaves[1], targets, d["adv"], d["mask"], bias=leaves[2],
                                         old_logprobs=d["old"], ref_logprobs=d["ref"], temperature=0.9,
                                         is_ratio=is_ratio, **opts)
    one_pass = type(out.loss.grad_fn).__name__ == "_LossWithGradientsBackward"
    assert one_pass == (not LOSS_TYPES[loss_type].whole_sequence)
    out.loss.backward()
    ref_leaves = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    rlp, _ = linear_token_logprobs_ref(*ref_leaves[:2], targets, ref_leaves[2], 0.9)
    ref = grpo_loss_ref(rlp, d["adv"], d["mask"] & (targets != -100), d["old"].double(), d["ref"].double(),
                        is_ratio=is_ratio.double(), **reference_options(opts))
    ref.backward()
    tol = 1e-10 if dtype == torch.float64 else 5e-5
    assert_close_scaled(out.loss, ref, tol, "loss")
    for name, g, r in zip(("d hidden", "d weight", "d bias"), leaves, ref_leaves):
        assert_close_scaled(g.grad, r.grad, tol, name)


def test_one_pass_is_three_gemms_and_nothing_under_no_grad(monkeypatch):
    """One logits GEMM per chunk (the two-pass route recomputes them in the backward); with d hidden
    and d weight, three GEMMs per chunk. Under no_grad only the logits GEMMs run and nothing is
    differentiable."""
    from r1kernels.logprobs import chunked
    monkeypatch.setenv("R1K_CHUNK_BYTES", str(10 * V * 4))             # 10-token chunks: 6 of them
    chunks = -(-B * T // 10)
    logits_calls = []
    original = chunked._Chunks.logits
    monkeypatch.setattr(chunked._Chunks, "logits", lambda *a: logits_calls.append(1) or original(*a))
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
    backend = "cpu" if "cpu" in cpu_backends("linear_logprobs") else "torch"
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


# ---------------------------------------------------------------- on the GPU

@gpu_test
def test_linear_grpo_loss_one_pass_real_lm_head():
    """The one-pass route (cuBLAS chunks, gradients in the forward) against the two-pass route on
    the fully fused kernel, at the benchmark's shape."""
    require("triton")
    hidden, weight, targets, _, _, rows, cols, _ = real_lm_head()
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
