"""Text generation with a KV cache, and its CLI (loading a model is checkpoint.py's, the model itself model.py's).

    python -m nanogpt2.sample --ckpt PATH_OR_HF_DIR --prompt "..." --max-new-tokens N --temperature T --top-k K --seed S

The cache stores `n_kv_head` heads per layer (GQA shrinks it) and, with a sliding window of W, only the newest W
positions in a rolling buffer, so generation runs past the window in constant memory. Rotary models keep absolute
positions in the cache and run past block_size. Models with learned positions cannot see past block_size: there,
like the uncached loop, each step past it recomputes the last block_size tokens.
"""

from __future__ import annotations

import argparse
import sys

import torch

from nanogpt2.checkpoint import CheckpointError, load_model
from nanogpt2.model import GPT, GPTConfig
from nanogpt2.runtime import parse_device
from nanogpt2.tokenizer import get_encoding


class KVCache:
    """Keys and values of every layer for the tokens seen so far; `seen` counts those tokens.

    Buffers are (n_layer, B, capacity, Hkv, D), `capacity` a first size: the cache doubles it on demand, up to the
    window for a sliding-window model. There it becomes a rolling buffer: position p goes to slot p % capacity and
    each slot remembers its position. Until it is full, slot p holds position p in both kinds, so growing keeps order.
    """

    def __init__(self, config: GPTConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.max_capacity = config.window  # None: grows without bound (full attention)
        capacity = max(1, min(capacity, config.window) if config.window is not None else capacity)
        shape = (config.n_layer, batch, capacity, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_pos = torch.full((capacity,), -1, dtype=torch.long, device=device)  # -1: empty slot
        self.seen = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def bytes_per_token(config: GPTConfig, dtype: torch.dtype) -> int:
        """Cache bytes one more token costs while the cache is below its capacity: K and V of every layer."""
        return 2 * config.n_layer * config.n_kv_head * config.head_dim * torch.empty((), dtype=dtype).element_size()

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this layer's new k, v (B, T, Hkv, D) at `positions` (T,); return the keys and values to attend over,
        (B, S, Hkv, D) each, and the (T, S) mask of the keys each new query sees, or None where every query sees
        every key: one new token (decoding), whose keys are the cache plus itself, all inside its window.
        """
        T = k.shape[1]
        end = self.seen + T
        if self.seen == 0 and self.k.dtype != k.dtype:  # the forward's dtype (FSDP's bf16), not the stored weights'
            self.k, self.v = self.k.to(k.dtype), self.v.to(k.dtype)
        if end > self.capacity and self.capacity != self.max_capacity:
            self._grow(end)
        rolling = self.max_capacity is not None and end > self.capacity
        if not rolling:  # slot p holds position p: write in place, attend over the first `end` slots
            self.k[layer_idx, :, self.seen : end] = k
            self.v[layer_idx, :, self.seen : end] = v
            keys, values = self.k[layer_idx, :, :end], self.v[layer_idx, :, :end]
            return keys, values, None if T == 1 else self._mask(torch.arange(end, device=k.device), positions)
        if T == 1:  # the slot overwritten holds the position one window back, which the new query no longer sees
            slot = self.seen % self.capacity
            self.k[layer_idx, :, slot] = k[:, 0]
            self.v[layer_idx, :, slot] = v[:, 0]
            return self.k[layer_idx], self.v[layer_idx], None
        # Several new tokens: the early ones may need keys that the later ones evict, so attend over old + new.
        keys = torch.cat([self.k[layer_idx], k], dim=1)  # (B, capacity + T, Hkv, D)
        values = torch.cat([self.v[layer_idx], v], dim=1)
        key_pos = torch.cat([self.slot_pos, positions])  # (capacity + T,)
        kept = positions[-self.capacity :]  # the newest positions fit the buffer
        self.k[layer_idx, :, kept % self.capacity] = k[:, -self.capacity :]
        self.v[layer_idx, :, kept % self.capacity] = v[:, -self.capacity :]
        return keys, values, self._mask(key_pos, positions)

    def _mask(self, key_pos: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(T, S): query at positions[i] sees key j when it is not later, not empty (< 0) and inside the window."""
        mask = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] >= 0)
        if self.max_capacity is not None:
            mask &= key_pos[None, :] > positions[:, None] - self.max_capacity
        return mask

    def advance(self, T: int) -> None:
        """Record that the T tokens just passed through every layer are now cached."""
        if self.max_capacity is not None and T == 1:
            self.slot_pos[self.seen % self.capacity] = self.seen  # a plain index: no tensor ops per decoded token
        elif self.max_capacity is not None:
            kept = torch.arange(max(self.seen, self.seen + T - self.capacity), self.seen + T, device=self.k.device)
            self.slot_pos[kept % self.capacity] = kept
        self.seen += T

    def _grow(self, needed: int) -> None:
        """Enlarge every buffer to hold `needed` positions (at least double), never past the window."""
        new_capacity = max(needed, 2 * self.capacity)
        if self.max_capacity is not None:
            new_capacity = min(new_capacity, self.max_capacity)
        pad = (*self.k.shape[:2], new_capacity - self.capacity, *self.k.shape[3:])
        self.k = torch.cat([self.k, self.k.new_zeros(pad)], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(pad)], dim=2)
        self.slot_pos = torch.cat([self.slot_pos, self.slot_pos.new_full((new_capacity - len(self.slot_pos),), -1)])


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick the next token (B, 1) from last-position logits (B, vocab): greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append max_new_tokens tokens to idx (B, T); returns (B, T + max_new_tokens).

    With use_cache=False every step recomputes the whole sequence (the last block_size tokens for learned positions);
    with the cache the result is the same, token for token, at a fraction of the cost.
    """
    cfg = model.config
    limit = cfg.block_size if cfg.pos_emb == "learned" else None  # learned positions end at block_size
    cache = None
    for _ in range(max_new_tokens):
        context = idx if limit is None else idx[:, -limit:]
        if not use_cache:
            logits, _ = model(context)
        elif cache is None or (limit is not None and cache.seen >= limit):
            # Prefill, or past block_size with learned positions, where positions shift and nothing can be reused.
            capacity = limit or idx.shape[1] + max_new_tokens
            dtype = next(model.parameters()).dtype
            cache = KVCache(cfg, idx.shape[0], capacity, dtype, idx.device)
            logits, _ = model(context, kv_cache=cache)
        else:
            logits, _ = model(idx[:, -1:], kv_cache=cache)
        next_token = sample_next(logits[:, -1, : cfg.vocab_size], temperature, top_k, generator)  # (B, 1)
        idx = torch.cat([idx, next_token], dim=1)
    return idx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sample text from a nanogpt2 or Hugging Face GPT-2 checkpoint.")
    parser.add_argument("--ckpt", required=True, help="training output dir / checkpoint file, or a HF GPT-2 dir/name")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples to draw")
    parser.add_argument("--seed", type=int, default=1337, help="random seed")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or not args.temperature >= 0 or args.top_k < 0 or args.num_samples < 1:  # nan too
        print("error: --max-new-tokens, --temperature and --top-k must be >= 0, --num-samples >= 1", file=sys.stderr)
        return 2
    try:
        device = parse_device(args.device)
        model = load_model(args.ckpt, device=device)
        enc = get_encoding()
        if model.config.vocab_size > enc.n_vocab:
            raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is not GPT-2's ({enc.n_vocab})")
        prompt = enc.encode(args.prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
        if max(prompt) >= model.config.vocab_size:
            raise ValueError(
                f"the prompt has token {max(prompt)}, past the model's vocabulary of {model.config.vocab_size}"
            )
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 1
    model.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k or None, not args.no_cache, generator)
    for row in out.tolist():
        print(enc.decode(row))
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
