"""The verdict of a GPU check: every target PASS / FAIL / MISSING, a markdown summary and the fastest candidates.

    python -m benches.summary RESULTS_DIR

Reads what benches/gpu_check.sh leaves in RESULTS_DIR (configs.json from benches.configs, bench_kernels.json from
benches.kernels, train-*.metrics.jsonl from train.py, train_loss.json from benches.train_loss, train_modes.json from
benches.train_modes) and writes
RESULTS_DIR/summary.md (ready to paste into BENCHMARKS.md) and RESULTS_DIR/defaults.json (the measured fastest
attention code path, to set the defaults in kernels/tuning.py from data). Prints the target table last.
"""

import json
import statistics
import sys
from pathlib import Path

from benches import common, train_loss, train_modes
from benches.kernels import CANDIDATES

TRAIN_WARMUP_STEPS = 10  # steps left out of training medians: compilation and autotuning


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(bench: dict | None, kernel: str, case: str, mode: str) -> dict | None:
    rows = (bench or {}).get("rows", [])
    return next((r for r in rows if r["kernel"] == kernel and r["case"] == case and r.get("mode") == mode), None)


def _best_ms(row: dict | None) -> float | None:
    return row["results"][row["best"]]["ms"] if row and "best" in row else None


def train_stats(results: Path, attn: str) -> dict | None:
    """Median ms/step, tokens/s and MFU of a training run's steps after warm-up."""
    path = results / f"train-{attn}.metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    rows = [r for r in rows if "tok_s" in r]
    rows = [r for r in rows if r["step"] > TRAIN_WARMUP_STEPS] or rows
    if not rows:
        return None
    return {
        "ms": statistics.median(r["ms"] for r in rows),
        "tok_s": statistics.median(r["tok_s"] for r in rows),
        "mfu": statistics.median(r.get("mfu", 0.0) for r in rows),
        "steps": len(rows),
    }


def targets(results: Path) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, PASS / FAIL / MISSING) for every target of the kernels."""
    bench = _load(results / "bench_kernels.json")
    configs = _load(results / "configs.json")
    out = []

    def add(name: str, value: float | None, goal: str, ok: bool | None, fmt: str = "{:.2f}") -> None:
        status = "MISSING" if value is None or ok is None else ("PASS" if ok else "FAIL")
        out.append((name, "-" if value is None else fmt.format(value), goal, status))

    if configs is None:
        add("every config correct (bf16, fp16)", None, "all runs ok", None)
    else:
        runs = configs["runs"]
        bad = sum(not r["ok"] for r in runs)
        ok = bad == 0 and configs.get("skipped", 0) == 0
        status = "PASS" if ok else ("FAIL" if bad else "MISSING")
        out.append(("every config correct (bf16, fp16)", f"{len(runs) - bad}/{len(runs) + configs.get('skipped', 0)}",
                    "all runs ok", status))  # fmt: skip

    gpt2 = _row(bench, "attention", "gpt2", "fwd+bwd")
    x = gpt2.get("x_sdpa") if gpt2 else None
    add("gpt2 fwd+bwd vs SDPA, launched", x, ">= 1.15x", None if x is None else x >= 1.15, "{:.2f}x")
    x = gpt2.get("x_sdpa_kernel") if gpt2 else None
    add("gpt2 fwd+bwd vs SDPA, kernel time", x, "report", None if x is None else True, "{:.2f}x")
    long = _row(bench, "attention", "long", "fwd+bwd")
    tflops = long["results"][long["best"]]["tflops"] if long and "best" in long else None
    add("long fwd+bwd TFLOP/s", tflops, ">= 400", None if tflops is None else tflops >= 400, "{:.0f}")
    w1024 = _row(bench, "attention", "long-w1024", "fwd+bwd")
    x = w1024.get("x_flex") if w1024 else None
    add("long-w1024 fwd+bwd vs FlexAttention", x, ">= 1.5x", None if x is None else x >= 1.5, "{:.2f}x")
    gqa_ms, mha_ms = _best_ms(_row(bench, "attention", "gpt2-gqa", "fwd+bwd")), _best_ms(gpt2)
    ratio = gqa_ms / mha_ms if gqa_ms and mha_ms else None
    add("gpt2-gqa time / gpt2 time", ratio, "<= 1.00", None if ratio is None else ratio <= 1.0)
    w256 = _row(bench, "attention", "long-w256", "fwd+bwd")
    ms_1024, ms_256 = _best_ms(w1024), _best_ms(w256)
    if ms_1024 and ms_256:
        expected = w1024["tiles"] / w256["tiles"]
        ratio = ms_1024 / ms_256
        add(f"long-w1024 / long-w256 time (tiles {expected:.2f})", ratio, f"{expected:.2f} +- 20%",
            abs(ratio / expected - 1) <= 0.2)  # fmt: skip
    else:
        add("long-w1024 / long-w256 time", None, "ratio of visible tiles +- 20%", None)
    rope = _row(bench, "rope", "gpt2", "fwd+bwd")
    frac = rope.get("of_copy") if rope else None
    add("RoPE fwd+bwd share of copy bandwidth", None if frac is None else 100 * frac, ">= 80%",
        None if frac is None else frac >= 0.8, "{:.0f}%")  # fmt: skip
    triton_run, torch_run = train_stats(results, "triton"), train_stats(results, "torch")
    for attn, stats in (("triton", triton_run), ("torch", torch_run)):
        value = None if stats is None else stats["tok_s"]
        goal = "report" if attn == "torch" else ">= torch's"
        ok = None if stats is None or torch_run is None else stats["tok_s"] >= torch_run["tok_s"]
        fmt = "{:,.0f} tok/s" + ("" if stats is None else f", mfu {100 * stats['mfu']:.1f}%")
        add(f"training gpt2 --attn {attn}", value, goal, ok if attn == "triton" else stats is not None, fmt)
    out += train_modes.targets(_load(results / "train_modes.json"))  # one row per training mode under torchrun
    return out


def fastest_candidates(results: Path) -> dict:
    """The fastest Triton candidate per case and mode, and the one with the least total fwd+bwd kernel time (the
    profiler's, launched time where it is missing) over the cases every candidate ran: the measured default for
    kernels/tuning.py."""
    bench = _load(results / "bench_kernels.json") or {}
    per_case, totals = {}, {}
    rows = [r for r in bench.get("rows", []) if r["kernel"] == "attention" and "best" in r]
    for r in rows:
        per_case[f"{r['case']} {r['mode']}"] = r["best"].removeprefix("triton[").removesuffix("]")
        if r["mode"] == "fwd+bwd":
            results = {c: r["results"].get(f"triton[{c}]", {}) for c in CANDIDATES}
            timed = {c: res.get("kernel_ms", res.get("ms")) for c, res in results.items()}
            if all(timed.values()):
                for c, ms in timed.items():
                    totals[c] = totals.get(c, 0.0) + ms
    best = min(totals, key=totals.get) if totals else None
    return {
        "per_case": per_case,
        "fwd+bwd_total_kernel_ms": totals,
        "recommended": None if best is None else {"candidate": best, **CANDIDATES[best]},
        "device": bench.get("device"),
        "commit": bench.get("commit"),
    }


def markdown_table(table: tuple[list[str], list[list[str]]]) -> list[str]:
    """A (header, rows) table of strings as markdown lines."""
    header, rows = table
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(row)} |" for row in rows)]


def loss_markdown(results: Path) -> list[str]:
    """bench.train_loss's table: the fused loss against the full logits over micro-batch sizes."""
    data = _load(results / "train_loss.json")
    if data is None:
        return ["Fused linear + cross-entropy against the full logits: not measured (no train_loss.json)."]
    s = data["settings"]
    intro = (
        f"Training step of the {s['preset']} preset, bf16 autocast, {s['seq_len']} tokens a sequence, "
        "`F.cross_entropy` on the full logits (unfused) against `nanogpt2/loss.py` (fused), each run in a fresh "
        f"process, median of {s['steps']} steps after {s['warmup']} (`python -m benches.train_loss`):"
    )
    return [intro, "", *markdown_table(train_loss.table(data)), "", train_loss.verdict(data) + "."]


def modes_markdown(results: Path) -> list[str]:
    """benches.train_modes's table: every training mode under torchrun on one GPU against a plain process."""
    data = _load(results / "train_modes.json")
    if data is None:
        return ["Training modes under torchrun: not measured (no train_modes.json)."]
    s = data["settings"]
    intro = (
        f"Training modes under `torchrun --standalone --nproc_per_node=1`, {s['steps']} steps each, the last "
        f"{s['resumed_steps']} also resumed from a checkpoint, against a plain process (`python -m "
        f"benches.train_modes`; flags `{' '.join(s['flags'])}`):"
    )
    return [intro, "", *markdown_table(train_modes.table(data))]


def markdown(results: Path, rows: list[tuple[str, str, str, str]], defaults: dict) -> str:
    """BENCHMARKS.md-ready text: the environment, the targets, every benchmark row, the fastest candidates, the
    fused loss against the full logits, the training modes under torchrun."""
    bench = _load(results / "bench_kernels.json") or {}
    get = bench.get
    lines = [
        f"### {get('device', 'unknown device')}, {get('date', '?')}, commit {get('commit', '?')}",
        "",
        f"torch {get('torch', '?')}, triton {get('triton', '?')}, CUDA {get('cuda', '?')}; device-to-device copy "
        f"{get('copy_gbs', 0):.0f} GB/s. Command: `bash benches/gpu_check.sh`.",
        "",
        "| target | measured | goal | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += [
        "",
        "| kernel | case | mode | implementation | launched ms | kernel ms | CUDA graph ms | rate | max diff |",
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in bench.get("rows", []):
        if "skipped" in r:
            lines.append(f"| {r['kernel']} | {r['case']} | | skipped ({r['skipped']}) | | | | | |")
            continue
        unit = "TFLOP/s" if r["kernel"] == "attention" else "GB/s"
        for impl, res in r["results"].items():
            if "ms" not in res:
                lines.append(f"| {r['kernel']} | {r['case']} | {r['mode']} | {impl} | failed | | | | |")
                continue
            rate = res.get("tflops", res.get("gbs"))
            diff = r.get("max_diff", {}).get(impl)
            lines.append(
                f"| {r['kernel']} | {r['case']} | {r['mode']} | {impl}{' (best)' if impl == r.get('best') else ''} | "
                f"{res['ms']:.3f} | {res.get('kernel_ms', float('nan')):.3f} | "
                f"{res.get('graph_ms', float('nan')):.3f} | {rate:.1f} {unit} | "
                f"{'' if diff is None else f'{diff:.1e}'} |"
            )
    rec = defaults.get("recommended")
    choice = "not measured"
    if rec:
        choice = f"{rec['candidate']} (tma={rec['tma']}, deterministic={rec['deterministic']})"
    lines += [
        "",
        f"Fastest attention path over all fwd+bwd cases (kernel time): {choice}.",
        "",
        *loss_markdown(results),
    ]
    lines += ["", *modes_markdown(results)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    results = Path((argv if argv is not None else sys.argv[1:])[0])
    rows = targets(results)
    defaults = fastest_candidates(results)
    common.write_json(results / "defaults.json", defaults)
    (results / "summary.md").write_text(markdown(results, rows, defaults))
    print(f"{'target':<48} {'measured':>24}  {'goal':<24} verdict")
    for name, value, goal, status in rows:
        print(f"{name:<48} {value:>24}  {goal:<24} {status}")
    rec = defaults["recommended"]
    print(f"fastest attention path (fwd+bwd, all cases): {rec or 'not measured'}")
    print(f"written: {results / 'summary.md'}, {results / 'defaults.json'}")


if __name__ == "__main__":
    main()
