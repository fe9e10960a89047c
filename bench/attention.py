"""``python -m bench attention``: varlen attention on a GRPO-like packed batch.

Workload: 8 completions of random lengths packed into one row (512..8,192 tokens, GQA 32/8,
head dim 128, bf16 on GPU; 16..512 tokens, 4/2 heads, head dim 64, fp32 on CPU), causal. FLOPs
count only the unmasked work of each sequence: forward 4 * D * H * sum_s L_s (L_s + 1) / 2,
backward 2.5x that (the FlashAttention convention), against the measured matmul rate (and the
datasheet peak on GPU). Rows: fwd, bwd = (fwd+bwd) - fwd, and fwd+bwd. Peers: flash-attn varlen
(FA2, and FA3 where installed), FlexAttention with a document mask, SDPA one sequence at a time
with its flash and its cuDNN backend (GPU), SDPA on the padded batch.
"""
from __future__ import annotations

import torch

import r1kernels
from bench.common import Row, measure_ceilings, median_time, print_table, save, try_case
from bench.logprobs import optional, our_backends

SHAPES = {
    "cuda": dict(seqs=8, min_len=512, max_len=8192, heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16),
    "cpu": dict(seqs=8, min_len=16, max_len=512, heads=4, kv_heads=2, head_dim=64, dtype=torch.float32),
}


def _lengths(seqs, lo, hi, gen):
    return torch.randint(lo, hi + 1, (seqs,), generator=gen).tolist()


def run(device: torch.device, quick: bool = False) -> list[Row]:
    s = SHAPES[device.type]
    dtype, heads, kv_heads, d = s["dtype"], s["heads"], s["kv_heads"], s["head_dim"]
    ceilings = measure_ceilings(device, dtype)
    lengths = _lengths(s["seqs"], s["min_len"], s["max_len"], torch.Generator().manual_seed(0))
    total, max_len = sum(lengths), max(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor(lengths, device=device).cumsum(0)
    q = torch.randn(total, heads, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(total, kv_heads, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(total, kv_heads, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(q)
    fwd_flops = 4 * d * heads * sum(n * (n + 1) // 2 for n in lengths)

    def ours(backend, deterministic=False):
        def f():
            with r1kernels.use_backend(backend):
                return r1kernels.varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=True,
                                                  deterministic=deterministic)
        return f

    impls = {}
    for backend in our_backends("attention", device):
        impls[f"ours varlen_attention [{backend}]"] = ours(backend)
    if device.type == "cuda":    # dQ by its own kernel (8 GEMMs) rather than atomic adds (6)
        impls["ours varlen_attention [triton, deterministic]"] = ours("triton", deterministic=True)
    fa2 = optional("flash_attn", "flash_attn_varlen_func")
    if fa2 is not None and device.type == "cuda":
        impls["flash-attn 2 varlen"] = lambda: fa2(q, k, v, cu, cu, max_len, max_len, causal=True)
    fa3 = optional("flash_attn_interface", "flash_attn_varlen_func")
    if fa3 is not None and device.type == "cuda":
        impls["flash-attn 3 varlen"] = lambda: fa3(q, k, v, cu, cu, max_len, max_len, causal=True)

    flex = optional("torch.nn.attention.flex_attention", "flex_attention")
    if flex is not None and device.type == "cuda" and not quick:     # compiles for minutes
        from torch.nn.attention.flex_attention import create_block_mask
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))

        def doc_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        block_mask = create_block_mask(doc_causal, None, None, total, total, device=device)
        flex_compiled = torch.compile(flex)
        impls["FlexAttention (document mask)"] = lambda: flex_compiled(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask,
            enable_gqa=heads != kv_heads)[0].transpose(0, 1)

    def sdpa_padded():
        # right padding + causal: a valid query only ever sees valid keys, so is_causal is exact
        def pad(x):
            out = x.new_zeros(len(lengths), max_len, x.shape[1], d)
            for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
                out[i, : b - a] = x[a:b]
            return out.transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True,
                                                               enable_gqa=heads != kv_heads)
        out = out.transpose(1, 2)
        return torch.cat([out[i, :n] for i, n in enumerate(lengths)])

    impls["SDPA on the padded batch"] = sdpa_padded

    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        group = heads // kv_heads

        def sdpa_per_sequence(backend):
            def f():   # GQA by repeating K and V heads (SDPA's flash and cuDNN kernels take equal heads)
                outs = []
                with sdpa_kernel(backend):
                    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
                        kk = k[a:b].repeat_interleave(group, 1).transpose(0, 1)
                        vv = v[a:b].repeat_interleave(group, 1).transpose(0, 1)
                        outs.append(torch.nn.functional.scaled_dot_product_attention(
                            q[a:b].transpose(0, 1)[None], kk[None], vv[None], is_causal=True)[0].transpose(0, 1))
                return torch.cat(outs)
            return f

        impls["SDPA per sequence (flash)"] = sdpa_per_sequence(SDPBackend.FLASH_ATTENTION)
        impls["SDPA per sequence (cuDNN)"] = sdpa_per_sequence(SDPBackend.CUDNN_ATTENTION)

    rows = []
    shape = f"{len(lengths)} seqs, {total} tok, H={heads}/{kv_heads} D={d}"
    for name, fn in impls.items():
        def case(fn=fn):
            def fwd():
                with torch.no_grad():
                    fn()

            def fwd_bwd():
                q.grad = k.grad = v.grad = None
                torch.autograd.backward(fn(), grad)

            repeats = dict(warmup=1, repeats=3) if quick else dict(warmup=2, repeats=5)
            t_fwd = median_time(fwd, device, **repeats)
            t_both = median_time(fwd_bwd, device, **repeats)
            return t_fwd, t_both

        result, note = try_case(case)
        t_fwd, t_both = result or (None, None)
        rows.append(Row(name, shape, t_fwd, None, fwd_flops, ceilings.matmul_flops, note, "fwd", "matmul"))
        t_bwd = None if t_fwd is None or t_both is None else max(t_both - t_fwd, 1e-9)
        rows.append(Row(name, shape, t_bwd, None, 2.5 * fwd_flops, ceilings.matmul_flops, note, "bwd", "matmul"))
        rows.append(Row(name, shape, t_both, None, 3.5 * fwd_flops, ceilings.matmul_flops, note, "fwd+bwd",
                        "matmul"))
    print_table("attention", rows, ceilings)
    print("FLOPs: unmasked work only (causal within each sequence); bwd = (fwd+bwd) - fwd")
    print("wrote", save("attention", rows, ceilings, device, quick=quick))
    return rows
