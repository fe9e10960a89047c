"""What the machine can do and what this process holds: the one home of these facts for the library,
the trainer and the benchmarks.

``PEAKS``: dense (no sparsity) tensor-core rates and HBM bandwidth from NVIDIA's H100 SXM5 and H200 SXM
datasheets. Both chips have the same SMs and clocks, so the same FLOP/s; the H200 has faster and larger
HBM3e. fp32 without tensor cores is the "ieee" dot precision our fp32 kernels ask for. The trainer's
MFU and the benchmarks' rooflines quote them; benchmarks also measure a ceiling in the same run.
"""
from __future__ import annotations

PEAKS = {
    "H100 SXM": dict(bf16=989.4e12, fp16=989.4e12, tf32=494.7e12, fp32=66.9e12, hbm_bytes_per_s=3.35e12),
    "H200": dict(bf16=989.4e12, fp16=989.4e12, tf32=494.7e12, fp32=66.9e12, hbm_bytes_per_s=4.8e12),
}

# torch dtype name -> the PEAKS key of its math
DTYPE_KEYS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def peak_for(gpu_name: str) -> tuple[str, dict] | None:
    """The PEAKS entry whose key names this device (``torch.cuda.get_device_name``), or None."""
    for key, peaks in PEAKS.items():
        if key.split()[0] in gpu_name:
            return key, peaks
    return None


def proc_status_bytes(key: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes; 0 where there is none (not
    Linux). The one reader of these numbers: the benchmarks, the trainer's peak and the tests' probe."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
