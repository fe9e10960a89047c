"""The GRPO-family loss types as data, and every loss option, declared once.

``LOSS_TYPES`` maps each name (TRL's ``GRPOConfig.loss_type``) to its per-token function, a key of
``NORMALISERS`` and the options it accepts and needs; ``LossOptions`` declares every option with its
default and meaning and validates a set of them. ``r1kernels.grpo`` computes the loss from these
(and re-exports them); the formulas are in its docstring.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from r1kernels import _checks

KL_ESTIMATORS = ("k1", "k2", "k3", "k3_clamped")
IS_LEVELS = ("token", "sequence")


# ---------------------------------------------------------------- the loss types, as data
def _clipped_token_loss(ratio: Tensor, adv: Tensor, logp: Tensor, o: dict, seq_weight=None):
    """PPO's clipped surrogate, with verl's dual clip and TRL's delta cap."""
    eps_low = 0.2 if o["epsilon_low"] is None else o["epsilon_low"]
    eps_high = eps_low if o["epsilon_high"] is None else o["epsilon_high"]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    capped = ratio if o["delta"] is None else torch.clamp(ratio, max=o["delta"])
    per_token = -torch.min(capped * adv, clipped * adv)
    if o["clip_ratio_c"] is not None:
        per_token = torch.where(adv < 0, torch.min(per_token, -o["clip_ratio_c"] * adv), per_token)
    # clip metrics as TRL measures them: on the delta-capped ratio
    return per_token, (capped < 1 - eps_low) & (adv < 0), (capped > 1 + eps_high) & (adv > 0)


def _cispo_token_loss(ratio: Tensor, adv: Tensor, logp: Tensor, o: dict, seq_weight=None):
    """CISPO: the capped ratio, detached, weights the log-prob's gradient."""
    per_token = -torch.clamp(ratio, max=o["epsilon_high"]).detach() * adv * logp
    return per_token, torch.zeros_like(adv, dtype=torch.bool), (ratio > o["epsilon_high"]) & (adv > 0)   # as TRL


def _sapo_token_loss(ratio: Tensor, adv: Tensor, logp: Tensor, o: dict, seq_weight=None):
    """SAPO: a sigmoid gate in place of the clip, temperature by the advantage's sign."""
    tau_pos = 1.0 if o["sapo_temperature_pos"] is None else o["sapo_temperature_pos"]
    tau_neg = 1.05 if o["sapo_temperature_neg"] is None else o["sapo_temperature_neg"]
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    never = torch.zeros_like(adv, dtype=torch.bool)
    return -torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau) * adv, never, never


def _vespo_token_loss(ratio: Tensor, adv: Tensor, logp: Tensor, o: dict, seq_weight=None):
    """VESPO: the sequence's gamma weight phi(w) (``_vespo_weight``, detached) scales A logp."""
    never = torch.zeros_like(adv, dtype=torch.bool)
    return -seq_weight * adv * logp, never, never


_LOG_MIN_WEIGHT = -18.420680743952367      # log(1e-8), TRL's floor on log w


def _vespo_weight(t, log_ratio: Tensor) -> Tensor:
    """phi(w) = e^lambda w^k e^(-lambda w) per token, from its sequence's ratio w = exp(sum over the
    sequence's tokens of clamp(logp - old, -20, 20), plus log is_ratio) clamped to [1e-8, e^20]; k and
    lambda by the advantage's sign (vespo_k_pos / vespo_lambda_pos for A >= 0, the _neg pair else).
    A per-token is_ratio adds the sum over the tokens of clamp(log r_t, log 1e-8, 20) (TRL's token
    modes); one given per sequence is already the sequence's ratio and adds clamp(log r, log 1e-8, 20)
    once (TRL refuses its sequence modes with vespo; spreading r over the tokens would count it L times)."""
    o, m, layout = t.options, t.m, t.layout
    seq_log_w = layout.seq_sum(torch.clamp(log_ratio.detach(), -20.0, 20.0) * m)
    if t.is_ratio_per_seq is not None:     # the sampler's correction folds into w (and is not applied again)
        seq_log_w = seq_log_w + torch.clamp(torch.log(t.is_ratio_per_seq), _LOG_MIN_WEIGHT, 20.0)
    elif t.is_ratio is not None:
        seq_log_w = seq_log_w + layout.seq_sum(torch.clamp(torch.log(t.is_ratio), _LOG_MIN_WEIGHT, 20.0) * m)
    log_w = torch.clamp(seq_log_w[layout.seq_ids], _LOG_MIN_WEIGHT, 20.0)
    positive = t.adv >= 0

    def by_sign(name):      # in the accumulation dtype (TRL's torch.where of two floats is float32)
        return torch.where(positive, torch.full_like(m, _option(o, name + "_pos")), _option(o, name + "_neg"))

    k, lam = by_sign("vespo_k"), by_sign("vespo_lambda").clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


_VESPO_DEFAULTS = {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}


def _option(o: dict, name: str) -> float:
    return _VESPO_DEFAULTS[name] if o.get(name) is None else o[name]


@dataclasses.dataclass(frozen=True)
class Normaliser:
    """How the masked token losses l_t m_t of a batch become the loss:
    loss = sum_t u_t m_t l_t / count, with u_t = 1 / (tokens of t's sequence) when ``per_sequence``
    (a mean of sequence means) and 1 otherwise. ``count(seqs, tokens, options)`` is the denominator
    from the batch's sequence and token counts (0-d tensors or numbers); counted locally, it adds up
    over micro-batches and ranks, so a trainer divides the summed loss_sum by the summed count once."""
    per_sequence: bool
    count: Callable
    options: tuple[str, ...] = ()           # options this normaliser reads
    required: tuple[str, ...] = ()          # ... of which these must be given


def _items(seqs, tokens, o):
    """dapo/cispo: TRL's num_items_in_batch / num_processes (the whole batch, all ranks), or the local count."""
    return tokens if o.get("num_items_in_batch") is None else o["num_items_in_batch"] / o.get("num_processes", 1)


NORMALISERS = {
    "sequence": Normaliser(True, lambda seqs, tokens, o: seqs),          # mean over sequences of token means
    "tokens": Normaliser(False, lambda seqs, tokens, o: tokens),         # mean over the batch's tokens
    # Dr. GRPO's constant: B sequences of max_completion_length tokens each
    "fixed_length": Normaliser(False, lambda seqs, tokens, o: seqs * o["max_completion_length"],
                               options=("max_completion_length",), required=("max_completion_length",)),
    "items": Normaliser(False, _items, options=("num_items_in_batch",)),
    "sequence_sum": Normaliser(False, lambda seqs, tokens, o: seqs),    # luspo: each sequence's sum, averaged
}


def loss_normaliser(loss_type: str, num_seqs, num_tokens, max_completion_length: Optional[int] = None):
    """The denominator of ``loss_type``'s loss for a batch of ``num_seqs`` sequences with
    ``num_tokens`` unmasked tokens. Sum it over micro-batches and ranks (it is additive), then scale
    each micro-batch's ``loss_sum`` by 1 / that sum: the loss of the whole batch at once."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPES)}, got {loss_type!r}")
    return NORMALISERS[LOSS_TYPES[loss_type].normaliser].count(
        num_seqs, num_tokens, {"max_completion_length": max_completion_length})


@dataclasses.dataclass(frozen=True)
class LossType:
    """One loss type (its name is TRL's ``GRPOConfig.loss_type``): the per-token loss
    ``token_loss(ratio, adv, logp, options) -> (l, clipped low, clipped high)``, a key of
    NORMALISERS, the type-specific options it accepts and needs, and what callers ask of it as
    fields (``clipped``, ``whole_sequence``, ``needs_max_completion_length``, ``counts_items``) rather
    than by testing option names. Adding a loss type is one entry here plus its float64 reference
    (``r1kernels/reference/grpo.py``)."""
    token_loss: Callable
    normaliser: str
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    # PPO's clipped ratio: epsilon_low / epsilon_high (defaults 0.2 / epsilon_low), delta, clip_ratio_c
    clipped: bool = False
    # a per-sequence weight from the whole sequence (vespo), passed to token_loss as seq_weight; such a
    # type folds is_ratio into it and takes the two-pass route
    sequence_weight: Optional[Callable] = None

    @property
    def accepts(self) -> tuple[str, ...]:
        return self.options + NORMALISERS[self.normaliser].options

    @property
    def needs(self) -> tuple[str, ...]:
        return self.required + NORMALISERS[self.normaliser].required

    @property
    def whole_sequence(self) -> bool:
        """A token's loss depends on its whole sequence (the fused loss then cannot run in one pass)."""
        return self.sequence_weight is not None

    @property
    def needs_max_completion_length(self) -> bool:
        """Its normaliser is B * max_completion_length (Dr. GRPO): pass max_completion_length."""
        return "max_completion_length" in NORMALISERS[self.normaliser].options

    @property
    def counts_items(self) -> bool:
        """Normalised by TRL's num_items_in_batch (the generation batch's tokens, all ranks) when given."""
        return "num_items_in_batch" in NORMALISERS[self.normaliser].options


_CLIP_OPTIONS = ("epsilon_low", "epsilon_high", "delta", "clip_ratio_c")
LOSS_TYPES = {
    "grpo": LossType(_clipped_token_loss, "sequence", _CLIP_OPTIONS, clipped=True),
    "bnpo": LossType(_clipped_token_loss, "tokens", _CLIP_OPTIONS, clipped=True),
    "dr_grpo": LossType(_clipped_token_loss, "fixed_length", _CLIP_OPTIONS, clipped=True),
    "dapo": LossType(_clipped_token_loss, "items", _CLIP_OPTIONS, clipped=True),
    "cispo": LossType(_cispo_token_loss, "items", ("epsilon_high",), required=("epsilon_high",)),
    "sapo": LossType(_sapo_token_loss, "sequence", ("sapo_temperature_pos", "sapo_temperature_neg")),
    "luspo": LossType(_clipped_token_loss, "sequence_sum", _CLIP_OPTIONS, clipped=True),
    "vespo": LossType(_vespo_token_loss, "items", tuple(_VESPO_DEFAULTS), sequence_weight=_vespo_weight),
}
# every option that only some loss types accept
TYPE_OPTIONS = tuple(dict.fromkeys(name for entry in LOSS_TYPES.values() for name in entry.accepts))
_WHY_NEEDED = {
    "epsilon_high": "the cap on the importance ratio (e.g. 5.0)",
    "max_completion_length": "its normaliser is B * max_completion_length",
}


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Every option of the GRPO-family loss, declared once: its default here and its meaning beside it.
    policy_loss, grpo_loss, linear_grpo_loss and check_options take these as keyword arguments (an
    unknown one raises TypeError, a bad value or one that does not apply to ``loss_type`` ValueError).
    None: the loss type's default, or off."""
    loss_type: str = "grpo"                          # a key of LOSS_TYPES (TRL's names)
    importance_sampling_level: str = "token"         # "sequence": GSPO, the ratio is a sequence mean
    epsilon_low: Optional[float] = None              # clipped types: the ratio's lower clip 1 - eps (0.2)
    epsilon_high: Optional[float] = None             # clipped: upper clip 1 + eps (epsilon_low); cispo: its cap
    delta: Optional[float] = None                    # clipped: a two-sided bound on the ratio (TRL's delta)
    beta: float = 0.0                                # KL coefficient (needs ref_logprobs)
    num_items_in_batch: object = None                # TRL's token count of the generation batch, all ranks
    num_processes: int = 1                           # ... divided by this (the ranks)
    max_completion_length: Optional[int] = None      # dr_grpo's normaliser: B * max_completion_length
    clip_ratio_c: Optional[float] = None             # verl's dual clip for A < 0
    kl_estimator: str = "k3"                         # one of KL_ESTIMATORS
    entropy_coef: float = 0.0                        # entropy bonus, a token mean (TRL)
    sapo_temperature_pos: Optional[float] = None     # sapo's gate temperatures (1.0 for A > 0, 1.05 for A < 0)
    sapo_temperature_neg: Optional[float] = None
    use_bias_correction_kl: bool = True              # the KL term times the importance ratio (TRL's default)
    off_policy_mask_threshold: Optional[float] = None  # DeepSeek-V3.2's off-policy sequence mask
    top_entropy_quantile: float = 1.0                # keep the policy term of the top-entropy tokens only
    vespo_k_pos: Optional[float] = None              # vespo's per-sequence weight shape and scale
    vespo_lambda_pos: Optional[float] = None
    vespo_k_neg: Optional[float] = None
    vespo_lambda_neg: Optional[float] = None

    def validate(self, has_ref: bool) -> None:
        """Raise on a bad value or an option that does not apply to the loss type."""
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")

        given = self.as_dict()
        entry = LOSS_TYPES[self.loss_type]
        for name in TYPE_OPTIONS:
            if given[name] is not None and name not in entry.accepts:
                types = tuple(lt for lt, e in LOSS_TYPES.items() if name in e.accepts)
                raise ValueError(f"{name} applies to loss_type in {types}, not {self.loss_type!r}")
        for name in entry.needs:
            if given[name] is None:
                raise ValueError(f"{self.loss_type} needs {name}: {_WHY_NEEDED[name]}")
        if self.num_items_in_batch is not None:
            _checks.positive_count("num_items_in_batch", self.num_items_in_batch)
        if isinstance(self.num_processes, bool) or not isinstance(self.num_processes, int) or self.num_processes < 1:
            raise ValueError(f"num_processes must be an int >= 1, got {self.num_processes!r}")
        if self.epsilon_low is not None and not 0 <= self.epsilon_low < 1:
            raise ValueError(f"epsilon_low must be in [0, 1), got {self.epsilon_low}")
        if self.epsilon_high is not None and not self.epsilon_high >= 0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.delta is not None and not self.delta > 1:
            raise ValueError(f"delta must be > 1 (an upper bound on the ratio), got {self.delta}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be > 1, got {self.clip_ratio_c}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.beta > 0 and not has_ref:
            raise ValueError("beta > 0 needs ref_logprobs")
        if self.max_completion_length is not None and not self.max_completion_length >= 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if given[name] is not None and not given[name] > 0:
                raise ValueError(f"{name} must be > 0, got {given[name]}")
        for name in _VESPO_DEFAULTS:
            if given[name] is not None and not given[name] >= 0:
                raise ValueError(f"{name} must be >= 0, got {given[name]}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        if not self.entropy_coef >= 0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.off_policy_mask_threshold is not None and not self.off_policy_mask_threshold >= 0:
            raise ValueError("off_policy_mask_threshold must be >= 0 (a mean log-prob drift), "
                             f"got {self.off_policy_mask_threshold}")
        if isinstance(self.top_entropy_quantile, bool) or not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile!r}")

    def as_dict(self) -> dict:
        """The options by name (values as given: a 0-d tensor stays that tensor)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def two_pass_reason(self) -> Optional[str]:
        """The TWO_PASS_ROUTES key these options send linear_grpo_loss to (a token's gradient needs more
        than the token), or None."""
        if self.importance_sampling_level != "token":
            return "sequence_level"
        if self.off_policy_mask_threshold is not None:
            return "off_policy_mask"
        if self.top_entropy_quantile < 1.0:
            return "top_entropy_quantile"
        if LOSS_TYPES.get(self.loss_type, LOSS_TYPES["grpo"]).whole_sequence:
            return "whole_sequence"
        return None


def loss_options(where: str, options: dict) -> LossOptions:
    """``options`` (keyword arguments of ``where``) as LossOptions; an unknown name raises TypeError."""
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise TypeError(f"{where} got unexpected options {unknown}")
    return LossOptions(**options)


_OPTION_NAMES = tuple(field.name for field in dataclasses.fields(LossOptions))
