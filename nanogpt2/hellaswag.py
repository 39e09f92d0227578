"""HellaSwag, scored as build-nanogpt and llm.c score it: which of 4 endings a model finds likeliest after a context.

Each example's context and its 4 endings become 4 rows of GPT-2 tokens, `ctx` + " " + ending; the model's
cross-entropy over each ending's tokens, summed and averaged, picks the prediction: `acc` counts the lowest sum, and
`acc_norm` the lowest mean (which does not favour short endings). GPT-2 124M scores acc_norm 0.2955 this way. Rows
longer than the model's block size lose tokens at the context's start. The validation set (10,042 examples) is
fetched once into the data cache; `python -m nanogpt2.eval hellaswag` is the command line.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanogpt2.errors import DataError, WriteError
from nanogpt2.files import write_atomic
from nanogpt2.tokenizer import VOCAB_SIZE, encode

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_EXAMPLES = 10_042
GPT2_ACC_NORM = 0.2955  # OpenAI's GPT-2 124M, completion style (build-nanogpt, llm.c)


@dataclass
class Example:
    ind: int
    ctx: str
    endings: list[str]
    label: int


def val_file(root: Path) -> Path:
    """The canonical validation jsonl in the data cache `root`, downloaded on first use."""
    path = root / "hellaswag" / "hellaswag_val.jsonl"
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(VAL_URL, timeout=60) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"cannot download HellaSwag's validation set from {VAL_URL} ({getattr(e, 'reason', e)}): connect to the "
            f"internet, or put the file at {path}, or give one with --data"
        ) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path.parent, e) from None
    write_atomic(path, raw)
    return path


def load_examples(path: Path, limit: int | None = None) -> list[Example]:
    """The examples of a HellaSwag jsonl file (at most `limit`): DataError naming the line that is not JSON or lacks
    a field (ind, ctx, endings: 4 strings, label: 0-3)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read HellaSwag examples ({getattr(e, 'strerror', None) or e})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if limit is not None and len(examples) == limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {number}: not JSON (HellaSwag files hold one JSON object a line)") from None
        examples.append(parse_example(row, f"{path} line {number}"))
    if not examples:
        raise DataError(f"{path}: no HellaSwag examples")
    return examples


def parse_example(row: object, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: not a JSON object")
    for name in ("ind", "ctx", "endings", "label"):
        if name not in row:
            raise DataError(f"{where}: no field {name!r} (a HellaSwag example has ind, ctx, endings and label)")
    endings, label = row["endings"], row["label"]
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise DataError(f"{where}: 'endings' must be a list of 4 strings")
    if not isinstance(row["ctx"], str):
        raise DataError(f"{where}: 'ctx' must be a string")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not (isinstance(label, int) and 0 <= label < 4):
        raise DataError(f"{where}: 'label' must be 0, 1, 2 or 3, got {row['label']!r}")
    return Example(int(row["ind"]), row["ctx"], endings, label)


def render(example: Example, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (4, T), mask (4, T)): each row the context and one ending, zero-padded on the right; the mask is 1 on
    the ending's tokens. A row longer than block_size loses tokens at its context's start."""
    ctx = encode(example.ctx)
    rows, masks = [], []
    for ending in example.endings:
        end = encode(" " + ending)[-block_size + 1 :]  # at least one context token predicts the ending's first
        row = (ctx + end)[-block_size:]
        rows.append(row)
        masks.append([0] * (len(row) - len(end)) + [1] * len(end))
    T = max(len(r) for r in rows)
    tokens = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros(4, T, dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(m)] = torch.tensor(m)
    return tokens, mask


@torch.no_grad()
def score(model: torch.nn.Module, example: Example, block_size: int, device: torch.device, autocast=None) -> dict:
    """The example's 4 endings' summed and mean cross-entropy, and the predictions from each."""
    tokens, mask = (t.to(device) for t in render(example, block_size))
    if autocast is None:
        logits, _ = model(tokens)
    else:
        with autocast():
            logits, _ = model(tokens)
    logits = logits[:, :-1, :VOCAB_SIZE].float()  # (4, T - 1, V): position t predicts token t + 1
    losses = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # (4, T - 1)
    ending = mask[:, 1:].float()  # (4, T - 1)
    sum_loss = (losses * ending).sum(1)  # (4,)
    mean_loss = sum_loss / ending.sum(1)
    return {
        "ind": example.ind,
        "label": example.label,
        "pred": int(sum_loss.argmin()),
        "pred_norm": int(mean_loss.argmin()),
        "sum_loss": sum_loss.tolist(),
        "mean_loss": mean_loss.tolist(),
    }


def check_vocab(vocab_size: int, what: str) -> None:
    """DataError unless the model reads GPT-2's tokens, which HellaSwag is rendered in."""
    if vocab_size != VOCAB_SIZE:
        raise DataError(
            f"{what} has a vocabulary of {vocab_size:,} tokens, not GPT-2's {VOCAB_SIZE:,}: HellaSwag is scored in "
            "GPT-2's tokens"
        )


def evaluate(
    model: torch.nn.Module,
    examples: list[Example],
    block_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    autocast=None,
) -> tuple[list[dict], torch.Tensor]:
    """Score this rank's share of the examples (every world_size-th from rank): (its results, a tensor of its
    (examples, correct, correct_norm) counts on `device`, to be summed over the ranks).

    Every rank runs as many forwards (FSDP's collectives need them in step), a short share scoring its first
    example again without counting it; compiled blocks run eagerly, since each example's length is new to them."""
    training = model.training
    model.eval()
    share = examples[rank::world_size]
    n_forwards = -(-len(examples) // world_size)
    with torch.compiler.set_stance("force_eager"):
        results = [score(model, ex, block_size, device, autocast) for ex in share]
        for _ in range(n_forwards - len(share)):
            score(model, examples[0], block_size, device, autocast)
    model.train(training)
    counts = [len(results), sum(r["pred"] == r["label"] for r in results)]
    counts.append(sum(r["pred_norm"] == r["label"] for r in results))
    return results, torch.tensor(counts, dtype=torch.float64, device=device)


def summary(counts: torch.Tensor) -> str:
    """The result line from (examples, correct, correct_norm) counts."""
    n, correct, correct_norm = counts.tolist()
    return f"hellaswag: {int(n)} examples, acc {correct / n:.4f}, acc_norm {correct_norm / n:.4f}"
