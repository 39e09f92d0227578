"""Training-step time and peak memory on CPU, the fused linear + cross-entropy against the full-logits loss.

    python -m benches.train_cpu                          # the table (about 3 minutes on 2 idle cores)
    python -m benches.train_cpu --json out.json          # and the rows as JSON (CPU, versions, commit included)

The recipe of issue 11: the `nano` preset (50,257 vocab), 16 x 256 tokens per step, no accumulation, AdamW lr 1e-3
(betas 0.9/0.95, weight decay 0.1), grad clip 1.0, float32, seed 1337; random tokens, so no corpus is needed (the
step's cost does not depend on which tokens). Each variant runs in a fresh subprocess so its peak RSS is its own:
`before` (F.cross_entropy on the full logits and the per-tensor foreach AdamW: the defaults before issue 11),
`fused-loss` (nanogpt2/loss.py, foreach AdamW) and `default` (the fused loss, AdamW(fused=True) and glibc kept from
returning freed blocks to the OS, as train.py runs now). Per step the forward, backward, clip and optimizer phases
are timed apart. The variants take turns over --rounds fresh runs each, so that other load on a shared machine hits
them alike; the table shows medians over all timed steps and the highest peak RSS. Ratios are `before` ms / variant ms.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benches import common

VARIANTS = ("before", "fused-loss", "default")
PHASES = ("forward", "backward", "clip", "optimizer")


def run_variant(variant: str, steps: int, warmup: int, batch: int, seq_len: int, chunk_rows: int | None) -> dict:
    """Train `warmup + steps` steps of the recipe in this process: per-phase ms of the timed steps, peak RSS, losses."""
    import nanogpt2.loss
    from nanogpt2.model import GPT, GPTConfig
    from nanogpt2.runtime import keep_freed_memory

    if variant == "default":
        keep_freed_memory()  # as train.py does on a CPU
    if chunk_rows is not None:
        nanogpt2.loss.CHUNK_ROWS = chunk_rows
    torch.manual_seed(1337)
    model = GPT(GPTConfig.from_preset("nano")).train()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")  # fused AdamW, the default
    if variant != "default":  # the same parameter groups through the per-tensor (foreach) implementation
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), foreach=True)
    g = torch.Generator().manual_seed(1337)
    times = {phase: [] for phase in PHASES}
    losses = []
    for step in range(warmup + steps):
        tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=g)
        t0 = time.perf_counter()
        loss = common.model_loss(model, tokens, fused=variant != "before")
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        losses.append(loss.item())
        if step >= warmup:
            for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[phase].append(dt * 1e3)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"variant": variant, "times_ms": times, "peak_rss_gib": rss_gib, "losses": losses}


def summarize(runs: list[dict], tokens_per_step: int) -> dict:
    """One variant's row from its runs: medians over all their timed steps, the highest peak RSS."""
    times = {phase: [t for run in runs for t in run["times_ms"][phase]] for phase in PHASES}
    step_ms = statistics.median(sum(parts) for parts in zip(*times.values(), strict=True))
    return {
        "variant": runs[0]["variant"],
        "ms_per_step": step_ms,
        "tokens_per_s": tokens_per_step / step_ms * 1e3,
        **{f"{phase}_ms": statistics.median(ts) for phase, ts in times.items()},
        "peak_rss_gib": max(run["peak_rss_gib"] for run in runs),
        "losses": runs[0]["losses"],
        "runs": runs,
    }


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git.stdout.strip() or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def print_table(rows: list[dict]) -> None:
    base = next((r["ms_per_step"] for r in rows if r["variant"] == "before"), None)
    header = f"{'variant':<18} {'ms/step':>8} {'tok/s':>7} {'peak RSS':>9} {'ratio':>6}"
    print(header + "".join(f" {phase + ' ms':>12}" for phase in PHASES))
    for r in rows:
        ratio = f"{base / r['ms_per_step']:.2f}x" if base else "-"
        line = f"{r['variant']:<18} {r['ms_per_step']:>8.0f} {r['tokens_per_s']:>7.0f} {r['peak_rss_gib']:>7.2f} G"
        print(line + f" {ratio:>6}" + "".join(f" {r[f'{phase}_ms']:>12.0f}" for phase in PHASES))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, in each run (default: 1)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh runs of each variant, taking turns (default: 2)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (default: 16)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="default: all")
    parser.add_argument("--chunk-rows", type=int, help="rows per chunk of the fused loss (default: its CHUNK_ROWS)")
    parser.add_argument("--json", type=Path, help="also write the environment and the rows to this JSON file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a fresh process
    args = parser.parse_args(argv)
    settings = (args.steps, args.warmup, args.batch, args.seq_len, args.chunk_rows)
    if args.child:
        print(json.dumps(run_variant(args.child, *settings)))
        return
    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    runs = {variant: [] for variant in args.variants}
    for _ in range(args.rounds):  # variants take turns, so a change in the machine's load hits them all alike
        for variant in args.variants:
            child = [sys.executable, "-m", "benches.train_cpu", "--child", variant, "--steps", str(args.steps)]
            child += ["--warmup", str(args.warmup), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
            child += ["--chunk-rows", str(args.chunk_rows)] if args.chunk_rows else []
            done = subprocess.run(child, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"variant {variant} failed:\n{done.stderr}")
            runs[variant].append(json.loads(done.stdout.splitlines()[-1]))
    rows = [summarize(variant_runs, args.batch * args.seq_len) for variant_runs in runs.values()]
    print_table(rows)
    first = rows[0]["losses"]
    drift = max(abs(a - b) for r in rows for a, b in zip(r["losses"], first, strict=True))
    print(f"max |loss - {rows[0]['variant']}'s| over all steps: {drift:.2e} (the same training, step for step)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**env, "settings": vars(args) | {"json": str(args.json)}, "rows": rows}))


if __name__ == "__main__":
    main()
