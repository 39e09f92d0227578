"""Triton RoPE against the float64 reference: outputs and gradients of q and k, GQA, strided views, bad inputs."""

import pytest
import torch
from helpers import DEVICE, assert_matches_ref

import nanogpt2.kernels._utils
from nanogpt2.kernels import apply_rope
from nanogpt2.kernels.reference import apply_rope_ref

pytestmark = pytest.mark.usefixtures("nan_outputs")


def make_qk(B, T, H, Hkv, D, dtype, layout):
    """Random q (B, T, H, D) and k (B, T, Hkv, D) leaves: views of a fused qkv projection, transposes of
    (B, heads, T, D) tensors, or contiguous tensors."""
    if layout == "qkv":
        fused = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEVICE, dtype=dtype)
        q, k, _ = fused.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k = q.view(B, T, H, D), k.view(B, T, Hkv, D)
    elif layout == "bhtd":
        q = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype)
        k = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=dtype)
    return q.detach().requires_grad_(), k.detach().requires_grad_()


def rope_tables(T, D, base=10000.0):
    """cos, sin (T, D/2) float32 for positions 0..T-1 (large angles included, as at long context)."""
    inv_freq = base ** -(torch.arange(D // 2, device=DEVICE, dtype=torch.float32) / (D // 2))
    angles = torch.arange(T, device=DEVICE, dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    return angles.cos(), angles.sin()


def rope_and_grads(fn, q, k, cos, sin, dq_rot, dk_rot):
    q_rot, k_rot = fn(q, k, cos, sin)
    return (q_rot, k_rot, *torch.autograd.grad((q_rot, k_rot), (q, k), (dq_rot, dk_rot)))


@pytest.mark.parametrize(
    "B, T, H, Hkv, D, dtype, layout",
    [
        (2, 1, 4, 4, 64, torch.float32, "contiguous"),
        (2, 17, 4, 2, 32, torch.bfloat16, "qkv"),
        (1, 113, 6, 1, 16, torch.float16, "qkv"),
        (1, 255, 4, 4, 128, torch.bfloat16, "bhtd"),
        (2, 300, 3, 1, 64, torch.float32, "qkv"),
        (1, 33, 6, 3, 48, torch.bfloat16, "contiguous"),
    ],
)
def test_matches_reference(B, T, H, Hkv, D, dtype, layout):
    q, k = make_qk(B, T, H, Hkv, D, dtype, layout)
    cos, sin = rope_tables(T, D)
    dq_rot, dk_rot = torch.randn_like(q), torch.randn_like(k)
    got = rope_and_grads(apply_rope, q, k, cos, sin, dq_rot, dk_rot)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = rope_and_grads(apply_rope_ref, q64, k64, cos.double(), sin.double(), dq_rot.double(), dk_rot.double())
    ref_lowp = rope_and_grads(apply_rope_ref, q, k, cos, sin, dq_rot, dk_rot)
    for g, r, r_lowp in zip(got, ref, ref_lowp, strict=True):
        assert g.shape == r.shape and g.dtype == dtype
        assert_matches_ref(g, r, r_lowp)


def test_batch_beyond_one_grid_runs_in_slices(monkeypatch):
    """More sequences than a CUDA grid axis holds: the batch is rotated in slices, with the same results."""
    q, k = make_qk(5, 9, 4, 2, 32, torch.float32, "contiguous")
    cos, sin = rope_tables(9, 32)
    whole = apply_rope(q, k, cos, sin)
    monkeypatch.setattr(nanogpt2.kernels._utils, "MAX_GRID_Y", 2)
    sliced = apply_rope(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced, strict=True))
    grads = [torch.autograd.grad(out, (q, k), torch.ones_like(out)) for out in (whole[0], sliced[0])]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_rejects_bad_inputs(monkeypatch):
    q, k = (t.detach() for t in make_qk(1, 8, 4, 2, 32, torch.float32, "contiguous"))
    cos, sin = rope_tables(8, 32)
    bad = {  # case: (arguments, what the message must name)
        "odd head dim": (dict(q=q[..., :31], k=k[..., :31], cos=cos[:, :15], sin=sin[:, :15]), "got 31"),
        "k head dim differs": (dict(k=k[..., :16]), r"\(1, 8, 2, 16\)"),
        "k length differs": (dict(k=k[:, :7]), r"\(1, 7, 2, 32\)"),
        "3-D q": (dict(q=q[0]), r"\(8, 4, 32\)"),
        "dtype mismatch": (dict(k=k.half()), "torch.float16"),
        "float64": (dict(q=q.double(), k=k.double()), "torch.float64"),
        "cos shape": (dict(cos=cos[:7]), r"got \(7, 16\)"),
        "sin dtype": (dict(sin=sin.half()), "torch.float16"),
        "last stride 2": (dict(q=torch.randn(1, 8, 4, 64, device=DEVICE)[..., ::2]), r"strides \(2048, 256, 64, 2\)"),
        "device mismatch": (dict(k=k.to("meta")), "meta"),
    }
    for case, (kwargs, message) in bad.items():
        args = dict(q=q, k=k, cos=cos, sin=sin) | kwargs
        with pytest.raises(ValueError, match=message):
            apply_rope(**args)
            pytest.fail(f"accepted {case}")
    monkeypatch.setattr(nanogpt2.kernels._utils, "INTERPRET", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        apply_rope(q.cpu(), k.cpu(), cos.cpu(), sin.cpu())
