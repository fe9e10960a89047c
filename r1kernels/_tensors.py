"""Tensor helpers every op shares: the accumulation dtype and a unit-stride view."""

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
