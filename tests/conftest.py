"""Test set-up: the Triton interpreter must be on before triton is first imported, so that
Triton kernels run on CPU tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from r1kernels import backends  # noqa: E402


def cpu_backends():
    """Backends that can run on this machine's CPU tensors."""
    names = ["torch"]
    if backends.extension_available():
        names.append("cpu")
    if backends.triton_available() and backends.triton_interpreting():
        names.append("triton")
    return names


def exact_backends():
    """Backends that run float64 (for gradcheck)."""
    return [b for b in cpu_backends() if b in ("torch", "cpu")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def assert_close_scaled(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max(1, max |expected|), and no NaN anywhere."""
    actual = actual.double()
    expected = expected.double()
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: non-finite mismatch"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:.1g} x scale {scale:.3g}"


# Relative tolerances by input dtype: fp32 math on exact inputs, outputs/grads in the input dtype.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
