"""The ``triton`` backend of varlen attention: the kernels of ``triton_kernels`` as custom ops, sinks
folded in around them, and the autograd that joins them (the contract ``attend`` of ``r1kernels.attention``)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from r1kernels.attention import triton_kernels as triton_attention


@torch.library.custom_op("r1kernels::varlen_attention_forward", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float, causal: bool,
             window_left: int, window_right: int, softcap: float) -> tuple[Tensor, Tensor]:
    return triton_attention.forward(q, k, v, cu_q, cu_k, scale, causal, (window_left, window_right), softcap)


@_forward.register_fake
def _(q, k, v, cu_q, cu_k, scale, causal, window_left, window_right, softcap):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("r1kernels::varlen_attention_backward", mutates_args=())
def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, delta: Tensor, lse: Tensor, cu_q: Tensor,
              cu_k: Tensor, scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
              deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    return triton_attention.backward(grad_out, q, k, v, delta, lse, cu_q, cu_k, scale, causal,
                                     (window_left, window_right), softcap, deterministic)


@_backward.register_fake
def _(grad_out, q, k, v, delta, lse, cu_q, cu_k, scale, causal, window_left, window_right, softcap, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _add_sinks(out, lse, sinks):
    """Fold one extra logit per head into each softmax denominator: with lse' = log(e^lse + e^sink),
    out' = out * e^(lse - lse'). A query that sees no key (lse = +inf) keeps out 0 and gets lse' = sink.
    The backward kernels are then exact when given (out', lse'), since P = exp(score - lse')."""
    sink = sinks.float()[:, None]
    empty = lse == math.inf
    finite_lse = torch.where(empty, -math.inf, lse)
    lse_all = torch.logaddexp(finite_lse, sink)
    factor = torch.exp(finite_lse - lse_all)                                   # [Hq, total_q]
    return (out.float() * factor.T[..., None]).to(out.dtype), lse_all


class _VarlenAttention(torch.autograd.Function):
    """Triton forward and backward; with sinks, d sink_h = -sum_i P(sink | query i) * rowsum(dO_i * O_i)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_q, cu_k, scale, causal, window, softcap, deterministic):
        out, lse = _forward(q, k, v, cu_q, cu_k, scale, causal, window[0], window[1], softcap)
        if sinks is not None:
            out, lse = _add_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, sinks, out, lse, cu_q, cu_k)
        ctx.args = (scale, causal, window[0], window[1], softcap, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, sinks, out, lse, cu_q, cu_k = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).T                      # [Hq, total_q]: rowsum(dO * O)
        dq, dk, dv = _backward(grad_out, q, k, v, delta, lse, cu_q, cu_k, *ctx.args)
        d_sinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            d_sinks = -(torch.exp(sinks.float()[:, None] - lse) * delta).sum(1).to(sinks.dtype)
        return dq, dk, dv, d_sinks, None, None, None, None, None, None, None


def attend(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, sinks, deterministic, need_lse):
    return _VarlenAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), sinks, cu_q, cu_k, scale, causal,
                                  window, softcap, deterministic)
