"""Fused linear + cross-entropy: the mean cross-entropy of `h @ W.T` without ever holding the full logits.

- Rows of h are taken in chunks; a chunk's logits (chunk, padded vocab) go through one in-place log-softmax (the
  log-sum-exp form: z - max - log sum exp(z - max), which has no underflow case), whose value at the target is the
  loss (-log p). Since d(mean CE)/d(logits) = (softmax - onehot) / n, the chunk's gradients for h and W are computed
  right there in the forward (as Liger-Kernel does) from exp(log-softmax), so the backward only scales them by the
  incoming grad. Nothing in it depends on the data's values on the host: no sync.
- The matmuls run over all of W's rows (the padded vocabulary, e.g. 50,304 = 64 x 786 for GPT-2: aligned widths);
  padding columns are set to -inf before the softmax, so they are never in it and their rows of W get an exact zero
  gradient from the same matmul. Matmuls run in the compute dtype (autocast's), softmax, loss and grad_W
  accumulation in float32.
- One chunk buffer is reused for every chunk: on CPU a fresh 200 MB tensor costs as much again as its matmul in page
  faults. Three matmuls per chunk, the same FLOPs as the unfused loss, no (rows, vocab) gradient, and no zero-filled
  gradients for the op's unused outputs in the backward (`set_materialize_grads(False)`).
- Limits: targets < 0 are ignored; with every target ignored the loss is NaN and the gradients are zero, as
  `F.cross_entropy` gives.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 1024  # measured on a 2-core CPU (nano preset, 4096 rows): smaller chunks slow the matmuls down


def _log_softmax(z: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """The log-softmax of z's rows in buffer's dtype (float32 or wider). On CPU it is written into `buffer`, which may
    be z itself (the kernel reads each row whole before writing it, so aliasing is safe there): a fresh 200 MB tensor
    costs a page-fault pass there. Elsewhere one kernel reads z in its own dtype into a fresh tensor (allocation is
    cheap, and in-place aliasing is not promised by the kernels)."""
    if z.device.type != "cpu":
        return torch.log_softmax(z, dim=1, dtype=buffer.dtype)
    if buffer is not z:
        buffer.copy_(z)
    return torch._log_softmax(buffer, 1, False, out=buffer)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (+)= a @ b without a temporary, or through one when out is wider than a and b (autocast)."""
    if out.dtype != a.dtype:
        out.add_(a @ b) if accumulate else out.copy_(a @ b)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


@torch.library.custom_op("nanogpt2::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    h: torch.Tensor,
    W: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk_rows: int,
    compute_dtype: torch.dtype,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_h, grad_W): the gradients for a loss gradient of 1, or empty tensors without with_grad."""
    N = h.shape[0]
    acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # softmax, loss and grad_W accumulation
    valid = targets >= 0  # (N,)
    n = valid.sum()
    weight = valid.to(acc_dtype) / n.clamp(min=1)  # (N,) each row's share of the mean; 0 for ignored rows
    safe_targets = targets.clamp(min=0)
    rows = torch.arange(min(chunk_rows, N), device=h.device)
    Wc = W.to(compute_dtype)  # (Vp, C) every row, padding included; a no-op without autocast
    hc = h.to(compute_dtype)  # (N, C)
    # h of the valid rows, unweighted: 1/n is applied once below in acc_dtype, since in fp16 it would flush small
    # products to zero before any loss scaling could save them.
    hv = (h * valid[:, None]).to(compute_dtype) if with_grad else None  # (N, C)
    logits = torch.empty(len(rows), W.shape[0], dtype=compute_dtype, device=h.device)  # reused by every chunk
    wide = acc_dtype != compute_dtype and h.device.type == "cpu"  # CPU under autocast: a float32 buffer as well
    logits_acc = torch.empty_like(logits, dtype=acc_dtype) if wide else logits
    logp = torch.empty(N, dtype=acc_dtype, device=h.device)  # (N,) log-probability of each row's target
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format) if with_grad else h.new_empty(0)
    grad_W = torch.empty(W.shape, dtype=acc_dtype, device=W.device) if with_grad else W.new_empty(0)
    for start in range(0, N, chunk_rows):
        end = min(start + chunk_rows, N)
        r, t, w = rows[: end - start], safe_targets[start:end], weight[start:end]
        z = torch.mm(hc[start:end], Wc.t(), out=logits[: end - start])  # (n, Vp)
        z[:, vocab_size:].fill_(-torch.inf)  # padding: exp(-inf) = 0, outside the softmax
        lp = _log_softmax(z, logits_acc[: end - start])  # (n, Vp) in acc_dtype
        logp[start:end] = lp[r, t]
        if not with_grad:
            continue
        p = torch.exp(lp, out=logits[: end - start])  # softmax, in the compute dtype (in place for a float32 z)
        # softmax - onehot at the targets, from float32 before rounding (softmax near 1 would lose its difference);
        # 1/n and the ignored rows are folded into the small factors below.
        p[r, t] = (logp[start:end].exp() - 1.0).to(p.dtype)
        torch.mul(p @ Wc, w[:, None], out=grad_h[start:end])  # the row weights applied in acc_dtype, rounded once
        _mm_into(grad_W, p.t(), hv[start:end], accumulate=start > 0)
    if with_grad:
        grad_W /= n.clamp(min=1)
    loss = -(logp * weight).sum()
    loss = torch.where(n > 0, loss, torch.nan)  # every target ignored: NaN, as F.cross_entropy gives
    return loss, grad_h, grad_W.to(W.dtype)


@_linear_cross_entropy_op.register_fake
def _(h, W, targets, vocab_size, chunk_rows, compute_dtype, with_grad):
    loss = h.new_empty((), dtype=torch.promote_types(compute_dtype, torch.float32))
    return (loss, h.new_empty(h.shape), W.new_empty(W.shape)) if with_grad else (loss, h.new_empty(0), W.new_empty(0))


def _setup_context(ctx, inputs, output):
    ctx.with_grad = inputs[-1]
    ctx.set_materialize_grads(False)  # grad_h and grad_W are outputs nobody differentiates: no zero-filled grads
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_loss, _grad_h, _grad_W):
    if not ctx.with_grad:
        raise RuntimeError("linear_cross_entropy was run without gradients (no_grad or no input requiring grad)")
    grad_h, grad_W = ctx.saved_tensors
    return grad_h * grad_loss.to(grad_h.dtype), grad_W * grad_loss.to(grad_W.dtype), None, None, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    h: torch.Tensor,
    W: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the logits `h @ W[:vocab_size].T` against targets, computed chunk by chunk.

    h: (N, C) float; W: (V_padded, C) (the tied embedding, padded vocab rows allowed); targets: (N,) int, < 0 ignored;
    vocab_size: the columns in the softmax (default: all of W's rows); chunk_rows: default CHUNK_ROWS. Returns a float32
    scalar (float64 for float64 inputs), equal to
    `F.cross_entropy((h @ W.T)[:, :vocab_size].float(), targets, ignore_index=-1)` to float32 rounding, and
    differentiable with respect to h and W (gradients in their dtypes; W's padding rows get zero). Peak extra memory is
    one (chunk_rows, V_padded) buffer (two under autocast) plus a W-sized gradient, instead of several (N, vocab)
    tensors.
    """
    vocab_size = W.shape[0] if vocab_size is None else vocab_size
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1]:
        raise ValueError(f"h must be (N, C) and W (V, C) with one C, got {tuple(h.shape)} and {tuple(W.shape)}")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets must be (N,) = ({h.shape[0]},), got {tuple(targets.shape)}")
    if not 1 <= vocab_size <= W.shape[0]:
        raise ValueError(f"vocab_size must be in [1, {W.shape[0]}] (W's rows), got {vocab_size}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(h.dtype, W.dtype)
    with_grad = torch.is_grad_enabled() and (h.requires_grad or W.requires_grad)
    with torch.autocast(device_type, enabled=False):  # the op runs in the dtypes chosen here, whatever autocast says
        return _linear_cross_entropy_op(h, W, targets, vocab_size, chunk_rows, compute_dtype, with_grad)[0]


def cross_entropy_of_logits(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The same loss from full logits (B, T, padded_vocab), as a model without the fused loss computes it: the
    reference for tests and the baseline of benchmarks. Padding columns are outside the softmax; targets < 0 ignored."""
    vocab_logits = logits[..., :vocab_size]  # (B, T, vocab)
    return torch.nn.functional.cross_entropy(
        vocab_logits.reshape(-1, vocab_size).float(),
        targets.reshape(-1).clamp(min=-1),  # every negative target is ignored, as in the fused loss
        ignore_index=-1,
    )
