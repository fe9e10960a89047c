"""Triton fused lm_head + log-prob: the [tokens, V] logits never exist in memory.

Forward: one program per BLOCK_N tokens walks the vocabulary in BLOCK_V tiles; each
logits tile is a [BLOCK_N, BLOCK_H] x [BLOCK_H, BLOCK_V] matmul accumulated in SRAM over
H, merged into per-row online softmax statistics (max, sum, tilted sum) and the target
logit. Backward recomputes each tile and forms d logits in registers (as Cut
Cross-Entropy does), then
  * default: one program per (token tile, vocab tile) adds d logits @ W into d hidden and
    d logits^T @ h into d weight with fp32 atomics (one pass, not bitwise reproducible);
  * deterministic: two kernels, each owning its output rows (token tiles for d hidden,
    vocab tiles for d weight and d bias), accumulate in a fixed order without atomics.
    A token's log-prob, entropy and d hidden then depend on its own row only: bitwise the
    same whatever else shares the batch (block sizes never depend on the token count).
Bytes moved per pass: h (N*H) and W (V*H) re-read once per tile row/column; FLOPs: 2NVH
per matmul; forward 1 matmul, backward 3 (recompute, d hidden, d weight), 4 when deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1kernels import constants

from r1kernels import backends
from r1kernels.triton.dot import dot
from r1kernels.logprobs.triton_softmax import NEG_INF, logit_grad, merge_stats, tile_stats

IGNORE_INDEX = tl.constexpr(constants.IGNORE_INDEX)


@triton.jit
def _row_tile(ptr, rows, row_mask, stride, ks, k_mask):
    """Rows ``rows`` x columns ``ks`` of a row-major matrix (zeros outside the masks), ready for a dot."""
    return tl.load(ptr + rows[:, None] * stride + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, hidden_size, stride_hidden,
                 stride_weight, inv_temperature, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """z = (h[rows] @ W[cols].T + b[cols]) / T as a [BLOCK_N, BLOCK_V] fp32 tile; -inf past the vocab."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < hidden_size
        h = _row_tile(hidden_ptr, rows, row_mask, stride_hidden, ks, k_mask)
        w = tl.load(weight_ptr + cols[None, :] * stride_weight + ks[:, None],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)   # [BLOCK_H, BLOCK_V], W^T
        acc = dot(h, w, acc, DOT_FP32, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc * inv_temperature, NEG_INF)


@triton.jit
def _r1k_linear_logprobs_forward(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, logp_ptr, entropy_ptr, max_ptr,
                                 log_sum_ptr, n_tokens, vocab, hidden_size, stride_hidden, stride_weight,
                                 inv_temperature, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                 BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    target = tl.load(targets_ptr + rows, mask=row_mask, other=IGNORE_INDEX).to(tl.int64)
    row_max = tl.full([BLOCK_N], NEG_INF, tl.float32)
    row_sum = tl.zeros([BLOCK_N], tl.float32)
    row_tilted = tl.zeros([BLOCK_N], tl.float32)
    z_target = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, cols < vocab, hidden_size,
                         stride_hidden, stride_weight, inv_temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H,
                         DOT_FP32, PRECISION)
        tile_max, tile_sum, tile_tilted = tile_stats(z)
        row_max, row_sum, row_tilted = merge_stats(row_max, row_sum, row_tilted, tile_max, tile_sum, tile_tilted)
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    valid = target != IGNORE_INDEX
    log_sum = tl.log(row_sum)
    tl.store(logp_ptr + rows, tl.where(valid, (z_target - row_max) - log_sum, 0.0), mask=row_mask)
    tl.store(entropy_ptr + rows, tl.where(valid, log_sum - row_tilted / row_sum, 0.0), mask=row_mask)
    tl.store(max_ptr + rows, row_max, mask=row_mask)
    tl.store(log_sum_ptr + rows, log_sum, mask=row_mask)


@triton.jit
def _dlogits_tile(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr,
                  grad_logp_ptr, grad_entropy_ptr, rows, cols, n_tokens, vocab, hidden_size, stride_hidden,
                  stride_weight, inv_temperature, HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
                  PRECISION: tl.constexpr):
    """d loss / d logits on one recomputed [BLOCK_N, BLOCK_V] tile, in the inputs' dtype for the next dots."""
    row_mask = rows < n_tokens
    col_mask = cols < vocab
    target = tl.load(targets_ptr + rows, mask=row_mask, other=IGNORE_INDEX).to(tl.int64)
    valid = target != IGNORE_INDEX
    grad_logp = tl.where(valid, tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0), 0.0)
    grad_entropy = tl.zeros([BLOCK_N], tl.float32)
    if HAS_GRAD_ENTROPY:
        grad_entropy = tl.where(valid, tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0), 0.0)
    row_max = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
    log_sum = tl.load(log_sum_ptr + rows, mask=row_mask, other=0.0)
    entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, hidden_size, stride_hidden,
                     stride_weight, inv_temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, PRECISION)
    dz = logit_grad(z - row_max[:, None], log_sum, entropy, cols[None, :] == target[:, None], grad_logp,
                    grad_entropy)
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz * inv_temperature, 0.0)
    if DOT_FP32:
        return dz
    return dz.to(hidden_ptr.dtype.element_ty)


@triton.jit
def _r1k_linear_logprobs_backward_atomic(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, max_ptr, log_sum_ptr,
                                         entropy_ptr, grad_logp_ptr, grad_entropy_ptr, grad_hidden_ptr, grad_weight_ptr,
                                         grad_bias_ptr, n_tokens, vocab, hidden_size, stride_hidden, stride_weight,
                                         inv_temperature, HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
                                         NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
                                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                                         DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # Flat 1-D grid over (token tile, vocab tile) pairs, so no grid axis can overflow. Token tiles
    # vary fastest and each token tile's vocab tiles are rotated by its index, so programs that run
    # at the same time add into different rows of d hidden and of d weight (a bijection: every pair
    # is still visited once).
    pid = tl.program_id(0).to(tl.int64)
    token_tiles = tl.cdiv(n_tokens, BLOCK_N)
    vocab_tiles = tl.cdiv(vocab, BLOCK_V)
    token_tile = pid % token_tiles
    vocab_tile = (pid // token_tiles + token_tile) % vocab_tiles
    rows = token_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = vocab_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_tokens
    col_mask = cols < vocab
    dz = _dlogits_tile(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr,
                       grad_logp_ptr, grad_entropy_ptr, rows, cols, n_tokens, vocab, hidden_size, stride_hidden,
                       stride_weight, inv_temperature, HAS_BIAS, HAS_GRAD_ENTROPY, BLOCK_N, BLOCK_V, BLOCK_H,
                       DOT_FP32, PRECISION)
    # The atomics only accumulate: nothing reads the sums before the kernel ends, so they need no
    # ordering. sem="relaxed" gives plain reductions; the default acq_rel wraps each one in a
    # GPU-scope fence and an L1 invalidate.
    for k0 in range(0, hidden_size, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < hidden_size
        if NEED_HIDDEN:
            w = _row_tile(weight_ptr, cols, col_mask, stride_weight, ks, k_mask)
            tl.atomic_add(grad_hidden_ptr + rows[:, None] * hidden_size + ks[None, :],
                          dot(dz, w, None, DOT_FP32, PRECISION), mask=row_mask[:, None] & k_mask[None, :],
                          sem="relaxed")
        if NEED_WEIGHT:
            h = _row_tile(hidden_ptr, rows, row_mask, stride_hidden, ks, k_mask)
            tl.atomic_add(grad_weight_ptr + cols[:, None] * hidden_size + ks[None, :],
                          dot(tl.trans(dz), h, None, DOT_FP32, PRECISION), mask=col_mask[:, None] & k_mask[None, :],
                          sem="relaxed")
    if NEED_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dz.to(tl.float32), axis=0), mask=col_mask, sem="relaxed")


@triton.jit
def _r1k_linear_logprobs_backward_hidden(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, max_ptr, log_sum_ptr,
                                         entropy_ptr, grad_logp_ptr, grad_entropy_ptr, grad_hidden_ptr, n_tokens, vocab,
                                         hidden_size, stride_hidden, stride_weight, inv_temperature,
                                         HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
                                         BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
                                         PRECISION: tl.constexpr):
    """Deterministic d hidden: this program owns BLOCK_N rows and sums over vocab tiles in order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < vocab
        dz = _dlogits_tile(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr,
                           grad_logp_ptr, grad_entropy_ptr, rows, cols, n_tokens, vocab, hidden_size, stride_hidden,
                           stride_weight, inv_temperature, HAS_BIAS, HAS_GRAD_ENTROPY, BLOCK_N, BLOCK_V, BLOCK_H,
                           DOT_FP32, PRECISION)
        # The loads below read sums that other threads of this program stored in the previous vocab
        # tile; Triton orders global memory between threads only across a barrier.
        tl.debug_barrier()
        for k0 in range(0, hidden_size, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_mask = ks < hidden_size
            w = _row_tile(weight_ptr, cols, col_mask, stride_weight, ks, k_mask)
            out = grad_hidden_ptr + rows[:, None] * hidden_size + ks[None, :]
            out_mask = row_mask[:, None] & k_mask[None, :]
            tl.store(out, tl.load(out, mask=out_mask, other=0.0) + dot(dz, w, None, DOT_FP32, PRECISION),
                     mask=out_mask)


@triton.jit
def _r1k_linear_logprobs_backward_weight(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, max_ptr, log_sum_ptr,
                                         entropy_ptr, grad_logp_ptr, grad_entropy_ptr, grad_weight_ptr, grad_bias_ptr,
                                         n_tokens, vocab, hidden_size, stride_hidden, stride_weight, inv_temperature,
                                         HAS_BIAS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
                                         NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                                         BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
                                         PRECISION: tl.constexpr):
    """Deterministic d weight / d bias: this program owns BLOCK_V vocab rows, sums over token tiles in order."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < vocab
    bias_acc = tl.zeros([BLOCK_V], tl.float32)
    for n0 in range(0, n_tokens, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < n_tokens
        dz = _dlogits_tile(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr,
                           grad_logp_ptr, grad_entropy_ptr, rows, cols, n_tokens, vocab, hidden_size, stride_hidden,
                           stride_weight, inv_temperature, HAS_BIAS, HAS_GRAD_ENTROPY, BLOCK_N, BLOCK_V, BLOCK_H,
                           DOT_FP32, PRECISION)
        if NEED_BIAS:
            bias_acc += tl.sum(dz.to(tl.float32), axis=0)
        if NEED_WEIGHT:
            tl.debug_barrier()          # as in the hidden kernel: read back the last token tile's sums
            for k0 in range(0, hidden_size, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_mask = ks < hidden_size
                h = _row_tile(hidden_ptr, rows, row_mask, stride_hidden, ks, k_mask)
                out = grad_weight_ptr + cols[:, None] * hidden_size + ks[None, :]
                out_mask = col_mask[:, None] & k_mask[None, :]
                tl.store(out, tl.load(out, mask=out_mask, other=0.0)
                         + dot(tl.trans(dz), h, None, DOT_FP32, PRECISION), mask=out_mask)
    if NEED_BIAS:
        tl.store(grad_bias_ptr + cols, bias_acc, mask=col_mask)


def _config(dtype: torch.dtype) -> dict:
    """Fixed tile sizes (never a function of the token count, which batch invariance needs)."""
    interpreting = backends.triton_interpreting()
    if interpreting:
        blocks = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=32)
    elif dtype == torch.float32:
        blocks = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32)
    else:
        blocks = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)
    # fp32 inputs get true fp32 dots (tf32 would lose three digits of the logits)
    precision = "ieee" if dtype == torch.float32 or interpreting else "tf32"
    return dict(blocks, DOT_FP32=interpreting, PRECISION=precision)


def _launch_options(interpreting: bool) -> dict:
    return {} if interpreting else dict(num_warps=8, num_stages=3)


def forward(hidden, weight, bias, targets, inv_temperature, *, backend="triton_tile", deterministic):
    """(logp, entropy, row_max, row_log_sum) per token (``backend`` is this kernel's own row; the
    forward has no atomics, so ``deterministic`` changes nothing here)."""
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    outputs = tuple(torch.empty(n_tokens, dtype=torch.float32, device=hidden.device) for _ in range(4))
    if n_tokens == 0:
        return outputs
    config = _config(hidden.dtype)
    grid = (triton.cdiv(n_tokens, config["BLOCK_N"]),)
    _r1k_linear_logprobs_forward[grid](hidden, weight, bias if bias is not None else hidden, targets.contiguous(),
                                       *outputs, n_tokens, vocab, hidden_size, hidden.stride(0), weight.stride(0),
                                       inv_temperature, HAS_BIAS=bias is not None, **config,
                                       **_launch_options(config["DOT_FP32"]))
    return outputs


def backward(hidden, weight, bias, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy,
             inv_temperature, *, backend="triton_tile", deterministic, needs_grad, wide_grads=False):
    """(d hidden, d weight, d bias) in the inputs' dtype, or with ``wide_grads`` the fp32 accumulators."""
    need_hidden, need_weight, need_bias = needs_grad
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    # fp32 accumulators; for fp32 inputs they are the gradients themselves
    grad_hidden = torch.zeros(n_tokens, hidden_size, dtype=torch.float32, device=device) if need_hidden else None
    grad_weight = torch.zeros(vocab, hidden_size, dtype=torch.float32, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else None
    if n_tokens:
        config = _config(hidden.dtype)
        launch = _launch_options(config["DOT_FP32"])
        grad_logp = grad_logp.float().contiguous()
        has_grad_entropy = grad_entropy is not None
        grad_entropy = grad_entropy.float().contiguous() if has_grad_entropy else grad_logp
        dummy = grad_logp
        common = (hidden, weight, bias if bias is not None else hidden, targets.contiguous(), row_max, row_log_sum,
                  entropy, grad_logp, grad_entropy)
        sizes = (n_tokens, vocab, hidden_size, hidden.stride(0), weight.stride(0), inv_temperature)
        flags = dict(HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_grad_entropy, **config, **launch)
        token_tiles = triton.cdiv(n_tokens, config["BLOCK_N"])
        vocab_tiles = triton.cdiv(vocab, config["BLOCK_V"])
        if deterministic:
            if need_hidden:
                _r1k_linear_logprobs_backward_hidden[(token_tiles,)](*common, grad_hidden, *sizes, **flags)
            if need_weight or need_bias:
                _r1k_linear_logprobs_backward_weight[(vocab_tiles,)](
                    *common, grad_weight if need_weight else dummy, grad_bias if need_bias else dummy, *sizes,
                    NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, **flags)
        else:
            _r1k_linear_logprobs_backward_atomic[(token_tiles * vocab_tiles,)](
                *common, grad_hidden if need_hidden else dummy, grad_weight if need_weight else dummy,
                grad_bias if need_bias else dummy, *sizes, NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight,
                NEED_BIAS=need_bias, **flags)
    if wide_grads:
        return grad_hidden, grad_weight, grad_bias
    return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))
