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


@pytest.mark.parametrize(
    "B, T, H, Hkv, D, dtype",
    [(2, 37, 4, 2, 64, torch.float32), (1, 70, 6, 3, 32, torch.bfloat16), (2, 20, 2, 1, 128, torch.float16)],
)
def test_matches_hugging_face_llama(B, T, H, Hkv, D, dtype):
    """Against a RoPE nobody here wrote: transformers' Llama `apply_rotary_pos_emb` (rotate-half, the reference
    Liger's tests use), on the model's own tables, outputs and gradients. HF's layout is (B, heads, T, D) with
    full-width cos/sin (B, T, D) = cat(freqs, freqs) per position; ours is (B, T, heads, D) with (T, D/2) tables."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from nanogpt2.model import rope_cos_sin

    q, k = make_qk(B, T, H, Hkv, D, dtype, "qkv")
    cos, sin = rope_cos_sin(torch.arange(T, device=DEVICE), D, 10000.0)
    assert cos.shape == sin.shape == (T, D // 2) and cos.dtype == torch.float32

    def hf_rope(q, k, cos, sin):
        cos, sin = (torch.cat([t, t], dim=-1)[None].expand(B, T, D) for t in (cos, sin))  # (B, T, D)
        q_rot, k_rot = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=1)
        return q_rot.transpose(1, 2), k_rot.transpose(1, 2)  # back to (B, T, heads, D)

    dq_rot, dk_rot = torch.randn_like(q), torch.randn_like(k)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    hf = rope_and_grads(hf_rope, q64, k64, cos.double(), sin.double(), dq_rot.double(), dk_rot.double())
    # HF in the input dtype, as Llama runs it (its rotary embedding casts the tables to q's dtype).
    hf_lowp = rope_and_grads(hf_rope, q, k, cos.to(dtype), sin.to(dtype), dq_rot, dk_rot)
    got = rope_and_grads(apply_rope, q, k, cos, sin, dq_rot, dk_rot)
    ours_ref = rope_and_grads(apply_rope_ref, q64, k64, cos.double(), sin.double(), dq_rot.double(), dk_rot.double())
    for name, g, r, r_lowp, mine in zip(("q", "k", "dq", "dk"), got, hf, hf_lowp, ours_ref, strict=True):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert_matches_ref(g, r, r_lowp)
        torch.testing.assert_close(mine, r, msg=f"apply_rope_ref differs from HF in float64 ({name})")


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


@pytest.mark.parametrize(
    "change, message",  # the arguments that differ from a valid call, from its (q, k, cos, sin); what the message names
    [
        pytest.param(
            lambda q, k, cos, sin: dict(q=q[..., :31], k=k[..., :31], cos=cos[:, :15], sin=sin[:, :15]),
            "got 31",
            id="odd head dim",
        ),
        pytest.param(lambda q, k, cos, sin: dict(k=k[..., :16]), r"\(1, 8, 2, 16\)", id="k head dim differs"),
        pytest.param(lambda q, k, cos, sin: dict(k=k[:, :7]), r"\(1, 7, 2, 32\)", id="k length differs"),
        pytest.param(lambda q, k, cos, sin: dict(q=q[0]), r"\(8, 4, 32\)", id="3-D q"),
        pytest.param(lambda q, k, cos, sin: dict(k=k.half()), "torch.float16", id="dtype mismatch"),
        pytest.param(lambda q, k, cos, sin: dict(q=q.double(), k=k.double()), "torch.float64", id="float64"),
        pytest.param(lambda q, k, cos, sin: dict(cos=cos[:7]), r"got \(7, 16\)", id="cos shape"),
        pytest.param(lambda q, k, cos, sin: dict(sin=sin.half()), "torch.float16", id="sin dtype"),
        pytest.param(
            lambda q, k, cos, sin: dict(q=torch.randn(1, 8, 4, 64, device=DEVICE)[..., ::2]),
            r"strides \(2048, 256, 64, 2\)",
            id="last stride 2",
        ),
        pytest.param(lambda q, k, cos, sin: dict(k=k.to("meta")), "meta", id="device mismatch"),
    ],
)
def test_rejects_bad_inputs(change, message):
    q, k = (t.detach() for t in make_qk(1, 8, 4, 2, 32, torch.float32, "contiguous"))
    cos, sin = rope_tables(8, 32)
    with pytest.raises(ValueError, match=message):
        apply_rope(**dict(q=q, k=k, cos=cos, sin=sin) | change(q, k, cos, sin))


def test_rejects_cpu_tensors_without_the_interpreter(monkeypatch):
    q, k = (t.detach().cpu() for t in make_qk(1, 8, 4, 2, 32, torch.float32, "contiguous"))
    cos, sin = (t.cpu() for t in rope_tables(8, 32))
    monkeypatch.setattr(nanogpt2.kernels._utils, "INTERPRET", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        apply_rope(q, k, cos, sin)
