"""The variant study: what rotary positions, grouped-query attention and sliding windows do to a GPT.

    python -m nanogpt2.study [--budget cpu|gpu|toy] [--variants base rope gqa swa all] [--seeds 2] [--out results/study]

Every variant trains through train.py itself (a subprocess per run, same seed, data, token budget and
hyperparameters), then each trained model is measured here: val loss at 1x, 2x and 4x the training context, KV-cache
bytes per token and at long context, and generation speed with the cache. Writes README.md (tables and a plain-words
reading), loss.png (val loss against tokens) and results.json (the raw numbers) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanogpt2.checkpoint import load_model
from nanogpt2.data import BatchLoader
from nanogpt2.model import GPT
from nanogpt2.plot import plot_runs, read_metrics
from nanogpt2.prepare import open_corpus
from nanogpt2.sample import KVCache, generate

REPO = Path(__file__).resolve().parents[1]

# Each variant changes one thing of the baseline (learned positions, multi-head attention, full causal attention).
VARIANTS: dict[str, dict] = {
    "base": {},
    "rope": {"pos_emb": "rope"},
    "gqa": {"gqa": True},
    "swa": {"swa": True},
    "all": {"pos_emb": "rope", "gqa": True, "swa": True},
}

# Token budgets. kv_heads and window are the GQA / sliding-window settings at that scale; the windows are a quarter
# of the context, as gpt2-swa's 256 is of 1024.
BUDGETS: dict[str, dict] = {
    "toy": dict(preset="pico", data="synthetic", seq_len=32, batch_size=4, max_steps=6, eval_every=3, eval_batches=1,
                lr=3e-3, warmup_steps=1, kv_heads=1, window=8, seeds=1, gen_tokens=8, device="cpu"),
    "cpu": dict(preset="micro", data="shakespeare", seq_len=128, batch_size=16, max_steps=120, eval_every=20,
                eval_batches=8, lr=3e-3, warmup_steps=10, kv_heads=2, window=32, seeds=2, gen_tokens=64, device="cpu"),
    "gpu": dict(preset="gpt2", data="shakespeare", seq_len=1024, batch_size=16, max_steps=300, eval_every=25,
                eval_batches=20, lr=1.2e-3, warmup_steps=50, kv_heads=4, window=256, seeds=2, gen_tokens=256,
                device="cuda"),
}  # fmt: skip


def train_command(budget: dict, variant: str, seed: int, out_dir: Path) -> list[str]:
    """The train.py command line of one run: python, train.py, then `--flag value` pairs."""
    v = VARIANTS[variant]
    cmd = [sys.executable, str(REPO / "train.py"), "--preset", budget["preset"], "--data", budget["data"]]
    for flag in ("seq_len", "batch_size", "max_steps", "eval_every", "eval_batches", "lr", "warmup_steps", "device"):
        cmd += [f"--{flag.replace('_', '-')}", str(budget[flag])]
    cmd += ["--min-lr", str(budget["lr"] / 10), "--sample-every", "0", "--seed", str(seed), "--out-dir", str(out_dir)]
    cmd += ["--data-order", "shuffled"]  # named, so runs made before shuffling existed are not taken as these
    cmd += ["--block-size", str(budget["seq_len"]), "--pos-emb", v.get("pos_emb", "learned")]
    if v.get("gqa"):
        cmd += ["--n-kv-head", str(budget["kv_heads"])]
    if v.get("swa"):
        cmd += ["--window", str(budget["window"])]
    return cmd


def made_by(run_dir: Path, cmd: list[str]) -> bool:
    """Whether the run in run_dir was started by this train.py command line (wherever its directory now is)."""
    try:
        recorded = json.loads((run_dir / "run.json").read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    flags = cmd[2:]
    wanted = {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
    wanted.pop("out_dir")
    return all(str(recorded.get(name)) == value for name, value in wanted.items())


def run_training(run_dir: Path, cmd: list[str]) -> tuple[bool, str]:
    """Bring the run in run_dir to its end: reuse it when this command completed it, else train it anew.

    Returns (success, what was done). An incomplete run, one without its checkpoint (committed results have none)
    or one another command made is cleared first: the study owns runs/.
    """
    complete = all((run_dir / name).is_file() for name in ("ckpt.pt", "summary.json"))
    if complete and made_by(run_dir, cmd):
        return True, "complete, reused"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.log", "w") as f:
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    return done.returncode == 0, "trained"


@torch.no_grad()
def val_loss_at(model: GPT, corpus, seq_len: int, eval_tokens: int, batches: int, device: str) -> float | None:
    """Mean val loss over sequences of seq_len tokens; None where the model cannot see that far.

    Reads `batches` batches of `eval_tokens` tokens from the start of the val split, cut into rows of seq_len: the
    same tokens at every length.
    """
    if model.config.pos_emb == "learned" and seq_len > model.config.block_size:
        return None
    rows = max(1, eval_tokens // seq_len)
    loader = BatchLoader(corpus.val, rows=rows, seq_len=seq_len, vocab_size=model.config.vocab_size)
    losses = []
    for _ in range(batches):
        x, y = loader.next_batch()
        losses.append(model(x.to(device), y.to(device))[1].item())
    return statistics.fmean(losses)


@torch.no_grad()
def generation_speed(model: GPT, new_tokens: int, device: str, repeats: int = 3) -> float:
    """Tokens per second generating `new_tokens` after a 16-token prompt (batch 1, greedy, KV cache); median of runs."""
    idx = torch.zeros((1, 16), dtype=torch.long, device=device)
    generate(model, idx, 4, temperature=0)  # warm-up
    rates = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, idx, new_tokens, temperature=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(new_tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def kv_cache_bytes(model: GPT, context: int, dtype: torch.dtype) -> int:
    """Bytes the KV cache holds at `context` tokens (a sliding window caps it at the window)."""
    held = min(context, model.config.window or context)
    return held * KVCache.bytes_per_token(model.config, dtype)


def measure_run(run_dir: Path, budget: dict) -> dict:
    """The numbers of one finished run: from its metrics and summary, and from its checkpoint."""
    metrics = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if r.get("val_loss") is not None]
    device = budget["device"]
    model = load_model(run_dir, device=device).eval()
    T = budget["seq_len"]
    long_context = 4 * T
    args = json.loads((run_dir / "run.json").read_text())["args"]
    eval_tokens = args["batch_size"] // args["grad_accum"] * T  # a micro-batch, as train.py evaluates
    corpus = open_corpus(budget["data"], seed=args["seed"])  # the seed picks synthetic data's tokens
    return {
        "params": model.num_params(),
        "train_loss": statistics.fmean(r["loss"] for r in steps[-10:]),
        "val_loss": evals[-1]["val_loss"],
        "tokens": steps[-1]["tokens"],
        "tokens_per_s": summary["tokens_per_s"],
        "peak_mem_mib": summary["peak_mem_mib"],
        "val_loss_1x": val_loss_at(model, corpus, T, eval_tokens, budget["eval_batches"], device),
        "val_loss_2x": val_loss_at(model, corpus, 2 * T, eval_tokens, budget["eval_batches"], device),
        "val_loss_4x": val_loss_at(model, corpus, 4 * T, eval_tokens, budget["eval_batches"], device),
        "kv_bytes_per_token": KVCache.bytes_per_token(model.config, torch.bfloat16),
        "kv_bytes_long_context": kv_cache_bytes(model, long_context, torch.bfloat16),
        "long_context": long_context,
        "gen_tokens_per_s": generation_speed(model, budget["gen_tokens"], device),
        "curve": [{"tokens": r["tokens"], "val_loss": r["val_loss"]} for r in evals],
    }


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the max-min range (0 for a single seed)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def fmt(value, spec: str = ".3f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: mean and spread over seeds of the losses, and the seed-0 run's other measurements."""
    table = {}
    for variant, runs in results.items():
        row = dict(runs[0])
        for key in ("train_loss", "val_loss", "val_loss_1x", "val_loss_2x", "val_loss_4x", "tokens_per_s"):
            values = [r[key] for r in runs if r[key] is not None]
            row[key], row[f"{key}_spread"] = mean_spread(values) if values else (None, None)
        table[variant] = row
    return table


def reading(table: dict[str, dict]) -> list[str]:
    """Plain-words lines: how each variant's val loss compares with the baseline, against the seed-to-seed spread."""
    base = table.get("base")
    lines = []
    for variant, row in table.items():
        if variant == "base" or base is None:
            continue
        diff = row["val_loss"] - base["val_loss"]
        noise = max(row["val_loss_spread"], base["val_loss_spread"])
        if noise > 0:
            verdict = "exceeds" if abs(diff) > 2 * noise else "does not exceed"
            against_noise = f"that {verdict} twice the seed-to-seed spread (±{noise:.3f})"
        else:
            against_noise = "one seed only, so the seed-to-seed spread is unknown"
        direction = "lower (better)" if diff < 0 else "higher (worse)"
        kv = row["kv_bytes_long_context"] / base["kv_bytes_long_context"]
        gen = row["gen_tokens_per_s"] / base["gen_tokens_per_s"]
        lines.append(
            f"- **{variant}**: val loss {row['val_loss']:.3f} vs {base['val_loss']:.3f}, {abs(diff):.3f} {direction}; "
            f"{against_noise}. Training speed "
            f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x the baseline's, KV cache at "
            f"{row['long_context']} tokens {kv:.2f}x, generation {gen:.2f}x."
        )
    return lines


def write_report(out: Path, budget_name: str, budget: dict, table: dict[str, dict], command: str) -> None:
    """README.md with the tables, the reading, and how the numbers were made."""
    T = budget["seq_len"]
    lines = [
        "# Variant study",
        "",
        f"Made by `{command}` on {platform.machine()} ({os.cpu_count()} CPUs, torch {torch.__version__}), "
        f"budget `{budget_name}`: preset `{budget['preset']}` on `{budget['data']}`, {budget['max_steps']} steps of "
        f"{budget['batch_size']} x {T} tokens, lr {budget['lr']} (cosine to a tenth), {budget['seeds']} seed(s). "
        f"GQA uses {budget['kv_heads']} KV heads, the window is {budget['window']} tokens. Losses are in nats per "
        "token; ± is half the range over seeds.",
        "",
        "## Quality and cost",
        "",
        "| variant | params | train loss | val loss | tokens/s (train) | peak mem (MiB) | KV bytes/token | "
        "gen tokens/s (cache) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, r in table.items():
        lines.append(
            f"| {variant} | {r['params']:,} | {r['train_loss']:.3f} ± {r['train_loss_spread']:.3f} | "
            f"{r['val_loss']:.3f} ± {r['val_loss_spread']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_mem_mib']:,.0f} | "
            f"{r['kv_bytes_per_token']:,} | {r['gen_tokens_per_s']:,.1f} |"
        )
    lines += [
        "",
        "## What the variants are for: longer context and a smaller cache",
        "",
        f"Val loss with sequences of 1x, 2x and 4x the training context ({T} tokens), each over the same val "
        "tokens as the training runs' evaluation (so the first column is the val loss above). Learned "
        "positions end at block_size, so models with them cannot be evaluated past it (n/a). KV cache in bf16 at "
        f"{4 * T} tokens, for one sequence.",
        "",
        f"| variant | val loss @ {T} | @ {2 * T} | @ {4 * T} | KV cache @ {4 * T} tokens (KiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for variant, r in table.items():
        lines.append(
            f"| {variant} | {fmt(r['val_loss_1x'])} | {fmt(r['val_loss_2x'])} | {fmt(r['val_loss_4x'])} | "
            f"{r['kv_bytes_long_context'] / 1024:,.0f} |"
        )
    lines += ["", "## Reading", "", *reading(table), "", "![val loss against tokens](loss.png)", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=list(BUDGETS), default="cpu", help="token budget and model scale")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="what to run")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default: the budget's)")
    parser.add_argument("--data", help="corpus, shard directory or text files (default: the budget's)")
    parser.add_argument("--out", default="results/study", help="output directory")
    args = parser.parse_args(argv)
    budget = dict(BUDGETS[args.budget])
    if args.seeds is not None:
        budget["seeds"] = args.seeds
    if args.data is not None:
        budget["data"] = args.data
    out = Path(args.out).resolve()  # train.py runs from the repository root
    variants = ["base", *[v for v in args.variants if v != "base"]]  # the baseline is always run
    results: dict[str, list[dict]] = {}
    for variant in variants:
        for seed in range(budget["seeds"]):
            run_dir = out / "runs" / f"{variant}-seed{seed}"
            cmd = train_command(budget, variant, seed, run_dir)
            print(f"[study] {variant} seed {seed}: {' '.join(cmd[1:])}", flush=True)
            ok, what = run_training(run_dir, cmd)
            if not ok:
                print(f"error: {variant} seed {seed} failed; see {run_dir}.log", file=sys.stderr)
                return 1
            print(f"[study] {run_dir}: {what}", flush=True)
            results.setdefault(variant, []).append(measure_run(run_dir, budget))
    table = summarize(results)
    command = "python -m nanogpt2.study " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.json").write_text(json.dumps({"budget": budget, "runs": results, "summary": table}, indent=1))
    plot_runs(
        {v: [{"tokens": c["tokens"], "val_loss": c["val_loss"]} for c in results[v][0]["curve"]] for v in results},
        out / "loss.png",
        title=f"val loss against tokens ({budget['preset']}, {budget['data']}, seed 0)",
        train=False,
    )
    write_report(out, args.budget, budget, table, command.strip())
    print(f"[study] wrote {out / 'README.md'}, {out / 'loss.png'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
