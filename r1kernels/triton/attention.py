"""Triton varlen FlashAttention-2: forward and backward, GQA without copying K and V.

Forward: one program per (sequence, BLOCK_M queries, query head) over a flat 1-D grid; it
streams the visible key blocks with an online softmax and saves the log-sum-exp. Backward
recomputes the probabilities from the log-sum-exp: one kernel owns a block of keys of one KV
head and accumulates dK and dV over every query head of its group, another owns a block of
queries and accumulates dQ. Every output is written by exactly one program, so gradients are
deterministic and each sequence's results are independent of what else is packed with it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1kernels import backends
from r1kernels.triton.dot import dot

NO_LIMIT = 1 << 30   # window side meaning "unbounded"


@triton.jit
def _scores(q, k, offs_m, offs_n, q_len, k_len, scale, softcap, left, right, HAS_SOFTCAP: tl.constexpr,
            DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled, soft-capped scores of a [BLOCK_M, BLOCK_N] tile, -inf where a key is not visible;
    also returns tanh(raw / softcap) for the backward (1.0 when there is no softcap)."""
    raw = dot(q, tl.trans(k), None, DOT_FP32, PRECISION) * scale
    capped_tanh = tl.full(raw.shape, 1.0, tl.float32)
    if HAS_SOFTCAP:
        capped_tanh = 2.0 * tl.sigmoid(2.0 * raw / softcap) - 1.0
        raw = softcap * capped_tanh
    aligned = offs_m[:, None] + (k_len - q_len)
    visible = (offs_n[None, :] < k_len) & (offs_n[None, :] <= aligned + right) & (offs_n[None, :] >= aligned - left)
    visible = visible & (offs_m[:, None] < q_len)
    return tl.where(visible, raw, float("-inf")), capped_tanh


@triton.jit
def _sequence_bounds(cu_q_ptr, cu_k_ptr, seq):
    """(q start, q length, k start, k length) of one packed sequence, int64."""
    q_start = tl.load(cu_q_ptr + seq).to(tl.int64)
    k_start = tl.load(cu_k_ptr + seq).to(tl.int64)
    return (q_start, tl.load(cu_q_ptr + seq + 1).to(tl.int64) - q_start, k_start,
            tl.load(cu_k_ptr + seq + 1).to(tl.int64) - k_start)


@triton.jit
def _kv_tile(k_ptr, v_ptr, k_start, k_len, offs_n, offs_d, d_mask, kv_head, stride_kt, stride_kh, stride_vt,
             stride_vh):
    """K and V rows offs_n of one sequence and KV head (zeros past its end), and their mask."""
    kv_mask = (offs_n[:, None] < k_len) & d_mask[None, :]
    k = tl.load(k_ptr + (k_start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + (k_start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    return k, v, kv_mask


@triton.jit
def _head_rows(ptr, seq_start, offs, mask, head, stride_t, stride_h, offs_d, d_mask):
    """Rows ``offs`` of one sequence and head of a [total, heads, D] tensor (zeros outside the masks)."""
    return tl.load(ptr + (seq_start + offs)[:, None] * stride_t + head * stride_h + offs_d[None, :],
                   mask=mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _seq_block_head(pid, heads, max_blocks):
    head = pid % heads
    rest = pid // heads
    return rest // max_blocks, rest % max_blocks, head


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, stride_qt, stride_qh, stride_kt,
                    stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, total_q, heads, group, head_dim,
                    max_m_blocks, scale, softcap, left, right, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    seq, m_block, head = _seq_block_head(tl.program_id(0).to(tl.int64), heads, max_m_blocks)
    q_start, q_len, k_start, k_len = _sequence_bounds(cu_q_ptr, cu_k_ptr, seq)
    m_start = m_block * BLOCK_M
    if m_start < q_len:
        kv_head = head // group
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        q = _head_rows(q_ptr, q_start, offs_m, offs_m < q_len, head, stride_qt, stride_qh, offs_d, d_mask)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        shift = k_len - q_len
        lo = tl.maximum(m_start + shift - left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(m_start + BLOCK_M - 1 + shift + right + 1, k_len)
        for n_start in range(lo, hi, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            k, v, _ = _kv_tile(k_ptr, v_ptr, k_start, k_len, offs_n, offs_d, d_mask, kv_head, stride_kt, stride_kh,
                               stride_vt, stride_vh)
            s, _ = _scores(q, k, offs_m, offs_n, q_len, k_len, scale, softcap, left, right, HAS_SOFTCAP, DOT_FP32,
                           PRECISION)
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(s - safe_max[:, None])
            rescale = tl.exp(row_max - safe_max)
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + dot(p.to(v.dtype), v, None, DOT_FP32, PRECISION)
            row_max = new_max
        out = tl.where(row_sum[:, None] > 0, acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None], 0.0)
        m_mask = offs_m < q_len
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
        # flash-attn 2's convention: +inf for a query that sees no key, so that the backward's P = 0
        lse = tl.where(row_sum > 0, row_max + tl.log(tl.where(row_sum > 0, row_sum, 1.0)), float("inf"))
        tl.store(lse_ptr + head * total_q + q_start + offs_m, lse, mask=m_mask)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_n, q_len, k_len, scale, softcap, left, right,
                       HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed probabilities P and d(raw scores) for one tile (raw = q.k * scale, before the softcap)."""
    s, capped_tanh = _scores(q, k, offs_m, offs_n, q_len, k_len, scale, softcap, left, right, HAS_SOFTCAP,
                             DOT_FP32, PRECISION)
    p = tl.exp(s - lse[:, None])                     # lse = +inf where a query sees nothing: P = 0
    dp = dot(do, tl.trans(v), None, DOT_FP32, PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - capped_tanh * capped_tanh)
    return p, ds


@triton.jit
def _backward_kv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                        total_q, kv_heads, group, head_dim, max_n_blocks, scale, softcap, left, right,
                        HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    seq, n_block, kv_head = _seq_block_head(tl.program_id(0).to(tl.int64), kv_heads, max_n_blocks)
    q_start, q_len, k_start, k_len = _sequence_bounds(cu_q_ptr, cu_k_ptr, seq)
    n_start = n_block * BLOCK_N
    if n_start < k_len:
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        k, v, kv_mask = _kv_tile(k_ptr, v_ptr, k_start, k_len, offs_n, offs_d, d_mask, kv_head, stride_kt, stride_kh,
                                 stride_vt, stride_vh)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        shift = k_len - q_len
        lo = tl.maximum(n_start - shift - right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        hi = tl.minimum(n_start + BLOCK_N - 1 - shift + left + 1, q_len)
        for h in range(0, group):
            head = kv_head * group + h
            for m_start in range(lo, hi, BLOCK_M):
                offs_m = m_start + tl.arange(0, BLOCK_M)
                m_mask = offs_m < q_len
                q = _head_rows(q_ptr, q_start, offs_m, m_mask, head, stride_qt, stride_qh, offs_d, d_mask)
                do = _head_rows(do_ptr, q_start, offs_m, m_mask, head, stride_dot, stride_doh, offs_d, d_mask)
                lse = tl.load(lse_ptr + head * total_q + q_start + offs_m, mask=m_mask, other=float("inf"))
                delta = tl.load(delta_ptr + head * total_q + q_start + offs_m, mask=m_mask, other=0.0)
                p, ds = _probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_n, q_len, k_len, scale, softcap,
                                           left, right, HAS_SOFTCAP, DOT_FP32, PRECISION)
                dv += dot(tl.trans(p).to(do.dtype), do, None, DOT_FP32, PRECISION)
                dk += dot(tl.trans(ds).to(q.dtype), q, None, DOT_FP32, PRECISION)
        out = (k_start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :]
        tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        out = (k_start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :]
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _backward_q_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr, stride_qt,
                       stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, total_q, heads,
                       group, head_dim, max_m_blocks, scale, softcap, left, right, HAS_SOFTCAP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    seq, m_block, head = _seq_block_head(tl.program_id(0).to(tl.int64), heads, max_m_blocks)
    q_start, q_len, k_start, k_len = _sequence_bounds(cu_q_ptr, cu_k_ptr, seq)
    m_start = m_block * BLOCK_M
    if m_start < q_len:
        kv_head = head // group
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        m_mask = offs_m < q_len
        rows = (q_start + offs_m)[:, None]
        q = _head_rows(q_ptr, q_start, offs_m, m_mask, head, stride_qt, stride_qh, offs_d, d_mask)
        do = _head_rows(do_ptr, q_start, offs_m, m_mask, head, stride_dot, stride_doh, offs_d, d_mask)
        lse = tl.load(lse_ptr + head * total_q + q_start + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(delta_ptr + head * total_q + q_start + offs_m, mask=m_mask, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        shift = k_len - q_len
        lo = tl.maximum(m_start + shift - left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(m_start + BLOCK_M - 1 + shift + right + 1, k_len)
        for n_start in range(lo, hi, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            k, v, _ = _kv_tile(k_ptr, v_ptr, k_start, k_len, offs_n, offs_d, d_mask, kv_head, stride_kt, stride_kh,
                               stride_vt, stride_vh)
            _, ds = _probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_n, q_len, k_len, scale, softcap, left,
                                       right, HAS_SOFTCAP, DOT_FP32, PRECISION)
            dq += dot(ds.to(k.dtype), k, None, DOT_FP32, PRECISION)
        tl.store(dq_ptr + rows * stride_qt + head * stride_qh + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & d_mask[None, :])


def _config(dtype, head_dim):
    interpreting = backends.triton_interpreting()
    block_d = max(16, triton.next_power_of_2(head_dim))   # padded (masked) to a tensor-core dot's smallest K
    if interpreting:
        blocks = dict(BLOCK_M=16, BLOCK_N=16)
    elif block_d >= 256:
        blocks = dict(BLOCK_M=64, BLOCK_N=32)
    else:
        blocks = dict(BLOCK_M=64, BLOCK_N=64)
    precision = "ieee" if dtype == torch.float32 or interpreting else "tf32"
    launch = {} if interpreting else dict(num_warps=4 if block_d <= 64 else 8, num_stages=2)
    return dict(blocks, BLOCK_D=block_d, DOT_FP32=interpreting, PRECISION=precision), launch


def _window(causal, window_size):
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return (NO_LIMIT if left < 0 else left), (NO_LIMIT if right < 0 else right)


def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window_size, softcap):
    total_q, heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(heads, total_q, dtype=torch.float32, device=q.device)
    num_seqs = cu_q.numel() - 1
    if total_q == 0 or num_seqs == 0:
        return out, lse.fill_(float("inf"))
    config, launch = _config(q.dtype, head_dim)
    left, right = _window(causal, window_size)
    max_blocks = triton.cdiv(max(max_q, 1), config["BLOCK_M"])
    _forward_kernel[(num_seqs * max_blocks * heads,)](
        q, k, v, out, lse, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), total_q, heads, heads // k.shape[1], head_dim, max_blocks, scale,
        softcap if softcap > 0 else 1.0, left, right, HAS_SOFTCAP=softcap > 0, **config, **launch)
    return out, lse


def backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, window_size, softcap):
    total_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    num_seqs = cu_q.numel() - 1
    if total_q == 0 or num_seqs == 0:
        return dq, dk, dv
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1).T.contiguous()           # [Hq, total_q]: rowsum(dO * O)
    config, launch = _config(q.dtype, head_dim)
    left, right = _window(causal, window_size)
    common = dict(HAS_SOFTCAP=softcap > 0, **config, **launch)
    cap = softcap if softcap > 0 else 1.0
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    n_blocks = triton.cdiv(max(max_k, 1), config["BLOCK_N"])
    _backward_kv_kernel[(num_seqs * n_blocks * kv_heads,)](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *strides, total_q, kv_heads, heads // kv_heads, head_dim,
        n_blocks, scale, cap, left, right, **common)
    m_blocks = triton.cdiv(max(max_q, 1), config["BLOCK_M"])
    _backward_q_kernel[(num_seqs * m_blocks * heads,)](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, *strides, total_q, heads, heads // kv_heads, head_dim, m_blocks,
        scale, cap, left, right, **common)
    return dq, dk, dv
