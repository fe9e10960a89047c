"""``python -m bench.gpu_env``: what the GPU check ran on (first step of bench/gpu_check.sh).
The last line is the one-line summary the check's report quotes."""
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess

import torch


def main() -> None:
    try:
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.TimeoutExpired) as err:
        print("nvidia-smi:", err)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    peers = [name for name in ("flash_attn", "flash_attn_interface", "liger_kernel", "cut_cross_entropy", "vllm")
             if importlib.util.find_spec(name) is not None]
    gpu = "no CUDA device"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    print(f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
          f"Python {platform.python_version()}, setuptools {_version('setuptools')}, ninja {_version('ninja')}, "
          f"nvcc {_nvcc()} (CUDA_HOME {os.environ.get('CUDA_HOME', 'unset')}); "
          f"peers: {', '.join(peers) or 'none'}")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _nvcc() -> str:
    """The release nvcc reports ("13.0"), or why there is none: the extension's CUDA build needs it."""
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"absent ({type(err).__name__})"
    found = re.search(r"release ([\d.]+)", out)
    return found.group(1) if found else "unknown"


if __name__ == "__main__":
    main()
