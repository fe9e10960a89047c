"""Triton helpers shared by the ops' kernels (each op's Triton kernels live in its own package).
Under TRITON_INTERPRET=1 they run on CPU tensors."""
