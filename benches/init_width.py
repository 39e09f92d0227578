"""Initialisations compared at GPT-2's width on a CPU: val loss after a short Shakespeare run, for several seeds.

    python -m benches.init_width                           # 4 layers x 768, 120 steps of 4 x 64 tokens, 3 seeds
    python -m benches.init_width --steps 2 --seeds 1 --json out.json   # checks the code only
    python -m benches.init_width --initial-loss            # every preset's initial loss, as built, at full depth

Issue 28's measurement: a `gpt2`-wide model (4 of its 12 layers, so that a CPU runs it) trained with the CPU recipe
(AdamW lr 1e-3, 12 warmup steps, cosine to 1e-4, weight decay 0.1, clip 1.0, shuffled windows) from each init:
- `gpt2`: GPT-2's (nanoGPT's): every matrix and embedding at std 0.02, the residual projections at 0.02 / sqrt(2L);
- `sqrt`: issue 11's rule: residual projections at zero, the tied embedding at 0.04 * sqrt(256 / width);
- `width`: issue 28's first rule: residual projections at zero, the embedding at 0.04 * min(sqrt(256 / w), 256 / w);
- `gpt2-wte`, `gpt2-proj`: GPT-2's init in two halves over `width`: its 0.02 embedding alone (residual projections
  at zero), or its residual projections alone (the embedding at `width`'s std);
- `default`: model.py's init as committed (init_stds), drawn as the model is built.
The same seed draws the same batches for every init. Speed is not measured: the CPU is shared.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from nanogpt2.model import GPT, PRESETS, GPTConfig, init_stds
from nanogpt2.prepare import open_corpus

INITS = ("gpt2", "sqrt", "width", "gpt2-wte", "gpt2-proj", "default")
WTE_STD = {  # the tied embedding's std for each init but `default`, at width w
    "gpt2": lambda w: 0.02,
    "sqrt": lambda w: 0.04 * math.sqrt(256 / w),
    "width": lambda w: 0.04 * min(math.sqrt(256 / w), 256 / w),
    "gpt2-wte": lambda w: 0.02,
    "gpt2-proj": lambda w: 0.04 * min(math.sqrt(256 / w), 256 / w),
}


def reinit(model: GPT, init: str) -> None:
    """Redraw the residual projections and the tied embedding of a built model as `init` draws them (every other
    matrix and embedding stays at the 0.02 every init shares); `default` keeps the model as built."""
    if init == "default":
        return
    cfg = model.config
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            if init in ("gpt2", "gpt2-proj"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
            else:
                nn.init.zeros_(p)
    nn.init.normal_(model.transformer.wte.weight, std=WTE_STD[init](cfg.n_embd))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine to lr / 10 at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr / 10 + 0.5 * (lr - lr / 10) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def val_loss(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    loss = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    model.train()
    return loss


def run(init: str, seed: int, args: argparse.Namespace, corpus) -> dict:
    """Train one (init, seed) and return its val losses at the evaluation steps."""
    torch.manual_seed(seed)
    config = GPTConfig.from_preset("gpt2", n_layer=args.n_layer, block_size=args.seq_len)
    model = GPT(config)
    reinit(model, init)
    train, val = corpus.loaders(args.batch, args.seq_len, 0, 1, config.vocab_size, "shuffled", seed, args.batch)
    val_batches = [val.next_batch() for _ in range(args.eval_batches)]
    optimizer = model.configure_optimizers(0.1, args.lr, (0.9, 0.95), "cpu")
    losses, start = {0: val_loss(model, val_batches)}, time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y = train.next_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            losses[step + 1] = val_loss(model, val_batches)
            print(f"{init:8s} seed {seed} step {step + 1:4d} val {losses[step + 1]:.4f} ({time.time() - start:.0f} s)")
    return {"init": init, "seed": seed, "val_loss": losses}


def shakespeare_windows() -> torch.Tensor:
    """4 windows of 65 tokens spread over Shakespeare's val split (4, 65)."""
    val = open_corpus("shakespeare").val
    stride = (val.n_tokens - 65) // 4
    return torch.stack([torch.from_numpy(val.read(i * stride, 65)) for i in range(4)])


def initial_loss(preset: str, windows: torch.Tensor) -> float:
    """The preset's loss as GPT() builds it (seed 0), at full depth, forward only, on up to 64 tokens of each window."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset(preset)
    T = min(64, config.block_size)
    with torch.no_grad():
        return GPT(config)(windows[:, :T], windows[:, 1 : T + 1])[1].item()


def initial_losses(json_path: Path | None) -> None:
    """Every preset's initial_loss on shakespeare_windows: tests/test_init.py's measurement, for the presets too big
    for the suite as well."""
    windows, rows = shakespeare_windows(), []
    print("| preset | width x layers | embedding std | residual projections' std | initial loss | ln(vocab) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for preset in PRESETS:
        config, loss = GPTConfig.from_preset(preset), initial_loss(preset, windows)
        wte_std, c_proj_std = init_stds(config)
        row = dict(preset=preset, n_embd=config.n_embd, n_layer=config.n_layer, wte_std=wte_std, c_proj_std=c_proj_std)
        rows.append(row | {"initial_loss": loss, "ln_vocab": math.log(config.vocab_size)})
        print(f"| `{preset}` | {config.n_embd} x {config.n_layer} | {wte_std:.4f} | {c_proj_std:.4f} | "
              f"{loss:.3f} | {math.log(config.vocab_size):.3f} |", flush=True)  # fmt: skip
    if json_path:
        json_path.write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS, help="inits to train (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds first-seed, first-seed + 1, ... (default: 3)")
    p.add_argument("--first-seed", type=int, default=1337, help="(default: 1337)")
    p.add_argument("--n-layer", type=int, default=4, help="layers at gpt2's width 768 (default: 4)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps (default: 120)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--warmup", type=int, default=12, help="warmup steps (default: 12)")
    p.add_argument("--eval-every", type=int, default=40, help="val loss every N steps (default: 40)")
    p.add_argument("--eval-batches", type=int, default=8, help="val batches of --batch x --seq-len (default: 8)")
    p.add_argument("--json", type=Path, help="append each run's result to this JSON-lines file (--initial-loss: "
                   "write its rows as one JSON list)")  # fmt: skip
    p.add_argument("--initial-loss", action="store_true", help="print every preset's initial loss instead of training")
    args = p.parse_args()
    if args.initial_loss:
        initial_losses(args.json)
        return
    corpus = open_corpus("shakespeare")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for init in args.inits:
            result = run(init, seed, args, corpus)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({**result, "settings": vars(args) | {"json": str(args.json)}}) + "\n")


if __name__ == "__main__":
    main()
