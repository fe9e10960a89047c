"""Rooflines for the benchmarks and the static sm_90 gate: the time a launch implies at the datasheet
peaks (``r1kernels.hardware.PEAKS``, re-exported here with ``DTYPE_KEYS`` and ``peak_for``) and what
one sm_90 SM holds. Benchmarks also measure a ceiling in the same run (bench.common.measure_ceilings).
"""
from __future__ import annotations

from r1kernels.hardware import DTYPE_KEYS, PEAKS, peak_for  # noqa: F401  (this module's API too)

# sm_90 resources per SM and per block (CUDA C Programming Guide, compute capability 9.0)
SM90_REGISTERS_PER_SM = 65536
SM90_REGISTER_UNIT = 256            # registers are allocated per warp in units of 256
SM90_SHARED_PER_SM = 228 * 1024
SM90_SHARED_PER_BLOCK = 227 * 1024  # the most one block may ask for
SM90_SHARED_RESERVED_PER_BLOCK = 1024
SM90_MAX_WARPS_PER_SM = 64
SM90_MAX_BLOCKS_PER_SM = 32


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
