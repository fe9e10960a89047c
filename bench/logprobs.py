"""``python -m bench logprobs``: token_logprobs and linear_token_logprobs against their peers.

Logits op: memory-bound, its floor is one read of the logits forward and read + write
backward (3 x N x V x bytes for forward+backward); fraction is against measured copy bandwidth.
Fused-linear op: matmul-bound, 2NHV FLOPs forward and 6NHV useful FLOPs forward+backward;
fraction is against the measured matmul rate, and a reference row times the four matmuls
(forward, recompute, d hidden, d weight) that a recomputing fused kernel cannot avoid.
"""
from __future__ import annotations

import importlib

import torch

import r1kernels
from bench.common import Row, measure_ceilings, median_time, peak_memory, print_table, save, try_case

SHAPES = {
    "cuda": dict(tokens=16384, hidden=4096, vocab=151936, dtype=torch.bfloat16),
    "cpu": dict(tokens=2048, hidden=512, vocab=32768, dtype=torch.float32),
}


def _our_backends(device):
    names = ["triton", "cuda", "torch"] if device.type == "cuda" else ["cpu", "torch"]
    usable = []
    for name in names:
        try:
            with r1kernels.use_backend(name):
                r1kernels.backends.resolve(device)
            usable.append(name)
        except (RuntimeError, ValueError):
            pass
    return usable


def naive_logprobs(logits, targets, temperature=1.0):
    """What trainers write: full fp32 log-softmax, then gather."""
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets[:, None])[:, 0]


def naive_linear_logprobs(hidden, weight, targets):
    return naive_logprobs(hidden @ weight.T, targets)


def _optional(module, attr):
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _time_and_memory(make_inputs, forward, device):
    """(forward s, forward+backward s, forward+backward peak bytes) of ``forward(*inputs)``."""
    inputs = make_inputs()
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def fwd():
        with torch.no_grad():
            forward(*inputs)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        forward(*inputs).sum().backward()

    t_fwd = median_time(fwd, device)
    t_both = median_time(fwd_bwd, device)
    for x in leaves:
        x.grad = None
    mem = peak_memory(fwd_bwd, device)
    return t_fwd, t_both, mem


def run(device: torch.device) -> list[Row]:
    s = SHAPES[device.type]
    n, h, v, dtype = s["tokens"], s["hidden"], s["vocab"], s["dtype"]
    ceilings = measure_ceilings(device, dtype)
    elt = torch.finfo(dtype).bits // 8
    targets = torch.randint(0, v, (n,), device=device)
    rows: list[Row] = []

    # ---- logits op
    def logits_inputs():
        return (torch.randn(n, v, device=device, dtype=dtype).requires_grad_(), targets)

    logits_impls = {f"ours token_logprobs [{b}]": (b, lambda x, t: r1kernels.token_logprobs(x, t))
                    for b in _our_backends(device)}
    logits_impls["naive log_softmax + gather"] = (None, naive_logprobs)
    logits_impls["torch.compile(naive)"] = (None, torch.compile(naive_logprobs))
    liger_selective = _optional("liger_kernel.ops.grpo_loss", "fused_selective_log_softmax")
    if liger_selective is not None and device.type == "cuda":
        logits_impls["liger fused_selective_log_softmax"] = (None, lambda x, t: liger_selective(x[None], t[None])[0])
    shape = f"N={n} V={v} {str(dtype)[6:]}"
    for name, (backend, fn) in logits_impls.items():
        def case(fn=fn, backend=backend):
            if backend is None:
                return _time_and_memory(logits_inputs, fn, device)
            with r1kernels.use_backend(backend):
                return _time_and_memory(logits_inputs, fn, device)
        result, note = try_case(case)
        t_fwd, t_both, mem = result or (None, None, None)
        rows.append(Row(f"{name} fwd", shape, t_fwd, None, n * v * elt, ceilings.bandwidth, note))
        rows.append(Row(f"{name} fwd+bwd", shape, t_both, mem, 3 * n * v * elt, ceilings.bandwidth, note))

    # ---- fused-linear op
    def linear_inputs():
        hidden = torch.randn(n, h, device=device, dtype=dtype).requires_grad_()
        weight = (torch.randn(v, h, device=device, dtype=dtype) * h ** -0.5).requires_grad_()
        return hidden, weight, targets

    linear_impls = {f"ours linear_token_logprobs [{b}]": (b, lambda x, w, t: r1kernels.linear_token_logprobs(x, w, t))
                    for b in _our_backends(device)}
    linear_impls["naive matmul + log_softmax + gather"] = (None, naive_linear_logprobs)
    linear_impls["torch.compile(naive)"] = (None, torch.compile(naive_linear_logprobs))
    cce = _optional("cut_cross_entropy", "linear_cross_entropy")
    if cce is not None and device.type == "cuda":
        linear_impls["cut-cross-entropy (reduction=none)"] = (None, lambda x, w, t: -cce(x, w, t, reduction="none"))
    shape = f"N={n} H={h} V={v} {str(dtype)[6:]}"
    flops = 2 * n * h * v
    for name, (backend, fn) in linear_impls.items():
        def case(fn=fn, backend=backend):
            if backend is None:
                return _time_and_memory(linear_inputs, fn, device)
            with r1kernels.use_backend(backend):
                return _time_and_memory(linear_inputs, fn, device)
        result, note = try_case(case)
        t_fwd, t_both, mem = result or (None, None, None)
        rows.append(Row(f"{name} fwd", shape, t_fwd, None, flops, ceilings.matmul_flops, note))
        rows.append(Row(f"{name} fwd+bwd", shape, t_both, mem, 3 * flops, ceilings.matmul_flops, note))

    def four_matmuls():
        hidden, weight, _ = linear_inputs()
        with torch.no_grad():
            def run4():
                logits = hidden @ weight.T
                logits = hidden @ weight.T
                logits @ weight
                logits.T @ hidden
            return median_time(run4, device)

    t4, note = try_case(four_matmuls)
    rows.append(Row("reference: 4 matmuls [N,H]x[H,V]", shape, t4, None, 4 * flops, ceilings.matmul_flops,
                    note or "goal: ours fwd+bwd <= 1.25x this"))
    print_table("logprobs", rows, ceilings)
    print("fraction: logits op vs copy bandwidth (3NV bytes fwd+bwd); linear op vs matmul rate (6NHV useful FLOPs)")
    print("wrote", save("logprobs", rows, ceilings, device))
    return rows
