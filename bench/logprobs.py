"""``python -m bench logprobs``: token_logprobs (from logits) against its peers.

Memory-bound: its floor is one read of the logits forward and a read + write backward
(3 x N x V x bytes for forward+backward); the fraction is against the measured copy bandwidth.
The shared helpers here (``our_backends``, ``time_and_memory``) serve ``bench linear`` too.
"""
from __future__ import annotations

import importlib

import torch

import r1kernels
from bench.common import Row, measure_ceilings, median_time, peak_memory, print_table, save, try_case
from r1kernels.naive import naive_logprobs

SHAPES = {
    "cuda": dict(tokens=16384, hidden=4096, vocab=151936, dtype=torch.bfloat16),
    "cpu": dict(tokens=2048, hidden=512, vocab=32768, dtype=torch.float32),
}


def our_backends(op, device):
    """``op``'s backends that ``auto`` may pick on ``device``, in its order (``backends.auto_candidates``)."""
    return list(r1kernels.backends.auto_candidates(op, device))


def optional(module, attr):
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def time_and_memory(make_inputs, forward, device, quick=False):
    """(forward s, forward+backward s, forward+backward peak bytes) of ``forward(*inputs)``."""
    inputs = make_inputs()
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    repeats = dict(warmup=1, repeats=3) if quick else {}

    def fwd():
        with torch.no_grad():
            forward(*inputs)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        forward(*inputs).sum().backward()

    t_fwd = median_time(fwd, device, **repeats)
    t_both = median_time(fwd_bwd, device, **repeats)
    for x in leaves:
        x.grad = None
    mem = peak_memory(fwd_bwd, device)
    return t_fwd, t_both, mem


def measure(impls, make_inputs, device, quick):
    """{name: (forward s, forward+backward s, peak bytes) or None, note} for ``impls`` {name: (backend, fn)}."""
    results = {}
    for name, (backend, fn) in impls.items():
        def case(fn=fn, backend=backend):
            if backend is None:
                return time_and_memory(make_inputs, fn, device, quick)
            with r1kernels.use_backend(backend):
                return time_and_memory(make_inputs, fn, device, quick)
        results[name] = try_case(case)
    return results


def phase_rows(results, shape, fwd_work, both_work, limit, bound) -> list[Row]:
    """A forward and a forward+backward row per implementation, from ``measure``'s results."""
    rows = []
    for name, (result, note) in results.items():
        t_fwd, t_both, mem = result or (None, None, None)
        rows.append(Row(name, shape, t_fwd, None, fwd_work, limit, note, "fwd", bound))
        rows.append(Row(name, shape, t_both, mem, both_work, limit, note, "fwd+bwd", bound))
    return rows


def run(device: torch.device, quick: bool = False) -> list[Row]:
    s = SHAPES[device.type]
    n, v, dtype = s["tokens"], s["vocab"], s["dtype"]
    ceilings = measure_ceilings(device, dtype)
    elt = torch.finfo(dtype).bits // 8
    targets = torch.randint(0, v, (n,), device=device)

    def logits_inputs():
        return (torch.randn(n, v, device=device, dtype=dtype).requires_grad_(), targets)

    impls = {f"ours token_logprobs [{b}]": (b, lambda x, t: r1kernels.token_logprobs(x, t))
             for b in our_backends("logprobs", device)}
    impls["naive log_softmax + gather"] = (None, naive_logprobs)
    if not quick:
        impls["torch.compile(naive)"] = (None, torch.compile(naive_logprobs))
    liger_selective = optional("liger_kernel.ops.grpo_loss", "fused_selective_log_softmax")
    if liger_selective is not None and device.type == "cuda":
        impls["liger fused_selective_log_softmax"] = (None, lambda x, t: liger_selective(x[None], t[None])[0])
    shape = f"N={n} V={v} {str(dtype)[6:]}"
    rows = phase_rows(measure(impls, logits_inputs, device, quick), shape, n * v * elt, 3 * n * v * elt,
                      ceilings.bandwidth, "bandwidth")
    print_table("logprobs", rows, ceilings)
    print("fraction: vs measured copy bandwidth (N*V bytes forward, 3*N*V forward+backward)")
    print("wrote", save("logprobs", rows, ceilings, device, quick=quick))
    return rows
