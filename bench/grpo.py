"""``python -m bench grpo``: the GRPO loss forward+backward, ours against its peers.

Work counted: 6NHV FLOPs (forward matmul, d hidden, d weight) for the fused-linear losses,
against the measured matmul rate. Peak memory is above the inputs (gradients included); the goal
lines compare time and the memory beyond the gradients with torch.compile(naive) and Liger.
``R1K_BENCH_ONLY="<implementation>"`` times one implementation alone in a fresh process (and
writes no JSON), so that no peer's allocations or threads colour its numbers.
"""
from __future__ import annotations

import importlib
import os

import torch

import r1kernels
from bench.common import Row, measure_ceilings, median_time, peak_memory, print_table, save, try_case
from bench.logprobs import our_backends
from r1kernels.naive import naive_logprobs

# vocabularies: the CPU run sweeps three for the chart; the GPU check keeps to Qwen2.5's (its time budget)
SHAPES = {
    "cuda": dict(batch=16, length=1024, hidden=4096, vocabs=(151936,), dtype=torch.bfloat16, repeats=5),
    "cpu": dict(batch=4, length=1024, hidden=512, vocabs=(8192, 32768, 65536), dtype=torch.float32, repeats=3),
}
OPTIONS = dict(loss_type="grpo", beta=0.04, epsilon_low=0.2, epsilon_high=0.2)


def _liger_linear():
    try:
        module = importlib.import_module("liger_kernel.chunked_loss")
    except ImportError:
        return None
    return getattr(module, "LigerFusedLinearGRPOLoss", None)


def run(device: torch.device, quick: bool = False) -> list[Row]:
    s = SHAPES[device.type]
    ceilings = measure_ceilings(device, s["dtype"])
    only = os.environ.get("R1K_BENCH_ONLY")          # one implementation alone in this process
    rows = []
    for vocab in s["vocabs"]:
        rows += _run_vocab(device, s, vocab, ceilings, quick, only)
    print_table("grpo", rows, ceilings)
    print("peak memory: above inputs, gradients included; fraction: 6NHV FLOPs vs measured matmul rate")
    if not only:                                    # a partial run does not overwrite the full table
        print("wrote", save("grpo", rows, ceilings, device, quick=quick))
    return rows


def _run_vocab(device, s, v, ceilings, quick, only) -> list[Row]:
    """Every implementation at one vocabulary size."""
    b, t, h, dtype = s["batch"], s["length"], s["hidden"], s["dtype"]
    n = b * t
    g = torch.Generator(device="cpu").manual_seed(0)
    targets = torch.randint(0, v, (b, t), generator=g).to(device)
    mask = torch.ones(b, t, device=device)
    mask[:, t * 3 // 4:] = 0                      # a quarter of the tokens are padding
    adv = torch.randn(b, generator=g).to(device)
    old = (-torch.rand(b, t, generator=g) * 5).to(device)
    ref = old + 0.05 * torch.randn(b, t, generator=g).to(device)
    hidden = torch.randn(b, t, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).to(device, dtype).requires_grad_()

    def ours(backend):
        def loss():
            with r1kernels.use_backend(backend):
                return r1kernels.linear_grpo_loss(hidden, weight, targets, adv, mask, old_logprobs=old,
                                                  ref_logprobs=ref, **OPTIONS).loss
        return loss

    def naive():
        logp = naive_logprobs((hidden @ weight.T).view(n, v), targets.view(n)).view(b, t)
        return r1kernels.policy_loss(logp, adv, mask, old_logprobs=old, ref_logprobs=ref, **OPTIONS).loss

    impls = {f"ours linear_grpo_loss [{be}]": ours(be) for be in our_backends("linear_logprobs", device)}
    impls["naive: TRL formula on materialised logits"] = naive
    if not quick:
        impls["torch.compile(naive)"] = torch.compile(naive)
    liger_cls = _liger_linear()
    if liger_cls is not None:
        liger = liger_cls(beta=0.04, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, compiled=False,
                          use_ref_model=True)
        impls["Liger LigerFusedLinearGRPOLoss"] = lambda: liger(hidden, weight, targets, mask, adv,
                                                                ref_per_token_logps=ref,
                                                                old_per_token_logps=old)[0]
        if device.type == "cuda" and not quick:
            liger_compiled = liger_cls(beta=0.04, loss_type="grpo", compiled=True, use_ref_model=True)
            impls["Liger LigerFusedLinearGRPOLoss (compiled)"] = lambda: liger_compiled(
                hidden, weight, targets, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    if only:
        impls = {name: fn for name, fn in impls.items() if name == only}
    rows = []
    shape = f"B={b} T={t} H={h} V={v} {str(dtype)[6:]}"
    for name, loss_fn in impls.items():
        def step(loss_fn=loss_fn):
            hidden.grad = weight.grad = None
            loss_fn().backward()

        def case(step=step):
            seconds = median_time(step, device, warmup=1, repeats=3 if quick else s["repeats"])
            hidden.grad = weight.grad = None
            return seconds, peak_memory(step, device)

        result, note = try_case(case)
        seconds, mem = result or (None, None)
        rows.append(Row(name, shape, seconds, mem, 6 * n * h * v, ceilings.matmul_flops, note, "fwd+bwd", "matmul"))
    print_goals(rows, grad_bytes=(hidden.numel() + weight.numel()) * hidden.element_size())
    return rows


GOALS = {"torch.compile(naive)": (1.1, 0.1), "Liger LigerFusedLinearGRPOLoss": (0.8, 0.5)}   # time, memory


def print_goals(rows: list[Row], grad_bytes: int) -> None:
    """Each of our rows against the peers the goals name: time ratio, and the ratio of memory
    beyond the inputs and the gradients."""
    peers = {r.name: r for r in rows if r.name in GOALS and r.seconds}
    for ours in (r for r in rows if r.name.startswith("ours") and r.seconds):
        for name, (time_goal, memory_goal) in GOALS.items():
            if name not in peers:
                continue
            peer = peers[name]
            beyond, peer_beyond = ours.peak_bytes - grad_bytes, peer.peak_bytes - grad_bytes
            print(f"{ours.name}: {ours.seconds / peer.seconds:.2f}x the time of {name} (goal <= {time_goal}), "
                  f"{beyond / 2**20:.0f} MiB beyond gradients = {beyond / peer_beyond:.2f}x its "
                  f"{peer_beyond / 2**20:.0f} MiB (goal <= {memory_goal})")
