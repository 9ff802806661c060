"""liger_kernels: exact fused Triton kernels for LLM training (needs only torch and triton)."""

__version__ = "0.1.0"
