"""r1kernels.integrations.verl against verl 0.9.1 itself, in verl's own environment (scripts/test_verl.sh;
verl pins transformers < 5.11, so the suite's environment does not have it and skips this module).

The engine tests run verl's real FSDP2 engine (tests/verl_engine_worker.py) in fresh processes: one
compute_log_prob and one update with verl's ppo_loss (SGD, so the parameters show the gradient), with
verl's eager path (logits, sdpa attention on padded rows) as the reference. The loss and estimator
tests call the registered functions as verl's ppo_loss and trainer do.
"""
import functools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from r1kernels.grpo.reference import grpo_loss_ref  # noqa: E402
from r1kernels.integrations import verl as r1k_verl  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "verl_engine_worker.py")
EAGER = ()                                                             # verl's own path: logits, sdpa
OURS = ("--fused", "--ours", "--rmpad", "--attn", "r1kernels")        # the config lines the docs give


@functools.lru_cache(maxsize=None)
def _run(options: tuple, processes: int = 1, expect_failure: bool = False):
    """One engine run (cached per options); its saved results, or its output when it must fail."""
    out = os.path.join(_tmp(), f"run-{abs(hash((options, processes)))}.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))}
    if processes == 1:
        env["MASTER_PORT"] = str(_free_port())
        launch = [sys.executable]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    done = subprocess.run([*launch, WORKER, out, *options], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if expect_failure:
        assert done.returncode != 0, "the run was expected to fail"
        return done.stdout + done.stderr
    assert done.returncode == 0, f"{options} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return torch.load(out)


@functools.lru_cache(maxsize=None)
def _tmp():
    import tempfile
    return tempfile.mkdtemp(prefix="r1k-verl-")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_run(ours: dict, reference: dict, atol: float = 1e-5):
    """Log-probs and entropy on the response tokens, the loss terms verl logs, the gradient norm within
    atol; every parameter after the SGD step (lr 0.1) within atol / 10, and moved by far more."""
    mask = reference["response_mask"].bool()
    assert (ours["entropy"] is None) == (reference["entropy"] is None)
    for key in ("log_probs", "entropy") if reference["entropy"] is not None else ("log_probs",):
        assert (ours[key] - reference[key])[mask].abs().max().item() <= atol, key
    assert ("actor/entropy_loss" in ours["metrics"]) == ("actor/entropy_loss" in reference["metrics"])
    for key in {"actor/pg_loss", "actor/entropy_loss"} & reference["metrics"].keys():
        assert ours["metrics"][key] == pytest.approx(reference["metrics"][key], abs=atol), key
    assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], abs=atol)
    for name, value in reference["parameters"].items():
        torch.testing.assert_close(ours["parameters"][name], value, atol=atol / 10, rtol=0.0, msg=name)


# ---------------------------------------------------------------- the fused log-probs in verl's engine


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_kernels_with_ours_equal_verl_eager_path(tied):
    """use_fused_kernels with our module (packed rows, our attention) equals verl's eager path (logits,
    padded rows, sdpa) in fp32 at temperature 0.7. Untied, lm_head is an FSDP2 unit of its own, its weight a
    DTensor outside its forward: the case verl's own fused path fails on (next test)."""
    tie = ("--tied",) if tied else ()
    ours, eager = _run(OURS + tie), _run(EAGER + tie)
    assert eager["lm_head_type"] == "DTensor"
    assert eager["temperature"] != 1.0
    _assert_same_run(ours, eager)


def test_no_entropy_asked():
    """calculate_entropy=False (no entropy bonus): the entropy output is unused, its incoming gradient None;
    the update still equals verl's eager path."""
    ours, eager = _run(OURS + ("--no-entropy",)), _run(EAGER + ("--no-entropy",))
    assert "actor/entropy_loss" not in eager["metrics"]
    _assert_same_run(ours, eager)


def test_verl_own_fused_path_fails_where_ours_works():
    """verl's own fused path, untied under FSDP2: verl issue #7520 (open), reproduced."""
    output = _run(("--fused", "--rmpad", "--attn", "r1kernels"), expect_failure=True)
    assert "got mixed torch.Tensor and DTensor" in output


@pytest.mark.parametrize("backend", ["triton", "liger"])
def test_every_fused_backend_runs_ours(backend):
    """verl's triton backend calls linear_cross_entropy, liger (no Liger installed here) FusedLinearForPPO:
    both are ours, with the same results as the torch backend."""
    _assert_same_run(_run(OURS + ("--backend", backend)), _run(OURS), atol=1e-6)


def test_unknown_fused_backend_raises():
    """verl skips its patch for an unknown backend and fails later on .log_probs; we raise, naming it."""
    output = _run(OURS + ("--backend", "cuda"), expect_failure=True)
    assert "fused_kernel_options.impl_backend must be one of" in output


def test_two_fsdp2_ranks():
    """Two ranks (gloo): lm_head sharded across them, its gradient reduce-scattered to each shard; equal to
    verl's eager path on the same two ranks."""
    ours, eager = _run(OURS, processes=2), _run(EAGER, processes=2)
    assert ours["world_size"] == eager["world_size"] == 2
    _assert_same_run(ours, eager)


def test_bf16_as_close_to_fp32_as_verl():
    """verl's default bf16 mixed precision (bf16 parameters in the forward, autocast): our log-probs,
    entropy and update are at least as close to the fp32 run as verl's own bf16 eager path is (our logits
    are never rounded to bf16)."""
    fp32, verl_bf16, ours_bf16 = _run(EAGER), _run(EAGER + ("--bf16",)), _run(OURS + ("--bf16",))
    mask = fp32["response_mask"].bool()
    for key in ("log_probs", "entropy"):
        verl_error = (verl_bf16[key] - fp32[key])[mask].abs().max().item()
        ours_error = (ours_bf16[key] - fp32[key])[mask].abs().max().item()
        assert verl_error > 1e-4, f"bf16 must change {key}"
        assert ours_error <= verl_error, (key, ours_error, verl_error)
    verl_error = max((verl_bf16["parameters"][n] - p).abs().max().item() for n, p in fp32["parameters"].items())
    ours_error = max((ours_bf16["parameters"][n] - p).abs().max().item() for n, p in fp32["parameters"].items())
    assert ours_error <= 1.5 * verl_error, (ours_error, verl_error)


@pytest.mark.parametrize("ours_mode, verl_mode, agg", [("r1k_dapo", "vanilla", "token-mean"),
                                                       ("r1k_grpo", "vanilla", "seq-mean-token-mean")])
def test_registered_loss_in_the_engine(ours_mode, verl_mode, agg):
    """Our policy loss selected by actor.policy_loss.loss_mode trains as verl's own mode with the
    aggregation TRL's type implies (no dual clip binds on this batch). loss_agg_mode still aggregates
    verl's entropy term, so both runs set it."""
    ours = _run(OURS + ("--loss-mode", ours_mode, "--loss-agg-mode", agg))
    verl_run = _run(EAGER + ("--loss-mode", verl_mode, "--loss-agg-mode", agg))
    _assert_same_run(ours, verl_run)


# ---------------------------------------------------------------- the registered losses, one call at a time


def _actor(**fields) -> ActorConfig:
    return ActorConfig(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                       clip_ratio_high=0.28, **fields)


def _batch(rows=8, length=7, seed=0, ratio_at_least_one=False, dtype=torch.float64):
    """A padded batch as verl's ppo_loss hands it: responses of lengths 0..length (an empty and a length-1
    one among them), per-token advantages (one value per sequence), old log-probs near the new ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length, 0, 1, 5, length, 3, 2, 6])[:rows]
    mask = torch.arange(length)[None, :] < lengths[:, None]
    logp = -torch.rand(rows, length, generator=g, dtype=dtype) * 3
    noise = 0.3 * torch.randn(rows, length, generator=g, dtype=dtype)
    old = logp - noise.abs() if ratio_at_least_one else logp + noise
    adv = torch.randn(rows, 1, generator=g, dtype=dtype).expand(rows, length) * mask
    return logp, old, adv.contiguous(), mask


def _verl_step(loss_fn, logp, old, adv, mask, config, dp_size=2, micro=2, rollout_is_weights=None):
    """The loss a verl update differentiates, split as verl splits it: dp_size ranks of micro-batches of
    `micro` rows, each micro-batch normalised by the global batch, summed per rank, the ranks averaged."""
    config.global_batch_info.update(dp_size=dp_size, batch_num_tokens=int(mask.sum()),
                                    global_batch_size=mask.shape[0], loss_scale_factor=config.loss_scale_factor)
    rank_rows = torch.arange(mask.shape[0]).chunk(dp_size)
    total = 0.0
    for rows in rank_rows:
        for micro_rows in rows.split(micro):
            weights = None if rollout_is_weights is None else rollout_is_weights[micro_rows]
            loss, metrics = loss_fn(old_log_prob=old[micro_rows], log_prob=logp[micro_rows], advantages=adv[micro_rows],
                                    response_mask=mask[micro_rows], loss_agg_mode=config.loss_agg_mode, config=config,
                                    rollout_is_weights=weights)
            total = total + loss
    return total / dp_size, metrics


def _rollout_is_weights(old, mask, level, threshold, seed=1):
    """verl's own rollout-correction weights (pi_old / pi_rollout, [B, R] at both levels) for a rollout
    policy near the old one; a threshold "lower_upper" is IcePop (weights outside it zeroed), one number TIS."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    g = torch.Generator().manual_seed(seed)
    rollout = old + 0.25 * torch.randn(old.shape, generator=g, dtype=old.dtype)
    weights, _ = compute_rollout_correction_weights((old - rollout) * mask, mask, rollout_is=level,
                                                    rollout_is_threshold=threshold)
    return weights


def _reference_options(name: str, config: ActorConfig, mask) -> dict:
    loss_type = r1k_verl.POLICY_LOSSES[name]["loss_type"]
    options = {"loss_type": loss_type,
               "importance_sampling_level": r1k_verl.POLICY_LOSSES[name].get("importance_sampling_level", "token"),
               "num_items_in_batch": int(mask.sum()), "max_completion_length": config.loss_scale_factor,
               "tau_pos": config.tau_pos, "tau_neg": config.tau_neg, "epsilon_low": 0.2, "epsilon_high": 0.28}
    if loss_type == "cispo":
        options["epsilon_high"] = 1.28
    return options


@pytest.mark.parametrize("name", sorted(r1k_verl.POLICY_LOSSES))
def test_registered_loss_equals_float64_reference(name):
    """Each registered loss, called per micro-batch on two ranks as verl calls it, sums to the float64
    reference loss of the whole batch, and so does its gradient."""
    assert name in core_algos.POLICY_LOSS_REGISTRY
    config = _actor(loss_scale_factor=7)
    logp, old, adv, mask = _batch()
    logp.requires_grad_(True)
    loss, metrics = _verl_step(core_algos.get_policy_loss_fn(name), logp, old, adv, mask, config)
    (grad,) = torch.autograd.grad(loss, logp)
    reference_logp = logp.detach().clone().requires_grad_(True)
    reference = grpo_loss_ref(reference_logp, adv, mask.double(), old, **_reference_options(name, config, mask))
    (reference_grad,) = torch.autograd.grad(reference, reference_logp)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    torch.testing.assert_close(grad, reference_grad, atol=1e-12, rtol=0.0)
    assert reference_grad.abs().max() > 1e-3
    assert {"actor/ppo_kl", "actor/pg_clipfrac"} <= metrics.keys()


SAME_AS_VERL = [("r1k_bnpo", "vanilla", "token-mean"), ("r1k_dapo", "vanilla", "token-mean"),
                ("r1k_grpo", "vanilla", "seq-mean-token-mean"), ("r1k_luspo", "vanilla", "seq-mean-token-sum"),
                ("r1k_dr_grpo", "vanilla", "seq-mean-token-sum-norm"), ("r1k_gspo", "gspo", "seq-mean-token-mean"),
                ("r1k_sapo", "sapo", "seq-mean-token-mean"), ("r1k_cispo", "cispo", "token-mean")]


@pytest.mark.parametrize("ours_mode, verl_mode, agg", SAME_AS_VERL)
def test_registered_loss_equals_verl_where_verl_has_the_mode(ours_mode, verl_mode, agg):
    """Where verl has the same objective: the same loss, gradient and verl metrics in fp32 (with the
    aggregation TRL's type implies; no dual clip binds here, and cispo's ratios are >= 1, where verl's
    two-sided clamp and TRL's cap agree)."""
    config = _actor(loss_scale_factor=7, loss_agg_mode=agg)
    logp, old, adv, mask = _batch(ratio_at_least_one=ours_mode == "r1k_cispo", dtype=torch.float32)
    results = []
    for mode in (ours_mode, verl_mode):
        x = logp.clone().requires_grad_(True)
        loss, metrics = _verl_step(core_algos.get_policy_loss_fn(mode), x, old, adv, mask, config)
        results.append((loss, torch.autograd.grad(loss, x)[0], metrics))
    (ours, ours_grad, ours_metrics), (theirs, their_grad, their_metrics) = results
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    torch.testing.assert_close(ours_grad, their_grad, atol=1e-6, rtol=0.0)
    assert ours_metrics["actor/ppo_kl"] == pytest.approx(their_metrics["actor/ppo_kl"], abs=1e-6)
    if ours_mode not in ("r1k_gspo", "r1k_sapo", "r1k_cispo"):     # those count their clips differently
        assert ours_metrics["actor/pg_clipfrac"] == pytest.approx(their_metrics["actor/pg_clipfrac"], abs=1e-6)


ROLLOUT_CORRECTIONS = [("token", 2.0), ("token", "0.8_1.25"), ("sequence", 2.0), ("sequence", "0.5_2.0")]


@pytest.mark.parametrize("level, threshold", ROLLOUT_CORRECTIONS, ids=lambda x: str(x))
@pytest.mark.parametrize("ours_mode, verl_mode, agg", SAME_AS_VERL)
def test_rollout_is_weights_as_verl_applies_them(ours_mode, verl_mode, agg, level, threshold):
    """verl's rollout correction (its own weights at both levels, truncated or IcePop-masked, [B, R] with
    0 on padding) scales each token's loss as in verl's own losses: the same loss and gradient in fp32.
    One exception, by design: r1k_gspo is TRL's GSPO, whose sequence ratio's gradient reaches every token
    of the sequence, so per-token weights that differ within a sequence spread it by their mean; verl's
    gspo (GSPO-token) weighs each token's gradient by its own weight. Same loss, different gradient there."""
    config = _actor(loss_scale_factor=7, loss_agg_mode=agg)
    logp, old, adv, mask = _batch(ratio_at_least_one=ours_mode == "r1k_cispo", dtype=torch.float32)
    weights = _rollout_is_weights(old, mask, level, threshold)
    assert ((weights > 0) & (weights != 1) & mask).any() and tuple(weights.shape) == tuple(mask.shape)
    results = []
    for mode in (ours_mode, verl_mode):
        x = logp.clone().requires_grad_(True)
        loss, _ = _verl_step(core_algos.get_policy_loss_fn(mode), x, old, adv, mask, config, rollout_is_weights=weights)
        results.append((loss, torch.autograd.grad(loss, x)[0]))
    (ours, ours_grad), (theirs, their_grad) = results
    plain, _ = _verl_step(core_algos.get_policy_loss_fn(ours_mode), logp, old, adv, mask, config)
    assert abs(plain.item() - ours.item()) > 1e-4, "the weights must change the loss"
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    if ours_mode == "r1k_gspo" and level == "token":
        assert (ours_grad - their_grad).abs().max() > 1e-4
        return
    torch.testing.assert_close(ours_grad, their_grad, atol=1e-6, rtol=0.0)


@pytest.mark.parametrize("level, threshold", ROLLOUT_CORRECTIONS, ids=lambda x: str(x))
@pytest.mark.parametrize("name", sorted(r1k_verl.POLICY_LOSSES))
def test_rollout_is_weights_equal_float64_reference(name, level, threshold):
    """Every registered loss (vespo told the level) with verl's weights against the float64 reference given
    the ratio per token (verl's token level) or once per sequence (its sequence level)."""
    config = _actor(loss_scale_factor=7)
    logp, old, adv, mask = _batch()
    weights = _rollout_is_weights(old, mask, level, threshold)
    options = r1k_verl.POLICY_LOSSES[name]
    fn = r1k_verl.make_policy_loss(level, **options) if options["loss_type"] == "vespo" \
        else core_algos.get_policy_loss_fn(name)
    logp.requires_grad_(True)
    loss, _ = _verl_step(fn, logp, old, adv, mask, config, rollout_is_weights=weights)
    (grad,) = torch.autograd.grad(loss, logp)
    reference_logp = logp.detach().clone().requires_grad_(True)
    is_ratio = weights if level == "token" else weights.amax(-1)
    reference = grpo_loss_ref(reference_logp, adv, mask.double(), old, is_ratio=is_ratio,
                              **_reference_options(name, config, mask))
    (reference_grad,) = torch.autograd.grad(reference, reference_logp)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    torch.testing.assert_close(grad, reference_grad, atol=1e-12, rtol=0.0)


def test_vespo_must_be_told_the_rollout_is_level():
    """verl's sequence-level weights spread over a response would count its ratio once per token in vespo's
    sequence weight: r1k_vespo given weights raises until registered with the level, and a sequence level
    given per-token weights raises."""
    config = _actor()
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="rollout_is='token' or 'sequence'"):
        _verl_step(core_algos.get_policy_loss_fn("r1k_vespo"), logp, old, adv, mask, config,
                   rollout_is_weights=_rollout_is_weights(old, mask, "sequence", 2.0))
    with pytest.raises(ValueError, match="differ within a response"):
        _verl_step(r1k_verl.make_policy_loss("sequence", loss_type="vespo"), logp, old, adv, mask, config,
                   rollout_is_weights=_rollout_is_weights(old, mask, "token", 2.0))
    with pytest.raises(ValueError, match="rollout_is must be one of"):
        r1k_verl.make_policy_loss("seq", loss_type="vespo")
    sequence_fn = r1k_verl.register_policy_loss("r1k_test_vespo_seq", loss_type="vespo", rollout_is="sequence")
    weights = _rollout_is_weights(old, mask, "sequence", 2.0)
    counted_once, _ = _verl_step(sequence_fn, logp, old, adv, mask, config, rollout_is_weights=weights)
    per_token, _ = _verl_step(r1k_verl.make_policy_loss("token", loss_type="vespo"), logp, old, adv, mask, config,
                              rollout_is_weights=weights)
    assert abs(counted_once.item() - per_token.item()) > 1e-4


def test_cispo_caps_above_only_as_trl():
    """verl's cispo clamps the ratio on both sides; TRL's (ours) caps it above only: they differ once a
    ratio falls below 1 - clip_ratio_low."""
    config = _actor(loss_agg_mode="token-mean")
    logp, old, adv, mask = _batch(dtype=torch.float32)
    ratio = torch.exp(logp - old)[mask]
    assert (ratio < 0.8).any()
    ours, _ = _verl_step(core_algos.get_policy_loss_fn("r1k_cispo"), logp, old, adv, mask, config)
    theirs, _ = _verl_step(core_algos.get_policy_loss_fn("cispo"), logp, old, adv, mask, config)
    assert abs(ours.item() - theirs.item()) > 1e-4


def test_dr_grpo_needs_loss_scale_factor():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="loss_scale_factor"):
        _verl_step(core_algos.get_policy_loss_fn("r1k_dr_grpo"), logp, old, adv, mask, _actor())


def test_register_policy_loss_with_options():
    """A loss of one's own (here TRL's delta, which verl's config has no field for), checked at registration."""
    fn = r1k_verl.register_policy_loss("r1k_test_delta", loss_type="grpo", delta=1.1)
    assert core_algos.get_policy_loss_fn("r1k_test_delta") is fn
    logp, old, adv, mask = _batch()
    config = _actor(loss_scale_factor=7)
    loss, _ = _verl_step(fn, logp, old, adv, mask, config)
    reference = grpo_loss_ref(logp, adv, mask.double(), old, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.28,
                              delta=1.1)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    with pytest.raises(TypeError):
        r1k_verl.register_policy_loss("r1k_test_bad", loss_type="grpo", not_an_option=1)
    with pytest.raises(ValueError):
        r1k_verl.register_policy_loss("r1k_test_bad", loss_type="sapo", delta=1.1)


# ---------------------------------------------------------------- advantages


def _rewards(seed=0, groups=5, size=4):
    """token_level_rewards [B, R] (each response's reward on its last token), response masks, and uids
    in shuffled order (groups need not be contiguous)."""
    g = torch.Generator().manual_seed(seed)
    rows = groups * size
    uids = np.array([f"prompt-{i}" for i in range(groups)] * size, dtype=object)[torch.randperm(rows, generator=g)]
    lengths = torch.randint(1, 6, (rows,), generator=g)
    mask = (torch.arange(6)[None, :] < lengths[:, None]).float()
    rewards = torch.zeros(rows, 6)
    rewards[torch.arange(rows), lengths - 1] = torch.randint(0, 3, (rows,), generator=g).float() * 0.5
    return rewards, mask, uids


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_estimator_equals_verl(norm):
    from verl.trainer.config import AlgoConfig

    rewards, mask, uids = _rewards()
    config = AlgoConfig(norm_adv_by_std_in_grpo=norm)
    ours, returns = core_algos.get_adv_estimator_fn("r1k_grpo")(
        token_level_rewards=rewards, response_mask=mask, index=uids, config=config, epsilon=1e-6)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids, epsilon=1e-6,
                                                          norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0.0)
    assert torch.equal(ours, returns) and ours.abs().max() > 0.1


def test_rloo_estimator_equals_verl():
    rewards, mask, uids = _rewards(seed=1)
    ours, _ = core_algos.get_adv_estimator_fn("r1k_rloo")(token_level_rewards=rewards, response_mask=mask,
                                                          index=uids, config=None)
    theirs, _ = core_algos.compute_rloo_outcome_advantage(rewards, mask, uids)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0.0)


def test_a_response_alone_in_its_group_gets_no_advantage():
    """No baseline to compare it with: 0, as TRL; verl's own grpo gives it its raw score."""
    rewards, mask = torch.tensor([[0.0, 2.0], [0.0, 1.0], [0.0, 3.0]]), torch.ones(3, 2)
    uids = np.array(["alone", "pair", "pair"], dtype=object)
    ours, _ = core_algos.get_adv_estimator_fn("r1k_grpo")(token_level_rewards=rewards, response_mask=mask,
                                                          index=uids, config=None)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids)
    assert ours[0].abs().max() == 0 and theirs[0, 0] > 1.9
    torch.testing.assert_close(ours[1:], theirs[1:], atol=1e-3, rtol=0.0)    # eps 1e-4 against verl's 1e-6


def test_version_outside_the_supported_range_raises():
    with pytest.raises(RuntimeError, match="supports verl"):
        r1k_verl._check_version("0.8.0")
    r1k_verl._check_version("0.9.1")


def test_bias_corrected_kl_in_verl_ppo_loss():
    """kl_loss_type=r1k_k3_bias_corrected through verl's own ppo_loss (policy r1k_bnpo, token-mean KL
    aggregation): TRL's loss with beta and use_bias_correction_kl, value and gradient, to float64 rounding."""
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils import losses
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(3)
    batch, prompt, response = 4, 3, 5
    lengths = torch.tensor([5, 1, 3, 4])
    mask = torch.arange(response)[None, :] < lengths[:, None]
    attention = torch.cat([torch.ones(batch, prompt, dtype=torch.long), mask.long()], 1)
    ids = torch.randint(0, 50, (batch, prompt + response), generator=g)
    logp = -torch.rand(batch, response, generator=g, dtype=torch.float64) * 2 * mask
    old = (logp + 0.2 * torch.randn(batch, response, generator=g, dtype=torch.float64)) * mask
    ref = (logp + 0.3 * torch.randn(batch, response, generator=g, dtype=torch.float64)) * mask
    adv = torch.randn(batch, 1, generator=g, dtype=torch.float64).expand(batch, response) * mask
    data = DataProto.from_single_dict({
        "input_ids": ids, "prompts": ids[:, :prompt], "responses": ids[:, prompt:], "attention_mask": attention,
        "position_ids": attention.cumsum(1) - 1, "response_mask": mask.long(), "old_log_probs": old,
        "advantages": adv.contiguous(), "ref_log_prob": ref})
    data = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=batch)
    # the model's log-probs over each whole packed sequence; ppo_loss slices the responses out (shifted by one)
    ends = (prompt + lengths).cumsum(0)
    values = torch.zeros(int(ends[-1]), dtype=torch.float64)
    for b in range(batch):
        start = int(ends[b]) - int(lengths[b]) - 1
        values[start:start + int(lengths[b])] = logp[b, :int(lengths[b])]
    values.requires_grad_(True)
    model_log_probs = torch.nested.nested_tensor_from_jagged(values, torch.cat([torch.zeros(1), ends]).long())
    beta = 0.05
    config = _actor(use_kl_loss=True, kl_loss_coef=beta, kl_loss_type=r1k_verl.BIAS_CORRECTED_KL,
                    entropy_coeff=0.0, policy_loss={"loss_mode": "r1k_bnpo"})
    loss, metrics = losses.ppo_loss(config, {"log_probs": model_log_probs}, data)
    (grad,) = torch.autograd.grad(loss, values)
    x = logp.clone().requires_grad_(True)
    reference = grpo_loss_ref(x, adv, mask.double(), old, ref, loss_type="bnpo", beta=beta, epsilon_low=0.2,
                              epsilon_high=0.28, use_bias_correction_kl=True)
    (reference_grad,) = torch.autograd.grad(reference, x)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    sliced = torch.stack([torch.cat([grad[int(ends[b]) - int(lengths[b]) - 1:int(ends[b]) - 1],
                                     grad.new_zeros(response - int(lengths[b]))]) for b in range(batch)])
    torch.testing.assert_close(sliced, reference_grad, atol=1e-12, rtol=0.0)
    assert metrics["kl_loss"].aggregate() > 1e-3
    uncorrected = grpo_loss_ref(logp, adv, mask.double(), old, ref, loss_type="bnpo", beta=beta, epsilon_low=0.2,
                                epsilon_high=0.28, use_bias_correction_kl=False)
    assert abs(uncorrected.item() - reference.item()) > 1e-5, "the correction must change the loss here"
