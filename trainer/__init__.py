"""A thin GRPO trainer (the DeepSeek-R1 recipe) on r1kernels and PyTorch FSDP2: ``python -m trainer``."""
