"""The one tile matmul every Triton kernel uses: ``tl.dot`` on the GPU, an exact stand-in under
the interpreter."""
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, INTERPRETING: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b for tiles a [M, K], b [K, N], fp32 accumulation (``acc`` may be None).

    Under TRITON_INTERPRET=1 the product is a broadcast multiply in fp32 summed over K in order:
    the interpreter's own dot goes through numpy's BLAS, which is wrong for bf16 (a known Triton
    bug) and, on some CPUs (OpenBLAS on AMD EPYC), not bitwise independent of a row's position in
    the tile, which the batch-invariance tests rely on.
    """
    if INTERPRETING:
        product = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        if acc is None:
            return product
        return acc + product
    return tl.dot(a, b, acc, input_precision=PRECISION)
