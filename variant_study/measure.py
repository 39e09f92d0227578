"""The study's measurements of trained and untrained models: loss and recall at longer lengths, and decoding speed."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from nanogpt2.checkpoint import load_model
from nanogpt2.data import BatchLoader
from nanogpt2.model import GPT, GPTConfig
from nanogpt2.prepare import open_corpus
from nanogpt2.sample import KVCache
from variant_study.plan import Budget, Part, variant_flags
from variant_study.plot import read_metrics
from variant_study.recall import RECALL_PAIRS, recall_batch

PREFILL_CHUNK = 1024  # prompt tokens per forward pass when filling the cache for the decoding benchmark
RECALL_EVAL_SEED = 12345  # val split sequences of this seed: the same questions for every model
EVAL_ROWS = 32  # sequences per forward pass when measuring recall
# Distinct keys asked per measured sequence: the pair is each answer's only source, and with half the keys asked,
# which keys are left says little about the answer.
EVAL_QUESTIONS = RECALL_PAIRS // 2


def autocast(part: Part, device: str):
    """The run's autocast, so evaluation computes as training's evaluation did."""
    if part.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, part.dtype))


def reaches(model: GPT, length: int) -> bool:
    """Whether the model can run sequences of `length` tokens: learned positions stop at block_size."""
    return model.config.pos_emb == "rope" or length <= model.config.block_size


def lengths_reached(model: GPT, part: Part, budget: Budget):
    """(key, k, length) for each evaluation length k x seq_len, with length None where the model cannot run it."""
    for k in budget.lengths:
        length = k * part.seq_len
        yield f"{k}x", k, length if reaches(model, length) else None


def training_record(run_dir: Path) -> dict:
    """What train.py recorded: losses, tokens, speed, memory, and the val curve."""
    metrics = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if r.get("val_loss") is not None]
    return {
        "train_loss": statistics.fmean(r["loss"] for r in steps[-10:]),
        "val_loss": evals[-1]["val_loss"],
        "tokens": steps[-1]["tokens"],
        "tokens_per_s": summary["tokens_per_s"],
        "peak_mem_mib": summary["peak_mem_mib"],
        "wall_s": summary["wall_s"],
        "curve": [{"tokens": r["tokens"], "val_loss": r["val_loss"]} for r in evals],
    }


@torch.no_grad()
def lm_losses(model: GPT, part: Part, budget: Budget, seed: int) -> dict[str, float | None]:
    """Val loss at each evaluation length (in training contexts): the same val tokens, cut into longer rows.

    The first `eval_batches` micro-batches of val, as train.py evaluates, so the 1x figure is its val loss. None where
    the model cannot run that length.
    """
    corpus = open_corpus(part.data, vocab_size=model.config.vocab_size, seed=seed)  # seed: synthetic data's tokens
    eval_tokens = part.batch_size * part.seq_len
    out = {}
    for key, _, length in lengths_reached(model, part, budget):
        if length is None:
            out[key] = None
            continue
        loader = BatchLoader(corpus.val, rows=max(1, eval_tokens // length), seq_len=length,
                             vocab_size=model.config.vocab_size)  # fmt: skip
        losses = []
        for _ in range(part.eval_batches):
            x, y = loader.next_batch()
            with autocast(part, budget.device):
                losses.append(model(x.to(budget.device), y.to(budget.device))[1].item())
        out[key] = statistics.fmean(losses)
    return out


@torch.no_grad()
def recall_accuracy(model: GPT, part: Part, budget: Budget) -> dict[str, dict | None]:
    """Recall accuracy at each evaluation length: overall, and per distance (the report and plots group distances into
    bins; the reading's bands, such as W to L x (W - 1), are then exact).

    Longer lengths ask over proportionally more sequences, so each distance holds about as many questions.
    """
    out = {}
    for key, k, length in lengths_reached(model, part, budget):
        if length is None:
            out[key] = None
            continue
        rows = budget.recall_eval_rows * k
        correct, total = torch.zeros(length + 1), torch.zeros(length + 1)  # per distance
        for first in range(0, rows, EVAL_ROWS):
            n = min(EVAL_ROWS, rows - first)
            x, y, d = recall_batch(first, n, length, RECALL_EVAL_SEED, 1, questions=EVAL_QUESTIONS, distinct=True)
            with autocast(part, budget.device):
                logits, _ = model(x.to(budget.device))  # (B, length, vocab)
            asked = y >= 0
            answers = logits[..., : model.config.vocab_size].argmax(-1).cpu()  # padding columns are no tokens
            right = (answers == y)[asked].float()  # (questions,)
            correct.index_add_(0, d[asked], right)
            total.index_add_(0, d[asked], torch.ones_like(right))
        seen = total > 0
        out[key] = {
            "accuracy": (correct.sum() / total.sum()).item(),
            "bin_width": 1,
            "bins": [  # each distance asked: its accuracy and its number of questions
                {"distance": i, "accuracy": (correct[i] / total[i]).item(), "questions": int(total[i])}
                for i in range(len(total))
                if seen[i]
            ],
        }
    return out


def measure_run(run_dir: Path, kind: str, budget: Budget, seed: int) -> dict:
    """The numbers of one finished run: train.py's records, then its checkpoint's losses or recall."""
    part = budget.lm if kind == "lm" else budget.recall
    record = training_record(run_dir)
    model = load_model(run_dir, device=budget.device).eval()
    record["params"] = model.num_params()
    record["config"] = model.config.to_dict()
    if kind == "lm":
        record["val_loss_at"] = lm_losses(model, part, budget, seed)
    else:
        record["recall"] = recall_accuracy(model, part, budget)
    return record


@torch.no_grad()
def decode_speed(budget: Budget, variant: str) -> list[dict]:
    """Tokens/s and KV-cache bytes of one-token decoding after a prompt of each context length (batch 1).

    The model is untrained (speed does not depend on the weights) and sized to reach the longest context. Per
    context: fill the cache with the prompt, then time `decode_tokens` single-token steps; the median step gives
    tokens/s.
    """
    flags = variant_flags(variant, budget.lm)
    overrides = {"block_size": max(budget.decode_contexts) + budget.decode_tokens, "pos_emb": flags["pos_emb"]}
    if "n_kv_head" in flags:
        overrides["n_kv_head"] = int(flags["n_kv_head"])
    if "window" in flags:
        overrides["window"] = int(flags["window"])
    torch.manual_seed(0)
    config = GPTConfig.from_preset(budget.decode_preset, **overrides)
    device = torch.device(budget.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = GPT(config).to(device=device, dtype=dtype).eval()
    rows = []
    for context in budget.decode_contexts:
        prompt = torch.randint(0, config.vocab_size, (1, context), device=device)
        cache = KVCache(config, 1, context + budget.decode_tokens, dtype, device)
        for start in range(0, context, PREFILL_CHUNK):  # in chunks: a (T, T) mask over 32k tokens would not fit
            logits, _ = model(prompt[:, start : start + PREFILL_CHUNK], kv_cache=cache)
        token = logits[:, -1:, : config.vocab_size].argmax(-1)  # (1, 1)
        step_s = []
        for _ in range(budget.decode_tokens):
            t0 = time.perf_counter()
            logits, _ = model(token, kv_cache=cache)
            token = logits[:, -1:, : config.vocab_size].argmax(-1)
            token.cpu()  # waits for the device
            step_s.append(time.perf_counter() - t0)
        rows.append({
            "context": context,
            "tokens_per_s": 1 / statistics.median(step_s),
            "cache_bytes": cache.k.nbytes + cache.v.nbytes,
            "cache_positions": cache.capacity,
        })  # fmt: skip
        del logits, cache
    return rows
