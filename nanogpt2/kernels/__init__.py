"""Triton kernels for the hot paths of a GPT: fused RoPE and flash attention (causal, GQA, sliding window).

The public names load their modules, and with them Triton, on first use: `nanogpt2.kernels.reference` (the plain
PyTorch path a CPU run takes) imports without them, which keeps a CPU process's start-up half a second shorter.
"""

import importlib

_HOMES = {
    "SUPPORTED_HEAD_DIMS": "attention",
    "flash_attention": "attention",
    "flash_attention_packed": "attention",
    "apply_rope": "rope",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
