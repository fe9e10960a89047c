"""``python -m bench.gpu_env``: what the GPU check ran on (first step of bench/gpu_check.sh).
The last line is the one-line summary the check's report quotes."""
import importlib.util
import platform
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
          f"Python {platform.python_version()}; peers: {', '.join(peers) or 'none'}")


if __name__ == "__main__":
    main()
