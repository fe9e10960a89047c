"""Row kernels over a [rows, vocab] logits matrix, one module per backend.

Every backend's row kernel has the same two calls, which the autograd layer
(``r1kernels.logprobs``) and the chunked fused-linear driver build on:

``forward(logits, targets, inv_temperature) -> (logp, entropy, row_max, row_log_sum)``
    With ``z = logits * inv_temperature`` per row: ``row_max = max_v z_v``,
    ``row_log_sum = log sum_v exp(z_v - row_max)``, ``logp = z_t - row_max - row_log_sum``
    and ``entropy = row_log_sum - sum_v p_v (z_v - row_max)``. Keeping the max apart from
    the log-sum (instead of one log-sum-exp) keeps ``z_v - row_max`` exact, so log-probs
    and gradients stay accurate with logits of 1e4.

``backward(logits, targets, row_max, row_log_sum, entropy, grad_logp, grad_entropy, inv_temperature, out)``
    Writes d logits into ``out`` (which may be ``logits`` itself):
    ``dz_v = g_logp (1[v = t] - p_v) - g_ent p_v (log p_v + H)``, ``d logits = dz * inv_temperature``.
    ``grad_entropy`` may be None. Rows whose target is -100 get zeros.
"""

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs accumulate (and return) fp64, for gradcheck; every other dtype uses fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` with stride 1 along its last dimension, copied only where it has another. An empty tensor
    counts as contiguous whatever its strides (``torch.randn(0, 1) * 0.1`` has (1, 0)), so
    ``contiguous()`` would keep them: it is cloned into the standard layout (autograd follows)."""
    if x.stride(-1) == 1:
        return x
    return x.clone(memory_format=torch.contiguous_format) if x.numel() == 0 else x.contiguous()
