"""Fused rotary positional embedding (rotate-half convention) for q and k in one launch.

Algorithm: out[..., :D/2] = x1 * cos - x2 * sin, out[..., D/2:] = x2 * cos + x1 * sin, computed in fp32. The backward
is the same rotation by the opposite angle (sin negated), so one kernel serves both directions.
Layout: q (B, T, H, D), k (B, T, Hkv, D) with unit last stride, other strides free (views of a fused qkv projection
need no copy); cos/sin (T, D/2) fp32. Each program rotates all heads of a tile of BLOCK_T tokens of q or of k (grid
(T / BLOCK_T, B, 2)), reading the tile's cos/sin once for all of them. Offsets are 64-bit where they can pass 2^31.
Limits: any even D, fp32 / fp16 / bf16; outputs are contiguous (B, T, heads, D) in the input dtype. cos and sin are
not differentiated (they are position tables, not parameters).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanogpt2.kernels import _utils, launcher
from nanogpt2.kernels._utils import store_cast


@triton.jit
def _rotate_tile(
    x_ptr, o_ptr, n_heads, stride_xt, stride_xh, stride_ot, stride_oh, cos, sin, offs_t, offs_h, offs_d, T,
    HALF: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    # x/o point at (b, t0, 0, 0) of a (T - t0, n_heads, 2 * HALF) slab with unit last stride; offs_t counts from t0;
    # cos/sin are (BLOCK_T, 1, BLOCK_HALF) fp32. Head offsets are 64-bit: heads can lie T * D apart.
    mask = (offs_t < T)[:, None, None] & (offs_h < n_heads)[None, :, None] & (offs_d < HALF)[None, None, :]
    heads = offs_h.to(tl.int64)[None, :, None]
    x = x_ptr + (offs_t[:, None, None] * stride_xt + offs_d[None, None, :]) + heads * stride_xh
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    o = o_ptr + (offs_t[:, None, None] * stride_ot + offs_d[None, None, :]) + heads * stride_oh
    tl.store(o, store_cast(x1 * cos - x2 * sin, o_ptr, ROUND_BF16), mask=mask)
    tl.store(o + HALF, store_cast(x2 * cos + x1 * sin, o_ptr, ROUND_BF16), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, H, HKV,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_qob, stride_qot, stride_qoh, stride_kob, stride_kot, stride_koh, stride_ct, stride_st,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    INVERSE: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    # q: (B, T, H, D), k: (B, T, HKV, D) with unit last strides; qo/ko: contiguous outputs of the same shapes;
    # cos/sin: (T, HALF) fp32 with unit last stride. Program (token tile, b, 0 for q / 1 for k) rotates all heads of
    # its token tile: one (BLOCK_T, BLOCK_H, BLOCK_HALF) tile per half, so the cos/sin tile is read once for every
    # head. The tile's first token is a 64-bit offset; offsets inside the tile stay 32-bit.
    t0 = tl.program_id(0) * BLOCK_T
    off_b = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (t0 + offs_t < T)[:, None] & (offs_d < HALF)[None, :]
    cos = tl.load(cos_ptr + (t0 + offs_t)[:, None] * stride_ct + offs_d[None, :], mask=mask, other=0.0)[:, None, :]
    sin = tl.load(sin_ptr + (t0 + offs_t)[:, None] * stride_st + offs_d[None, :], mask=mask, other=0.0)[:, None, :]
    if INVERSE:
        sin = -sin
    t0_64 = t0.to(tl.int64)
    if tl.program_id(2) == 0:
        _rotate_tile(
            q_ptr + off_b * stride_qb + t0_64 * stride_qt, qo_ptr + off_b * stride_qob + t0_64 * stride_qot, H,
            stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin, offs_t, offs_h, offs_d, T - t0, HALF, ROUND_BF16,
        )  # fmt: skip
    else:
        _rotate_tile(
            k_ptr + off_b * stride_kb + t0_64 * stride_kt, ko_ptr + off_b * stride_kob + t0_64 * stride_kot, HKV,
            stride_kt, stride_kh, stride_kot, stride_koh, cos, sin, offs_t, offs_h, offs_d, T - t0, HALF, ROUND_BF16,
        )  # fmt: skip


class _Blocks(NamedTuple):
    """The kernel's one config for a shape: token tile, head and half-dim tile widths (powers of 2)."""

    block_t: int
    block_h: int
    block_half: int

    def meta(self) -> dict:
        return {"BLOCK_T": self.block_t, "BLOCK_H": self.block_h, "BLOCK_HALF": self.block_half, "num_warps": 4}


def _blocks(T: int, H: int, Hkv: int, D: int) -> _Blocks:
    block_half = triton.next_power_of_2(D // 2)
    block_h = triton.next_power_of_2(max(H, Hkv))
    # ~4K elements per half-tile (all heads of BLOCK_T tokens): bytes in flight on a GPU, few interpreter programs.
    return _Blocks(max(2, min(64, 4096 // (block_h * block_half), triton.next_power_of_2(T))), block_h, block_half)


def rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, traced: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by +angle (or -angle when `inverse`) into new contiguous tensors, in one launch (inputs
    checked by the caller; `traced`: see launcher.launch)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q_out.numel() == 0 and k_out.numel() == 0:
        return q_out, k_out
    key = ("rope", q.device, q.dtype, q.shape, k.shape, q.stride(), k.stride(), cos.stride(), sin.stride(), inverse,
           launcher.aligned((q, k, cos, sin), traced))  # fmt: skip

    def setup() -> launcher.Launch:
        strides = (*q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3])
        return launcher.Launch(
            lambda blocks: (_utils.cdiv(T, blocks.block_t), B, 2),
            (T, H, Hkv, *strides, cos.stride(0), sin.stride(0)),
            {"HALF": D // 2, "INVERSE": inverse, "ROUND_BF16": _utils.INTERPRET and q.dtype == torch.bfloat16},
            [_blocks(T, H, Hkv, D)],
        )

    launcher.launch(_rope_kernel, key, (q, k, q_out, k_out, cos, sin), setup, traced=traced)
    return q_out, k_out


class _Rope(torch.autograd.Function):
    """Eager RoPE: the backward is the rotation by the opposite angle (the rotation is orthogonal)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return *rotate(grad_q, grad_k, cos, sin, True), None, None


@launcher.traceable_op(
    "nanogpt2::rope", fake=lambda q, k, cos, sin, inverse: (q.new_empty(q.shape), k.new_empty(k.shape))
)
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return rotate(q, k, cos, sin, inverse, traced=True)


def _rope_op_backward(ctx, grad_q, grad_k):
    return *_rope_op(grad_q, grad_k, *ctx.saved_tensors, True), None, None, None


def _rope_op_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


_rope_op.register_autograd(_rope_op_backward, setup_context=_rope_op_setup)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positional embedding of q and k in one launch, exactly `nanogpt2.kernels.reference.apply_rope_ref`.

    q: (B, T, H, D), k: (B, T, Hkv, D), both of one dtype (fp32, fp16 or bf16) with unit last stride (other strides
    are free: views of a fused qkv projection need no copy); cos, sin: (T, D/2) float32. Returns contiguous rotated
    (q, k) in the input dtype. Differentiable with respect to q and k; cos and sin get no gradient.
    """
    check_rope_inputs(q, k, cos, sin)
    rows = _utils.MAX_GRID_Y
    if q.shape[0] > rows:  # more sequences than one launch's grid holds: rotate the batch in slices
        rotated = [apply_rope(q[i : i + rows], k[i : i + rows], cos, sin) for i in range(0, q.shape[0], rows)]
        return torch.cat([qr for qr, _ in rotated]), torch.cat([kr for _, kr in rotated])
    if torch.compiler.is_compiling():
        return _rope_op(q, k, cos, sin, False)
    return _Rope.apply(q, k, cos, sin)


def check_rope_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """ValueError unless q (B, T, H, D), k (B, T, Hkv, D) and cos, sin (T, D/2) fp32 suit the kernel."""
    _utils.check_inputs(q=q, k=k)
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, T={T}, Hkv, D={D}) like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if D % 2 != 0:
        raise ValueError(f"the head dim must be even for rotate-half RoPE, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, D // 2):
            raise ValueError(f"{name} must be (T, D/2) = ({T}, {D // 2}), got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
    _utils.check_unit_last_stride(cos=cos, sin=sin)
    _utils.check_device(q, k, cos, sin)
