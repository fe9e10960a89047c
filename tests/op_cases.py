"""Helpers every op's test module shares: the hypothesis settings of the property tests, random
targets, and the two table-driven checks each op runs over its own rows (bad input names the
argument on every backend; empty inputs with any strides give empty results)."""
import pytest
import torch
from conftest import cpu_backends
from hypothesis import HealthCheck, settings

import r1kernels

# Property tests: each op against its float64 reference on random valid inputs drawn by hypothesis
# (shapes that are no multiple of any block, masked targets, extreme logits, every loss type and
# layout). A failing draw is shrunk to the smallest input that still fails.
PROPERTY_SETTINGS = settings(max_examples=12, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_targets(gen, rows, vocab, masked_fraction):
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < masked_fraction] = -100
    return targets


def assert_rejects(op, call, error, pattern):
    """``call()`` raises ``error`` with a message matching ``pattern`` (naming the argument) on every
    backend of ``op`` that runs on this machine's CPU; once where ``op`` is None (no backends: the loss
    math, the packing helpers)."""
    for backend in cpu_backends(op) if op is not None else [None]:
        forced = r1kernels.use_backend(**{op: backend}) if op is not None else r1kernels.use_backend()
        with forced, pytest.raises(error, match=pattern):
            call()


def empty_strided(shape, strides, requires_grad=True):
    """An empty tensor with the given strides: empty tensors are 'contiguous' whatever theirs are."""
    return torch.empty_strided(shape, strides).requires_grad_(requires_grad)


def ids(*shape):
    return torch.zeros(shape, dtype=torch.long)


def assert_empty_results(backend, make, call):
    """``call(*make())`` on ``backend``: empty outputs (a loss of 0 over no tokens) and, backward, a
    gradient of each differentiable input's shape (zeros for the lm_head weight)."""
    inputs = make()
    with r1kernels.use_backend(backend):
        out = call(*inputs)
    outputs = [out.loss] if hasattr(out, "loss") else list(out) if isinstance(out, tuple) else [out]
    for value in outputs:
        if value.dim() == 0:
            assert value.item() == 0.0, "the loss over no tokens is 0"
        else:
            assert value.numel() == 0
    leaves = [x for x in inputs if x.requires_grad]
    if leaves:
        with r1kernels.use_backend(backend):
            sum(value.sum() for value in outputs).backward()
        for x in leaves:
            assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
