"""``python -m bench.gpu_build``: the GPU check's build step. Builds the C++ extension in place, then
fails, naming the reason, unless the result has its CUDA kernels: a CPU-only build would otherwise
"pass" and every ``cuda_ext`` test would skip."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = "import torch, r1kernels._C; print(torch.ops.r1k_C.built_with_cuda())"


def why_not_cuda() -> str:
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH: bench/gpu_check.sh asks nvcc)"
    if os.environ.get("R1K_SKIP_CUDA", "0") == "1":
        return "R1K_SKIP_CUDA=1"
    return f"unknown (CUDA_HOME={cpp_extension.CUDA_HOME}); see the build log above"


def main() -> int:
    from torch.utils import cpp_extension

    print(f"CUDA_HOME={os.environ.get('CUDA_HOME')} (torch sees {cpp_extension.CUDA_HOME})", flush=True)
    code = subprocess.call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT)
    if code:
        return code
    built = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True)
    if built.returncode or built.stdout.strip() != "True":
        print(built.stderr.strip())      # the reason comes last: the check's summary quotes the log's last line
        print(f"the extension was built without its CUDA kernels: {why_not_cuda()}", flush=True)
        return 1
    print("the extension has its CUDA kernels", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
