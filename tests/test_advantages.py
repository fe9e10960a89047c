"""group_advantages on every CPU-runnable backend against the float64 reference and TRL's formula; bad and
empty input on every backend, and the GPU checks (a real multi-program grid barrier, ``cuda``-marked)."""
import pytest
import torch
from conftest import assert_close_scaled, cpu_backends
from gpu_cases import gpu_test, require
from op_cases import assert_empty_results, assert_rejects, empty_strided, ids
from hypothesis import given, settings
from hypothesis import strategies as st

import r1kernels
from r1kernels.reference import group_advantages_ref


def _contiguous(batch, size):
    return [list(range(i, i + size)) for i in range(0, batch, size)]


def _from_ids(ids):
    groups = {}
    for i, g in enumerate(ids.tolist()):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def _run(backend, rewards, **kw):
    with r1kernels.use_backend(backend):
        return r1kernels.group_advantages(rewards, **kw)


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
@pytest.mark.parametrize("estimator, scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                              ("rloo", "none"), ("rloo", "group"), ("dr_grpo", None)])
@pytest.mark.parametrize("num_rewards", [1, 3])
def test_contiguous_groups_match_reference(backend, estimator, scale, num_rewards):
    batch, size = 64, 8
    rewards = torch.randn(batch, num_rewards) if num_rewards > 1 else torch.randn(batch)
    rewards[5] = float("nan")                     # an unscorable completion
    rewards[16:24] = 0.5                          # a constant group
    weights = torch.tensor([1.0, 0.5, 2.0]) if num_rewards > 1 else None
    for multi in (["sum_then_normalize", "normalize_then_sum"] if num_rewards > 1 else ["sum_then_normalize"]):
        adv = _run(backend, rewards, group_size=size, estimator=estimator, scale=scale, reward_weights=weights,
                   multi_reward=multi)
        ref = group_advantages_ref(rewards, _contiguous(batch, size), estimator, scale or "none", 1e-4, weights,
                                   multi)
        assert adv.dtype == torch.float32 and adv.shape == (batch,)
        assert_close_scaled(adv, ref, 1e-5, f"{multi}")
        if multi == "sum_then_normalize":
            assert (adv[16:24] == 0).all(), "a constant group must give exactly 0"
    if num_rewards == 1:
        assert adv[5] == 0


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_shuffled_ids_mixed_sizes(backend):
    sizes = [1, 2, 3, 8, 5, 17, 1, 4]
    ids = torch.cat([torch.full((n,), 100 + 7 * g) for g, n in enumerate(sizes)])
    ids = ids[torch.randperm(ids.numel())]
    rewards = torch.randn(ids.numel()) * 3 + 1
    rewards[torch.randint(0, ids.numel(), (3,))] = float("nan")
    for estimator in ("grpo", "rloo"):
        adv, stats = _run(backend, rewards, group_ids=ids, estimator=estimator, return_stats=True)
        ref = group_advantages_ref(rewards, _from_ids(ids), estimator, "group" if estimator == "grpo" else "none")
        assert_close_scaled(adv, ref, 1e-5, estimator)
        assert stats.group_mean.shape == (len(sizes),)
    # the two groups of one give exactly 0
    singles = [i for i, g in enumerate(ids.tolist()) if g in (100, 100 + 7 * 6)]
    assert (adv[singles] == 0).all()


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_huge_offsets_keep_their_spread(backend):
    """Rewards near 1e6 with spread 1e-2: E[x^2] - E[x]^2 in fp32 returns noise (or a negative
    variance) here; the shifted two-pass std stays exact."""
    for dtype in (torch.float64, torch.float32):
        rewards = (1e6 + torch.randn(256, dtype=torch.float64) * 1e-2).to(dtype)
        adv = _run(backend, rewards, group_size=8)
        ref = group_advantages_ref(rewards, _contiguous(256, 8))
        # the float64 reference averages unshifted values near 1e6 itself: its own error is ~1e-8
        assert_close_scaled(adv, ref, 1e-4 if dtype == torch.float32 else 1e-7, str(dtype))
        assert adv.abs().max() > 0.5, "the spread must survive"
    x = rewards.view(-1, 8).float()
    naive_var = (x * x).mean(1) - x.mean(1) ** 2
    true_var = x.double().var(1, unbiased=False)
    assert ((naive_var.double() - true_var).abs() > true_var).any(), "the naive formula should fail here"


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equals_trl_formula(backend, scale):
    size = 4
    rewards = torch.randn(32)
    grouped = rewards.view(-1, size)
    adv_trl = rewards - grouped.mean(1).repeat_interleave(size)
    if scale == "group":
        adv_trl = adv_trl / (grouped.std(1).repeat_interleave(size) + 1e-4)
    elif scale == "batch":
        adv_trl = adv_trl / (rewards.std() + 1e-4)
    adv = _run(backend, rewards, group_size=size, scale=scale)
    torch.testing.assert_close(adv, adv_trl, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_equals_verl_grpo_and_rloo_by_uid(backend):
    """verl's per-uid loops (groups of two or more; verl gives a lone completion mean 0, std 1)."""
    ids = torch.tensor([3, 9, 3, 9, 9, 4, 4, 3, 4, 4])
    rewards = torch.randn(10, dtype=torch.float64)
    groups = _from_ids(ids)
    verl_grpo = torch.empty(10, dtype=torch.float64)
    verl_rloo = torch.empty(10, dtype=torch.float64)
    for idx in groups:
        vals = rewards[idx]
        n = len(idx)
        verl_grpo[idx] = (vals - vals.mean()) / (vals.std() + 1e-6)
        verl_rloo[idx] = vals * n / (n - 1) - vals.mean() * n / (n - 1)
    torch.testing.assert_close(_run(backend, rewards, group_ids=ids, eps=1e-6), verl_grpo)
    torch.testing.assert_close(_run(backend, rewards, group_ids=ids, estimator="rloo"), verl_rloo)


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_extreme_group_sizes_and_stats(backend):
    rewards = torch.randn(48)
    assert (_run(backend, rewards, group_size=1) == 0).all()
    whole = _run(backend, rewards, group_size=48)
    assert_close_scaled(whole, (rewards - rewards.mean()) / (rewards.std() + 1e-4), 1e-5)
    rewards[:12] = 1.0
    adv, stats = _run(backend, rewards, group_size=12, return_stats=True)
    assert stats.zero_std_fraction.item() == pytest.approx(0.25)
    assert_close_scaled(stats.group_mean, rewards.view(4, 12).mean(1), 1e-6)
    assert_close_scaled(stats.group_std, rewards.view(4, 12).std(1), 1e-6)
    nan_group = torch.full((4,), float("nan"))
    adv, stats = _run(backend, nan_group, group_size=2, return_stats=True)
    assert (adv == 0).all() and torch.isnan(stats.group_mean).all()


@pytest.mark.parametrize("backend", [b for b in cpu_backends("advantages") if b != "triton"])
def test_large_batch(backend):
    rewards = torch.randn(1 << 20, 3)
    adv = _run(backend, rewards, group_size=64)
    r = rewards.double().sum(1).view(-1, 64)
    expected = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    assert_close_scaled(adv, expected, 1e-5)


def _huge_reward_groups():
    """Groups of 4 whose squared deviations overflow fp32 (the first is 1e19 times TRL's [5, 7, 6, 9]),
    up to the fp32 maximum, beside an ordinary group."""
    big = torch.finfo(torch.float32).max
    return torch.cat([torch.tensor([5.0, 7, 6, 9]) * 1e19, torch.tensor([5.0, 7, 6, 9]) * 1e30,
                      torch.tensor([-0.5, 0.5, 0.0, 0.25]) * big, torch.tensor([1.0, 0.5, 1.0, 0.75]) * big,
                      torch.tensor([0.3, -1.2, 2.0, 0.4])])


def _assert_close_per_group(adv, ref, rtol, what):
    """Each group of 4 within rtol of its own largest |advantage| (groups differ by 1e30 in scale)."""
    for g in range(0, ref.numel(), 4):
        assert_close_scaled(adv[g:g + 4] / ref[g:g + 4].abs().max(), ref[g:g + 4] / ref[g:g + 4].abs().max(),
                            rtol, f"{what}, group {g // 4}")


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
@pytest.mark.parametrize("estimator, scale", [("grpo", "group"), ("grpo", "batch"), ("rloo", "group"),
                                              ("rloo", "none"), ("dr_grpo", None)])
def test_huge_rewards_up_to_the_fp32_maximum(backend, estimator, scale):
    """Advantages of any finite fp32 reward are the float64 reference's to fp32 precision, contiguous
    groups and group ids alike (fp32 squares of 1e19-sized deviations used to overflow to all zeros),
    and an ordinary group beside huge ones gets exactly the advantages it gets alone."""
    rewards = _huge_reward_groups()
    groups = _contiguous(rewards.numel(), 4)
    if scale is None or scale == "none":       # the advantages themselves must fit in fp32
        rewards[8:16] = rewards[8:16] * 0.5
    ref = group_advantages_ref(rewards, groups, estimator, scale or "none")
    ids = torch.arange(rewards.numel()) // 4 * 7 + 3
    shuffle = torch.randperm(rewards.numel())
    for how, adv in (("group_size", _run(backend, rewards, group_size=4, estimator=estimator, scale=scale)),
                     ("group_ids", _run(backend, rewards[shuffle], group_ids=ids[shuffle], estimator=estimator,
                                        scale=scale)[torch.argsort(shuffle)])):
        assert torch.isfinite(adv).all() and (adv != 0).all(), how
        _assert_close_per_group(adv, ref, 2e-6, how)
        if scale != "batch":
            grouping = dict(group_size=4) if how == "group_size" else dict(group_ids=ids[-4:])
            alone = _run(backend, rewards[-4:], estimator=estimator, scale=scale, **grouping)
            assert torch.equal(adv[-4:], alone), f"{how}: the ordinary group must not change"
    # stats at the extremes: the mean is representable, the std of [-max, max, 0, max/3] is too
    adv, stats = _run(backend, rewards, group_size=4, estimator=estimator, scale=scale, return_stats=True)
    grouped = rewards.double().view(-1, 4)
    assert_close_scaled(stats.group_mean.double() / grouped.abs().amax(1), grouped.mean(1) / grouped.abs().amax(1),
                        1e-6, "mean")
    assert_close_scaled(stats.group_std.double() / grouped.abs().amax(1), grouped.std(1) / grouped.abs().amax(1),
                        1e-6, "std")


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_weighted_columns_with_a_large_offset_are_exact(backend, scale):
    """Three fp32 columns of 1e4 + 1e-2 noise, weighted: summed in fp32 before the group statistics they
    were off by 0.1 from float64 (issue 35); now as exact as one column, contiguous groups and ids alike,
    and the group means are those of the weighted sums."""
    gen = torch.Generator().manual_seed(0)
    rewards = (1e4 + torch.randn(32, 3, generator=gen, dtype=torch.float64) * 0.01).float()
    rewards[3] = float("nan")                      # a failed row (a failed column alone would make an outlier)
    weights = torch.tensor([0.3, 0.5, 0.2])
    ids = (torch.arange(32) % 4) * 7               # groups spread over the batch
    for groups, kwargs in ((_contiguous(32, 8), dict(group_size=8)), (_from_ids(ids), dict(group_ids=ids))):
        ref = group_advantages_ref(rewards, groups, scale=scale, reward_weights=weights)
        adv, stats = _run(backend, rewards, reward_weights=weights, scale=scale, return_stats=True, **kwargs)
        assert_close_scaled(adv, ref, 1e-6, f"{backend} {scale} {kwargs.keys()}")
        sums = rewards.double() @ weights.double()
        means = torch.stack([sums[[i for i in g if i != 3]].mean() for g in groups])
        torch.testing.assert_close(stats.group_mean.double(), means, atol=2e-3, rtol=0)   # fp32 of 1e4: ulp 1e-3


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_extreme_batch_std_and_overflowing_weighted_sums(backend):
    """The batch std of [-max, max] is sqrt(2) max, beyond fp32: scale="batch" still gives +-1/sqrt(2).
    Rewards whose weighted sum overflows fp32 make that row a failed reward (0), not NaNs for its group."""
    big = torch.finfo(torch.float32).max
    adv = _run(backend, torch.tensor([-big, big]), group_size=2, scale="batch")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]) / 2 ** 0.5)
    rewards = torch.tensor([[big, big], [1.0, 0.0], [2.0, 1.0], [4.0, 0.0]])
    adv = _run(backend, rewards, group_size=4)
    ref = group_advantages_ref(torch.tensor([float("nan"), 1.0, 3.0, 4.0]), [[0, 1, 2, 3]])
    assert_close_scaled(adv, ref, 1e-5)
    assert adv[0] == 0


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_huge_float64_rewards(backend):
    rewards = torch.tensor([5.0, 7, 6, 9, 1, 3, 2, 2], dtype=torch.float64) * 1e150
    for estimator, scale in (("grpo", "group"), ("rloo", "none")):
        adv = _run(backend, rewards, group_size=4, estimator=estimator, scale=scale)
        ref = group_advantages_ref(rewards, _contiguous(8, 4), estimator, scale)
        _assert_close_per_group(adv, ref, 1e-12, f"{estimator}/{scale}")


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=10), seed=st.integers(0, 10_000),
       estimator=st.sampled_from(["grpo", "rloo"]), columns=st.integers(1, 3),
       offset=st.sampled_from([0.0, 1e4, 1e6]), weighted=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_random_groups(sizes, seed, estimator, columns, offset, weighted, dtype):
    """Groups of any sizes in any order; one or several reward columns, weighted or not, sharing a large
    offset (rewards such as 1e4 + 0.5 k): every CPU backend that takes the dtype, against float64, to
    the output's rounding (fp32: 1e-6 of the largest advantage; fp64: 1e-9)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    rewards = offset + torch.randint(0, 3, (ids.numel(), columns), generator=gen).double() * 0.5   # ties, constants
    rewards = rewards.to(dtype).squeeze(1) if columns == 1 else rewards.to(dtype)
    weights = torch.rand(columns, generator=gen) + 0.1 if weighted else None
    ref = group_advantages_ref(rewards, _from_ids(ids), estimator, "group" if estimator == "grpo" else "none",
                               reward_weights=weights)
    for backend in cpu_backends("advantages"):
        if dtype == torch.float64 and not r1kernels.backends.table("advantages")[backend].float64:
            continue
        adv = _run(backend, rewards, group_ids=ids, estimator=estimator, reward_weights=weights)
        assert torch.isfinite(adv).all()
        assert_close_scaled(adv, ref, 1e-9 if dtype == torch.float64 else 1e-6, backend)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=8), seed=st.integers(0, 10_000))
def test_property_expand_to_tokens(lengths, seed):
    """Sequences of any lengths (empty and length-1 among them, as many tokens as sequences too): each
    token of the packed layout and each unmasked token of the padded one carries its sequence's value."""
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(len(lengths), generator=gen, dtype=torch.float64)
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    expected = [adv[i].item() for i, n in enumerate(lengths) for _ in range(n)]
    assert r1kernels.expand_to_tokens(adv, cu_seqlens=cu).tolist() == expected
    mask = torch.arange(max(max(lengths), 1))[None, :] < torch.tensor(lengths)[:, None]
    padded = r1kernels.expand_to_tokens(adv, mask=mask)
    assert padded[mask].tolist() == expected and (padded[~mask] == 0).all()


def test_compile_fullgraph_contiguous():
    rewards = torch.randn(32)
    f = torch.compile(lambda r: r1kernels.group_advantages(r, group_size=8), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(rewards), r1kernels.group_advantages(rewards, group_size=8))


def test_expand_to_tokens():
    adv = torch.tensor([1.0, -2.0, 3.0])
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    assert torch.equal(r1kernels.expand_to_tokens(adv, cu_seqlens=cu), torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0]))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert torch.equal(r1kernels.expand_to_tokens(adv, mask=mask),
                       torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]]))
    with pytest.raises(ValueError, match="exactly one"):
        r1kernels.expand_to_tokens(adv)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor, got list"):    # was AttributeError
        r1kernels.expand_to_tokens(adv, cu_seqlens=[0, 2, 2, 5])
    with pytest.raises(TypeError, match="mask must be a torch.Tensor, got list"):
        r1kernels.expand_to_tokens(adv, mask=[[1, 1, 0], [0, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(group_size=5), ValueError, "not divisible by group_size"),
    (dict(group_size=0), ValueError, "group_size must be a positive int"),
    (dict(), ValueError, "exactly one of group_size"),
    (dict(group_ids=torch.zeros(7, dtype=torch.long)), ValueError, r"group_ids must have shape \[B\]"),
    (dict(group_ids=torch.zeros(8)), TypeError, "group_ids must be an integer tensor"),
    (dict(group_size=4, reward_weights=torch.ones(2)), ValueError, r"reward_weights must have shape \[R\]"),
    (dict(group_size=4, estimator="ppo"), ValueError, "estimator must be one of"),
    (dict(group_size=4, scale="global"), ValueError, "scale must be one of"),
    (dict(group_size=4, estimator="dr_grpo", scale="group"), ValueError, "dr_grpo does not scale"),
    (dict(group_size=4, multi_reward="max"), ValueError, "multi_reward must be one of"),
])
def test_bad_input(kwargs, error, words):
    with pytest.raises(error, match=words):
        r1kernels.group_advantages(torch.randn(8), **kwargs)
    with pytest.raises(TypeError, match="rewards must be a floating tensor"):
        r1kernels.group_advantages(torch.ones(8, dtype=torch.long), group_size=4)


# --- arbitrary group ids: the single-launch Triton hash-table kernel and its contract -----------

def _first_appearance_stats(rewards, ids):
    """Per-group mean / std / constant flag, groups in order of first appearance (float64)."""
    means, stds, constants = [], [], []
    for idx in _from_ids(ids):
        vals = rewards.double()[idx]
        good = vals[~torch.isnan(vals)]
        means.append(good.mean() if good.numel() else torch.tensor(float("nan"), dtype=torch.float64))
        stds.append(good.std() if good.numel() > 1 else torch.tensor(0.0, dtype=torch.float64))
        constants.append(good.numel() <= 1 or bool((good == good[0]).all()))
    return torch.stack(means), torch.stack(stds), torch.tensor(constants)


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_id_stats_list_groups_by_first_appearance(backend):
    ids = torch.tensor([42, -7, 42, 5, -7, 5, 5, 9, 42, 2 ** 40])
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan"), 4.0, 4.0, 0.5, 2.0, 7.0])
    adv, stats = _run(backend, rewards, group_ids=ids, return_stats=True)
    mean, std, constant = _first_appearance_stats(rewards, ids)      # groups 42, -7, 5, 9, 2^40
    assert_close_scaled(stats.group_mean, mean, 1e-6)
    assert_close_scaled(stats.group_std, std, 1e-6)
    assert stats.zero_std_fraction.item() == pytest.approx(constant.float().mean().item())
    assert (adv[[1, 3, 4, 5, 6, 7, 9]] == 0).all(), "NaN, constant groups and groups of one give exactly 0"


def test_triton_id_kernel_many_programs_match_one_bitwise():
    """The phases as separate launches with 3 programs (the interpreter cannot run a grid barrier
    with more than one program) give the same bits as the one-launch, one-program path: the int64
    fixed-point sums do not depend on which program adds first."""
    from r1kernels.advantages.triton_by_id import BLOCK, _launch, group_normalize_by_id
    gen = torch.Generator().manual_seed(3)
    batch = 2 * BLOCK + 37
    ids = torch.randint(-50, 300, (batch,), generator=gen) * (1 << 20)     # strided ids: one hash bucket apart
    rewards = torch.randn(batch, 3, generator=gen) * 2 + 5
    rewards[::17, 0] = float("nan")
    weights = torch.tensor([1.0, 0.5, 0.25])
    one = group_normalize_by_id(rewards, weights, ids, leave_one_out=False, scale="group", eps=1e-4,
                                batch_denominator=None, with_stats=True)
    many = _launch(rewards, weights, ids, leave_one_out=False, scale="group", eps=1e-4, batch_denominator=None,
                   with_stats=True, programs=3, split_phases=True)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    ref = group_advantages_ref(rewards, _from_ids(ids), reward_weights=weights)
    assert_close_scaled(one[0], ref, 1e-6)


@pytest.mark.skipif("triton" not in cpu_backends("advantages"), reason="needs the Triton interpreter")
def test_triton_ids_shuffle_equivariant_bitwise_and_barrier_reset():
    from r1kernels.advantages.triton_by_id import _barrier_word
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (700,), generator=gen)
    rewards = torch.randn(700, generator=gen)
    perm = torch.randperm(700, generator=gen)
    with r1kernels.use_backend("triton"):
        adv = r1kernels.group_advantages(rewards, group_ids=ids, estimator="rloo", scale="group")
        shuffled = r1kernels.group_advantages(rewards[perm], group_ids=ids[perm], estimator="rloo", scale="group")
    assert torch.equal(shuffled, adv[perm])
    assert _barrier_word(rewards.device)[0].item() == 0, "every launch must leave zero arrivals behind"


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_ids_at_the_int64_limits_and_small_dtypes(backend):
    ids = torch.tensor([-2 ** 63, 2 ** 63 - 1, -2 ** 63, 0, 2 ** 63 - 1, 0, -1, -1])
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 6.0, 9.0, 4.0, 4.0])
    ref = group_advantages_ref(rewards, _from_ids(ids))
    assert_close_scaled(_run(backend, rewards, group_ids=ids), ref, 1e-5, "int64 ids")
    small = torch.tensor([3, 1, 3, 2, 1, 2, 0, 0], dtype=torch.int8)
    assert_close_scaled(_run(backend, rewards, group_ids=small), ref, 1e-5, "int8 ids")
    strided = torch.arange(16)[::2]                                    # a non-contiguous view
    assert (_run(backend, rewards, group_ids=strided) == 0).all(), "eight groups of one"


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_ids_one_group_spanning_the_batch_with_huge_offset(backend):
    rewards = 1e6 + torch.randn(3000, dtype=torch.float64) * 1e-2
    ids = torch.full((3000,), 11)
    adv = _run(backend, rewards, group_ids=ids)
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    assert_close_scaled(adv, expected, 1e-7)
    assert adv.abs().max() > 1.0


def test_compile_fullgraph_group_ids():
    rewards, ids = torch.randn(24), torch.arange(24) % 5
    f = torch.compile(lambda r, g: r1kernels.group_advantages(r, group_ids=g), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(rewards, ids), r1kernels.group_advantages(rewards, group_ids=ids))


@pytest.mark.skipif("triton" not in cpu_backends("advantages"), reason="needs the Triton interpreter")
def test_triton_long_contiguous_groups_use_the_persistent_kernel():
    from r1kernels.advantages.triton_groups import LARGE_GROUP
    from r1kernels.advantages.triton_by_id import _launch, group_normalize_by_id
    size = LARGE_GROUP + 3
    rewards = torch.randn(2 * size, 2)
    rewards[5] = float("nan")
    with r1kernels.use_backend("triton"):
        adv, stats = r1kernels.group_advantages(rewards, group_size=size, estimator="rloo", scale="group",
                                                return_stats=True)
    ref = group_advantages_ref(rewards, _contiguous(2 * size, size), "rloo", "group")
    assert_close_scaled(adv, ref, 1e-6)
    combined = rewards.double().nansum(1)
    combined[5] = float("nan")
    expected_mean = torch.stack([g[~torch.isnan(g)].mean() for g in combined.view(2, size)])
    assert_close_scaled(stats.group_mean, expected_mean, 1e-6)
    one = group_normalize_by_id(rewards, None, None, leave_one_out=True, scale="group", eps=1e-4,
                                batch_denominator=None, with_stats=True, group_size=size)
    many = _launch(rewards, None, None, leave_one_out=True, scale="group", eps=1e-4, batch_denominator=None,
                   with_stats=True, group_size=size, programs=4, split_phases=True)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.skipif("triton" not in cpu_backends("advantages"), reason="needs the Triton interpreter")
def test_id_kernel_grid_of_several_programs_is_launched_cooperatively():
    """Its grid barrier spins until every program arrives: a single launch of several programs must be
    cooperative (it then fails to launch rather than hang when SMs are taken); split phases need not."""
    from r1kernels.advantages.triton_by_id import launch_options
    assert launch_options(132, split_phases=False)["launch_cooperative_grid"] is True
    assert "launch_cooperative_grid" not in launch_options(1, split_phases=False)
    assert "launch_cooperative_grid" not in launch_options(3, split_phases=True)


def test_triton_advantages_are_one_kernel_launch_and_allocations(monkeypatch):
    """What a GPU would run: each call launches one Triton kernel, and every other tensor op is an
    allocation or a view (no kernels). Checked by logging every aten op outside the launch, in the
    public function (which calls the custom op) and in the Triton launchers behind the custom op."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    from r1kernels.advantages.triton_groups import group_normalize
    from r1kernels.advantages.triton_by_id import group_normalize_by_id

    launches, ops, inside = [], [], []
    launch = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        inside.append(True)
        try:
            return launch(self, *args, **kwargs)
        finally:
            inside.pop()

    class LogOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside:
                ops.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    rewards, weights = torch.randn(96, 3), torch.tensor([1.0, 0.5, 0.25])
    ids = torch.arange(96) % 7
    with r1kernels.use_backend("triton"):
        r1kernels.group_advantages(rewards, group_ids=ids)          # allocates the barrier word once
        monkeypatch.setattr(InterpretedFunction, "run", counted)
        with LogOps():
            r1kernels.group_advantages(rewards, group_ids=ids, reward_weights=weights, estimator="rloo")
            r1kernels.group_advantages(rewards, group_size=8)
        assert set(ops) <= {"unsqueeze", "slice", "view", "alias", "group_normalize", "group_normalize_by_id"}, ops
        ops.clear()
        with LogOps():
            group_normalize_by_id(rewards, weights, ids, leave_one_out=True, scale="group", eps=1e-4,
                                  batch_denominator=None, with_stats=True)
            group_normalize_by_id(rewards, None, None, leave_one_out=False, scale="group", eps=1e-4,
                                  batch_denominator=None, with_stats=True, group_size=12)
            group_normalize(rewards, weights, group_size=8, leave_one_out=False, scale="none", eps=1e-4)
        assert set(ops) <= {"empty", "empty_strided"}, ops
    assert launches == ["_r1k_advantages_by_id", "_r1k_advantages_grouped"] + \
        ["_r1k_advantages_by_id"] * 2 + ["_r1k_advantages_grouped"]


@pytest.mark.skipif("triton" not in cpu_backends("advantages"), reason="needs the Triton interpreter")
def test_triton_ids_large_batch_matches_cpu():
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(1 << 20, generator=gen)
    ids = torch.randint(0, 1 << 17, (1 << 20,), generator=gen)     # groups of about 8, from 0 to ~25 rows
    with r1kernels.use_backend("triton"):
        adv = r1kernels.group_advantages(rewards, group_ids=ids, estimator="rloo", scale="group")
    with r1kernels.use_backend("cpu" if "cpu" in cpu_backends("advantages") else "torch"):
        expected = r1kernels.group_advantages(rewards.double(), group_ids=ids, estimator="rloo", scale="group")
    assert_close_scaled(adv, expected, 1e-5)


@pytest.mark.parametrize("backend", cpu_backends("advantages"))
@pytest.mark.parametrize("multi", ["sum_then_normalize", "normalize_then_sum"])
def test_ids_every_scale_and_multi_reward(backend, multi):
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 9, (60,), generator=gen) * 3 - 10
    rewards = torch.randn(60, 2, generator=gen)
    rewards[7] = float("nan")
    rewards[8, 1] = float("nan")
    weights = torch.tensor([1.0, -0.5])
    for estimator, scale in [("grpo", "batch"), ("grpo", "none"), ("rloo", "group"), ("dr_grpo", None)]:
        adv = _run(backend, rewards, group_ids=ids, estimator=estimator, scale=scale, reward_weights=weights,
                   multi_reward=multi)
        ref = group_advantages_ref(rewards, _from_ids(ids), estimator, scale or "none", 1e-4, weights, multi)
        assert_close_scaled(adv, ref, 1e-5, f"{estimator}/{scale}")


# ---------------------------------------------------------------- bad and empty input

@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_infinite_reward_is_a_failed_reward(backend):
    """+-inf is a reward function's failure, like NaN: advantage 0, the rest of its group unaffected,
    counted in the stats."""
    rewards = torch.tensor([1.0, 2.0, 4.0, float("inf"), 3.0, 0.0, float("-inf"), 5.0])
    as_nan = torch.where(torch.isinf(rewards), torch.nan, rewards)
    with r1kernels.use_backend(advantages=backend):
        adv, stats = r1kernels.group_advantages(rewards, 4, return_stats=True)
        expected = r1kernels.group_advantages(as_nan, 4)
    assert torch.isfinite(adv).all() and adv[3] == 0 and adv[6] == 0
    torch.testing.assert_close(adv, expected)
    assert int(stats.failed_rewards) == 2


# Bad input: (case, call, exception, a pattern the message must match: it names the argument);
# each row runs on every backend of the op that runs on this machine's CPU
INVALID = [
    ("group size not dividing", lambda: r1kernels.group_advantages(torch.randn(5), 2), ValueError, "group_size"),
    ("group ids shape",
     lambda: r1kernels.group_advantages(torch.randn(4), group_ids=torch.zeros(3).long()), ValueError, "group_ids"),
    ("unknown estimator", lambda: r1kernels.group_advantages(torch.randn(4), 2, estimator="ppo"),
     ValueError, "estimator"),
    ("NaN reward weight", lambda: r1kernels.group_advantages(torch.randn(4, 2), 2,
                                                             reward_weights=torch.tensor([1.0, float("nan")])),
     ValueError, "reward_weights must be finite"),
]


@pytest.mark.parametrize("case, call, error, pattern", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_inputs_name_the_argument(case, call, error, pattern):
    assert_rejects("advantages", call, error, pattern)


EMPTY = {
    "group_advantages": (lambda: [empty_strided((0,), (0,), False)],
                         lambda r: r1kernels.group_advantages(r, group_size=4)),
    "group_advantages [0, R], ids": (lambda: [empty_strided((0, 2), (1, 0), False), ids(0)],
                                     lambda r, group_ids: r1kernels.group_advantages(r, group_ids=group_ids)),
}


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("backend", cpu_backends("advantages"))
def test_empty_inputs_with_any_strides_give_empty_results(case, backend):
    """Empty outputs (a loss of 0 over no tokens) and gradients of each input's shape, on every backend."""
    assert_empty_results(backend, *EMPTY[case])


# ---------------------------------------------------------------- on the GPU

@gpu_test
@pytest.mark.parametrize("batch", [1, 5000, 1 << 20, 1 << 24])
def test_group_advantages_by_id_cuda_one_launch_grid_barrier(batch):
    """The id-grouped Triton kernel with a real multi-program grid barrier (the interpreter runs
    one program): equal to the float64 torch path, bitwise shuffle-equivariant, barrier reset."""
    require("triton")
    from r1kernels.advantages.triton_by_id import _barrier_word
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


@gpu_test
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.cuda_ext)])
@pytest.mark.parametrize("group_size", [8, 64, 1 << 20])
def test_group_advantages_contiguous_cuda(backend, group_size):
    """Contiguous groups: Triton's tile kernel (small groups) and persistent kernel (one group of
    2^20), and the CUDA C++ kernel."""
    require(backend)
    rewards = torch.randn(1 << 20, 3, device="cuda")
    with r1kernels.use_backend(backend):
        adv, stats = r1kernels.group_advantages(rewards, group_size=group_size, return_stats=True)
    r = rewards.double().sum(1).view(-1, group_size)
    expected = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    assert_close_scaled(adv, expected, 1e-5)
    assert_close_scaled(stats.group_std, r.std(1), 1e-5)
