"""``python -m bench train``: the trainer's GRPO update with our kernels (packed varlen attention,
fused lm_head + loss) against the same trainer with naive PyTorch (materialised logits) on padded
batches with SDPA. The same fixed rollouts feed both; reports train tokens/s and peak memory
(MFU on GPU). Rollout speed is the generation engine's and is the same for both. On CPU three
shapes: the built-in 82-token vocabulary with short and with long rollouts, and a 32,768-token
vocabulary, where the lm_head is most of the work and the fused loss shows. Ours runs the lm_head on
the completion rows only (prompt and padding positions skipped, as TRL's logits_to_keep does); naive
on every position, prompt and padding included."""
from __future__ import annotations

import tempfile
import time

import torch

from bench.common import Row, measure_ceilings, peak_memory, print_table, save, try_case

TINY = {"name": "builtin-tiny", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 512}
SHAPES = {
    # bf16 parameters (allowed for a throughput measurement) on one GPU, where there is no FSDP to cast
    "cuda": [dict(model={"name": "builtin-1.5b", "dtype": "bfloat16", "allow_bf16_params": True},
                  sequences=512, prompt=(64, 256), completion=(64, 1024))],
    # --quick on a GPU (the GPU check's last step): a Qwen2.5-0.5B-shaped model, fewer and shorter rollouts
    "cuda-quick": [dict(model={"name": "builtin-0.5b", "dtype": "bfloat16", "allow_bf16_params": True},
                        sequences=128, prompt=(64, 256), completion=(64, 512))],
    # CPU: the built-in 82-token vocabulary (the lm_head is negligible: attention, packing and per-micro-batch
    # work decide), with short and long rollouts, and a 32,768-token one (the lm_head dominates)
    "cpu": [dict(model=TINY, sequences=64, prompt=(8, 32), completion=(8, 96)),
            dict(model=TINY, sequences=64, prompt=(8, 32), completion=(64, 512)),
            dict(model=dict(TINY, vocab_size=32768), sequences=64, prompt=(8, 32), completion=(8, 96))],
}
IMPLEMENTATIONS = {
    "ours: packed varlen + fused linear GRPO loss": {"packing": True, "kernels": "r1kernels"},
    "naive: padded SDPA + materialised logits": {"packing": False, "kernels": "naive"},
}


def _update_case(device, s, grpo):
    """(median seconds of one update, peak bytes, tokens, parameters) for one shape and implementation."""
    from trainer.config import from_dict
    from trainer.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict({"model": s["model"], "grpo": dict(grpo, micro_batch_tokens=8192),
                         "checkpoint": {"dir": tmp, "export": False}, "log": {"progress": False}})
        trainer = Trainer(cfg)
        if not grpo["packing"]:
            trainer.model.set_attn_implementation("sdpa")
        vocab = trainer.model.config.vocab_size
        gen = torch.Generator().manual_seed(0)          # the same rollouts for both
        lengths = [(int(torch.randint(*s["prompt"], (1,), generator=gen)),
                    int(torch.randint(*s["completion"], (1,), generator=gen))) for _ in range(s["sequences"])]
        prompts = [torch.randint(8, vocab, (p,), generator=gen).tolist() for p, _ in lengths]
        completions = [torch.randint(8, vocab, (c,), generator=gen).tolist() for _, c in lengths]
        adv = torch.randn(len(lengths), generator=gen).tolist()
        optimizer, scheduler = trainer._optimizer(1e-5, 10, 0, "constant")
        step = lambda: trainer.update(prompts, completions, adv, optimizer, scheduler)  # noqa: E731
        step()                                       # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))
        return sorted(times)[1], peak_memory(step, device), tokens, trainer.n_params


def run(device: torch.device, quick: bool = False) -> list[Row]:
    shapes = SHAPES["cuda-quick" if quick and device.type == "cuda" else device.type]
    ceilings = measure_ceilings(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = []
    for s in shapes:
        vocab = s["model"].get("vocab_size", "built-in")
        label = f"V={vocab}, {s['sequences']} x ({s['completion'][0]}-{s['completion'][1]} new)"
        for name, grpo in IMPLEMENTATIONS.items():
            result, note = try_case(lambda s=s, grpo=grpo: _update_case(device, s, grpo))
            seconds, mem, tokens, params = result or (None, None, 0, 0)
            if seconds:
                note = note or f"{tokens / seconds:,.0f} train tok/s, {tokens} tokens"
            rows.append(Row(name, label, seconds, mem, 6 * params * tokens, ceilings.matmul_flops, note, "update",
                            "matmul"))
    print_table("train (one GRPO update)", rows, ceilings)
    print("fraction: 6 x params x tokens FLOPs (MFU-style) vs the measured matmul rate")
    print("wrote", save("train", rows, ceilings, device, quick=quick))
    return rows
