"""Triton kernels for the hot paths of a GPT: fused RoPE and flash attention (causal, GQA, sliding window)."""

from kernels.attention import SUPPORTED_HEAD_DIMS, flash_attention
from kernels.rope import apply_rope

__all__ = ["SUPPORTED_HEAD_DIMS", "apply_rope", "flash_attention"]
