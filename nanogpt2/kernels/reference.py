"""Plain-PyTorch attention and RoPE: the ground truth for the kernel tests and the CPU path.

Both functions compute in the dtype they are given (pass float64 for a reference), except that RoPE rotates in at
least float32, as the kernel does. They are written for clarity, not speed: the attention materialises the full
(T, T) score matrix.
"""

import torch


def attention_mask(t_q: int, t_k: int, causal: bool, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean (t_q, t_k) mask of the key positions each query may see, or None when it sees all of them.

    Queries are the last t_q positions of the t_k keys (t_q == t_k in training). Query i sees key j when
    j <= i (causal) and i - window < j (sliding window of `window` keys, itself included).
    """
    if not causal:
        return None
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # (t_q, 1)
    k_pos = torch.arange(t_k, device=device)[None, :]  # (1, t_k)
    visible = k_pos <= q_pos
    if window is not None:
        visible = visible & (k_pos > q_pos - window)
    return visible


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Naive masked-softmax attention with grouped-query heads.

    q: (B, T, H, D); k, v: (B, T, Hkv, D) with H % Hkv == 0; query head h reads KV head h // (H // Hkv).
    `window=W` lets query i see keys i - W < j <= i; it requires causal=True. Returns (B, T, H, D).
    """
    if window is not None and not causal:
        raise ValueError(f"a sliding window needs causal=True, got causal={causal} with window={window}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the KV heads ({Hkv})")
    scale = D**-0.5 if scale is None else scale
    qg = q.view(B, T, Hkv, H // Hkv, D)  # (B, T, Hkv, G, D): the G query heads that share one KV head
    scores = torch.einsum("bihgd,bjhd->bhgij", qg, k) * scale  # (B, Hkv, G, T, Tk)
    mask = attention_mask(T, k.shape[1], causal, window, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgij,bjhd->bihgd", probs, v)  # (B, T, Hkv, G, D)
    return out.reshape(B, T, H, D)


def rotate_half_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + D/2]) of x (B, T, heads, D) by the angles whose cos/sin are (T, D/2)."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(compute_dtype).chunk(2, dim=-1)  # (B, T, heads, D/2) each
    cos = cos.to(compute_dtype)[:, None, :]  # (T, 1, D/2)
    sin = sin.to(compute_dtype)[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positional embedding, rotate-half convention (GPT-NeoX, HF Llama).

    q: (B, T, H, D), k: (B, T, Hkv, D), cos/sin: (T, D/2) float32. Returns rotated (q, k) in their own dtypes.
    """
    return rotate_half_ref(q, cos, sin), rotate_half_ref(k, cos, sin)
