"""Triton kernels for the hot paths of a GPT: fused RoPE and flash attention (causal, GQA, sliding window)."""
