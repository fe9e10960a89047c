"""Triton varlen FlashAttention: forward and backward, GQA without copying K and V, tiled for Hopper.

Forward: one program per (BLOCK_M queries of a sequence, query head), the work items listed by a
block table built on the device from cu_seqlens (no empty programs for short sequences, no host
sync, the heaviest blocks first); it streams the visible key blocks with an online softmax and saves
the log-sum-exp. Backward recomputes the probabilities from the log-sum-exp. Each program owns a
block of keys of one KV head and accumulates over every query head of its group, in two passes over
the queries: dV (from P), then dK (from dS), each holding one fp32 accumulator, which keeps every
product on a warpgroup MMA of N >= 64 without spilling (one pass holding both does not fit in the
register file). By default the dK pass also adds its queries' dQ atomically (6 GEMMs, one more than
FlashAttention-2's 5: S is formed in both passes); with ``deterministic`` a second kernel owns a
block of queries and accumulates dQ instead (8 GEMMs, every output written by exactly one program).
Either way a sequence's results do not depend on what else is packed with it. docs/design.md states
the tiles and the estimates behind them.
"""
from __future__ import annotations

import torch
import triton
from torch.utils.weak import WeakTensorKeyDictionary
import triton.language as tl

from r1kernels import backends
from r1kernels.triton.dot import dot

NO_LIMIT = 1 << 30   # window side meaning "unbounded"
LOG2E = tl.constexpr(1.4426950408889634)   # scores are kept in log2 units: exp2 is the native instruction
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _visible(m, n, q_len, k_len, left, right):
    """Whether query m (its row in the sequence) may attend to key n; m and n broadcast against
    each other, so the same test serves [M, N] and transposed [N, M] tiles."""
    aligned = m + (k_len - q_len)
    return (m < q_len) & (n < k_len) & (n <= aligned + right) & (n >= aligned - left)


@triton.jit
def _capped(raw, softcap, HAS_SOFTCAP: tl.constexpr):
    """(softcap * tanh(raw / softcap), that tanh) or (raw, 1.0). Scores are in log2 units (log2(e)
    folded into the scale and the cap alike), which leaves tanh's argument unchanged."""
    if HAS_SOFTCAP:
        # tanh(x) = 1 - 2 / (1 + e^(2x)), the division to 2 ulp: IEEE division's slow path costs registers the
        # backward does not have (flash-attn itself uses tanh.approx, ~2^-11)
        capped_tanh = 1.0 - tl.fdiv(2.0, 1.0 + tl.math.exp2(raw * (2.0 * LOG2E / softcap)), ieee_rounding=False)
        return softcap * capped_tanh, capped_tanh
    return raw, tl.full(raw.shape, 1.0, tl.float32)


@triton.jit
def _sequence_bounds(cu_q_ptr, cu_k_ptr, seq):
    """(q start, q length, k start, k length) of one packed sequence. The starts are int64 (row offsets
    into the packed tensors can pass 2^31 elements); lengths and the positions within a sequence stay
    int32, which halves the registers of the [M, N] position tiles the masks are built from."""
    q_first = tl.load(cu_q_ptr + seq)
    k_first = tl.load(cu_k_ptr + seq)
    return (q_first.to(tl.int64), tl.load(cu_q_ptr + seq + 1) - q_first, k_first.to(tl.int64),
            tl.load(cu_k_ptr + seq + 1) - k_first)


@triton.jit
def _head_rows(ptr, first_row, rows, mask, head, stride_t, stride_h, offs_d, d_mask):
    """Rows first_row + rows of one head of a [total, heads, D] tensor (zeros outside the masks). The
    row base is a scalar and the in-tile offsets are int32, so a loop's offset tile is the same every
    iteration and only the scalar moves."""
    return tl.load(ptr + first_row * stride_t + head * stride_h + (rows[:, None] * stride_t + offs_d[None, :]),
                   mask=mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _work_item(pid, heads, slot_seq_ptr, slot_start_ptr):
    """(sequence, first row of its block, head) of this program, from the block table; the few slots
    past the last block have a start of 2^30, which no sequence reaches, and do nothing."""
    slot = pid // heads
    return tl.load(slot_seq_ptr + slot), tl.load(slot_start_ptr + slot), pid % heads


@triton.jit
def _dims(head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Offsets along the head dimension and their mask; with EVEN_D (head_dim == BLOCK_D) the mask is
    all true at compile time, so loads need no per-element predicate."""
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        return offs_d, offs_d < BLOCK_D
    return offs_d, offs_d < head_dim


@triton.jit
def _key_tiles(m_start, shift, left, right, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of the query block [m_start, m_start + BLOCK_M), aligned to BLOCK_N:
    [lo, hi) holds every visible key, and [full_lo, full_hi) the tiles that every query of the block
    sees in full, which need no mask (the causal diagonal, the window's edge and the sequence's end
    fall outside it)."""
    lo = (tl.maximum(m_start + shift - left, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m_start + BLOCK_M + shift + right, k_len)
    first_seen_by_all = tl.maximum(m_start + BLOCK_M - 1 + shift - left, 0)
    full_lo = tl.minimum(tl.maximum(lo, tl.cdiv(first_seen_by_all, BLOCK_N) * BLOCK_N), tl.maximum(hi, lo))
    end_seen_by_all = tl.minimum(m_start + shift + right + 1, k_len)
    full_hi = full_lo + tl.maximum(end_seen_by_all - full_lo, 0) // BLOCK_N * BLOCK_N
    return lo, full_lo, full_hi, hi


@triton.jit
def _kv_tile(k_ptr, v_ptr, k_start, k_len, offs_n, offs_d, d_mask, kv_head, stride_kt, stride_kh, stride_vt,
             stride_vh):
    """K and V rows offs_n of one sequence and KV head (zeros past its end)."""
    kv_mask = (offs_n[:, None] < k_len) & d_mask[None, :]
    k = tl.load(k_ptr + (k_start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + (k_start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _forward_tile(acc, row_max, row_sum, q, k_ptr, v_ptr, k_start, k_len, q_len, n_start, offs_m, offs_d, d_mask,
                  kv_head, stride_kt, stride_kh, stride_vt, stride_vh, scale2, softcap2, left, right,
                  MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One online-softmax step over keys [n_start, n_start + BLOCK_N), in log2 units."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    k, v = _kv_tile(k_ptr, v_ptr, k_start, k_len, offs_n, offs_d, d_mask, kv_head, stride_kt, stride_kh, stride_vt,
                       stride_vh)
    s, _ = _capped(dot(q, tl.trans(k), None, DOT_FP32, PRECISION) * scale2, softcap2, HAS_SOFTCAP)
    if MASKED:
        s = tl.where(_visible(offs_m[:, None], offs_n[None, :], q_len, k_len, left, right), s, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(s, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.math.exp2(s - safe_max[:, None])
    rescale = tl.math.exp2(row_max - safe_max)
    row_sum = row_sum * rescale + tl.sum(p, axis=1)
    acc = acc * rescale[:, None] + dot(p.to(v.dtype), v, None, DOT_FP32, PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _r1k_attention_forward(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, stride_qt, stride_qh,
                           stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, total_q, heads, group,
                           head_dim, slot_seq_ptr, slot_start_ptr, scale2, softcap2, left, right,
                           HAS_SOFTCAP: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                           DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """out and lse of BLOCK_M queries of one head: masked tiles at the band's edges, unmasked inside."""
    seq, m_start, head = _work_item(tl.program_id(0), heads, slot_seq_ptr, slot_start_ptr)
    q_start, q_len, k_start, k_len = _sequence_bounds(cu_q_ptr, cu_k_ptr, seq)
    if m_start < q_len:
        kv_head = head // group
        rows = tl.arange(0, BLOCK_M)
        offs_m = m_start + rows
        offs_d, d_mask = _dims(head_dim, BLOCK_D, EVEN_D)
        m_mask = offs_m < q_len
        q = _head_rows(q_ptr, q_start + m_start, rows, m_mask, head, stride_qt, stride_qh, offs_d, d_mask)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        lo, full_lo, full_hi, hi = _key_tiles(m_start, k_len - q_len, left, right, k_len, BLOCK_M, BLOCK_N)
        tile = (q, k_ptr, v_ptr, k_start, k_len, q_len)
        for n_start in range(lo, full_lo, BLOCK_N):
            acc, row_max, row_sum = _forward_tile(acc, row_max, row_sum, *tile, n_start, offs_m, offs_d, d_mask,
                                                  kv_head, stride_kt, stride_kh, stride_vt, stride_vh, scale2,
                                                  softcap2, left, right, True, HAS_SOFTCAP, BLOCK_N, DOT_FP32,
                                                  PRECISION)
        for n_start in range(full_lo, full_hi, BLOCK_N):
            acc, row_max, row_sum = _forward_tile(acc, row_max, row_sum, *tile, n_start, offs_m, offs_d, d_mask,
                                                  kv_head, stride_kt, stride_kh, stride_vt, stride_vh, scale2,
                                                  softcap2, left, right, False, HAS_SOFTCAP, BLOCK_N, DOT_FP32,
                                                  PRECISION)
        for n_start in range(full_hi, hi, BLOCK_N):
            acc, row_max, row_sum = _forward_tile(acc, row_max, row_sum, *tile, n_start, offs_m, offs_d, d_mask,
                                                  kv_head, stride_kt, stride_kh, stride_vt, stride_vh, scale2,
                                                  softcap2, left, right, True, HAS_SOFTCAP, BLOCK_N, DOT_FP32,
                                                  PRECISION)
        # a query that sees no key has a sum of exactly 0; one whose scores hold a NaN has a NaN sum
        # (and keeps it: its output and lse are NaN, as the reference's)
        unseen = row_sum == 0
        out = tl.where(unseen[:, None], 0.0, acc / tl.where(unseen, 1.0, row_sum)[:, None])
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
        # natural-log lse; flash-attn 2's +inf for a query that sees no key, so that the backward's P = 0
        lse = tl.where(unseen, float("inf"), (row_max + tl.math.log2(tl.where(unseen, 1.0, row_sum))) * LN2)
        tl.store(lse_ptr + head * total_q + q_start + offs_m, lse, mask=m_mask)


@triton.jit
def _store_rows(ptr, first_row, rows_left, head, stride_t, stride_h, x, head_dim, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr):
    """x [R, BLOCK_D] into rows first_row.. of one head (the first min(R, rows_left) rows). Addresses and mask
    are rebuilt here from scalars rather than kept from the loads: a tile's worth of them would stay live
    across the whole loop."""
    rows = tl.arange(0, x.shape[0])
    dims, d_mask = _dims(head_dim, BLOCK_D, EVEN_D)
    tl.store(ptr + first_row * stride_t + head * stride_h + (rows[:, None] * stride_t + dims[None, :]),
             x.to(ptr.dtype.element_ty), mask=(rows < rows_left)[:, None] & d_mask[None, :])


@triton.jit
def _backward_tile(acc, k, v, offs_n, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, q_start, q_len, k_len, m_start,
                   head, stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, stride_dqh, total_q, offs_d, d_mask,
                   scale2, softcap2, left, right, HAS_SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                   DV: tl.constexpr, BLOCK_M: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One key block's dV (pass DV) or dK += the part from queries [m_start, m_start + BLOCK_M) of one
    head; with ATOMIC_DQ the dK pass also adds those queries' dQ += dS K, unscaled, into an fp32
    accumulator. The products are formed transposed ([keys, queries]: S^T = K Q^T, dP^T = V dO^T), so
    that P^T and dS^T feed dV += P^T dO and dK += dS^T Q from registers, and each warpgroup's wgmma N
    is the BLOCK_M queries; dQ reads dS^T through a transposed shared-memory view."""
    rows = tl.arange(0, BLOCK_M)
    offs_m = m_start + rows
    m_mask = offs_m < q_len
    # no `other`: the rows past the sequence are invisible, their P and dS zeroed by the masks below
    # (a select after the pipelined load would carry the mask into the next iteration)
    lse2 = tl.load(lse_ptr + head * total_q + q_start + offs_m, mask=m_mask) * LOG2E
    q = _head_rows(q_ptr, q_start + m_start, rows, m_mask, head, stride_qt, stride_qh, offs_d, d_mask)
    do = _head_rows(do_ptr, q_start + m_start, rows, m_mask, head, stride_dot, stride_doh, offs_d, d_mask)
    s_t, _ = _capped(dot(k, tl.trans(q), None, DOT_FP32, PRECISION) * scale2, softcap2, HAS_SOFTCAP)
    visible_t = _visible(offs_m[None, :], offs_n[:, None], q_len, k_len, left, right)
    p_t = tl.where(visible_t, tl.math.exp2(s_t - lse2[None, :]), 0.0)      # lse = +inf: P = 0
    if DV:
        acc += dot(p_t.to(do.dtype), do, None, DOT_FP32, PRECISION)
    else:
        if HAS_SOFTCAP:
            # d capped / d raw = 1 - tanh^2, with tanh read back from P (log2 P + lse = softcap tanh) rather than
            # kept: one [N, M] tile fewer stays live. P = 0 (invisible, or underflowed) stays 0, a NaN stays NaN.
            tanh_t = (tl.math.log2(p_t) + lse2[None, :]) * (1.0 / softcap2)
            p_t = tl.where(p_t == 0.0, 0.0, p_t * (1.0 - tanh_t * tanh_t))
        delta = tl.load(delta_ptr + head * total_q + q_start + offs_m, mask=m_mask)
        # dP^T - delta with the subtraction as the product's starting accumulator: no [M] vector stays live
        minus_delta = tl.broadcast_to(-delta[None, :], (v.shape[0], BLOCK_M))
        ds_t = p_t * dot(v, tl.trans(do), minus_delta, DOT_FP32, PRECISION)
        ds_t = tl.where(visible_t, ds_t, 0.0).to(q.dtype)
        acc += dot(ds_t, q, None, DOT_FP32, PRECISION)
        if ATOMIC_DQ:
            dq = dot(tl.trans(ds_t), k, None, DOT_FP32, PRECISION)
            # relaxed: the adds need no order among themselves, so no memory fence enters the loop
            tl.atomic_add(dq_ptr + (q_start + offs_m)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                          dq, mask=m_mask[:, None] & d_mask[None, :], sem="relaxed")
    return acc


@triton.jit
def _dkdv_block(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt,
                stride_dqh, total_q, kv_heads, group, head_dim, slot_seq_ptr, slot_start_ptr, scale, scale2,
                softcap2, left, right, HAS_SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr,
                PRECISION: tl.constexpr):
    """dK and dV of BLOCK_N keys of one KV head, over every query head of its group: a pass for dV, then
    one for dK, each over (query head, query tile) pairs in one loop, so the pipeline prefetches across
    heads. disable_licm: a hoisted loop invariant (the [BLOCK_M, D] offset tiles) would stay live through
    the loop, which holds no registers to spare."""
    seq, n_start, kv_head = _work_item(tl.program_id(0), kv_heads, slot_seq_ptr, slot_start_ptr)
    q_start, q_len, k_start, k_len = _sequence_bounds(cu_q_ptr, cu_k_ptr, seq)
    if n_start < k_len:
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_d, d_mask = _dims(head_dim, BLOCK_D, EVEN_D)
        k, v = _kv_tile(k_ptr, v_ptr, k_start, k_len, offs_n, offs_d, d_mask, kv_head, stride_kt, stride_kh,
                           stride_vt, stride_vh)
        # the queries' view of _key_tiles: query and key swap roles, the shift changes sign, the window's sides swap
        lo, _, _, hi = _key_tiles(n_start, q_len - k_len, right, left, q_len, BLOCK_N, BLOCK_M)
        tiles = tl.cdiv(hi - lo, BLOCK_M)
        tile = (k, v, offs_n, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, q_start, q_len, k_len)
        strides = (stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, stride_dqh, total_q)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for i in tl.range(0, group * tiles, disable_licm=True):
            dv = _backward_tile(dv, *tile, lo + (i % tiles) * BLOCK_M, kv_head * group + i // tiles, *strides,
                                offs_d, d_mask, scale2, softcap2, left, right, HAS_SOFTCAP, ATOMIC_DQ, True, BLOCK_M,
                                DOT_FP32, PRECISION)
        _store_rows(dv_ptr, k_start + n_start, k_len - n_start, kv_head, stride_vt, stride_vh, dv, head_dim, BLOCK_D,
                    EVEN_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for i in tl.range(0, group * tiles, disable_licm=True):
            dk = _backward_tile(dk, *tile, lo + (i % tiles) * BLOCK_M, kv_head * group + i // tiles, *strides,
                                offs_d, d_mask, scale2, softcap2, left, right, HAS_SOFTCAP, ATOMIC_DQ, False, BLOCK_M,
                                DOT_FP32, PRECISION)
        _store_rows(dk_ptr, k_start + n_start, k_len - n_start, kv_head, stride_kt, stride_kh, dk * scale, head_dim,
                    BLOCK_D, EVEN_D)


@triton.jit
def _r1k_attention_backward(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr, cu_q_ptr,
                            cu_k_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
                            stride_doh, stride_dqt, stride_dqh, total_q, kv_heads, group, head_dim, slot_seq_ptr,
                            slot_start_ptr, scale, scale2, softcap2, left, right, HAS_SOFTCAP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                            DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """The default backward, one kernel of 6 GEMMs: dK and dV of a key block, and its queries' dQ
    added atomically into an fp32 accumulator (bitwise run-to-run order varies, as in flash-attn)."""
    _dkdv_block(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt,
                stride_dqh, total_q, kv_heads, group, head_dim, slot_seq_ptr, slot_start_ptr, scale, scale2,
                softcap2, left, right, HAS_SOFTCAP, True, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_FP32, PRECISION)


@triton.jit
def _r1k_attention_backward_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr,
                                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
                                 stride_doh, total_q, kv_heads, group, head_dim, slot_seq_ptr, slot_start_ptr,
                                 scale, scale2, softcap2, left, right, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                                 DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """The deterministic backward's first kernel (5 GEMMs): dK and dV only; dQ is the next kernel's."""
    _dkdv_block(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dk_ptr, cu_q_ptr, cu_k_ptr,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, 0, 0,
                total_q, kv_heads, group, head_dim, slot_seq_ptr, slot_start_ptr, scale, scale2, softcap2,
                left, right, HAS_SOFTCAP, False, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, DOT_FP32, PRECISION)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_ptr, v_ptr, k_start, k_len, q_len, n_start, offs_m, offs_d, d_mask, kv_head,
             stride_kt, stride_kh, stride_vt, stride_vh, scale2, softcap2, left, right, HAS_SOFTCAP: tl.constexpr,
             BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """dQ += dS K over keys [n_start, n_start + BLOCK_N), with dS = P (dO V^T - delta)."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    k, v = _kv_tile(k_ptr, v_ptr, k_start, k_len, offs_n, offs_d, d_mask, kv_head, stride_kt, stride_kh, stride_vt,
                       stride_vh)
    s, capped_tanh = _capped(dot(q, tl.trans(k), None, DOT_FP32, PRECISION) * scale2, softcap2, HAS_SOFTCAP)
    visible = _visible(offs_m[:, None], offs_n[None, :], q_len, k_len, left, right)
    p = tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.0)
    ds = p * (dot(do, tl.trans(v), None, DOT_FP32, PRECISION) - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - capped_tanh * capped_tanh)
    return dq + dot(tl.where(visible, ds, 0.0).to(k.dtype), k, None, DOT_FP32, PRECISION)


@triton.jit
def _r1k_attention_backward_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
                               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
                               stride_doh, total_q, heads, group, head_dim, slot_seq_ptr, slot_start_ptr,
                               scale, scale2, softcap2, left, right, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """The deterministic backward's second kernel (3 GEMMs): dQ of BLOCK_M queries of one head, each
    row written by one program."""
    seq, m_start, head = _work_item(tl.program_id(0), heads, slot_seq_ptr, slot_start_ptr)
    q_start, q_len, k_start, k_len = _sequence_bounds(cu_q_ptr, cu_k_ptr, seq)
    if m_start < q_len:
        kv_head = head // group
        rows = tl.arange(0, BLOCK_M)
        offs_m = m_start + rows
        offs_d, d_mask = _dims(head_dim, BLOCK_D, EVEN_D)
        m_mask = offs_m < q_len
        q = _head_rows(q_ptr, q_start + m_start, rows, m_mask, head, stride_qt, stride_qh, offs_d, d_mask)
        do = _head_rows(do_ptr, q_start + m_start, rows, m_mask, head, stride_dot, stride_doh, offs_d, d_mask)
        lse2 = tl.load(lse_ptr + head * total_q + q_start + offs_m, mask=m_mask, other=float("inf")) * LOG2E
        delta = tl.load(delta_ptr + head * total_q + q_start + offs_m, mask=m_mask, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, _, _, hi = _key_tiles(m_start, k_len - q_len, left, right, k_len, BLOCK_M, BLOCK_N)
        for n_start in range(lo, hi, BLOCK_N):     # every tile masked, as in the dK/dV kernel (register pressure)
            dq = _dq_tile(dq, q, do, lse2, delta, k_ptr, v_ptr, k_start, k_len, q_len, n_start, offs_m, offs_d, d_mask,
                          kv_head, stride_kt, stride_kh, stride_vt, stride_vh, scale2, softcap2, left, right,
                          HAS_SOFTCAP, BLOCK_N, DOT_FP32, PRECISION)
        tl.store(dq_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# Tiles per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages) by head-dim bucket (BLOCK_D), for bf16/fp16
# ("low"; "low_softcap" where softcap needs another), and for fp32 ("ieee" dots on CUDA cores).
# None: no tile fits, the backward takes the two-kernel path.
_CONFIGS = {
    "forward": {"low": {16: (128, 128, 8, 3), 32: (128, 128, 8, 3), 64: (128, 128, 8, 3), 128: (128, 64, 8, 3),
                        256: (128, 32, 8, 2)},
                "fp32": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2), 128: (32, 32, 4, 2),
                         256: (16, 32, 4, 2)}},
    "backward": {"low": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 128, 8, 2),
                         256: None},
                 "low_softcap": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: None, 256: None},
                 "fp32": {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 32, 4, 2),
                          256: (16, 16, 4, 2)}},
    "dkdv": {"low": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 128, 8, 2),
                     256: (32, 32, 8, 2)},
             "fp32": {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 32, 4, 2),
                      256: (16, 16, 4, 2)}},
    "dq": {"low": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (128, 64, 8, 2),
                   256: (128, 32, 8, 2)},
           "fp32": {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 16, 4, 2),
                    256: (16, 16, 4, 2)}},
}


def _config(kernel, dtype, head_dim, softcap=False):
    """(constexprs, launch options) of one kernel, or None where the table has no tile for it. Under
    the interpreter: 16 x 16 tiles, so that tests with short sequences still cross tile edges, and
    exact fp32 dots."""
    block_d = max(16, triton.next_power_of_2(head_dim))   # padded (masked) to a tensor-core dot's smallest K
    shape = dict(BLOCK_D=block_d, EVEN_D=head_dim == block_d)
    if backends.triton_interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, **shape, DOT_FP32=True, PRECISION="ieee"), {}
    if dtype == torch.float32:
        kind = "fp32"
    else:
        kind = "low_softcap" if softcap and "low_softcap" in _CONFIGS[kernel] else "low"
    tile = _CONFIGS[kernel][kind][block_d]
    if tile is None:
        return None
    block_m, block_n, warps, stages = tile
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return (dict(BLOCK_M=block_m, BLOCK_N=block_n, **shape, DOT_FP32=False, PRECISION=precision),
            dict(num_warps=warps, num_stages=stages))


def _window(causal, window_size):
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return (NO_LIMIT if left < 0 else left), (NO_LIMIT if right < 0 else right)


def _scales(scale, softcap):
    """(scale2, softcap2): the score scale and cap in log2 units (times log2(e))."""
    log2e = LOG2E.value
    return scale * log2e, (softcap if softcap > 0 else 1.0) * log2e


_BLOCK_TABLES = WeakTensorKeyDictionary()     # cu_seqlens -> {(block, version, total, heavy): table}


def _block_table(cu, block, total, heavy=None):
    """Work items of ``block`` rows over every sequence, built on the device with no host sync:
    (slot -> sequence [bound] int32, slot -> first row of its block [bound] int32, bound). A sequence
    of length L has cdiv(L, block) items, so bound = S + total // block covers them all and at most S
    slots are empty, whatever the spread of lengths (a grid of max_seqlen blocks per sequence would
    leave most programs empty on a packed RL batch). The slots are ordered heaviest first, so that the
    longest programs start in the first wave and the short ones fill the tail: under a causal mask a
    query block's work grows with its position (``heavy="last"``) and a key block's shrinks
    (``"first"``); otherwise every block of a sequence costs its length. Cached on the offsets
    tensor: built once per micro-batch, not per layer."""
    key = (block, cu._version, total, heavy)
    per_offsets = _BLOCK_TABLES.setdefault(cu, {})
    if key not in per_offsets:
        lengths = (cu[1:] - cu[:-1]).long()
        blocks = (lengths + block - 1) // block
        ends = blocks.cumsum(0)
        bound = blocks.numel() + total // block
        slots = torch.arange(bound, device=cu.device)
        seq = torch.searchsorted(ends, slots, right=True)
        used = seq < blocks.numel()
        seq = seq.clamp(max=blocks.numel() - 1)
        start = (slots - (ends - blocks)[seq]) * block
        length = lengths[seq]
        work = {"last": torch.minimum(start + block, length), "first": length - start, None: length}[heavy]
        order = torch.argsort(torch.where(used, work, -1), descending=True, stable=True)
        start = torch.where(used, start, 1 << 30)
        per_offsets[key] = (seq[order].to(torch.int32), start[order].to(torch.int32), bound)
    return per_offsets[key]


def _finite_or_zero(x):
    return torch.where(torch.isfinite(x), x, 0.0)


def forward(q, k, v, cu_q, cu_k, scale, causal, window_size, softcap):
    """out, lse. Non-finite values follow the reference's rule: a key whose value holds one gets a
    NaN key instead and a zero value, so that its NaN reaches exactly the queries that see it (an
    invisible key's P is 0 inside a masked tile, and 0 * NaN in the P V product would reach them all)."""
    bad_values = ~torch.isfinite(v).all(-1, keepdim=True)
    k, v = torch.where(bad_values, float("nan"), k), torch.where(bad_values, 0.0, v)
    total_q, heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(heads, total_q, dtype=torch.float32, device=q.device)
    num_seqs = cu_q.numel() - 1
    if total_q == 0 or num_seqs == 0:
        return out, lse.fill_(float("inf"))
    config, launch = _config("forward", q.dtype, head_dim, softcap > 0)
    left, right = _window(causal, window_size)
    slot_seq, slot_start, bound = _block_table(cu_q, config["BLOCK_M"], total_q, "last" if causal else None)
    _r1k_attention_forward[(bound * heads,)](
        q, k, v, out, lse, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), total_q, heads, heads // k.shape[1], head_dim, slot_seq, slot_start,
        *_scales(scale, softcap), left, right, HAS_SOFTCAP=softcap > 0, **config, **launch)
    return out, lse


def backward(do, q, k, v, delta, lse, cu_q, cu_k, scale, causal, window_size, softcap, deterministic):
    """dq, dk, dv; ``delta`` [Hq, total_q] fp32 is rowsum(dO * O), computed once by the caller.
    Default: one kernel, dQ by atomic adds (6 GEMMs), where ``_CONFIGS["backward"]`` has a tile for
    the head dim; else, and with ``deterministic``, dK/dV and dQ kernels that each write every output
    row once (8 GEMMs: S and dP are computed by both). Non-finite q and k are zeroed: the forward's
    lse (NaN for a query whose softmax saw one) and delta (NaN where the output is) carry each NaN to
    exactly the gradients that depend on it, while in the dQ and dK products an invisible pair's
    dS = 0 times a NaN would carry it everywhere."""
    q, k = _finite_or_zero(q), _finite_or_zero(k)
    total_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    num_seqs = cu_q.numel() - 1
    if total_q == 0 or num_seqs == 0:
        return torch.zeros_like(q), dk, dv
    do, delta = do.contiguous(), delta.contiguous()
    left, right = _window(causal, window_size)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    scales = (scale, *_scales(scale, softcap))
    group = heads // kv_heads
    keys_heavy = "first" if causal else None
    one_kernel = None if deterministic else _config("backward", q.dtype, head_dim, softcap > 0)
    if one_kernel is not None:
        config, launch = one_kernel
        slot_seq, slot_start, bound = _block_table(cu_k, config["BLOCK_N"], k.shape[0], keys_heavy)
        dq_sum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        _r1k_attention_backward[(bound * kv_heads,)](
            q, k, v, do, lse, delta, dk, dv, dq_sum, cu_q, cu_k, *strides, dq_sum.stride(0), dq_sum.stride(1), total_q,
            kv_heads, group, head_dim, slot_seq, slot_start, *scales, left, right, HAS_SOFTCAP=softcap > 0,
            **config, **launch)
        return dq_sum.mul_(scale).to(q.dtype), dk, dv
    dq = torch.zeros_like(q)
    config, launch = _config("dkdv", q.dtype, head_dim, softcap > 0)
    slot_seq, slot_start, bound = _block_table(cu_k, config["BLOCK_N"], k.shape[0], keys_heavy)
    _r1k_attention_backward_dkdv[(bound * kv_heads,)](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *strides, total_q, kv_heads, group, head_dim, slot_seq,
        slot_start, *scales, left, right, HAS_SOFTCAP=softcap > 0, **config, **launch)
    config, launch = _config("dq", q.dtype, head_dim, softcap > 0)
    slot_seq, slot_start, bound = _block_table(cu_q, config["BLOCK_M"], total_q, "last" if causal else None)
    _r1k_attention_backward_dq[(bound * heads,)](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, *strides, total_q, heads, group, head_dim, slot_seq, slot_start,
        *scales, left, right, HAS_SOFTCAP=softcap > 0, **config, **launch)
    return dq, dk, dv
