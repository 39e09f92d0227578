"""What the kernel files share: the interpreter decision, the dtype table, CUDA's grid limit, input checks, the TMA
allocator and the small @triton.jit helpers for loads and stores.

INTERPRET is read once, when `nanogpt2.kernels` is imported, as Triton itself decides at decoration time whether
a @triton.jit function runs compiled or in its CPU interpreter: set TRITON_INTERPRET=1 before importing
`nanogpt2.kernels`.
"""

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second axis, which holds the batch (times the heads)
# Offsets of whole sequences, heads and tiles are 64-bit; offsets inside a tile of up to 128 rows are 32-bit.
MAX_ROW_STRIDE = 2**31 // 128


def check_device(*tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors share one device on which Triton can run (CUDA, or CPU when interpreting)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"Triton kernels need CUDA tensors, got device {device}; to run on CPU set TRITON_INTERPRET=1 before "
            "importing nanogpt2.kernels (the interpreter is slow: tests only), or use nanogpt2.kernels.reference"
        )


def check_inputs(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless the named (B, T, heads, D) tensors share one dtype of DTYPES and one usable device, and
    each has a unit last stride (the other strides are free)."""
    values = tensors.values()
    dtype = next(iter(values)).dtype
    for t in values:
        if t.dim() != 4:
            shapes = ", ".join(str(tuple(t.shape)) for t in values)
            raise ValueError(f"{', '.join(tensors)} must be (B, T, heads, D), got {shapes}")
        if t.dtype != dtype or dtype not in DTYPES:
            got = ", ".join(str(t.dtype) for t in values)
            raise ValueError(f"{', '.join(tensors)} must share one dtype among {DTYPES}, got {got}")
    for name, t in tensors.items():
        strides = t.stride()
        if strides[3] != 1:
            raise ValueError(f"{name} must have a unit last stride, got strides {strides}")
        if strides[1] >= MAX_ROW_STRIDE:
            raise ValueError(
                f"{name} has a row (T) stride of {t.stride(1)} elements; the kernels take up to {MAX_ROW_STRIDE - 1} "
                "(offsets inside a tile are 32-bit): pass a (B, T, heads, D)-contiguous tensor"
            )


def check_unit_last_stride(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless each named tensor has a unit last stride."""
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride, got strides {t.stride()}")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (triton.cdiv costs microseconds per call on triton >= 3.9)."""
    return -(-a // b)


def tma_compatible(tensors: Sequence[torch.Tensor], aligned: Sequence[bool]) -> bool:
    """Whether TMA tensor descriptors can address these (..., D) tensors, given whether each starts 16-byte aligned:
    every stride but the unit last one a multiple of 16 bytes (true of the model's fused-qkv views at any even head
    count x D >= 8)."""
    return all(aligned) and all(
        t.stride(-1) == 1 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in tensors
    )


def _torch_allocator(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def set_tma_allocator() -> None:
    """Give Triton the global-memory allocator that on-device TMA descriptors need (a few bytes per program).

    Triton keeps it in a ContextVar, which autograd's backward thread does not inherit: call before every launch of
    a kernel that builds descriptors. A user's own allocator is left in place.
    """
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)  # a private ContextVar (triton 3.4-3.9): set if unknown
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_allocator)


@triton.jit
def maybe_upcast(x, UPCAST: tl.constexpr):
    """fp32 copy of x in the interpreter, which cannot compute in bf16; a GPU keeps the dtype for tensor-core dots."""
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def store_cast(x, ptr, ROUND_BF16: tl.constexpr):
    """Cast fp32 `x` to the element type of the pointer `ptr`, rounding to nearest even.

    The interpreter truncates fp32 -> bf16 (a GPU rounds), so with ROUND_BF16 the value is first rounded to the bf16
    grid with integer ops, which makes the interpreter's cast exact.
    """
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)
