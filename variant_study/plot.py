"""Loss curves of training runs: train and val loss against tokens seen, one color per run.

    python -m variant_study.plot OUT_DIR/metrics.jsonl [MORE.jsonl ...] [--labels a b ...] -o loss.png

matplotlib is optional for the project; this module asks for it by name when it is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON records of a metrics.jsonl file (a run directory is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from None
    return records


def import_pyplot():
    """matplotlib.pyplot with a file-only backend, or an error that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: dict[str, list[dict]], out: str | Path, title: str = "", train: bool = True) -> Path:
    """Plot val loss (markers) and, with train=True, train loss (thin lines) of each run against tokens; save a PNG."""
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.get_cmap("tab10").colors
    for i, (label, records) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        steps = [r for r in records if "loss" in r and "tokens" in r]
        evals = [r for r in records if r.get("val_loss") is not None and "tokens" in r]
        if train and steps:
            ax.plot([r["tokens"] / 1e6 for r in steps], [r["loss"] for r in steps], color=color, alpha=0.35, lw=1)
        if evals:
            xs, ys = [r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals]
            ax.plot(xs, ys, color=color, marker="o", ms=4, lw=1.8, label=f"{label} (val)")
        elif steps:
            ax.plot([], [], color=color, label=f"{label} (train)")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.set_title(title or ("train (thin) and val (dots) loss" if train else "val loss"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot train/val loss against tokens for one or more training runs.")
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files (or run directories holding one)")
    parser.add_argument("--labels", nargs="+", help="a legend label per run (default: the run's directory name)")
    parser.add_argument("-o", "--out", default="loss.png", help="PNG file to write")
    parser.add_argument("--title", default="", help="plot title")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.metrics):
        print(f"error: {len(args.labels)} labels for {len(args.metrics)} runs", file=sys.stderr)
        return 2
    labels = args.labels or [Path(m).parent.name if Path(m).suffix else Path(m).name for m in args.metrics]
    try:
        runs = {label: read_metrics(m) for label, m in zip(labels, args.metrics, strict=True)}
        print(f"wrote {plot_runs(runs, args.out, args.title)}")
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
