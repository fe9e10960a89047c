"""Builds the C++ extension r1kernels._C from csrc/ with ninja through torch's extension tools.

torch must already be installed (install it first, then ``pip install --no-build-isolation``):
an isolated build would download the newest CUDA torch just to compile against it.
R1K_SKIP_EXTENSION=1 skips the extension (the package then runs on the torch backend).
CUDA sources join when torch has CUDA and nvcc is found (R1K_SKIP_CUDA=1 leaves them out).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    if os.environ.get("R1K_SKIP_EXTENSION", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:  # pragma: no cover - exercised only by a broken install
        raise RuntimeError("install torch before r1kernels, then pip install --no-build-isolation .") from err

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/bindings.cpp") + rel("csrc/cpu/*.cpp")
    include = [os.path.join(ROOT, "csrc", "include")]
    # -fno-trapping-math: we never read FP exception flags, and without it GCC will not if-convert
    # (so not vectorise) the CPU row kernels' selects. -ffp-contract=off: a fused multiply-add of
    # z = logits * inv_t into z - max would skip the rounding of z that the row's max saw, an error of
    # ulp(z) in every log-prob (1e-4 relative at logits of 1e4); the kernels write their FMAs explicitly
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"]
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("R1K_SKIP_CUDA", "0") != "1")
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is None:
        print(f"warning: torch has CUDA {torch.version.cuda} but no CUDA toolkit was found (set CUDA_HOME): "
              "building the CPU kernels only", flush=True)
    if with_cuda:
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
        ext = cpp_extension.CUDAExtension(
            "r1kernels._C", sources + rel("csrc/cuda/*.cu"), include_dirs=include,
            define_macros=[("R1K_WITH_CUDA", None)], extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("r1kernels._C", sources, include_dirs=include,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
