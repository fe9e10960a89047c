"""Triton kernels (the main GPU path). Under TRITON_INTERPRET=1 they run on CPU tensors."""
