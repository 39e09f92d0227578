"""Triton kernels for the hot paths of a GPT: fused RoPE and flash attention (causal, GQA, sliding window)."""

from nanogpt2.kernels.attention import SUPPORTED_HEAD_DIMS, flash_attention, flash_attention_packed
from nanogpt2.kernels.rope import apply_rope

__all__ = ["SUPPORTED_HEAD_DIMS", "apply_rope", "flash_attention", "flash_attention_packed"]
