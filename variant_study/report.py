"""The study's numbers in words and pictures: summaries over seeds, the reading sentences, and the plots (report_text.py
assembles the README)."""

from __future__ import annotations

import statistics
from pathlib import Path

from variant_study.plan import Budget
from variant_study.plot import import_pyplot
from variant_study.recall import N_VALUES

GOOD = 0.9  # recall accuracy that counts as "recalls"
CHANCE = 1 / N_VALUES  # one of the values


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the max-min range (0 for a single value)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def summarize_lm(lm: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: mean and spread over seeds of the losses and speed; loss at each length (mean, None if any is)."""
    table = {}
    for variant, runs in lm.items():
        row = {"params": runs[0]["params"], "peak_mem_mib": max(r["peak_mem_mib"] for r in runs), "seeds": len(runs)}
        for key in ("train_loss", "val_loss", "tokens_per_s"):
            row[key], row[f"{key}_spread"] = mean_spread([r[key] for r in runs])
        row["val_loss_at"] = {
            k: None
            if any(r["val_loss_at"][k] is None for r in runs)
            else mean_spread([r["val_loss_at"][k] for r in runs])
            for k in runs[0]["val_loss_at"]
        }
        table[variant] = row
    return table


def reach(recall_at_length: dict, floor: float = GOOD) -> int | None:
    """The first distance from which accuracy stays below `floor` in every later bin (None: it never drops)."""
    bins = recall_at_length["bins"]
    for i, b in enumerate(bins):
        if all(later["accuracy"] < floor for later in bins[i:]):
            return b["distance"]
    return None


def lm_reading(table: dict[str, dict]) -> list[str]:
    """How each variant's val loss compares with the baseline's, against the seed-to-seed spread."""
    base = table["base"]
    lines = []
    for variant, row in table.items():
        if variant == "base":
            continue
        diff = row["val_loss"] - base["val_loss"]
        noise = max(row["val_loss_spread"], base["val_loss_spread"])
        if row["seeds"] > 1:
            verdict = "exceeds" if abs(diff) > 2 * noise else "does not exceed"
            against = f"that {verdict} twice the seed-to-seed spread (±{noise:.3f})"
        else:
            against = "one seed only, so the seed-to-seed spread is unknown"
        direction = "lower (better)" if diff < 0 else "higher (worse)"
        lines.append(
            f"- **{variant}**: val loss {row['val_loss']:.3f} vs {base['val_loss']:.3f}, {abs(diff):.3f} {direction}; "
            f"{against}."
        )
    return lines


def bins_between(at_length: dict, lo: int, hi: int | None = None) -> list[dict]:
    """The bins wholly at distances in [lo, hi) (hi None: no end)."""
    width = at_length["bin_width"]
    return [b for b in at_length["bins"] if b["distance"] >= lo and (hi is None or b["distance"] + width <= hi)]


def pooled(bins: list[dict]) -> tuple[float | None, int]:
    """The accuracy over all the questions of some bins (None if they hold none), and how many questions."""
    questions = sum(b["questions"] for b in bins)
    return (sum(b["accuracy"] * b["questions"] for b in bins) / questions if questions else None), questions


def accuracy_between(at_length: dict, lo: int, hi: int | None = None) -> float | None:
    """Accuracy over the questions at distances in [lo, hi) (bins that start there), None if there are none."""
    return pooled(bins_between(at_length, lo, hi))[0]


def few_questions(at_length: dict, lo: int, hi: int | None = None, enough: int = 100) -> str:
    """ " (N questions)" when the range holds fewer than `enough` questions, so a thin figure is read as one."""
    questions = pooled(bins_between(at_length, lo, hi))[1]
    return f" ({questions} questions)" if 0 < questions < enough else ""


def rebin(at_length: dict, width: int) -> dict:
    """Recall measured per bin, regrouped into bins of `width` distances (a multiple of its bin width): each new bin
    starts at a multiple of `width` and its accuracy is over all the questions it holds."""
    grouped: dict[int, list[dict]] = {}
    for b in at_length["bins"]:
        grouped.setdefault(b["distance"] // width * width, []).append(b)
    bins = []
    for start, members in grouped.items():
        accuracy, questions = pooled(members)
        bins.append({"distance": start, "accuracy": accuracy, "questions": questions})
    return {**at_length, "bin_width": width, "bins": bins}


def display_width(budget: Budget) -> int:
    """The bin width of the report's plots and reach: a quarter of the window, so the sweep's half window spans two."""
    return max(1, budget.recall.window // 4)


def times(length_key: str) -> int:
    """The multiple of the training length a key of the measurements names: "4x" -> 4."""
    return int(length_key.rstrip("x"))


def recall_reading(recall: dict[str, dict], budget: Budget) -> list[str]:
    """Per recall run, in words: how well it recalls at the training length, and for windowed runs whether anything
    gets past the window. A query sees keys less than W back; over L layers information can travel at most
    L x (W - 1) back, so the band from W to L x (W - 1) is where only relaying between layers can answer."""
    T = budget.recall.seq_len
    lines = []
    for name, run in recall.items():
        at_T, c = run["recall"]["1x"], run["config"]
        text = f"- **{name}**: accuracy {at_T['accuracy']:.2f} at the training length {T}"
        window = c["window"]
        if window is not None and window < T:
            relay = c["n_layer"] * (window - 1)
            inside, band = accuracy_between(at_T, 0, window), accuracy_between(at_T, window, relay + 1)
            text += f"; {fmt(inside, '.2f')} at distances below its window of {window}"
            text += f", {fmt(band, '.2f')}{few_questions(at_T, window, relay + 1)} from {window} to L x (W - 1) = "
            text += f"{relay} (reachable only by relaying)"
            if relay + 1 < T:
                beyond = accuracy_between(at_T, relay + 1)
                text += f", {fmt(beyond, '.2f')}{few_questions(at_T, relay + 1)} beyond"
            if inside is None or inside < GOOD:
                text += ": it does not recall reliably even inside its window"
            elif band is not None and band >= GOOD:
                text += ": the layers relay what the window cannot see"
            elif band is not None and band >= 2 * CHANCE:
                text += ": the layers relay a little of what the window cannot see"
            elif band is not None:
                text += f": recall stops at the window; {c['n_layer']} layers do not carry the pairs further"
        else:
            binned = rebin(at_T, display_width(budget))
            stop = reach(binned)
            text += (
                f"; at or above {GOOD} at every distance" if stop is None else
                f"; below {GOOD} at every distance" if stop == binned["bins"][0]["distance"] else
                f"; below {GOOD} from distance {stop} on"
            )  # fmt: skip
        longer = [k for k in list(run["recall"])[1:] if run["recall"][k] is not None]
        if longer:
            text += "; past the training length: " + ", ".join(
                f"{run['recall'][k]['accuracy']:.2f} at {times(k) * T}" for k in longer
            )
        elif c["pos_emb"] == "learned":
            text += "; learned positions end at the training length"
        lines.append(text + ".")
    return lines


def length_reading(table: dict[str, dict], seq_len: int) -> list[str]:
    """Per variant: how its val loss moves from the training context to the longest length, or where it stops."""
    lines = []
    for variant, row in table.items():
        at = {k: v for k, v in row["val_loss_at"].items() if v is not None}
        longest = max(at, key=times)
        if longest == "1x":
            lines.append(f"- **{variant}**: learned positions end at the training context ({seq_len}): no longer rows.")
            continue
        first, last = at["1x"][0], at[longest][0]
        steps = ", ".join(f"{at[k][0]:.3f} at {times(k) * seq_len}" for k in at)
        change = (last - first) / first
        verdict = "holds" if abs(change) <= 0.02 else "rises" if change > 0 else "falls"
        lines.append(f"- **{variant}**: {steps}: the loss {verdict} ({change:+.1%}) from {seq_len} to "
                     f"{times(longest) * seq_len} tokens.")  # fmt: skip
    return lines


def decode_reading(decode: dict[str, list[dict]]) -> list[str]:
    """Per variant: how speed and cache size change from the shortest to the longest context."""
    lines = []
    for variant, rows in decode.items():
        first, last = rows[0], rows[-1]
        speed = last["tokens_per_s"] / first["tokens_per_s"]
        flat = "flat" if speed >= 0.85 else "falling"
        lines.append(
            f"- **{variant}**: {first['tokens_per_s']:.1f} -> {last['tokens_per_s']:.1f} tokens/s ({speed:.2f}x, "
            f"{flat}) and cache {first['cache_bytes'] / 2**20:.2f} -> {last['cache_bytes'] / 2**20:.2f} MiB from "
            f"context {first['context']} to {last['context']}."
        )
    return lines


def plot_loss(lm: dict[str, list[dict]], out: Path, title: str) -> None:
    """Val loss against tokens: each seed thin, the mean over seeds bold, one color per variant."""
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.get_cmap("tab10").colors
    for i, (variant, runs) in enumerate(lm.items()):
        for r in runs:
            ax.plot([c["tokens"] / 1e6 for c in r["curve"]], [c["val_loss"] for c in r["curve"]],
                    color=colors[i], alpha=0.3, lw=1)  # fmt: skip
        points = list(zip(*[[c["val_loss"] for c in r["curve"]] for r in runs], strict=True))
        tokens = [c["tokens"] / 1e6 for c in runs[0]["curve"]]
        ax.plot(tokens, [statistics.fmean(p) for p in points], color=colors[i], marker="o", ms=4, lw=2, label=variant)
    ax.set(xlabel="tokens seen (millions)", ylabel="val loss (nats / token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, plt, out)


def plot_recall(recall: dict[str, dict], budget: Budget, out: Path) -> None:
    """Recall accuracy against distance: at the training length (left), and at the longest length each run reaches
    beyond it (right); dashed lines mark the windows."""
    plt = import_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), dpi=120)
    colors = plt.get_cmap("tab10").colors
    longest = f"{max(budget.lengths)}x"
    for i, (name, run) in enumerate(recall.items()):
        color, style = colors[i % 10], "-" if i < 10 else "--"
        for ax, key in ((left, "1x"), (right, longest)):
            at = run["recall"].get(key)
            if at is None:
                continue
            at = rebin(at, display_width(budget))
            bins = at["bins"]
            xs = [b["distance"] + at["bin_width"] / 2 for b in bins]
            ax.plot(xs, [b["accuracy"] for b in bins], color=color, ls=style, marker=".", label=name)
    windows = sorted({run["config"]["window"] for run in recall.values() if run["config"]["window"]})
    for ax in (left, right):
        for w in windows:
            ax.axvline(w, color="grey", ls=":", lw=1)
        ax.axhline(CHANCE, color="black", lw=0.5)
        ax.set(xlabel="distance from the pair to the question (tokens)", ylabel="recall accuracy", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    T = budget.recall.seq_len
    left.set_title(f"at the training length ({T} tokens); dotted: windows {windows}")
    right.set_title(f"at {times(longest)} x the training length ({times(longest) * T} tokens)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    save(fig, plt, out)


def plot_decode(decode: dict[str, list[dict]], out: Path) -> None:
    """Decoding tokens/s (left) and KV-cache memory (right) against context, one line per variant."""
    plt = import_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for variant, rows in decode.items():
        contexts = [r["context"] for r in rows]
        left.plot(contexts, [r["tokens_per_s"] for r in rows], marker="o", label=variant)
        right.plot(contexts, [r["cache_bytes"] / 2**20 for r in rows], marker="o", label=variant)
    left.set(ylabel="tokens/s (batch 1, one token per step)", title="decoding speed with the KV cache")
    right.set(ylabel="KV cache (MiB)", title="KV-cache memory", yscale="log")
    for ax in (left, right):
        ax.set(xlabel="context (tokens)", xscale="log")
        ax.minorticks_off()
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, plt, out)


def save(fig, plt, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
