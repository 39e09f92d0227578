"""GPT-2 in one file, with three switchable attention variants: what the model is, and nothing of how it is trained.

- Rotary positions (`pos_emb="rope"`): no position table; q and k are rotated by position (rotate-half convention).
- Grouped-query attention (`n_kv_head < n_head`): each K/V head serves `n_head // n_kv_head` query heads.
- Sliding-window attention (`window=W`): query i attends keys i - W < j <= i.

Module names follow Hugging Face's GPT-2 (transformer.wte/wpe/h/ln_f, attn.c_attn/c_proj, mlp.c_fc/c_proj, lm_head),
so a Hugging Face checkpoint maps by a short table (nanogpt2/hf.py). The attention implementation, PyTorch's SDPA
or the Triton kernels of nanogpt2/kernels/, is a constructor argument of GPT (`attn`), not part of the config: the same
weights run with either. Checkpoints, parallelism and training live elsewhere (checkpoint.py, parallel.py, train.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogpt2.kernels.reference import apply_rope_ref
from nanogpt2.loss import linear_cross_entropy

POS_EMBS = ("learned", "rope")
ATTN_IMPLS = ("torch", "triton")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # training context; rope models can also run longer sequences
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: as many as n_head (multi-head attention)
    n_embd: int = 768
    pos_emb: str = "learned"  # "learned" (GPT-2's wpe table) or "rope"
    rope_base: float = 10000.0
    window: int | None = None  # sliding-window attention over this many keys, itself included
    dropout: float = 0.0
    bias: bool = True
    vocab_pad_multiple: int = 1  # pad the embedding rows to a multiple of this (64 gives 50304, faster on GPU)

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "vocab_pad_multiple")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.pos_emb not in POS_EMBS:
            raise ValueError(f"GPTConfig.pos_emb must be one of {POS_EMBS}, got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"GPTConfig.n_embd / n_head must be even with rope, got head dim {self.head_dim}")
        if self.rope_base <= 1:
            raise ValueError(f"GPTConfig.rope_base must be > 1, got {self.rope_base}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"GPTConfig.window must be None or an integer >= 1, got {self.window!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """The named preset (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


_GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768)
PRESETS: dict[str, dict] = {
    "gpt2": _GPT2_SMALL,  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "gpt2-rope": dict(_GPT2_SMALL, pos_emb="rope"),
    "gpt2-gqa": dict(_GPT2_SMALL, n_kv_head=4),
    "gpt2-swa": dict(_GPT2_SMALL, window=256),
    "gpt2-all": dict(_GPT2_SMALL, pos_emb="rope", n_kv_head=4, window=256),
    # Small models that train usefully on a 2-core CPU in minutes (the 50k-vocab logits dominate their cost).
    "nano": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "micro": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "pico": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
}


class Cache(Protocol):
    """What the model asks of a KV cache (nanogpt2/sample.py's KVCache): `seen` tokens so far, per-layer update."""

    seen: int

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def advance(self, T: int) -> None: ...


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim/2) fp32 of the rotary angles pos * base**(-2i/head_dim) for positions (T,)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2), in fp64 so long positions stay exact
    return angles.cos().float(), angles.sin().float()


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of T tokens over themselves, as in training, through SDPA:
    q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D). (The Triton kernels: `attend_packed`; they have no dropout.)"""
    if window is None or window >= q.shape[1]:
        return sdpa(q, k, v, None, dropout_p, is_causal=True)
    i = torch.arange(q.shape[1], device=q.device)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # (T, T)
    return sdpa(q, k, v, band, dropout_p, is_causal=False)


def attend_packed(
    qkv: torch.Tensor, n_kv_head: int, rope: tuple[torch.Tensor, torch.Tensor] | None, window: int | None
) -> torch.Tensor:
    """`attend` with the Triton kernels on the packed projection qkv (B, T, H + 2 Hkv, D), RoPE applied first when
    `rope` = (cos, sin) is given -> (B, T, H, D)."""
    from nanogpt2.kernels import flash_attention_packed

    return flash_attention_packed(qkv, n_kv_head, rope, causal=True, window=window)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of T new tokens over the S keys a KV cache returned: q (B, T, H, D), k/v (B, S, Hkv, D); `mask`
    (T, S) says which keys each query sees, None that every query sees every key (one new token: the fast path)."""
    return sdpa(q, k, v, mask, 0.0, is_causal=False)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, is_causal: bool
) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention on our (B, T, heads, D) layout, K/V heads shared by query heads."""
    gqa = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (B, H, T, D)
        k.transpose(1, 2),  # (B, Hkv, S, D)
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        **gqa,
    )  # (B, H, T, D)
    return y.transpose(1, 2)  # (B, T, H, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, attn_impl: str = "torch"):
        super().__init__()
        self.config, self.layer_idx, self.attn_impl = config, layer_idx, attn_impl
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_dim = config.n_kv_head * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: Cache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with a KV cache, `positions` (T,) are the absolute positions of x's tokens."""
        B, T, C = x.shape
        dropout_p = self.config.dropout if self.training else 0.0
        qkv = self.c_attn(x)  # (B, T, C + 2 * kv_dim)
        if self.attn_impl == "triton" and kv_cache is None and dropout_p == 0.0:
            # One kernel call from the packed projection: its backward writes d(qkv) whole and undoes RoPE inside.
            heads = qkv.view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
            y = attend_packed(heads, self.n_kv_head, rope, self.config.window)  # (B, T, H, D)
            return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = qkv.split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        if rope is not None:
            q, k = rotate_qk(q, k, *rope, self.attn_impl)
        if kv_cache is None:
            y = attend(q, k, v, self.config.window, dropout_p)  # (B, T, H, D)
        else:
            k, v, mask = kv_cache.update(self.layer_idx, k, v, positions)  # (B, S, Hkv, D) x 2, (T, S) or None
            y = attend_cached(q, k, v, mask)  # (B, T, H, D)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, D) and k (B, T, Hkv, D) by RoPE, with the Triton kernel or the PyTorch reference."""
    if attn_impl == "triton":
        from nanogpt2.kernels import apply_rope

        return apply_rope(q, k, cos, sin)
    return apply_rope_ref(q, k, cos, sin)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, attn_impl: str = "torch"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx, attn_impl)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: Cache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, positions)
        return x + self.mlp(self.ln_2(x))


def check_attn_impl(config: GPTConfig, attn_impl: str) -> None:
    """ValueError unless `attn_impl` names an implementation that can run this config."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if attn_impl == "triton":
        from nanogpt2.kernels import SUPPORTED_HEAD_DIMS  # here: a CPU run with attn="torch" never loads Triton

        if config.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"attn_impl='triton' needs a head dim in {SUPPORTED_HEAD_DIMS}, got {config.head_dim}")


# Widths up to this start with issue 11's init, wider ones with GPT-2's: each won where it was measured (256 and 768).
SMALL_INIT_MAX_WIDTH = 256


def init_stds(config: GPTConfig) -> tuple[float, float]:
    """(tied token embedding std, residual projections' std) at init; every other matrix and embedding gets 0.02.

    Widths above SMALL_INIT_MAX_WIDTH: GPT-2's init, (0.02, 0.02 / sqrt(2 * n_layer)). At widths up to it, issue 11's:
    residual projections at zero, so every block starts as the identity (modded-nanogpt), and the embedding at
    0.04 * sqrt(256 / width), 0.04 at 256. Measured (BENCHMARKS.md): issue 11's init trained better at width 256. At
    768 it starts at a loss of 13.2 (with identity blocks, a token's logit for itself grows with the width), and
    shrinking its embedding to fix that trained worse than GPT-2's init, which starts near ln(vocab) at every width
    because its random blocks dilute that logit. Between 256 and 768 nothing was measured."""
    if config.n_embd > SMALL_INIT_MAX_WIDTH:
        return 0.02, 0.02 / math.sqrt(2 * config.n_layer)
    return 0.04 * math.sqrt(SMALL_INIT_MAX_WIDTH / config.n_embd), 0.0


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, attn_impl: str = "torch"):
        """`attn_impl`: the attention/RoPE implementation, "torch" (SDPA) or "triton" (nanogpt2/kernels/, needs
        CUDA). The Triton kernels have no dropout: while dropout is active (training with dropout > 0) attention runs
        through SDPA."""
        super().__init__()
        check_attn_impl(config, attn_impl)
        self.config, self.attn_impl = config, attn_impl
        modules = dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i, attn_impl) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        )
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        if config.pos_emb == "rope":
            cos, sin = rope_cos_sin(torch.arange(config.block_size), config.head_dim, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # The residual projections and the tied embedding at init_stds (the embedding drawn last, because lm_head's
        # Linear init redraws it).
        wte_std, c_proj_std = init_stds(config)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=c_proj_std) if c_proj_std else nn.init.zeros_(p)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=wte_std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Number of parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight plus attention's scores and values (PaLM appendix B), causal."""
        cfg = self.config
        n_weights = self.num_params() - (self.transformer.wpe.weight.numel() if cfg.pos_emb == "learned" else 0)
        w = min(seq_len, cfg.window or seq_len)
        visible = w - w * w / (2 * seq_len)  # keys a query sees, on average: T/2 causal, about W for a window W << T
        return 6 * n_weights + 12 * cfg.n_layer * cfg.n_embd * visible

    def _rope(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin (T, D/2) for positions start..start+T-1, from the table or computed past block_size."""
        if self.config.pos_emb != "rope":
            return None
        if start + T <= self.rope_cos.shape[0] and self.rope_cos.dtype == torch.float32:  # unless cast by .to()
            return self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        return rope_cos_sin(torch.arange(start, start + T, device=device), self.config.head_dim, self.config.rope_base)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: Cache | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, padded_vocab), None), or with targets (B, T) -> (None, loss).

        The loss is the mean cross-entropy (targets < 0 are ignored) from nanogpt2/loss.py's fused linear +
        cross-entropy, which never holds the logits (`loss.cross_entropy_of_logits` is the same loss from full
        logits). With a KV cache (nanogpt2/sample.py), idx continues the tokens the cache has seen.
        """
        B, T = idx.shape
        start = kv_cache.seen if kv_cache is not None else 0
        positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_emb == "learned":
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
            x = x + self.transformer.wpe(positions)  # (T, C), broadcast over the batch
        x = self.transformer.drop(x)
        rope = self._rope(start, T, idx.device)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, positions)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.transformer.ln_f(x)
        if targets is not None:
            h, y = x.reshape(B * T, -1), targets.reshape(-1)
            return None, linear_cross_entropy(h, self.lm_head.weight, y, self.config.vocab_size)
        return self.lm_head(x), None  # (B, T, padded_vocab)

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only; fused (one kernel for all parameters)
        on CPU and CUDA, where it is several times faster than the per-tensor loop."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))
