"""One GRPO update on a batch of rollouts: micro-batches (packed varlen, or padded), per-token
log-probs through the fused LM head, and the loss normalised for every loss type so that the
sum over micro-batches and ranks equals the loss of the whole global batch at once.

Normalisation, once: each micro-batch's un-normalised ``loss_sum`` is divided by the loss type's
denominator summed over every micro-batch and rank (``r1kernels.loss_normaliser`` counts are
additive), and multiplied by the world size because FSDP averages gradients over ranks.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import r1kernels
from r1kernels.naive import naive_logprobs
from r1kernels.constants import IGNORE_INDEX
from r1kernels.grpo import LOSS_TYPES, loss_normaliser


@dataclasses.dataclass
class MicroBatch:
    rows: list                      # indices into the rollout batch
    input_ids: torch.Tensor         # packed [1, N] or padded [B, T]
    position_ids: torch.Tensor
    targets: torch.Tensor           # packed [N] or padded [B, T]; IGNORE_INDEX where no loss
    mask: torch.Tensor              # bool, completion tokens only
    advantages: torch.Tensor        # [S]
    cu_seqlens: Optional[torch.Tensor] = None      # packed only
    attention_mask: Optional[torch.Tensor] = None  # padded only
    loss_rows: torch.Tensor = dataclasses.field(init=False)        # flat indices of the tokens with a loss
    loss_cu_seqlens: torch.Tensor = dataclasses.field(init=False)  # [S + 1] each sequence's offset in loss_rows
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    is_ratio: Optional[torch.Tensor] = None        # sampler/trainer importance ratio per token (vLLM)

    def __post_init__(self):
        # The lm_head only runs on the rows that have a loss (like TRL's logits_to_keep, but exact for
        # packed rows too): prompt and padding positions never reach the [tokens, V] GEMMs.
        flat = self.mask.reshape(-1)
        self.loss_rows = flat.nonzero().view(-1)
        if self.cu_seqlens is None:        # padded: a row per sequence
            offsets = torch.nn.functional.pad(self.mask.sum(1).cumsum(0), (1, 0))
        else:                              # packed: loss tokens before each sequence's start
            offsets = torch.nn.functional.pad(flat.cumsum(0), (1, 0))[self.cu_seqlens.long()]
        self.loss_cu_seqlens = offsets.to(torch.int32)

    @property
    def num_seqs(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def _targets_and_mask(ids: list, prompt_len: int):
    targets = ids[1:] + [IGNORE_INDEX]
    mask = [prompt_len - 1 <= i < len(ids) - 1 for i in range(len(ids))]
    return targets, mask


def _pad_right(rows: list, fill) -> list:
    """Lists padded on the right with ``fill`` to the longest one's length."""
    width = max(len(row) for row in rows)
    return [row + [fill] * (width - len(row)) for row in rows]


def build_micro_batches(prompt_ids, completion_ids, advantages, max_tokens, packing, pad_id, device, rows=None):
    """Token-budget micro-batches (first-fit decreasing), packed into one row each or padded."""
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
    rows = list(range(len(sequences))) if rows is None else rows
    lengths = [len(sequences[r]) for r in rows]
    plan = r1kernels.plan_micro_batches(lengths, max(max_tokens, max(lengths)), num_ranks=1)[0]
    batches = []
    for members in plan:
        members = [rows[i] for i in sorted(members)]
        if not members:
            continue
        ids = [sequences[r] for r in members]
        tm = [_targets_and_mask(sequences[r], len(prompt_ids[r])) for r in members]
        adv = torch.tensor([advantages[r] for r in members], dtype=torch.float32, device=device)
        if packing:
            packed = r1kernels.pack([torch.tensor(x, device=device) for x in ids])
            batches.append(MicroBatch(
                members, packed.input_ids[None], packed.position_ids[None],
                torch.tensor([t for targets, _ in tm for t in targets], device=device),
                torch.tensor([m for _, mask in tm for m in mask], device=device), adv, cu_seqlens=packed.cu_seqlens))
        else:
            input_ids = torch.tensor(_pad_right(ids, pad_id), device=device)
            attention = torch.tensor(_pad_right([[1] * len(x) for x in ids], 0), device=device)
            batches.append(MicroBatch(
                members, input_ids, (attention.cumsum(1) - 1).clamp(min=0),
                torch.tensor(_pad_right([t for t, _ in tm], IGNORE_INDEX), device=device),
                torch.tensor(_pad_right([m for _, m in tm], False), device=device), adv, attention_mask=attention))
    return batches


def model_inputs(mb: MicroBatch) -> dict:
    """The model's keyword arguments for the micro-batch: varlen offsets when packed, else a padding mask."""
    if mb.cu_seqlens is not None:
        max_len = int((mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).max())
        return dict(input_ids=mb.input_ids, position_ids=mb.position_ids, cu_seq_lens_q=mb.cu_seqlens,
                    cu_seq_lens_k=mb.cu_seqlens, max_length_q=max_len, max_length_k=max_len)
    return dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids)


def naive_head_logprobs(hidden, weight, bias, targets, temperature):
    """What a plain trainer computes: every position's logits materialised, then the benchmarks' naive
    log-softmax and gather; 0 where the target is IGNORE_INDEX."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return naive_logprobs(logits, targets.clamp(min=0), temperature) * (targets != IGNORE_INDEX)


def _on_loss_rows(x: Optional[torch.Tensor], mb: MicroBatch) -> Optional[torch.Tensor]:
    """``x``, laid out like ``mb.targets``, on the micro-batch's loss rows only (None stays None)."""
    return None if x is None else x.reshape(-1).index_select(0, mb.loss_rows)


def make_head(mb: MicroBatch, temperature: float, kernels: str, loss: Optional[dict] = None):
    """The model's head for one micro-batch. Without ``loss``: per-token log-probs laid out like
    ``mb.targets`` (0 where there is no loss); with ``loss`` (policy_loss's options): the GRPO loss
    output on the micro-batch's advantages and old/ref/importance log-probs.

    The fused kernels see only the loss rows (the completion tokens), packed by ``mb.loss_cu_seqlens``,
    so prompt and padding positions never reach the [tokens, V] GEMMs; naive materialises the logits
    of every position, as a plain trainer does."""
    def head(hidden, weight, bias):
        if kernels == "naive":
            packed = mb.cu_seqlens is not None
            logp = naive_head_logprobs(hidden.reshape(-1, hidden.shape[-1]) if packed else hidden, weight,
                                       bias, mb.targets, temperature)
            if loss is None:
                return logp
            layout = dict(cu_seqlens=mb.cu_seqlens) if packed else {}
            return r1kernels.policy_loss(logp, mb.advantages, mb.mask, old_logprobs=mb.old_logprobs,
                                         ref_logprobs=mb.ref_logprobs, is_ratio=mb.is_ratio, **layout, **loss)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb.loss_rows)
        targets = _on_loss_rows(mb.targets, mb)
        if loss is None:
            logp = r1kernels.linear_token_logprobs(rows, weight, targets, bias, temperature)
            return logp.new_zeros(mb.targets.numel()).index_copy(0, mb.loss_rows, logp).view(mb.targets.shape)
        return r1kernels.linear_grpo_loss(
            rows, weight, targets, mb.advantages, bias=bias, temperature=temperature, cu_seqlens=mb.loss_cu_seqlens,
            old_logprobs=_on_loss_rows(mb.old_logprobs, mb), ref_logprobs=_on_loss_rows(mb.ref_logprobs, mb),
            is_ratio=_on_loss_rows(mb.is_ratio, mb), **loss)
    return head


@torch.no_grad()
def model_logprobs(model, mb: MicroBatch, temperature: float, kernels: str) -> torch.Tensor:
    """Per-token log-probs of the micro-batch's targets (old policy or reference), no gradient."""
    return model(**model_inputs(mb), head=make_head(mb, temperature, kernels)).float()


def _sampled_logprobs(mb: MicroBatch, sampling_logprobs: list) -> torch.Tensor:
    """The sampler's log-probs laid out like ``mb.old_logprobs`` (0 outside the completion tokens)."""
    sampled = torch.zeros_like(mb.old_logprobs)
    flat = sampled.view(-1)
    positions = mb.mask.reshape(-1).nonzero().view(-1)
    values = torch.tensor([lp for r in mb.rows for lp in sampling_logprobs[r]], dtype=flat.dtype, device=flat.device)
    if values.numel() != positions.numel():
        raise ValueError(f"sampler returned {values.numel()} log-probs for {positions.numel()} completion tokens")
    flat[positions] = values
    return sampled


def importance_ratio(mb: MicroBatch, sampling_logprobs: list, cap: float) -> torch.Tensor:
    """min(exp(old - sampling), cap) on the micro-batch's completion tokens (1 elsewhere): the
    truncated importance-sampling correction for a sampler whose numerics differ from training."""
    ratio = torch.exp(mb.old_logprobs - _sampled_logprobs(mb, sampling_logprobs)).clamp(max=cap)
    return torch.where(mb.mask.reshape(ratio.shape), ratio, torch.ones_like(ratio))


def sampler_mismatch(mb: MicroBatch, sampling_logprobs: list) -> tuple:
    """(sum, count, max) over the completion tokens of |sampler's log-prob - the trainer's| under the
    same weights (TRL's sampling_logp_difference): a stale or broken weight sync shows here first."""
    diff = (mb.old_logprobs - _sampled_logprobs(mb, sampling_logprobs)).abs()[mb.mask.reshape(mb.old_logprobs.shape)]
    return float(diff.sum()), diff.numel(), float(diff.max()) if diff.numel() else 0.0


CLIP_DEFAULTS = {"epsilon_low": 0.2, "epsilon_high": 0.28}   # DAPO's clip-higher, for the clipped loss types
CISPO_CAP = 5.0                                                # TRL's recommended cap on cispo's ratio


def policy_loss_options(cfg) -> dict:
    """The library's keyword arguments for this GRPO config: its loss type, each option the user set
    (one that does not apply then raises in the library's check), and our defaults where the type
    takes one. cispo's ratio cap, the library's epsilon_high, is ``grpo.cispo_cap``.
    (max_completion_length is added per micro-batch, by micro_batch_loss.)"""
    clipped = LOSS_TYPES[cfg.loss_type].clipped
    options = dict(loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level, beta=cfg.beta)
    if cfg.loss_type == "cispo":
        options["epsilon_high"] = CISPO_CAP if cfg.cispo_cap is None else cfg.cispo_cap
        return options
    for name, default in CLIP_DEFAULTS.items():
        value = getattr(cfg, name)
        if value is not None or clipped:
            options[name] = default if value is None else value
    return options


def local_normaliser(loss_type: str, batches: list, max_completion_length: int) -> float:
    """This rank's part of the loss type's denominator (all-reduce it for the whole batch's)."""
    return sum(float(loss_normaliser(loss_type, mb.num_seqs, mb.num_tokens, max_completion_length)) for mb in batches)


def loss_scale(global_normaliser: float, world_size: int) -> float:
    """The factor on each micro-batch's loss_sum: 1 / the whole batch's denominator (1 when it is 0,
    the loss then being 0), times the world size that FSDP's gradient mean divides by."""
    return world_size / (global_normaliser if global_normaliser > 0 else 1.0)


def micro_batch_loss(model, mb: MicroBatch, cfg, temperature: float, max_completion_length: int, options: dict):
    """The (unscaled) loss output of one micro-batch, gradients attached."""
    loss = dict(options)
    if LOSS_TYPES[cfg.loss_type].needs_max_completion_length:
        loss["max_completion_length"] = max_completion_length
    return model(**model_inputs(mb), head=make_head(mb, temperature, cfg.kernels, loss))
