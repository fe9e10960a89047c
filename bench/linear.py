"""``python -m bench linear``: linear_token_logprobs (fused with the lm_head) against its peers.

Matmul-bound: 2NHV FLOPs forward and 6NHV useful FLOPs forward+backward (forward, d hidden,
d weight); the fraction is against the measured matmul rate. Reference rows time plain matmuls
of the same shape in the same run: three (what materialising the logits costs, the floor of a
loss whose gradient is known in the forward) and four (a fused kernel that recomputes the logits
in the backward).
"""
from __future__ import annotations

import torch

import r1kernels
from bench.common import Row, measure_ceilings, median_time, print_table, save, try_case
from bench.logprobs import SHAPES, measure, optional, our_backends, phase_rows
from r1kernels.naive import naive_logprobs


def naive_linear_logprobs(hidden, weight, targets):
    return naive_logprobs(hidden @ weight.T, targets)


def matmul_reference(device, n, h, v, dtype, count):
    """Median seconds of ``count`` [N,H]x[H,V]-sized matmuls: logits, (recomputed logits,) d hidden, d weight."""
    hidden = torch.randn(n, h, device=device, dtype=dtype)
    weight = torch.randn(v, h, device=device, dtype=dtype)

    def matmuls():
        logits = hidden @ weight.T
        for _ in range(count - 3):
            logits = hidden @ weight.T
        logits @ weight
        logits.T @ hidden

    with torch.no_grad():
        return median_time(matmuls, device)


def run(device: torch.device, quick: bool = False) -> list[Row]:
    s = SHAPES[device.type]
    n, h, v, dtype = s["tokens"], s["hidden"], s["vocab"], s["dtype"]
    ceilings = measure_ceilings(device, dtype)
    targets = torch.randint(0, v, (n,), device=device)

    def linear_inputs():
        hidden = torch.randn(n, h, device=device, dtype=dtype).requires_grad_()
        weight = (torch.randn(v, h, device=device, dtype=dtype) * h ** -0.5).requires_grad_()
        return hidden, weight, targets

    impls = {f"ours linear_token_logprobs [{b}]": (b, lambda x, w, t: r1kernels.linear_token_logprobs(x, w, t))
             for b in our_backends("linear_logprobs", device)}
    impls["naive matmul + log_softmax + gather"] = (None, naive_linear_logprobs)
    if not quick:
        impls["torch.compile(naive)"] = (None, torch.compile(naive_linear_logprobs))
    cce = optional("cut_cross_entropy", "linear_cross_entropy")
    if cce is not None and device.type == "cuda":
        impls["cut-cross-entropy (reduction=none)"] = (None, lambda x, w, t: -cce(x, w, t, reduction="none"))
    shape = f"N={n} H={h} V={v} {str(dtype)[6:]}"
    flops = 2 * n * h * v
    rows = phase_rows(measure(impls, linear_inputs, device, quick), shape, flops, 3 * flops, ceilings.matmul_flops,
                      "matmul")
    for count, goal in ((3, "the floor when the gradient is known in the forward"),
                        (4, "a fused kernel that recomputes the logits")):
        seconds, note = try_case(lambda count=count: matmul_reference(device, n, h, v, dtype, count))
        rows.append(Row(f"reference: {count} matmuls [N,H]x[H,V]", shape, seconds, None, count * flops,
                        ceilings.matmul_flops, note or goal, "fwd+bwd", "matmul"))
    print_table("linear", rows, ceilings)
    print("fraction: vs measured matmul rate (2NHV FLOPs forward, 6NHV useful forward+backward)")
    print("wrote", save("linear", rows, ceilings, device, quick=quick))
    return rows
