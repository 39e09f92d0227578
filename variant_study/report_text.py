"""The study's README.md: what was run, the tables, and the reading in words (report.py makes the sentences)."""

from __future__ import annotations

from pathlib import Path

from variant_study.measure import EVAL_QUESTIONS
from variant_study.plan import Budget, Part
from variant_study.recall import RECALL_PAIRS
from variant_study.report import (
    CHANCE,
    GOOD,
    decode_reading,
    display_width,
    fmt,
    length_reading,
    lm_reading,
    reach,
    rebin,
    recall_reading,
    times,
)


def describe(part: Part) -> str:
    layers = f", {part.n_layer} layers" if part.n_layer else ""
    return (
        f"preset `{part.preset}`{layers} on `{part.data}`, {part.max_steps} steps of {part.batch_size} x "
        f"{part.seq_len} tokens ({part.max_steps * part.batch_size * part.seq_len:,} tokens), lr {part.lr} "
        f"(warmup {part.warmup_steps}, cosine to a tenth), {part.dtype}"
    )


def recall_section(recall: dict[str, dict], budget: Budget) -> list[str]:
    part = budget.recall
    lengths = [f"{k}x" for k in budget.lengths]
    lines = [
        "## 1. Associative recall against distance",
        "",
        f"Multi-query associative recall (`--data recall`, variant_study/recall.py): {RECALL_PAIRS} key-value pairs "
        "open each sequence, each pair one token naming its key and value, then questions (a key; the model must emit "
        "its value) at random places later on, filler between; only the answers are scored. Distance is the number of "
        f"positions from the pair to the question. Each run: {describe(part)}, one seed. Measured on "
        f"{budget.recall_eval_rows} held-out sequences at the training length (k times as many at k times the "
        f"length), each asking {EVAL_QUESTIONS} distinct keys, so the pair is the only place an answer stood before; "
        f"chance {CHANCE:.3f}. *Reach*: the distance from which accuracy stays below {GOOD} (none: it never drops), "
        f"in bins of {display_width(budget)} distances as in the plot; the reading's bands count every distance. "
        "Learned positions cannot run past the training length: n/a.",
        "",
        "| run | positions | K/V heads | window | layers | "
        + " | ".join(f"accuracy @ {times(k) * part.seq_len}" for k in lengths)
        + f" | reach @ {part.seq_len} |",
        "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in lengths) + " | ---: |",
    ]
    for name, run in recall.items():
        c = run["config"]
        accs = [fmt(run["recall"][k]["accuracy"] if run["recall"][k] else None) for k in lengths]
        stop = reach(rebin(run["recall"]["1x"], display_width(budget)))
        lines.append(
            f"| {name} | {c['pos_emb']} | {c['n_kv_head']} of {c['n_head']} | {c['window'] or 'none'} | "
            f"{c['n_layer']} | " + " | ".join(accs) + f" | {'none' if stop is None else stop} |"
        )
    lines += ["", *recall_reading(recall, budget), "", "![recall accuracy against distance](recall.png)", ""]
    return lines


def length_section(summary: dict[str, dict], budget: Budget) -> list[str]:
    part = budget.lm
    lengths = list(next(iter(summary.values()))["val_loss_at"])
    lines = [
        "## 2. Length generalisation (language modelling)",
        "",
        f"Val loss of the language models of section 4 on the same val tokens cut into rows of 1x, 2x, 4x and 8x the "
        f"training context ({part.seq_len}); mean ± half the range over seeds. Learned positions stop at the "
        "training context (the position table ends there): n/a. Recall at longer lengths is in section 1's table.",
        "",
        "| variant | " + " | ".join(f"val loss @ {times(k) * part.seq_len}" for k in lengths) + " |",
        "| --- | " + " | ".join("---:" for _ in lengths) + " |",
    ]
    for variant, row in summary.items():
        cells = [fmt(None) if row["val_loss_at"][k] is None else "{:.3f} ± {:.3f}".format(*row["val_loss_at"][k])
                 for k in lengths]  # fmt: skip
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return [*lines, "", *length_reading(summary, part.seq_len), ""]


def lm_section(summary: dict[str, dict], budget: Budget) -> list[str]:
    part = budget.lm
    lines = [
        "## 4. Language modelling",
        "",
        f"{describe(part).capitalize()}, {budget.seeds} seeds per variant. GQA: {part.kv_heads} K/V heads, "
        f"window {part.window}. Losses in nats per token; ± is half the range over seeds. Training tokens/s are "
        "as each run measured them, with whatever else the machine ran at the time (a rerun reuses finished runs, so "
        "they can come from different sessions): compare speeds with benches/, not here.",
        "",
        "| variant | params | train loss | val loss | tokens/s (train) | peak mem (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, r in summary.items():
        lines.append(
            f"| {variant} | {r['params']:,} | {r['train_loss']:.3f} ± {r['train_loss_spread']:.3f} | "
            f"{r['val_loss']:.3f} ± {r['val_loss_spread']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_mem_mib']:,.0f} |"
        )
    lines += ["", *lm_reading(summary), "", "![val loss against tokens](loss.png)", ""]
    return lines


def decode_section(decode: dict[str, list[dict]], budget: Budget) -> list[str]:
    if not decode:
        return []
    variants = list(decode)
    lines = [
        "## 3. Decoding at long context",
        "",
        f"One sequence, one new token per step through the KV cache after a prompt of each length; the median of "
        f"{budget.decode_tokens} steps. Untrained `{budget.decode_preset}` models sized to the longest context (speed "
        "does not depend on the weights). Cache: the bytes the K and V buffers hold after the steps, in the model's "
        f"dtype ({'float32 on a CPU' if budget.device == 'cpu' else 'bfloat16'}): context + {budget.decode_tokens} "
        "positions with full attention, the window's with a sliding window.",
        "",
        "| context | " + " | ".join(f"{v} tokens/s" for v in variants) + " | "
        + " | ".join(f"{v} cache MiB" for v in variants) + " |",
        "| ---: | " + " | ".join("---:" for _ in range(2 * len(variants))) + " |",
    ]  # fmt: skip
    for i, context in enumerate(r["context"] for r in decode[variants[0]]):
        speeds = [f"{decode[v][i]['tokens_per_s']:.1f}" for v in variants]
        sizes = [f"{decode[v][i]['cache_bytes'] / 2**20:.2f}" for v in variants]
        lines.append(f"| {context} | " + " | ".join(speeds + sizes) + " |")
    lines += ["", *decode_reading(decode), "", "![decoding speed and cache memory](decode.png)", ""]
    return lines


def write_report(
    path: Path, about: dict, budget: Budget, summary: dict, recall: dict[str, dict], decode: dict[str, list[dict]]
) -> None:
    """README.md of the study: how it was made, then sections 1-4 (recall, length, decoding, language modelling)."""
    lines = [
        "# Variant study: what rotary positions, grouped-query attention and sliding windows do",
        "",
        f"Made by `{about['command']}` on {about['date']}, {about['machine']}: budget `{about['budget_name']}`. "
        f"This invocation took {about['total_s'] / 60:.1f} minutes ({about['train_s'] / 60:.1f} training the runs it "
        f"did not find complete, the rest measuring); the runs' own training times add up to "
        f"{about['runs_s'] / 60:.1f} minutes (language models {budget.lm.workers} at a time, recall runs "
        f"{budget.recall.workers} at a time). Every run trains through train.py; its command, log and metrics are "
        "under runs/. results.json holds every number below.",
        "",
        "Variants: **base** (GPT-2: learned positions, multi-head, full causal attention), **rope** (rotary "
        "positions), **gqa** (fewer K/V heads), **swa** (sliding-window attention), **all** (the three together).",
        "",
        *recall_section(recall, budget),
        *length_section(summary, budget),
        *decode_section(decode, budget),
        *lm_section(summary, budget),
    ]
    path.write_text("\n".join(lines))
