"""Datasheet peaks of the GPUs we report against: the one home for these numbers.

Dense (no sparsity) tensor-core rates and HBM bandwidth from NVIDIA's H100 SXM5 and H200 SXM
datasheets. Both chips have the same SMs and clocks, so the same FLOP/s; the H200 has faster and
larger HBM3e. fp32 without tensor cores is the "ieee" dot precision our fp32 kernels ask for.
Benchmarks also measure a ceiling in the same run (bench.common.measure_ceilings); these are the
numbers a roofline quotes, and the static sm_90 gate uses them for the time a launch implies.
"""
from __future__ import annotations

PEAKS = {
    "H100 SXM": dict(bf16=989.4e12, fp16=989.4e12, tf32=494.7e12, fp32=66.9e12, hbm_bytes_per_s=3.35e12),
    "H200": dict(bf16=989.4e12, fp16=989.4e12, tf32=494.7e12, fp32=66.9e12, hbm_bytes_per_s=4.8e12),
}

# torch dtype name -> the PEAKS key of its math
DTYPE_KEYS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}

# sm_90 resources per SM and per block (CUDA C Programming Guide, compute capability 9.0)
SM90_REGISTERS_PER_SM = 65536
SM90_REGISTER_UNIT = 256            # registers are allocated per warp in units of 256
SM90_SHARED_PER_SM = 228 * 1024
SM90_SHARED_PER_BLOCK = 227 * 1024  # the most one block may ask for
SM90_SHARED_RESERVED_PER_BLOCK = 1024
SM90_MAX_WARPS_PER_SM = 64
SM90_MAX_BLOCKS_PER_SM = 32


def peak_for(gpu_name: str) -> tuple[str, dict] | None:
    """The PEAKS entry whose key names this device (``torch.cuda.get_device_name``), or None."""
    for key, peaks in PEAKS.items():
        if key.split()[0] in gpu_name:
            return key, peaks
    return None


def implied_seconds(flops: float, hbm_bytes: float, math: str, peaks: dict) -> float:
    """Roofline time: the larger of the compute time at the dot precision's peak and the HBM time."""
    compute = flops / peaks[math] if flops else 0.0
    return max(compute, hbm_bytes / peaks["hbm_bytes_per_s"])


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Blocks of this kernel one sm_90 SM can hold at once (registers, shared memory, warps)."""
    per_warp = -(-registers * 32 // SM90_REGISTER_UNIT) * SM90_REGISTER_UNIT
    by_registers = SM90_REGISTERS_PER_SM // max(per_warp * num_warps, 1)
    by_shared = SM90_SHARED_PER_SM // (shared_bytes + SM90_SHARED_RESERVED_PER_BLOCK)
    by_warps = SM90_MAX_WARPS_PER_SM // num_warps
    return min(by_registers, by_shared, by_warps, SM90_MAX_BLOCKS_PER_SM)
