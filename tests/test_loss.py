"""nanogpt2/loss.py: the fused linear + cross-entropy against F.cross_entropy on the full logits."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, randomize_residual_projections
from torch.utils._python_dispatch import TorchDispatchMode

from nanogpt2.loss import cross_entropy_of_logits, linear_cross_entropy
from nanogpt2.model import GPT, GPTConfig

# (rows, vocab, padded vocab rows of W, chunk rows): odd row counts, vocabs and row counts not multiples of the chunk
SHAPES = [(1, 7, 7, 4), (17, 53, 64, 8), (113, 97, 97, 32), (255, 129, 192, 64), (64, 50, 50, 64)]


def inputs(N, V, Vp, C=24, dtype=torch.float32, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    W = torch.randn(Vp, C, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[1::ignore_every] = -1  # row 0 always counts
    return h, W, y


def unfused(h, W, y, V):
    return F.cross_entropy((h @ W.T)[:, :V], y, ignore_index=-1)


def loss_and_grads(fn, h, W, dout=0.7):
    loss = fn()
    return (loss.detach(), *torch.autograd.grad(loss * dout, (h, W)))


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-V{}-Vp{}-chunk{}".format(*s))
def test_matches_unfused(shape, dtype, nan_outputs):
    N, V, Vp, chunk = shape
    h, W, y = inputs(N, V, Vp, dtype=dtype)
    ours = loss_and_grads(lambda: linear_cross_entropy(h, W, y, V, chunk_rows=chunk), h, W)
    hd, Wd = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = loss_and_grads(lambda: unfused(hd, Wd, y, V), hd, Wd)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours[1].dtype == ours[2].dtype == dtype
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, a, b in zip(("loss", "grad_h", "grad_W"), ours, ref, strict=True):
        assert max_err(a, b) <= atol, name
    assert (ours[2][V:] == 0).all()  # padded vocab rows are outside the softmax


def test_every_target_ignored_gives_nan_loss_and_zero_grads():
    """Documented behaviour, the same as F.cross_entropy's: the mean over no targets is NaN; no row gets gradient."""
    h, W, y = inputs(9, 11, 16)
    y[:] = -1
    loss, gh, gW = loss_and_grads(lambda: linear_cross_entropy(h, W, y, 11, chunk_rows=4), h, W)
    ref = loss_and_grads(lambda: unfused(h, W, y, 11), h, W)
    assert loss.isnan() and ref[0].isnan()
    assert (gh == 0).all() and (gW == 0).all() and (ref[1] == 0).all() and (ref[2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_underflowing_target_probabilities(dtype):
    """Logits so spread that most targets' softmax underflows (losses of hundreds of nats): the log-sum-exp form keeps
    loss and gradients as exact as the unfused path's, where the log of the softmax would be -inf."""
    N, V, Vp, chunk = 37, 53, 64, 16
    h, W, y = inputs(N, V, Vp, dtype=dtype)
    h = (h.detach() * 60).requires_grad_()
    ours = loss_and_grads(lambda: linear_cross_entropy(h, W, y, V, chunk_rows=chunk), h, W)
    lowp = loss_and_grads(lambda: unfused(h, W, y, V), h, W)
    hd, Wd = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = loss_and_grads(lambda: unfused(hd, Wd, y, V), hd, Wd)
    finfo = torch.finfo(dtype)
    assert ref[0] > -math.log(finfo.tiny), "the test needs targets whose probability underflows"
    for name, a, low, b in zip(("loss", "grad_h", "grad_W"), ours, lowp, ref, strict=True):
        assert max_err(a, b) <= 2 * max_err(low, b) + 10 * finfo.eps, name


def test_without_grad_gives_the_same_loss():
    h, W, y = inputs(37, 53, 64)
    with torch.no_grad():
        no_grad = linear_cross_entropy(h, W, y, 53, chunk_rows=16)
    assert not no_grad.requires_grad
    assert no_grad.item() == linear_cross_entropy(h, W, y, 53, chunk_rows=16).item()
    plain = linear_cross_entropy(h.detach(), W.detach(), y, 53, chunk_rows=16)
    assert plain.item() == no_grad.item() and not plain.requires_grad


def test_autocast_bf16():
    """Matmuls in bf16, softmax and accumulation in fp32: within 2x the unfused autocast loss's error of fp64."""
    h, W, y = inputs(77, 97, 128, C=64, ignore_every=7)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ours = loss_and_grads(lambda: linear_cross_entropy(h, W, y, 97, chunk_rows=32), h, W)
        lowp = loss_and_grads(lambda: unfused(h, W, y, 97).float(), h, W)
    hd, Wd = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = loss_and_grads(lambda: unfused(hd, Wd, y, 97), hd, Wd)
    assert ours[0].dtype == ours[1].dtype == ours[2].dtype == torch.float32
    for name, a, low, b in zip(("loss", "grad_h", "grad_W"), ours, lowp, ref, strict=True):
        assert max_err(a, b) <= 2 * max_err(low, b) + 1e-3, name


def test_torch_compile():
    """The custom op traces with its fake and autograd registrations (aot_eager: no C++ compile, so fast)."""
    h, W, y = inputs(33, 29, 32)
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    ours = loss_and_grads(lambda: compiled(h, W, y, 29, chunk_rows=16), h, W)
    ref = loss_and_grads(lambda: linear_cross_entropy(h, W, y, 29, chunk_rows=16), h, W)
    for a, b in zip(ours, ref, strict=True):
        assert max_err(a, b) <= 1e-6


def test_bad_input():
    h, W, y = inputs(5, 7, 8)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        linear_cross_entropy(h, W, y, 9)
    with pytest.raises(ValueError, match=r"targets must be \(N,\)"):
        linear_cross_entropy(h, W, y[:4], 7)
    with pytest.raises(ValueError, match="h must be"):
        linear_cross_entropy(h, W[:, :3], y, 7)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, W, y, 7, chunk_rows=0)


def test_model_fused_loss_matches_unfused():
    """GPT's (fused) loss and gradients equal those of full logits; padded vocab, an ignored target."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, vocab_pad_multiple=64, block_size=32, n_layer=1, n_head=2, n_embd=32))
    randomize_residual_projections(model)
    model = model.to(DEVICE)
    idx = torch.randint(0, 97, (3, 32), device=DEVICE)
    targets = idx[:, 1:].clone()
    targets[0, 5] = -1
    results = {}
    for fused in (True, False):
        model.zero_grad()
        if fused:
            logits, loss = model(idx[:, :-1], targets)
            assert logits is None
        else:
            loss = cross_entropy_of_logits(model(idx[:, :-1])[0], targets, 97)
        loss.backward()
        results[fused] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert abs(results[True][0] - results[False][0]) <= 1e-5
    for name, grad in results[False][1].items():
        assert max_err(results[True][1][name], grad) <= 1e-6, name
    assert model(idx)[0].shape == (3, 32, 128)  # without targets: the logits, as before


def test_backward_fills_no_zeros():
    """The op's grad_h and grad_W outputs are never differentiated: the backward gets no zero-filled gradients for
    them (a W-sized memset per micro-batch at GPT-2's size), only scales the saved gradients."""

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    h, W, y = inputs(37, 53, 64)
    loss = linear_cross_entropy(h, W, y, 53, chunk_rows=16)
    with Ops() as ops:
        loss.backward()
    assert not {"zeros", "zeros_like", "new_zeros", "zero_", "fill_"} & set(ops.names), ops.names
    assert "mul" in ops.names and h.grad is not None and W.grad is not None
