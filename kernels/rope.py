"""Fused rotary positional embedding (rotate-half convention) for q and k in one launch.

Algorithm: out[..., :D/2] = x1 * cos - x2 * sin, out[..., D/2:] = x2 * cos + x1 * sin, computed in fp32. The backward
is the same rotation by the opposite angle (sin negated), so one kernel serves both directions.
Layout: q (B, T, H, D), k (B, T, Hkv, D) with any strides (views of a fused qkv projection need no copy); cos/sin
(T, D/2) fp32. Each program rotates a tile of BLOCK_T tokens of one head of q or k: grid (T / BLOCK_T, H + Hkv, B).
Limits: any even D, fp32 / fp16 / bf16; outputs are contiguous (B, T, heads, D) in the input dtype. cos and sin are
not differentiated (they are position tables, not parameters).
"""

import os

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def store_cast(x, ptr, ROUND_BF16: tl.constexpr):
    """Cast fp32 `x` to the element type of `ptr`, rounding to nearest even.

    The interpreter truncates fp32 -> bf16 (a GPU rounds), so with ROUND_BF16 the value is first rounded to the bf16
    grid with integer ops, which makes the interpreter's cast exact.
    """
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _rotate_tile(
    x_ptr,
    o_ptr,
    stride_xt,
    stride_xd,
    stride_ot,
    cos,
    sin,
    offs_t,
    offs_d,
    mask,
    HALF: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # x/o point at (b, 0, head, 0); cos/sin are the (BLOCK_T, BLOCK_HALF) fp32 tables of this token tile.
    x_row = x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
    o_row = o_ptr + offs_t[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_row, store_cast(x1 * cos - x2 * sin, o_ptr, ROUND_BF16), mask=mask)
    tl.store(o_row + HALF, store_cast(x2 * cos + x1 * sin, o_ptr, ROUND_BF16), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    cos_ptr,
    sin_ptr,
    T,
    H,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_qob,
    stride_qot,
    stride_qoh,
    stride_kob,
    stride_kot,
    stride_koh,
    stride_ct,
    stride_st,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INVERSE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # q: (B, T, H, D), k: (B, T, Hkv, D) any strides; qo/ko: contiguous outputs of the same shapes (unit last stride);
    # cos/sin: (T, HALF) fp32 with unit last stride. Program (t_tile, head, b); heads >= H are k heads.
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_t < T)[:, None] & (offs_d < HALF)[None, :]
    cos = tl.load(cos_ptr + offs_t[:, None] * stride_ct + offs_d[None, :], mask=mask, other=0.0)
    sin = tl.load(sin_ptr + offs_t[:, None] * stride_st + offs_d[None, :], mask=mask, other=0.0)
    if INVERSE:
        sin = -sin
    if head < H:
        _rotate_tile(
            q_ptr + off_b * stride_qb + head * stride_qh,
            qo_ptr + off_b * stride_qob + head * stride_qoh,
            stride_qt,
            stride_qd,
            stride_qot,
            cos,
            sin,
            offs_t,
            offs_d,
            mask,
            HALF,
            ROUND_BF16,
        )
    else:
        _rotate_tile(
            k_ptr + off_b * stride_kb + (head - H) * stride_kh,
            ko_ptr + off_b * stride_kob + (head - H) * stride_koh,
            stride_kt,
            stride_kd,
            stride_kot,
            cos,
            sin,
            offs_t,
            offs_d,
            mask,
            HALF,
            ROUND_BF16,
        )


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: rotate q and k by +angle (or -angle when `inverse`) into new contiguous tensors."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q_out.numel() == 0 and k_out.numel() == 0:
        return q_out, k_out
    half = D // 2
    block_half = triton.next_power_of_2(half)
    # ~4K elements per half-tile: enough bytes in flight per program on a GPU, few programs in the interpreter.
    block_t = max(16, min(128, 4096 // block_half, triton.next_power_of_2(T)))
    grid = (triton.cdiv(T, block_t), H + Hkv, B)
    _rope_kernel[grid](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        T,
        H,
        *q.stride(),
        *k.stride(),
        *q_out.stride()[:3],
        *k_out.stride()[:3],
        cos.stride(0),
        sin.stride(0),
        HALF=half,
        BLOCK_T=block_t,
        BLOCK_HALF=block_half,
        INVERSE=inverse,
        ROUND_BF16=interpreting() and q.dtype == torch.bfloat16,
        num_warps=4,
    )
    return q_out, k_out


@torch.library.custom_op("nanogpt2::apply_rope", mutates_args=())
def _apply_rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, cos, sin, inverse)


@_apply_rope_op.register_fake
def _(q, k, cos, sin, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _backward(ctx, grad_q, grad_k):
    # The rotation is orthogonal: its vector-Jacobian product is the rotation by the opposite angle.
    cos, sin = ctx.saved_tensors
    grad_q, grad_k = _apply_rope_op(grad_q, grad_k, cos, sin, not ctx.inverse)
    return grad_q, grad_k, None, None, None


_apply_rope_op.register_autograd(_backward, setup_context=_setup_context)


def check_device(*tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors share one device on which Triton can run (CUDA, or CPU when interpreting)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"Triton kernels need CUDA tensors, got device {device}; to run on CPU set TRITON_INTERPRET=1 before "
            "importing kernels (the interpreter is slow: tests only), or use kernels.reference"
        )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positional embedding of q and k in one launch, exactly `kernels.reference.apply_rope_ref`.

    q: (B, T, H, D), k: (B, T, Hkv, D), both of one dtype (fp32, fp16 or bf16) with unit last stride (other strides
    are free: views of a fused qkv projection need no copy); cos, sin: (T, D/2) float32. Returns contiguous rotated
    (q, k) in the input dtype. Differentiable with respect to q and k; cos and sin get no gradient.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, T, heads, D), got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, T={T}, Hkv, D={D}) like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if D % 2 != 0:
        raise ValueError(f"the head dim must be even for rotate-half RoPE, got {D}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one dtype among {_DTYPES}, got {q.dtype} and {k.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, D // 2):
            raise ValueError(f"{name} must be (T, D/2) = ({T}, {D // 2}), got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride, got strides {t.stride()}")
    check_device(q, k, cos, sin)
    return _apply_rope_op(q, k, cos, sin, False)
