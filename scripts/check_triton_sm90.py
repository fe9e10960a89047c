"""The Hopper static gate: every Triton kernel compiled for sm_90a down to SASS, with no GPU.

The Triton interpreter, which the tests use, runs kernels as NumPy code: it accepts code that the
GPU compiler rejects, and it says nothing about speed. This script calls each launcher of the
package's Triton modules (``triton_sources``: each op's, in its package) with every configuration
the dispatch launches (dtypes, block sizes per head dim, modes), swaps the launch for
``triton.compile(..., target=sm_90a)`` with the specialisation a real call gets (16-byte aligned
pointers, sizes and strides divisible by 16: the tensors here have the divisibility of real model
sizes), and reads the result:

    registers     per thread (cuobjdump -res-usage)
    spill_bytes   stack frame + local memory per thread: registers ptxas spilled (Triton kernels
                  have no local arrays or calls, so nothing else lives there)
    shared_bytes  shared memory per block
    ctas_per_sm   blocks one SM holds at once (registers, shared memory, warps)
    has_dot_lowp  a bf16/fp16 tl.dot in the kernel (TTGIR)
    hmma, hgmma   mma.sync (HMMA) and Hopper warpgroup MMA (HGMMA) instructions in the SASS, and the
                  HGMMA shapes (MxNxK; N is the tile width one instruction covers)
    hgmma_min_n   the narrowest HGMMA N, and hgmma_n_floor what it must reach: 64 (an N = 16 or 32
                  wgmma moves its operands from shared memory for a quarter or half of the work), or the
                  head dim where it is narrower (a [rows, head dim] product cannot be wider)
    stages        the software-pipelining depth the launch asks for (num_stages)
    async_copies  asynchronous global-to-shared copies in the SASS (LDGSTS, cp.async; UTMALDG and
                  UBLKCP, the tensor memory accelerator's): the loads the pipeline overlaps
    fences_in_loop  GPU- or system-scope MEMBARs inside a loop of the SASS (a backward branch)
    flops, hbm_bytes  per launch at the GPU benchmark shape (bench/*.py SHAPES["cuda"]): tensor-core
                  FLOPs (2 per multiply-add) and the bytes the op must move at least (each input read
                  once, each output written once), and the time they imply at H100/H200 peak

``violations()`` states the gate's rules; KNOWN_FAILURES lists the kernels that break one today and
the issue that rewrites them.

Run: python scripts/check_triton_sm90.py [--out-dir bench/results]   (TRITON_INTERPRET must be unset)
It writes sm90-static-triton<version>.{json,md} for the installed Triton; the report of every Triton
the project supports is committed (3.6.0, the GPU machine's, and the newest: `bash
scripts/check_triton_sm90_all.sh` makes both). tests/test_triton_sm90.py regenerates the installed
Triton's and fails when it differs from the committed one or a rule breaks, and fails when another
committed report was made from other inputs (kernel sources, this script, the benchmark shapes:
``inputs_sha256``). Compiles are cached by Triton (~/.triton/cache, keyed by source hash), so only
changed kernels recompile.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from bench import hardware  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MIN_WGMMA_N = 64
TOOLS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# (kernel, rule, configs it applies to: a substring of the config, "" for all) -> why it fails today
# and which issue rewrites it. An entry that no configuration breaks is an error too, so the list
# cannot go stale, and configurations outside an entry's filter stay gated.
KNOWN_FAILURES = {
    ("attention.triton_kernels._r1k_attention_forward", "wgmma_n", "BLOCK_D=256"):
        "head dim 256: the fp32 output tile alone takes 128 registers a thread; beside it only a 32-key score "
        "tile fits without spilling (FlashAttention-3 has 80 keys there, on 240 registers its producer warp frees)",
    ("attention.triton_kernels._r1k_attention_backward_dq", "wgmma_n", "BLOCK_D=256"):
        "head dim 256: as for the forward, the fp32 dQ tile beside a 32-key score tile",
    ("attention.triton_kernels._r1k_attention_backward_dkdv", "wgmma", "BLOCK_D=256"):
        "head dim 256: a tensor-core tile of 64 keys (wgmma's smallest M) with the dK or dV accumulator needs more "
        "than 255 registers and spills 160-200 B; the 32-key tile runs mma.sync (FlashAttention-3 keeps its "
        "score tiles at N = 32 there too)",
    ("attention.triton_kernels._r1k_attention_backward_dkdv", "spills",
     "BLOCK_D=256 EVEN_D=True DOT_FP32=False PRECISION=tf32 warps=8 stages=2 triton=3.6.0"):
        "head dim 256 under Triton 3.6: its ptxas holds the 32-key mma.sync kernel to 128 registers and spills 16 B",
    ("attention.triton_kernels._r1k_attention_backward", "spills", "in=fp32"):
        "fp32 inputs ('ieee' dots on CUDA cores keep both operands in registers); bf16/fp16 is the training path",
    ("attention.triton_kernels._r1k_attention_backward_dkdv", "spills", "in=fp32"):
        "fp32 inputs ('ieee' dots on CUDA cores keep both operands in registers); bf16/fp16 is the training path",
    ("attention.triton_kernels._r1k_attention_forward", "spills", "in=fp32"):
        "fp32 inputs ('ieee' dots on CUDA cores keep both operands in registers); bf16/fp16 is the training path",
    ("logprobs.triton_tile._r1k_linear_logprobs_backward_atomic", "spills", "in=fp32"):
        "issue 11: the fused-tile backward's fp32 tiles; its rewrite re-tiles the kernel",
    ("logprobs.triton_tile._r1k_linear_logprobs_backward_atomic", "wgmma_n", ""):
        "the opt-in fused-tile lm_head (triton_tile): its [64 rows, 64 hidden] products split N across two "
        "warpgroups (N = 32); the default lm_head runs cuBLAS",
    ("logprobs.triton_tile._r1k_linear_logprobs_backward_hidden", "wgmma_n", ""):
        "as for _r1k_linear_logprobs_backward_atomic",
    ("advantages.triton_by_id._r1k_advantages_by_id", "spills",
     "WRITE_STATS=False FIRST_PHASE=0 LAST_PHASE=5 BLOCK=1024 ACC=fp32 WIDE=fp64 warps=4 stages=3 triton=3.6.0"):
        "Triton 3.6's ptxas holds the variant without statistics to 168 registers (the one with them gets 203) "
        "and spills 8 B of the float64 combined rewards; 3.9 does not spill. A latency-bound launch per step",
    ("advantages.triton_by_id._r1k_advantages_by_id", "spills",
     "WRITE_STATS=False FIRST_PHASE=0 LAST_PHASE=5 BLOCK=1024 ACC=fp64 WIDE=fp64 warps=4 stages=3 triton=3.6.0"):
        "as the fp32 variant: 16 B under Triton 3.6's 168-register cap; 3.9 does not spill",
    ("advantages.triton_groups._r1k_advantages_grouped", "spills",
     "LEAVE_ONE_OUT=True SCALE=0 GROUPS_PER_PROGRAM=16 BLOCK=16 ACC=fp64 WIDE=fp64 warps=4 stages=3 triton=3.6.0"):
        "float64 rewards of one column, RLOO: Triton 3.6 spills 8 B (3.9 does not); float64 rewards are a "
        "testing path on GPU",
}


def violations(record: dict) -> list[str]:
    """The gate's rules, by name: what must hold for every configuration the dispatch launches. For a
    bf16/fp16 kernel: "wgmma", every product on warpgroup MMAs, none on mma.sync (HMMA); "wgmma_n",
    none narrower than hgmma_n_floor; "pipelined", at least 2 stages with asynchronous loads."""
    broken = []
    if record["spill_bytes"] > 0:
        broken.append("spills")
    if record["shared_bytes"] > hardware.SM90_SHARED_PER_BLOCK:
        broken.append("shared")
    if record["has_dot_lowp"]:
        if record["hmma"] > 0 or record["hgmma"] == 0:
            broken.append("wgmma")
        elif record["hgmma_min_n"] < record["hgmma_n_floor"]:
            broken.append("wgmma_n")
        if record["stages"] < 2 or record["async_copies"] == 0:
            broken.append("pipelined")
    if record["fences_in_loop"]:          # an ordered atomic in a hot loop: use sem="relaxed" or "acquire"
        broken.append("fences")
    return broken


def known_failure(record: dict, rule: str) -> tuple | None:
    """The KNOWN_FAILURES key that covers this record's breaking ``rule``, if any. An entry's config
    filter is matched against the config followed by ``triton=<version>``, so an entry may name one
    compiler."""
    described = f"{record['config']} triton={record['triton']}"
    for key in KNOWN_FAILURES:
        kernel, known_rule, configs = key
        if kernel == record["kernel"] and known_rule == rule and configs in described:
            return key
    return None


def unexpected_violations(record: dict) -> list[str]:
    return [rule for rule in violations(record) if known_failure(record, rule) is None]


# ---------------------------------------------------------------- collecting launches
launches: list[dict] = []          # one per distinct (kernel, specialisation, options)
_seen: set = set()
_workload: dict = {}               # kernel name -> (flops, hbm_bytes, dot precision, shape text); set by each case


def _dtype_name(dtype: torch.dtype) -> str | None:
    return hardware.DTYPE_KEYS.get(str(dtype).removeprefix("torch."))


def _kernel_name(fn: JITFunction) -> str:
    return f"{fn.__module__.removeprefix('r1kernels.')}.{fn.__name__}"


def _record_launch(self: JITFunction, *args, grid, warmup, **kwargs):
    """Replaces JITFunction.run: binds the arguments exactly as a GPU launch would, records them."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(self.signature, self.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
    float_dtypes = [_dtype_name(v.dtype) for v in bound.values()
                    if isinstance(v, torch.Tensor) and _dtype_name(v.dtype)]
    shown = {p.name: bound[p.name] for p in self.params if p.is_constexpr and bound[p.name] is not None}
    config = " ".join([f"in={float_dtypes[0]}" if float_dtypes else "in=-"]
                      + [f"{k}={v}" for k, v in shown.items()]
                      + [f"warps={options.num_warps}", f"stages={options.num_stages}"])
    name = _kernel_name(self)
    key = (name, config, repr(sorted(signature.items())), repr(sorted(attrs.items())))
    if key in _seen:
        return None
    _seen.add(key)
    flops, hbm_bytes, math, shape = _workload[self.__name__]
    launches.append(dict(kernel=name, config=config, constexprs_shown=shown, module=self.__module__,
                         fn=self.__name__, signature=signature, constexprs=constexprs, attrs=attrs,
                         options=options.__dict__, flops=flops, hbm_bytes=hbm_bytes, math=math, shape=shape))
    return None


def _elt(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _math(dtype: torch.dtype, precision: str) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return _dtype_name(dtype)
    return "tf32" if precision == "tf32" else "fp32"


# ---------------------------------------------------------------- the cases (every dispatched config)
def _logprobs():
    from bench.logprobs import SHAPES
    from r1kernels.logprobs import triton_rows as logprobs
    n, v = SHAPES["cuda"]["tokens"], SHAPES["cuda"]["vocab"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        e, shape = _elt(dtype), f"N={n} V={v}"
        per_row = 8 + 4 * 4                                   # target, logp, entropy, row max, log-sum
        _workload.update(_r1k_logprobs_forward=(0, n * v * e + n * per_row, "fp32", shape),
                         _r1k_logprobs_backward=(0, 2 * n * v * e + n * (per_row + 8), "fp32", shape))
        rows, vocab = 64, 4352           # > 4096 (the BLOCK_V of every real vocab), divisible by 16 like 151936
        logits = torch.zeros(rows, vocab, dtype=dtype)
        targets = torch.zeros(rows, dtype=torch.long)
        logp, entropy, row_max, row_log_sum = logprobs.forward(logits, targets, 1.0)
        grad = torch.zeros(rows)
        for grad_entropy in (None, grad):
            logprobs.backward(logits, targets, row_max, row_log_sum, entropy, grad, grad_entropy, 1.0, logits)


def _linear_logprobs():
    from bench.logprobs import SHAPES
    from r1kernels.logprobs import triton_tile as linear_logprobs
    n, h, v = SHAPES["cuda"]["tokens"], SHAPES["cuda"]["hidden"], SHAPES["cuda"]["vocab"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        e, mm = _elt(dtype), 2 * n * h * v
        math = _math(dtype, linear_logprobs._config(dtype)["PRECISION"])
        shape = f"N={n} H={h} V={v}"
        inputs, per_row = (n * h + v * h) * e, 8 + 4 * 4
        _workload.update(
            _r1k_linear_logprobs_forward=(mm, inputs + n * per_row, math, shape),
            _r1k_linear_logprobs_backward_atomic=(3 * mm, inputs + (n * h + v * h) * 4 + n * (per_row + 8), math,
                                                  shape),
            _r1k_linear_logprobs_backward_hidden=(2 * mm, inputs + n * h * 4 + n * (per_row + 8), math, shape),
            _r1k_linear_logprobs_backward_weight=(2 * mm, inputs + v * h * 4 + n * (per_row + 8), math, shape))
        hidden, weight = torch.zeros(128, 256, dtype=dtype), torch.zeros(1024, 256, dtype=dtype)
        targets = torch.zeros(128, dtype=torch.long)
        grad = torch.zeros(128)
        for bias in (None, torch.zeros(1024, dtype=dtype)):
            logp, entropy, row_max, row_log_sum = linear_logprobs.forward(hidden, weight, bias, targets, 1.0,
                                                                          deterministic=False)
            for deterministic in (False, True):
                for grad_entropy in (None, grad):
                    linear_logprobs.backward(hidden, weight, bias, targets, row_max, row_log_sum, entropy, grad,
                                             grad_entropy, 1.0, deterministic=deterministic,
                                             needs_grad=(True, True, bias is not None))
        # hidden-only backward (a frozen lm_head): the launch flags differ
        linear_logprobs.backward(hidden, weight, None, targets, row_max, row_log_sum, entropy, grad, None, 1.0,
                                 deterministic=False, needs_grad=(True, False, False))


def _attention():
    from bench.attention import SHAPES, _lengths
    from r1kernels.attention import triton_kernels as attention
    s = SHAPES["cuda"]
    lengths = _lengths(s["seqs"], s["min_len"], s["max_len"], torch.Generator().manual_seed(0))
    heads, kv_heads, total = s["heads"], s["kv_heads"], sum(lengths)
    causal_pairs = sum(n * (n + 1) // 2 for n in lengths)
    cu = torch.tensor([0, 48, 128], dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        e = _elt(dtype)
        for head_dim in (128, 96, 64, 256, 32, 16):     # the benchmark's 128 first; 96: a head dim under its tile
            config, _ = attention._config("forward", dtype, head_dim)
            math = _math(dtype, config["PRECISION"])
            one_matmul = 2 * head_dim * heads * causal_pairs           # QK^T or PV over the causal pairs
            q_bytes = total * heads * head_dim * e
            kv_bytes = 2 * total * kv_heads * head_dim * e
            lse_bytes = total * heads * 4
            shape = f"{len(lengths)} seqs {total} tok H={heads}/{kv_heads} D={head_dim} causal"
            # tensor-core work as the kernels do it: the backward's dV pass forms S again (6 GEMMs, 5 in dK/dV)
            _workload.update(
                _r1k_attention_forward=(2 * one_matmul, 2 * q_bytes + kv_bytes + lse_bytes, math, shape),
                _r1k_attention_backward=(6 * one_matmul, 2 * q_bytes + 2 * kv_bytes + 2 * lse_bytes + total * heads
                                         * head_dim * 4, math, shape),        # + the fp32 dQ accumulator's adds
                _r1k_attention_backward_dkdv=(5 * one_matmul, 2 * q_bytes + 2 * kv_bytes + 2 * lse_bytes, math,
                                              shape),
                _r1k_attention_backward_dq=(3 * one_matmul, 3 * q_bytes + kv_bytes + 2 * lse_bytes, math, shape))
            q = torch.zeros(128, 4, head_dim, dtype=dtype)
            kv = torch.zeros(128, 2, head_dim, dtype=dtype)
            for causal, window, softcap in ((True, (-1, -1), 0.0), (False, (32, 0), 30.0)):
                out, lse = attention.forward(q, kv, kv, cu, cu, head_dim ** -0.5, causal, window, softcap)
                delta = torch.zeros(lse.shape, dtype=torch.float32)
                for deterministic in (False, True):
                    attention.backward(out, q, kv, kv, delta, lse, cu, cu, head_dim ** -0.5, causal, window, softcap,
                                       deterministic)


def _advantages():
    from bench.advantages import BATCHES, NUM_REWARDS
    from r1kernels.advantages import triton_groups, triton_by_id
    batch = max(BATCHES)
    shape = f"B={batch} R={NUM_REWARDS}"
    for dtype in (torch.float32, torch.float64):
        e = _elt(dtype)
        rows_bytes = batch * NUM_REWARDS * e + batch * e               # rewards in, advantages out
        _workload.update(_r1k_advantages_grouped=(0, rows_bytes, "fp32", shape),
                         _r1k_advantages_by_id=(0, rows_bytes + batch * 8, "fp32", shape))
        rewards = torch.zeros(256, 3, dtype=dtype)
        weights = torch.ones(3, dtype=dtype)
        ids = torch.zeros(256, dtype=torch.long)
        for scale, denominator in (("group", None), ("batch", torch.ones((), dtype=dtype)), ("none", None)):
            # one unweighted column stays in the accumulation dtype; several columns combine in float64
            for columns, w in ((rewards[:, :1].contiguous(), None), (rewards, None), (rewards, weights)):
                for loo in (False, True):
                    options = dict(leave_one_out=loo, scale=scale, eps=1e-4, batch_denominator=denominator)
                    triton_groups.group_normalize(columns, w, group_size=16, **options)
                    triton_by_id.group_normalize_by_id(columns, w, ids, **options, with_stats=True)
        options = dict(leave_one_out=False, scale="group", eps=1e-4, batch_denominator=None)
        triton_by_id.group_normalize_by_id(rewards, None, ids.int(), **options, with_stats=False)
        triton_by_id.group_normalize_by_id(rewards, weights, None, **options, with_stats=True, group_size=128)


CASES = (_logprobs, _linear_logprobs, _attention, _advantages)


# ---------------------------------------------------------------- compiling and reading the SASS
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")
_GPU_FENCE = re.compile(r"\bMEMBAR\.\S*(?:GPU|SYS)\b")
_LOWP_DOT = re.compile(r"(?:\btt\.dot\b|warp_group_dot\b)(?!_wait).*x(?:bf16|f16)[,>]")
_HMMA = re.compile(r"\bHMMA\.")
_HGMMA = re.compile(r"\bHGMMA\.(\d+x\d+x\d+)")
_ASYNC_COPY = re.compile(r"\b(?:LDGSTS|UTMALDG|UBLKCP)\b")


def mma_counts(sass: str) -> dict:
    """HMMA (mma.sync) and HGMMA (wgmma) instruction counts, the HGMMA shapes and the asynchronous copies."""
    shapes = _HGMMA.findall(sass)
    return dict(hmma=len(_HMMA.findall(sass)), hgmma=len(shapes),
                hgmma_shapes=sorted(set(shapes), key=lambda m: [int(x) for x in m.split("x")]),
                hgmma_min_n=min((int(m.split("x")[1]) for m in shapes), default=0),
                async_copies=len(_ASYNC_COPY.findall(sass)))


def fences_in_loops(sass: str) -> int:
    """GPU/system-scope MEMBARs that lie inside a loop: between a backward branch and its target."""
    instructions = [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for address, text in instructions:
        branch = _BRANCH.search(text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
    return sum(1 for address, text in instructions
               if _GPU_FENCE.search(text) and any(lo <= address <= hi for lo, hi in loops))


def _resources(cubin_path: str) -> dict:
    out = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True,
                         check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", out.split("Function", 1)[1]))
    return dict(registers=int(fields["REG"]), spill_bytes=int(fields["STACK"]) + int(fields["LOCAL"]))


def _compile(index: int) -> dict:
    spec = launches[index]
    module = __import__(spec["module"], fromlist=[spec["fn"]])
    fn = getattr(module, spec["fn"])
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, spec["signature"], spec["constexprs"], spec["attrs"]), target=TARGET,
                            options=spec["options"])
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        resources = _resources(f.name)
        sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    num_warps = spec["options"]["num_warps"]
    shared = kernel.metadata.shared
    record = dict(kernel=spec["kernel"], config=spec["config"], **resources, shared_bytes=shared,
                  ctas_per_sm=hardware.ctas_per_sm(resources["registers"], num_warps, shared),
                  has_dot_lowp=bool(_LOWP_DOT.search(kernel.asm["ttgir"])), **mma_counts(sass),
                  hgmma_n_floor=min(MIN_WGMMA_N, spec["constexprs_shown"].get("BLOCK_D", MIN_WGMMA_N)),
                  stages=spec["options"]["num_stages"],
                  fences_in_loop=fences_in_loops(sass), flops=spec["flops"], hbm_bytes=spec["hbm_bytes"],
                  benchmark_shape=spec["shape"], math=spec["math"], triton=triton.__version__)
    for gpu, peaks in hardware.PEAKS.items():
        seconds_at_peak = hardware.implied_seconds(spec["flops"], spec["hbm_bytes"], spec["math"], peaks)
        record[f"{gpu.split()[0].lower()}_us"] = round(seconds_at_peak * 1e6, 1)
    record["compile_seconds"] = seconds
    return record


def collect() -> list[dict]:
    """Compile every dispatched configuration (two processes) and return the records, sorted."""
    saved_run = JITFunction.run
    JITFunction.run = _record_launch
    try:
        for case in CASES:
            case()
    finally:
        JITFunction.run = saved_run
    context = multiprocessing.get_context("fork")         # workers inherit ``launches``
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 4)),
                                                mp_context=context) as pool:
        records = list(pool.map(_compile, range(len(launches))))
    return sorted(records, key=lambda r: (r["kernel"], r["config"]))


def triton_sources() -> list[pathlib.Path]:
    """Every module of the package that defines a Triton kernel or jitted helper, each op's beside it."""
    return sorted(p for p in (ROOT / "r1kernels").rglob("*.py") if "@triton.jit" in p.read_text())


def inputs_sha256() -> str:
    """What the records depend on besides the compiler: the kernel sources, this script, the benchmark
    shapes the roofline columns use and the datasheet peaks. A committed report made from other inputs
    is stale."""
    from bench.advantages import BATCHES, NUM_REWARDS
    from bench.attention import SHAPES as ATTENTION
    from bench.logprobs import SHAPES as LOGPROBS

    digest = hashlib.sha256()
    for path in triton_sources() + [pathlib.Path(__file__).resolve()]:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    shapes = [LOGPROBS["cuda"], ATTENTION["cuda"], list(BATCHES), NUM_REWARDS, hardware.PEAKS]
    digest.update(json.dumps(shapes, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def report_name(version: str) -> str:
    return f"sm90-static-triton{version}"


def markdown(records: list[dict]) -> str:
    lines = [
        f"# sm_90a static gate, triton {triton.__version__}: every Triton kernel configuration the dispatch launches",
        "",
        f"Generated by `python scripts/check_triton_sm90.py` with triton {triton.__version__}, no GPU: compiled "
        "for sm_90a with a real call's specialisation, read from ptxas resources and the SASS. Rules (tested): "
        "no spills; shared memory <= 227 KB; a bf16/fp16 kernel's products are all wgmma (HGMMA), none mma.sync "
        "(HMMA), none narrower than N = 64 (or the head dim, where narrower: the floor), at least 2 stages with "
        "asynchronous loads; no GPU-scope fence inside a loop. Async copies: LDGSTS (cp.async), UTMALDG/UBLKCP "
        "(TMA). "
        "Roofline: tensor-core FLOPs and the bytes the op must move at least, at the GPU benchmark shape, as "
        "time at datasheet peak (`bench/hardware.py`); an estimate, not a measurement.",
        "",
        "| kernel | config | regs | spill B | smem KB | CTAs/SM | lowp dot | HMMA | HGMMA | HGMMA shapes "
        "| min N (floor) | stages | async copies | fences in loop | GFLOP | GB | H100 us | H200 us | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        broken, unexpected = violations(r), unexpected_violations(r)
        gate = "FAIL: " + ", ".join(unexpected) if unexpected else ("known: " + ", ".join(broken) if broken else "ok")
        lines.append(f"| {r['kernel']} | {r['config']} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['shared_bytes'] / 1024:.1f} | {r['ctas_per_sm']} | {'yes' if r['has_dot_lowp'] else 'no'} | "
                     f"{r['hmma']} | {r['hgmma']} | {' '.join(r['hgmma_shapes']) or '-'} | "
                     f"{r['hgmma_min_n'] or '-'} ({r['hgmma_n_floor']}) | {r['stages']} | {r['async_copies']} | "
                     f"{r['fences_in_loop']} | {r['flops'] / 1e9:.0f} | "
                     f"{r['hbm_bytes'] / 1e9:.2f} | {r['h100_us']} | {r['h200_us']} | {gate} |")
    lines += ["", "Benchmark shapes: " + "; ".join(sorted({f"{r['kernel'].split('.')[0]}: {r['benchmark_shape']}"
                                                           for r in records})), "", "Known failures:"]
    lines += [f"- `{kernel}` ({rule}{', ' + configs if configs else ''}): {why}"
              for (kernel, rule, configs), why in sorted(KNOWN_FAILURES.items())]
    return "\n".join(lines) + "\n"


def write(records: list[dict], out_dir: pathlib.Path) -> pathlib.Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stable = [{k: v for k, v in r.items() if k != "compile_seconds"} for r in records]
    report = dict(triton=triton.__version__, inputs_sha256=inputs_sha256(), records=stable)
    path = out_dir / f"{report_name(triton.__version__)}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(records))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("check_triton_sm90: unset TRITON_INTERPRET (the interpreter does not compile)")
    start = time.perf_counter()
    records = collect()
    path = write(records, args.out_dir)
    failing = 0
    for r in records:
        broken = unexpected_violations(r)
        failing += bool(broken)
        flag = f"  FAIL {','.join(broken)}" if broken else ""
        print(f"  sm_90a {r['kernel']:48s} regs {r['registers']:3d} spill {r['spill_bytes']:4d} "
              f"smem {r['shared_bytes']:6d} hmma {r['hmma']:3d} hgmma {r['hgmma']:3d} fences {r['fences_in_loop']} "
              f"compile {r['compile_seconds']:5.1f} s  {r['config']}{flag}")
    compile_seconds = sorted(r["compile_seconds"] for r in records)
    print(f"check_triton_sm90: {len(records)} kernel variants compiled for sm_90a with triton {triton.__version__} "
          f"in {time.perf_counter() - start:.0f} s (one variant: median {compile_seconds[len(records) // 2]:.1f} s, "
          f"max {compile_seconds[-1]:.1f} s); {failing} break a rule outside KNOWN_FAILURES; wrote {path}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
