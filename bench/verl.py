"""``python -m bench verl``: the log-prob + entropy head verl's actor runs with use_fused_kernels, ours
(``linear_token_logprobs``, what r1kernels.integrations.verl puts there) against verl's own
``FusedLinearForPPO`` (its torch backend, chunks of 512 tokens; verl's default), at a 32k and a 152k
vocabulary. Forward, and forward+backward of log p + entropy (both gradients, as an entropy bonus
asks). verl pins transformers < 5.11: run it with verl's environment,
``$(bash scripts/verl_env.sh) -m bench verl``; without verl only our rows are timed.

Matmul-bound: 2NHV FLOPs forward, 6NHV useful forward+backward; the fraction is against the measured
matmul rate.
"""
from __future__ import annotations

import torch

import r1kernels
from bench.common import measure_ceilings, print_table, save
from bench.logprobs import measure, optional, our_backends, phase_rows

SHAPES = {
    "cuda": dict(tokens=16384, hidden=4096, dtype=torch.bfloat16),
    "cpu": dict(tokens=512, hidden=512, dtype=torch.float32),
}
VOCABS = (32768, 151936)        # Llama-style 32k, Qwen2.5's 152k
TEMPERATURE = 0.7


def run(device: torch.device, quick: bool = False):
    s = SHAPES[device.type]
    n, h, dtype = s["tokens"], s["hidden"], s["dtype"]
    ceilings = measure_ceilings(device, dtype)
    verl_head = optional("verl.utils.experimental.torch_functional", "FusedLinearForPPO")
    rows = []
    for v in VOCABS:
        targets = torch.randint(0, v, (n,), device=device)

        def inputs(v=v, targets=targets):
            hidden = torch.randn(n, h, device=device, dtype=dtype).requires_grad_()
            weight = (torch.randn(v, h, device=device, dtype=dtype) * h ** -0.5).requires_grad_()
            return hidden, weight, targets

        def ours(x, w, t):
            logp, entropy = r1kernels.linear_token_logprobs(x, w, t, temperature=TEMPERATURE, return_entropy=True)
            return logp + entropy

        impls = {f"ours linear_token_logprobs [{b}]": (b, ours) for b in our_backends("linear_logprobs", device)}
        if verl_head is not None:
            head = verl_head(impl_backend="torch")

            def verl_torch(x, w, t, head=head):
                logp, entropy = head(x, w, t, TEMPERATURE)
                return logp + entropy

            impls["verl FusedLinearForPPO [torch]"] = (None, verl_torch)
        flops = 2 * n * h * v
        rows += phase_rows(measure(impls, inputs, device, quick), f"N={n} H={h} V={v} {str(dtype)[6:]}", flops,
                           3 * flops, ceilings.matmul_flops, "matmul")
    print_table("verl", rows, ceilings)
    if verl_head is None:
        print("verl is not installed here: run $(bash scripts/verl_env.sh) -m bench verl for its rows")
    print("fraction: vs measured matmul rate (2NHV FLOPs forward, 6NHV useful forward+backward)")
    print("wrote", save("verl", rows, ceilings, device, quick=quick))
    return rows
