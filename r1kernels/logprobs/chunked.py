"""Fused lm_head + log-prob on any row kernel, a chunk of tokens at a time; the matmuls go to
torch (MKL on CPU, cuBLAS on GPU) and the row pass to a backend's row kernel.

Used by the ``torch``, ``cpu``, ``cuda`` and ``triton`` backends (``triton_tile`` is the fully
fused Triton kernel instead). Only one [chunk, V] logits buffer is alive at once, in forward and
in backward, where d logits overwrite it in place, so memory is O(chunk * V), not O(tokens * V).

Three drivers:
  ``forward``           logits -> per-token statistics                              (1 GEMM)
  ``backward``          recompute logits -> d logits -> d hidden, d weight          (3 GEMMs)
  ``forward_backward``  when the per-token gradients are known in the forward (a token-level
                        loss): logits -> statistics -> their gradients -> d logits -> d hidden,
                        d weight, with no recompute                                  (3 GEMMs)

Chunk size: R1K_CHUNK_BYTES when set; else on CUDA the smaller of 1 GiB and 1/16 of the free
device memory (3,532 rows of bf16 logits at V = 151,936: large enough for cuBLAS to run near peak),
on CPU 64 MiB (512 rows of fp32 logits at V = 32,768: on a 2-core Xeon, MKL's logits GEMM runs 25%
faster at 512 rows than at 256, and the chunk stays a sixteenth of those logits). One buffer serves every
chunk. d weight accumulates in fp32 (fp64 for fp64) in place, with no per-chunk [V, H] temporary; the
first chunk writes it rather than adds, so it is never zero-filled.
"""
from __future__ import annotations

import os

import torch

from r1kernels import backends
from r1kernels._tensors import accumulation_dtype

_ADDMM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()   # mixed-precision GEMMs into fp32
_MM_OUT_DTYPE = "dtype_out" in torch.ops.aten.mm.overloads()
CPU_CHUNK_BYTES = 64 << 20
GPU_CHUNK_BYTES = 1 << 30
GPU_FREE_FRACTION = 16


def chunk_bytes(device: torch.device) -> int:
    """Bytes of one chunk's logits (see the module docstring)."""
    forced = os.environ.get("R1K_CHUNK_BYTES")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"R1K_CHUNK_BYTES must be a positive number of bytes, got {forced!r}")
        return int(forced)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(GPU_CHUNK_BYTES, free // GPU_FREE_FRACTION)
    return CPU_CHUNK_BYTES


class _Chunks:
    """The token chunks of one pass, and one logits buffer that every chunk reuses: a fresh [chunk, V]
    tensor per chunk goes back to the OS when freed and is faulted in again page by page (on CPU at
    V = 32,768 that cost about a sixth of the logits GEMM's time)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        step = max(1, chunk_bytes(hidden.device) // (hidden.element_size() * max(vocab, 1)))
        self.slices = [slice(start, min(tokens, start + step)) for start in range(0, tokens, step)]
        self.buffer = hidden.new_empty(min(step, tokens), vocab)

    def logits(self, hidden, weight, bias, chunk):
        """The chunk's logits, in the shared buffer (valid until the next chunk's)."""
        out = self.buffer[: chunk.stop - chunk.start]
        if bias is None:
            return torch.mm(hidden[chunk], weight.T, out=out)
        return torch.addmm(bias, hidden[chunk], weight.T, out=out)


def _accumulate_weight_grad(grad_weight, dlogits, hidden_chunk, first):
    """grad_weight += dlogits.T @ hidden_chunk (= instead for the ``first`` chunk, so the [V, H]
    accumulator is never zero-filled), accumulated in grad_weight's (wider) dtype in place."""
    beta = 0 if first else 1     # beta = 0: the accumulator's old contents are not read
    if grad_weight.dtype == dlogits.dtype:
        grad_weight.addmm_(dlogits.T, hidden_chunk, beta=beta)
    elif dlogits.is_cuda and _ADDMM_OUT_DTYPE:
        # cuBLAS: bf16/fp16 inputs, fp32 accumulation and fp32 output
        torch.addmm(grad_weight, dlogits.T, hidden_chunk, beta=beta, out_dtype=grad_weight.dtype, out=grad_weight)
    elif dlogits.is_cuda:
        # torch before addmm(out_dtype=): a low-precision [V, H] partial per chunk, summed in fp32
        if first:
            grad_weight.copy_(dlogits.T @ hidden_chunk)
        else:
            grad_weight += dlogits.T @ hidden_chunk
    else:
        # MKL has no mixed-precision GEMM: widen the chunk (chunk-sized copies, never [V, H])
        grad_weight.addmm_(dlogits.T.to(grad_weight.dtype), hidden_chunk.to(grad_weight.dtype), beta=beta)


class _Grads:
    """The fp32 (fp64) accumulators of one backward, and the per-chunk updates. The gradients come back
    in the inputs' dtype, or with ``wide`` in the accumulation dtype (autocast: fp32 leaves get fp32
    gradients, rounded once)."""

    def __init__(self, hidden, weight, bias, needs_grad, wide=False):
        need_hidden, need_weight, need_bias = needs_grad
        acc = accumulation_dtype(weight.dtype)
        self.bias_dtype = acc if wide else (weight if bias is None else bias).dtype
        self.weight_dtype = acc if wide else weight.dtype
        self.hidden = (torch.empty(hidden.shape, dtype=acc if wide else hidden.dtype, device=hidden.device)
                       if need_hidden else None)
        self.weight = torch.empty(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        self._chunks_added = 0
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        self._wide_weight = None

    def _hidden_grad(self, chunk, dlogits, weight):
        """d hidden of a chunk = dlogits @ weight, accumulated in fp32, written in self.hidden's dtype."""
        out = self.hidden[chunk]
        if out.dtype == dlogits.dtype:
            torch.mm(dlogits, weight, out=out)
        elif dlogits.is_cuda and _MM_OUT_DTYPE:
            torch.mm(dlogits, weight, out_dtype=out.dtype, out=out)
        elif dlogits.is_cuda:
            out.copy_(dlogits @ weight)      # torch before mm(out_dtype=): rounded to the inputs' dtype first
        else:
            # MKL has no mixed-precision GEMM: widen the chunk, and the weight once per backward
            if self._wide_weight is None:
                self._wide_weight = weight.to(out.dtype)
            torch.mm(dlogits.to(out.dtype), self._wide_weight, out=out)

    def add(self, chunk, dlogits, hidden, weight):
        if self.hidden is not None:
            self._hidden_grad(chunk, dlogits, weight)
        if self.weight is not None:
            _accumulate_weight_grad(self.weight, dlogits, hidden[chunk], first=self._chunks_added == 0)
        if self.bias is not None:
            self.bias += dlogits.sum(0, dtype=self.bias.dtype)
        self._chunks_added += 1

    def result(self):
        if self.weight is not None and self._chunks_added == 0:     # no tokens: d weight is 0
            self.weight.zero_()
        return (self.hidden, None if self.weight is None else self.weight.to(self.weight_dtype),
                None if self.bias is None else self.bias.to(self.bias_dtype))


def forward(hidden, weight, bias, targets, inv_temperature, *, backend, deterministic=False):
    """(logp, entropy, row_max, row_log_sum) per token, through ``backend``'s row kernel. Every backend's
    chunks are deterministic: ``deterministic`` asks nothing more of them."""
    rows = backends.kernels("logprobs", backend)
    outputs = tuple(hidden.new_empty(hidden.shape[0], dtype=accumulation_dtype(hidden.dtype)) for _ in range(4))
    chunks = _Chunks(hidden, weight)
    for chunk in chunks.slices:
        chunk_out = rows.forward(chunks.logits(hidden, weight, bias, chunk), targets[chunk], inv_temperature)
        for full, part in zip(outputs, chunk_out):
            full[chunk] = part
    return outputs


def backward(hidden, weight, bias, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy,
             inv_temperature, *, backend, deterministic=False, needs_grad, wide_grads=False):
    """(d hidden, d weight, d bias), each None unless ``needs_grad`` asks for it; recomputes the logits.
    ``wide_grads``: in the accumulation dtype (see ``_Grads``)."""
    rows = backends.kernels("logprobs", backend)
    grads = _Grads(hidden, weight, bias, needs_grad, wide_grads)
    chunks = _Chunks(hidden, weight)
    for chunk in chunks.slices:
        logits = chunks.logits(hidden, weight, bias, chunk)
        dlogits = rows.backward(logits, targets[chunk], row_max[chunk], row_log_sum[chunk], entropy[chunk],
                                grad_logp[chunk], None if grad_entropy is None else grad_entropy[chunk],
                                inv_temperature, out=logits)
        grads.add(chunk, dlogits, hidden, weight)
    return grads.result()


def forward_backward(hidden, weight, bias, targets, inv_temperature, token_grads, needs_grad, *, backend):
    """One pass: ((logp, entropy), (d hidden, d weight, d bias)) of ``loss = sum_t f_t(logp_t, H_t)``.

    ``token_grads(chunk, logp, entropy) -> (d loss / d logp, d loss / d entropy or None)`` gives each
    chunk's per-token gradients from that chunk's values alone, while its logits are still in memory.
    """
    rows = backends.kernels("logprobs", backend)
    logp, entropy = (hidden.new_empty(hidden.shape[0], dtype=accumulation_dtype(hidden.dtype)) for _ in range(2))
    grads = _Grads(hidden, weight, bias, needs_grad)
    chunks = _Chunks(hidden, weight)
    for chunk in chunks.slices:
        logits = chunks.logits(hidden, weight, bias, chunk)
        chunk_logp, chunk_entropy, row_max, row_log_sum = rows.forward(logits, targets[chunk], inv_temperature)
        logp[chunk], entropy[chunk] = chunk_logp, chunk_entropy
        grad_logp, grad_entropy = token_grads(chunk, chunk_logp, chunk_entropy)
        dlogits = rows.backward(logits, targets[chunk], row_max, row_log_sum, chunk_entropy, grad_logp, grad_entropy,
                                inv_temperature, out=logits)
        grads.add(chunk, dlogits, hidden, weight)
    return (logp, entropy), grads.result()
