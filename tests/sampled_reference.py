"""float64 references for a sample of rows, for the GPU tests at sizes where the full float64
reference would not fit (N x V > 2^31 logits) or take minutes (three [N,H]x[H,V] GEMMs in fp64).

Each token's log-prob, entropy, d logits and d hidden depend only on its own row, so a sample of
rows is checked exactly. d weight sums over every token: for a sample of vocabulary rows it needs
each token's full log-sum-exp, which comes from the logits in chunks, computed by a matmul of the
inputs (exact products, fp32 accumulation: bf16/fp16 tensor cores on the GPU) and reduced in
float64. tests/test_sampled_reference.py checks these helpers against the full reference on CPU.
"""
from __future__ import annotations

import torch

from r1kernels.constants import IGNORE_INDEX
from r1kernels.reference import token_logprobs_ref



def sample_indices(n: int, count: int, device) -> torch.Tensor:
    """``count`` distinct indices of [0, n), always including the first and the last (where index
    arithmetic overflows first)."""
    picked = torch.randperm(n, device=device)[:count]
    return torch.unique(torch.cat([picked, torch.tensor([0, n - 1], device=device)]))


def _grad_logits(logits64, targets, grad_logp, grad_entropy, inv_temperature):
    """d (sum g_logp * logp + g_ent * entropy) / d logits, float64, for rows of logits / T."""
    logp_all = torch.log_softmax(logits64 * inv_temperature, -1)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1, keepdim=True)
    valid = (targets != IGNORE_INDEX)[:, None]
    onehot = torch.zeros_like(p).scatter_(1, torch.where(valid[:, 0], targets, 0).long()[:, None], 1.0)
    dz = grad_logp.double()[:, None] * (onehot - p) - grad_entropy.double()[:, None] * p * (logp_all + entropy)
    return torch.where(valid, dz * inv_temperature, 0.0)


def token_logprobs_rows(logits, targets, rows, grad_logp, grad_entropy, temperature=1.0):
    """(logp, entropy, d logits) of ``rows`` in float64."""
    z = logits[rows].double()
    logp, entropy = token_logprobs_ref(z, targets[rows], temperature)
    return logp, entropy, _grad_logits(z, targets[rows], grad_logp[rows], grad_entropy[rows], 1.0 / temperature)


def _fp32_logits(hidden, weight):
    """hidden @ weight.T with exact products and fp32 accumulation (on the GPU: tensor cores with
    an fp32 output, or TF32, whose 10-bit mantissa holds bf16/fp16 values exactly)."""
    if not hidden.is_cuda or hidden.dtype not in (torch.bfloat16, torch.float16):
        return hidden.float() @ weight.float().T
    if "dtype" in torch.ops.aten.mm.overloads():
        return torch.mm(hidden, weight.T, out_dtype=torch.float32)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return hidden.float() @ weight.float().T
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def linear_token_logprobs_rows(hidden, weight, targets, rows, cols, grad_logp, grad_entropy, chunk=2048):
    """(logp, entropy, d hidden) of tokens ``rows`` and d weight of vocabulary rows ``cols``, float64,
    for logits = hidden @ weight.T (temperature 1, no bias)."""
    w64 = weight.double()
    z_rows = hidden[rows].double() @ w64.T
    logp, entropy = token_logprobs_ref(z_rows, targets[rows])
    d_hidden = _grad_logits(z_rows, targets[rows], grad_logp[rows], grad_entropy[rows], 1.0) @ w64
    d_weight = torch.zeros(len(cols), weight.shape[1], dtype=torch.float64, device=weight.device)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start:start + chunk]
        full = _fp32_logits(h, weight).double()                       # [chunk, V]: each token's whole row
        lse = torch.logsumexp(full, -1, keepdim=True)
        tok_entropy = lse - (torch.softmax(full, -1) * full).sum(-1, keepdim=True)
        del full
        logp_cols = h.double() @ w64[cols].T - lse                     # [chunk, len(cols)], exact logits
        p = logp_cols.exp()
        t = targets[start:start + chunk]
        valid = (t != IGNORE_INDEX)[:, None]
        onehot = (t[:, None] == cols[None, :]).double()
        dz = (grad_logp[start:start + chunk].double()[:, None] * (onehot - p)
              - grad_entropy[start:start + chunk].double()[:, None] * p * (logp_cols + tok_entropy))
        d_weight += torch.where(valid, dz, 0.0).T @ h.double()
    return logp, entropy, d_hidden, d_weight
