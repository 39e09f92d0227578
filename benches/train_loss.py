"""Training-step time and peak memory on CUDA, the fused linear + cross-entropy against the full-logits loss, over
micro-batch sizes up to ones the full logits cannot fit.

    python -m benches.train_loss                                   # gpt2, bf16, 1024 tokens, B = 8 ... 192: the table
    python -m benches.train_loss --json out.json --deadline 60     # and the runs as JSON; start no run after 60 s
    python -m benches.train_loss --dry-run                         # CPU, pico, tiny batches: checks the code only

The GPU half of benches/train_cpu.py's comparison (issue 11): the `gpt2` preset (124M) with SDPA attention (the
loss is measured, not the Triton kernels), bf16 autocast, AdamW(fused=True) lr 1e-3, grad clip 1.0, seed 1337, random
tokens (the step's cost does not depend on which). `unfused` is F.cross_entropy on the float32 (B, T, 50,257) logits
(206 MB a sequence of 1024 tokens, and as much again for their log-softmax and for each gradient); `fused` is
nanogpt2/loss.py, the default. Each (variant, micro-batch) runs in a fresh subprocess, so that an out-of-memory error
is its own and so is the peak memory (torch.cuda.max_memory_allocated; peak RSS in the dry run): some warm-up steps,
then the median of the timed ones. Batches run from the smallest up; once a variant runs out of memory, its larger
batches are not run. Ratios are unfused ms / fused ms (above 1, the fused loss is faster).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from benches import common

VARIANTS = ("unfused", "fused")
# About 1.1 GB a sequence with the full logits, 0.4 GB fused (estimated): on an 80 GB H100 the unfused loss should run
# out of memory from 64 or 128 on, on a 141 GB H200 from 128 on; 192 (fused, about 85 GB) fits an H200 only.
BATCHES = (8, 32, 64, 128, 192)
DRY_RUN_BATCHES = (1, 2)


def run(variant: str, preset: str, batch: int, seq_len: int, steps: int, warmup: int, device: str) -> dict:
    """Train `warmup + steps` steps in this process: status "ok" with the timed steps' ms, or "oom"; peak memory."""
    from nanogpt2.model import GPT, GPTConfig

    torch.manual_seed(1337)
    torch.set_float32_matmul_precision("high")  # tf32 for what autocast leaves in fp32, as train.py
    with torch.device(device):  # initialised in place: a 124M model set up on the CPU costs seconds per run
        model = GPT(GPTConfig.from_preset(preset), attn_impl="torch").train()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    result = {"variant": variant, "batch": batch, "status": "ok", "times_ms": [], "losses": []}
    try:
        for step in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = common.model_loss(model, tokens, fused=variant == "fused")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            result["losses"].append(loss.item())
            if step >= warmup:
                result["times_ms"].append((time.perf_counter() - t0) * 1e3)
    except RuntimeError as e:  # torch.OutOfMemoryError, or cuBLAS failing to allocate its workspace at the limit
        if not isinstance(e, torch.OutOfMemoryError) and "ALLOC_FAILED" not in str(e):
            raise
        # Data, not a crash: the peak below is the memory held when an allocation failed.
        result.update(status="oom", error=str(e).splitlines()[0])
    if device == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return result


def summarize(result: dict, seq_len: int) -> dict:
    """A child's result with its median ms/step and tokens/s."""
    if result["status"] != "ok":
        return result
    ms = statistics.median(result["times_ms"])
    return {**result, "ms_per_step": ms, "tokens_per_s": result["batch"] * seq_len / ms * 1e3}


def cells(run: dict | None) -> list[str]:
    """One variant's cells of the table: ms/step, tokens/s, peak GiB, or why there are none."""
    if run is None:
        return ["-", "", ""]
    if run["status"] == "ok":
        return [f"{run['ms_per_step']:.1f}", f"{run['tokens_per_s']:,.0f}", f"{run['peak_gib']:.2f}"]
    if run["status"] == "oom":
        return ["OOM", "", f"{run['peak_gib']:.2f}"]
    return [run["status"], "", ""]


def analyse(runs: list[dict]) -> dict:
    """The ratio unfused ms / fused ms at each batch both ran, the largest batch each variant fits, and how far
    apart the two losses are at the first step of those batches (the same tokens and initial weights; later steps
    drift apart as bf16 rounding differences grow over training on random tokens)."""
    ok = {(r["variant"], r["batch"]): r for r in runs if r["status"] == "ok"}
    both = [b for v, b in ok if v == "fused" and ("unfused", b) in ok]
    ratios = {str(b): ok["unfused", b]["ms_per_step"] / ok["fused", b]["ms_per_step"] for b in both}  # keys as in JSON
    largest = {v: max((b for w, b in ok if w == v), default=None) for v in VARIANTS}
    diffs = [abs(ok["unfused", b]["losses"][0] - ok["fused", b]["losses"][0]) for b in both]
    return {"ratios": ratios, "largest": largest, "first_step_loss_diff": max(diffs, default=None)}


def table(data: dict) -> tuple[list[str], list[list[str]]]:
    """The header and the rows (one per micro-batch) of a result's table, as strings: printed here, and written as
    markdown by benches.summary."""
    seq_len, peak = data["settings"]["seq_len"], "peak RSS GiB" if data["device"] == "cpu (dry run)" else "peak GiB"
    header = ["batch", "tokens"] + [f"{v} {c}" for v in VARIANTS for c in ("ms/step", "tokens/s", peak)]
    by_key = {(r["variant"], r["batch"]): r for r in data["runs"]}
    rows = []
    for b in data["settings"]["batches"]:
        ratio = data["ratios"].get(str(b))
        row = [str(b), f"{b * seq_len:,}", *cells(by_key.get(("unfused", b))), *cells(by_key.get(("fused", b)))]
        rows.append(row + ["-" if ratio is None else f"{ratio:.2f}x"])
    return header + ["unfused/fused"], rows


def verdict(data: dict) -> str:
    """The line under the table: the largest micro-batch each variant fits, and the losses' agreement."""
    largest, diff = data["largest"], data["first_step_loss_diff"]
    fits = ", ".join(f"{v} {largest[v] or 'none'}" for v in VARIANTS)
    agree = "-" if diff is None else f"{diff:.1e}"
    return f"largest micro-batch that fits: {fits}; max |loss unfused - fused| at the first step: {agree}"


def print_table(data: dict) -> None:
    header, rows = table(data)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print(verdict(data))


def spawn(variant: str, batch: int, settings: dict, dry_run: bool) -> dict:
    """One run in a fresh process: its summarized result, or status "failed" with the last line of its error."""
    child = [sys.executable, "-m", "benches.train_loss", "--child", variant, "--preset", settings["preset"]]
    child += ["--batches", str(batch), "--seq-len", str(settings["seq_len"]), "--steps", str(settings["steps"])]
    child += ["--warmup", str(settings["warmup"]), *(["--dry-run"] if dry_run else [])]
    done = subprocess.run(child, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return summarize(json.loads(done.stdout.splitlines()[-1]), settings["seq_len"])
    print(f"{variant} B={batch} failed:\n{done.stderr}", file=sys.stderr, flush=True)
    error = (done.stderr.strip().splitlines() or [f"rc {done.returncode}"])[-1]
    return {"variant": variant, "batch": batch, "status": "failed", "error": error}


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(
        __doc__, "also write the environment and every run to this JSON file", "start no run after S seconds"
    )
    parser.add_argument("--preset", default=None, help="model preset (default: gpt2; pico in the dry run)")
    parser.add_argument(
        "--batches", type=int, nargs="+", help=f"micro-batch sizes (default: {' '.join(map(str, BATCHES))})"
    )
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 1024; 64 in the dry run)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, in each run (default: 2)")
    # A parent runs each (variant, first of --batches) as a child: one run, its result as JSON on the last line.
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = common.select_device(args.dry_run, "benches.train_loss")
    preset = args.preset or ("pico" if args.dry_run else "gpt2")
    seq_len = args.seq_len or (64 if args.dry_run else 1024)
    batches = args.batches or list(DRY_RUN_BATCHES if args.dry_run else BATCHES)
    if args.child:
        print(json.dumps(run(args.child, preset, batches[0], seq_len, args.steps, args.warmup, device)))
        return
    deadline = time.monotonic() + args.deadline
    env = common.environment(args.dry_run)
    if device == "cuda":
        env["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    settings = {"preset": preset, "seq_len": seq_len, "batches": batches, "steps": args.steps, "warmup": args.warmup}
    runs = []
    for batch in batches:
        for variant in reversed(VARIANTS):  # fused first: at the largest batches it is the run that matters
            oom = next((r["batch"] for r in runs if r["variant"] == variant and r["status"] == "oom"), None)
            if oom is not None:
                runs.append({"variant": variant, "batch": batch, "status": f"not run (OOM at {oom})"})
            elif time.monotonic() > deadline:
                runs.append({"variant": variant, "batch": batch, "status": "not run (deadline)"})
            else:
                runs.append(spawn(variant, batch, settings, args.dry_run))
            print(f"{variant} B={batch}: {' | '.join(c for c in cells(runs[-1]) if c)}", flush=True)
            data = {**env, "settings": settings, "runs": runs, **analyse(runs)}
            if args.json:  # rewritten after every run, so a run cut short still leaves complete JSON
                common.write_json(args.json, data)
    print_table(data)
    if any(r["status"] == "failed" for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
