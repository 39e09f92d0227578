"""What the study runs: the variants, the budgets, and the train.py command of every training run.

Two kinds of training run, both through train.py:
- language modelling ("lm"): each variant on a text corpus, several seeds;
- associative recall ("recall", variant_study/recall.py): each variant, plus the sweeps that explain it: K/V heads 1,
  2 and all; for `all` (rotary positions with a window: the windowed model that learns recall in the CPU budget; with
  learned positions a window slows learning down, see the report) the window at W and W/2, and at W over twice the
  layers (can layers relay what a window cannot see?).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from nanogpt2.model import GPTConfig

REPO = Path(__file__).resolve().parents[1]

# Each variant changes one thing of the baseline (learned positions, multi-head attention, full causal attention).
VARIANTS: dict[str, dict] = {
    "base": {},
    "rope": {"pos_emb": "rope"},
    "gqa": {"gqa": True},
    "swa": {"swa": True},
    "all": {"pos_emb": "rope", "gqa": True, "swa": True},
}
DECODE_VARIANTS = ("base", "gqa", "swa", "all")  # rope decodes as base does: the cache is the same size


@dataclass(frozen=True)
class Part:
    """One kind of training run: the train.py settings every run of it shares."""

    preset: str
    data: str
    seq_len: int
    batch_size: int
    max_steps: int
    lr: float
    warmup_steps: int
    eval_every: int
    eval_batches: int
    kv_heads: int  # the gqa variant's K/V heads
    window: int  # the swa variant's window
    n_layer: int | None = None  # None: the preset's
    dtype: str = "float32"
    # Runs trained at once; on a CPU each gets cpu_count / workers threads. Two one-thread runs of the CPU budget's LM
    # make 5,631 tokens/s together against 4,900-5,080 for one two-thread run (2 cores, idle, 2026-11-28).
    workers: int = 1

    @property
    def layers(self) -> int:
        return self.n_layer or GPTConfig.from_preset(self.preset).n_layer

    @property
    def heads(self) -> int:
        return GPTConfig.from_preset(self.preset).n_head


@dataclass(frozen=True)
class Budget:
    """The scale of a whole study: its two kinds of run, seeds, evaluation sizes and the decoding benchmark."""

    lm: Part
    recall: Part
    seeds: int  # language-modelling seeds per variant (recall: one)
    recall_eval_rows: int  # sequences per length for recall accuracy
    decode_preset: str
    decode_contexts: tuple[int, ...]
    decode_tokens: int  # tokens timed per context
    device: str
    lengths: tuple[int, ...] = field(default=(1, 2, 4, 8))  # evaluation lengths, in training contexts


BUDGETS: dict[str, Budget] = {
    "toy": Budget(
        lm=Part("pico", "synthetic", seq_len=32, batch_size=4, max_steps=4, lr=3e-3, warmup_steps=1, eval_every=2,
                eval_batches=1, kv_heads=1, window=8, workers=2),
        recall=Part("pico", "recall", seq_len=64, batch_size=4, max_steps=4, lr=3e-3, warmup_steps=1, eval_every=2,
                    eval_batches=1, kv_heads=1, window=16, workers=2),
        seeds=1, recall_eval_rows=8, decode_preset="pico", decode_contexts=(32, 64), decode_tokens=4, device="cpu",
    ),
    "cpu": Budget(
        lm=Part("nano", "shakespeare", seq_len=256, batch_size=16, max_steps=240, lr=2e-3, warmup_steps=20,
                eval_every=40, eval_batches=4, kv_heads=2, window=64, dtype="bfloat16", workers=2),
        recall=Part("micro", "recall", seq_len=64, batch_size=16, max_steps=1500, lr=1e-3, warmup_steps=50,
                    eval_every=250, eval_batches=4, kv_heads=1, window=16, n_layer=2, workers=2),
        seeds=3, recall_eval_rows=512, decode_preset="nano", decode_contexts=(256, 512, 1024, 2048, 4096, 8192),
        decode_tokens=128, device="cpu",
    ),
    # GPT-2 124M on Shakespeare: 15 runs of 6.6M tokens (4.7 epochs of its 1.4M): about 8 minutes on one H200 at the
    # 205k tokens/s train.py measured there (eager bf16, 16.5% MFU; BENCHMARKS.md), plus about 10 of recall runs,
    # measurement and decoding. An estimate from that throughput: the study itself has not run on a GPU.
    "gpu": Budget(
        lm=Part("gpt2", "shakespeare", seq_len=1024, batch_size=32, max_steps=200, lr=1.2e-3, warmup_steps=20,
                eval_every=25, eval_batches=4, kv_heads=4, window=256, dtype="bfloat16"),
        recall=Part("micro", "recall", seq_len=256, batch_size=32, max_steps=3000, lr=1e-3, warmup_steps=100,
                    eval_every=500, eval_batches=4, kv_heads=1, window=64, n_layer=2),
        seeds=3, recall_eval_rows=1024, decode_preset="gpt2",
        decode_contexts=(1024, 2048, 4096, 8192, 16384, 32768), decode_tokens=128, device="cuda",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One training run: its name in the report, its kind, seed and the model flags it adds to its part's."""

    kind: str  # "lm" or "recall"
    variant: str  # the VARIANTS entry it belongs to
    name: str  # base, gqa-kv1, all-w16-L4, ...
    seed: int
    model_flags: tuple[tuple[str, str], ...]

    @property
    def dir_name(self) -> str:
        return f"{self.kind}-{self.name}-seed{self.seed}"


def variant_flags(variant: str, part: Part) -> dict[str, str]:
    """The model flags of a variant at a part's scale."""
    v = VARIANTS[variant]
    flags = {"pos_emb": v.get("pos_emb", "learned")}
    if v.get("gqa"):
        flags["n_kv_head"] = str(part.kv_heads)
    if v.get("swa"):
        flags["window"] = str(part.window)
    return flags


def recall_runs(variant: str, part: Part) -> list[tuple[str, dict[str, str]]]:
    """The recall runs a variant brings: itself, plus the sweeps that explain it (names and model flags)."""
    flags = variant_flags(variant, part)
    if variant == "gqa":  # the K/V-head sweep: 1, 2, ... up to all (= base)
        counts = sorted({1, 2, part.kv_heads} & set(range(1, part.heads)))
        return [(f"gqa-kv{n}", {**flags, "n_kv_head": str(n)}) for n in counts if part.heads % n == 0]
    if variant == "swa":
        return [(f"swa-w{part.window}", flags)]
    if variant == "all":  # the window, half of it, and the window over twice the layers
        w = part.window
        return [
            (variant, flags),
            (f"all-w{w // 2}", {**flags, "window": str(w // 2)}),
            (f"all-w{w}-L{2 * part.layers}", {**flags, "n_layer": str(2 * part.layers)}),
        ]
    return [(variant, flags)]


def plan_runs(budget: Budget, variants: list[str]) -> list[Run]:
    """Every training run of the study, language modelling first (the longest), then recall."""
    runs = []
    for variant in variants:
        for seed in range(budget.seeds):
            flags = variant_flags(variant, budget.lm)
            runs.append(Run("lm", variant, variant, seed, tuple(flags.items())))
    for variant in variants:
        for name, flags in recall_runs(variant, budget.recall):
            runs.append(Run("recall", variant, name, 0, tuple(flags.items())))
    return runs


def check_budget(budget: Budget) -> None:
    """ValueError, naming the setting, for a study that cannot run as configured."""
    for kind, part in (("lm", budget.lm), ("recall", budget.recall)):
        if part.window < 2 or part.kv_heads < 1:
            raise ValueError(f"{kind}: the window must be at least 2 and K/V heads at least 1")
        if part.window > part.seq_len:
            raise ValueError(f"{kind}: the window ({part.window}) is larger than the context ({part.seq_len})")
        if part.heads % part.kv_heads != 0:
            raise ValueError(f"{kind}: {part.kv_heads} K/V heads do not divide {part.heads} heads")
    if budget.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {budget.seeds}")


def train_command(part: Part, run: Run, out_dir: Path, device: str) -> list[str]:
    """The train.py command line of one run: python, train.py, then `--flag value` pairs."""
    settings = {
        "preset": part.preset,
        "data": part.data,
        "seq_len": part.seq_len,
        "block_size": part.seq_len,
        "batch_size": part.batch_size,
        "grad_accum": 1,
        "max_steps": part.max_steps,
        "lr": part.lr,
        "min_lr": part.lr / 10,
        "warmup_steps": part.warmup_steps,
        "eval_every": part.eval_every,
        "eval_batches": part.eval_batches,
        "sample_every": 0,
        "save_every": 0,  # the last checkpoint only: the study retrains an unfinished run, never resumes it (runs.py)
        "dtype": part.dtype,
        "device": device,
        "seed": run.seed,
    }
    if part.n_layer is not None:
        settings["n_layer"] = part.n_layer
    settings.update(dict(run.model_flags))
    cmd = [sys.executable, str(REPO / "train.py")]
    for name, value in settings.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd + ["--out-dir", str(out_dir)]
