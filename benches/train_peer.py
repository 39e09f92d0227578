"""GPT-2 124M side by side with nanoGPT on the same GPU: nanoGPT's own train.py against ours, on synthetic tokens.

    python -m benches.train_peer --nanogpt ../shared/peers/nanoGPT                  # on a CUDA GPU: the table
    python -m benches.train_peer --nanogpt DIR --json out.json --deadline 280       # and the runs as JSON
    python -m benches.train_peer --nanogpt DIR --dry-run                            # CPU, tiny model: the plumbing

DIR is an unmodified nanoGPT checkout. It runs in a scratch copy holding random GPT-2 tokens as
data/synthetic/{train,val}.bin, with its defaults (torch.compile on, bf16 autocast, 12 x 1024 micro-batches) and as
many micro-steps as make its global batch ours (--batch-size sequences of 1024 tokens: 48 = 12 x 4). Ours is
`train.py --preset gpt2 --data synthetic` at the same global batch, in each variant of VARIANTS (eager, whole-model
compile, compile + CUDA graphs; --attn torch and triton). Every run is a fresh process; the runs take turns over
--rounds, so that other load, and torch.compile's on-disk cache, favour none of them.

Per run: the median time per step after --warmup steps (nanoGPT prints each step's time, after a `.item()` that
waits for the device; ours logs each --log-every interval's mean in metrics.jsonl), tokens/s, peak GPU memory
(torch.cuda.max_memory_allocated: ours from summary.json, nanoGPT's read at exit by a wrapper that runs its train.py
with runpy) and tokens/s against nanoGPT's. The models differ slightly: nanoGPT's default has no biases (ours has
GPT-2's), both pad the vocabulary to 50,304.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benches import common

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 1024
NANOGPT_MICRO_BATCH = 12  # nanoGPT's default batch_size (its micro-batch)
NANOGPT_FILES = ("train.py", "model.py", "configurator.py")
# Our variants: name -> train.py flags.
VARIANTS = {
    "eager-torch": ["--no-compile", "--attn", "torch"],
    "eager-triton": ["--no-compile", "--attn", "triton"],
    "compiled-torch": ["--compile", "--attn", "torch"],
    "compiled-triton": ["--compile", "--attn", "triton"],
    "graphs-torch": ["--compile", "--cuda-graphs", "--attn", "torch"],
    "graphs-triton": ["--compile", "--cuda-graphs", "--attn", "triton"],
}
DRY_VARIANTS = {"eager-torch": ["--no-compile", "--attn", "torch"]}  # CPU: no Triton, no CUDA graphs, no long compile
# nanoGPT on CPU, per its README: no compile, float32, a tiny model (our pico preset's shape).
NANOGPT_DRY = ["--device=cpu", "--compile=False", "--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=64"]
# Runs nanoGPT's train.py unchanged in this process, then prints its peak memory as ours measures it (run.py's
# peak_memory_mib): allocated on the GPU, the resident set on CPU (dry run).
NANOGPT_WRAPPER = """
import resource, runpy, sys, torch
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("peak_mem_bytes", torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rss)
"""
RUN_TIMEOUT_S = 600  # one run: start-up, compiling (a minute or two for GPT-2) and the steps
ITER_LINE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")


def nanogpt_scratch(nanogpt: Path, work: Path, vocab_size: int = 50257, tokens: int = 2**21) -> Path:
    """A copy of nanoGPT's scripts in `work` with random tokens as its dataset "synthetic" (flat uint16, its format)."""
    for name in NANOGPT_FILES:
        if not (nanogpt / name).is_file():
            sys.exit(f"--nanogpt {nanogpt}: no {name} there (expected an unmodified nanoGPT checkout)")
        shutil.copy(nanogpt / name, work / name)
    data = work / "data" / "synthetic"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1337)
    for split in ("train", "val"):
        rng.integers(0, vocab_size, tokens, dtype=np.uint16).tofile(data / f"{split}.bin")
    return work


def run_nanogpt(work: Path, steps: int, batch: int, dry_run: bool, timeout: float) -> dict:
    """nanoGPT's train.py for `steps` steps of `batch` sequences: per-step ms (from its log), losses, peak memory."""
    micro, seq_len = (4, 64) if dry_run else (NANOGPT_MICRO_BATCH, SEQ_LEN)
    flags = [
        "--dataset=synthetic", f"--batch_size={micro}", f"--block_size={seq_len}",
        f"--gradient_accumulation_steps={batch // micro}", f"--max_iters={steps - 1}",  # it runs max_iters + 1 steps
        "--eval_interval=1000000", "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False",
        f"--out_dir={work / 'out'}", *(NANOGPT_DRY if dry_run else []),
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", NANOGPT_WRAPPER, *flags], cwd=work, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    iters = [ITER_LINE.match(line) for line in done.stdout.splitlines()]
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("peak_mem_bytes"))
    return {
        "ms": [float(m[3]) for m in iters if m],
        "loss": [float(m[2]) for m in iters if m],
        "peak_mem_gib": peak / 2**30,
        "tokens_per_step": batch * seq_len,
    }


def run_ours(variant_flags: list[str], out_dir: Path, steps: int, batch: int, dry_run: bool, timeout: float) -> dict:
    """Our train.py for `steps` steps of `batch` sequences: per-step ms (metrics.jsonl), losses, peak memory."""
    size = ["--preset", "pico", "--seq-len", "64", "--device", "cpu"] if dry_run else ["--preset", "gpt2"]
    seq_len = 64 if dry_run else SEQ_LEN
    cmd = [sys.executable, str(REPO / "train.py"), *size, "--data", "synthetic", "--batch-size", str(batch),
           "--max-steps", str(steps), "--eval-every", "0", "--eval-batches", "1", "--out-dir", str(out_dir),
           *variant_flags]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out_dir / "summary.json").read_text())
    return {
        "ms": [r["ms"] for r in rows],
        "loss": [r["loss"] for r in rows],
        "peak_mem_gib": summary["peak_mem_mib"] / 1024,
        "tokens_per_step": batch * seq_len,
    }


def table(results: dict[str, list[dict]], warmup: int) -> tuple[str, dict]:
    """The side-by-side table (median ms per step after warmup over every round) and its rows as a dict."""
    rows = {}
    for name, runs in results.items():
        ms = [t for run in runs if "ms" in run for t in run["ms"][warmup:]]
        if not ms:
            rows[name] = {"error": next((run["error"] for run in runs if "error" in run), "no timed steps")}
            continue
        median = statistics.median(ms)
        rows[name] = {"ms_per_step": median, "tokens_per_s": runs[0]["tokens_per_step"] / median * 1e3,
                      "peak_mem_gib": max(run["peak_mem_gib"] for run in runs if "peak_mem_gib" in run)}  # fmt: skip
    peer = rows.get("nanoGPT", {}).get("tokens_per_s")
    lines = [f"{'run':<18} {'ms/step':>9} {'tokens/s':>11} {'peak GiB':>9} {'vs nanoGPT':>11}"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"{name:<18} failed: {row['error']}")
            continue
        row["vs_nanogpt"] = row["tokens_per_s"] / peer if peer else None
        ratio = f"{row['vs_nanogpt']:.2f}x" if peer else "-"
        lines.append(f"{name:<18} {row['ms_per_step']:>9.1f} {row['tokens_per_s']:>11,.0f} "
                     f"{row['peak_mem_gib']:>9.2f} {ratio:>11}")  # fmt: skip
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "write the runs and the table as JSON here", "start no run after this many seconds")
    p.add_argument("--nanogpt", type=Path, required=True, help="an unmodified nanoGPT checkout (its train.py)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default: 30)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing: compiling (default: 5)")
    p.add_argument("--batch-size", type=int, default=48, help="global sequences per step, 12 x k (default: 48)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each, taking turns (default: 1)")
    p.add_argument("--variants", nargs="+", help=f"ours to run (default: all of {', '.join(VARIANTS)})")
    args = p.parse_args(argv)
    device = common.select_device(args.dry_run, "benches.train_peer")
    variants = DRY_VARIANTS if args.dry_run else {k: VARIANTS[k] for k in args.variants or VARIANTS}
    batch = 4 if args.dry_run else args.batch_size
    if batch % NANOGPT_MICRO_BATCH and not args.dry_run:
        sys.exit(f"--batch-size {batch} must be a multiple of nanoGPT's micro-batch {NANOGPT_MICRO_BATCH}")
    t0 = time.monotonic()
    results: dict[str, list[dict]] = {"nanoGPT": [], **{f"ours {name}": [] for name in variants}}
    with tempfile.TemporaryDirectory() as tmp:
        work = nanogpt_scratch(args.nanogpt.resolve(), Path(tmp))
        for round_ in range(args.rounds):
            for name in results:
                if time.monotonic() - t0 > args.deadline:
                    print(f"deadline: {name} round {round_ + 1} not run", flush=True)
                    continue
                try:
                    if name == "nanoGPT":
                        run = run_nanogpt(work, args.steps, batch, args.dry_run, RUN_TIMEOUT_S)
                    else:
                        out = Path(tmp) / f"{name.split()[1]}-{round_}"
                        run = run_ours(variants[name.split()[1]], out, args.steps, batch, args.dry_run, RUN_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    run = {"error": f"timed out after {RUN_TIMEOUT_S} s"}
                results[name].append(run)
                ms = statistics.median(run["ms"][args.warmup :] or run["ms"]) if run.get("ms") else None
                print(f"{name} round {round_ + 1}: " + (f"{ms:.1f} ms/step" if ms else run["error"]), flush=True)
    text, rows = table(results, args.warmup)
    print(f"\nGPT-2 124M, {batch} x {SEQ_LEN if not args.dry_run else 64} tokens per step, on {device}:\n{text}")
    if args.json:
        setup = {"batch_size": batch, "steps": args.steps, "warmup": args.warmup}
        common.write_json(args.json, {"environment": common.environment(args.dry_run), **setup, "rows": rows,
                                      "runs": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
