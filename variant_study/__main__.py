"""The variant study: what rotary positions, grouped-query attention and sliding windows do to a GPT.

    python -m variant_study [--budget cpu|gpu|toy] [--variants base rope gqa swa all] [--seeds N] [--out DIR]

Trains every variant through train.py (a subprocess per run, a few at a time), then measures each trained model here:
- language modelling: val loss against tokens over several seeds, and at 2x, 4x and 8x the training context;
- associative recall (variant_study/recall.py): accuracy against the distance between a pair and its query, with sweeps
  of K/V heads, window and depth, at the training length and beyond it;
- decoding: tokens/s and KV-cache bytes against context, with the cache.
Writes README.md (tables, a reading in plain words made from the numbers), results.json and three plots into --out
(default runs/study-BUDGET, never the committed results/study: regenerating those is an explicit --out results/study).
Reruns reuse finished runs and retrain incomplete ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from variant_study.measure import decode_speed, measure_run
from variant_study.plan import BUDGETS, DECODE_VARIANTS, VARIANTS, check_budget, plan_runs, train_command
from variant_study.plot import import_pyplot
from variant_study.report import plot_decode, plot_loss, plot_recall, summarize_lm
from variant_study.report_text import write_report
from variant_study.runs import train_all


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m variant_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="cpu", help=f"scale of the study: {', '.join(BUDGETS)} (default cpu)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--seeds", type=int, help="language-modelling seeds per variant (default: the budget's)")
    parser.add_argument("--window", type=int, help="the swa variant's window in both tasks (default: the budget's)")
    parser.add_argument(
        "--kv-heads", type=int, help="the gqa variant's K/V heads in both tasks (default: the budget's)"
    )
    parser.add_argument(
        "--out", help="output directory (default: runs/study-BUDGET; the committed results: --out results/study)"
    )
    args = parser.parse_args(argv)
    args.out = args.out or f"runs/study-{args.budget}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.budget not in BUDGETS:
        print(f"error: unknown budget {args.budget!r}; the budgets are {', '.join(BUDGETS)}", file=sys.stderr)
        return 2
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant {unknown[0]!r}; the variants are {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    budget = BUDGETS[args.budget]
    if args.seeds is not None:
        budget = dataclasses.replace(budget, seeds=args.seeds)
    for name in ("window", "kv_heads"):
        if getattr(args, name) is not None:
            parts = {
                p: dataclasses.replace(getattr(budget, p), **{name: getattr(args, name)}) for p in ("lm", "recall")
            }
            budget = dataclasses.replace(budget, **parts)
    try:
        check_budget(budget)
    except ValueError as err:
        print(f"error: budget {args.budget}: {err}", file=sys.stderr)
        return 2
    if budget.device == "cuda" and not torch.cuda.is_available():
        print(f"error: budget {args.budget} needs a CUDA device and none is available", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()  # train.py runs from the repository root
    if out.exists() and not out.is_dir():
        print(f"error: --out {args.out} is a file, not a directory", file=sys.stderr)
        return 2
    try:
        import_pyplot()  # the plots come after all the training: fail now, not then
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    variants = ["base", *[v for v in VARIANTS if v in args.variants and v != "base"]]  # the baseline always runs
    t0 = time.perf_counter()
    runs = plan_runs(budget, variants)
    outcome = {}
    parts = {"lm": budget.lm, "recall": budget.recall}
    # One queue per number of runs at a time, language models first: with the same number for both kinds, the first
    # recall runs fill the slots the last language models leave.
    for workers in dict.fromkeys(part.workers for part in parts.values()):
        jobs = {}
        for run in (r for r in runs if parts[r.kind].workers == workers):
            run_dir = out / "runs" / run.dir_name
            jobs[run_dir] = train_command(parts[run.kind], run, run_dir, budget.device)
        outcome.update(train_all(jobs, workers, cpu=budget.device == "cpu"))
    failed = [d for d, what in outcome.items() if what == "failed"]
    if failed:
        print(f"error: {len(failed)} run(s) failed, first {failed[0].name}; see {failed[0]}.log", file=sys.stderr)
        return 1
    train_s = time.perf_counter() - t0
    torch.set_num_threads(os.cpu_count() or 1)
    lm: dict[str, list[dict]] = {}
    recall: dict[str, dict] = {}
    for run in runs:
        print(f"[study] measuring {run.dir_name}", flush=True)
        record = measure_run(out / "runs" / run.dir_name, run.kind, budget, run.seed)
        if run.kind == "lm":
            lm.setdefault(run.variant, []).append(record)
        else:
            recall[run.name] = record
    (out / "results.json").write_text(json.dumps({"lm": lm, "recall": recall}, indent=1))  # kept if decoding fails
    print("[study] timing decoding", flush=True)
    decode = {v: decode_speed(budget, v) for v in DECODE_VARIANTS if v in variants}
    total_s = time.perf_counter() - t0
    command = "python -m variant_study " + " ".join(argv if argv is not None else sys.argv[1:])
    about = {
        "command": command.strip(),
        "budget_name": args.budget,
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if budget.device == "cuda" else ""),
        "train_s": train_s,
        "runs_s": sum(r["wall_s"] for runs in lm.values() for r in runs) + sum(r["wall_s"] for r in recall.values()),
        "total_s": total_s,
        "outcome": {d.name: what for d, what in outcome.items()},
    }
    summary = summarize_lm(lm)
    results = {"about": about, "budget": dataclasses.asdict(budget), "lm": lm, "lm_summary": summary,
               "recall": recall, "decode": decode}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_loss(lm, out / "loss.png", f"val loss against tokens ({budget.lm.preset}, {budget.lm.data})")
    plot_recall(recall, budget, out / "recall.png")
    if decode:
        plot_decode(decode, out / "decode.png")
    write_report(out / "README.md", about, budget, summary, recall, decode)
    print(f"[study] wrote {out / 'README.md'}, results.json and plots in {total_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
