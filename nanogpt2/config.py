"""The training configuration: `TrainConfig`, its command line, every default and every check, in one place.

Each field is one flag of train.py (`--batch-size` is `batch_size`); its metadata holds the help text, the --help group
and how a resumed run treats it:

- run: defines the model, the data or the optimisation; a resumed run keeps the checkpoint's, and a flag given again
  must agree with it;
- how: how the run executes (parallel mode, compilation, attention kernels, where it writes); never taken from a
  checkpoint, chosen afresh on every start;
- the rest (steps, logging, device, dtype, grad-accum) come from the checkpoint unless given again.

A field left None is filled by `finalize` from the device's defaults (DEVICE_DEFAULTS) and the model's block size;
`finalize` then checks the whole, raising ConfigError with the flag to change. Building the model, data and run
directory from a config is train.py's.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from nanogpt2.data import DATA_ORDERS
from nanogpt2.model import POS_EMBS, PRESETS, GPTConfig, check_attn
from nanogpt2.parallel import parse_device
from nanogpt2.recall import RECALL_DATA, RECALL_VOCAB
from nanogpt2.tokenizer import VOCAB_SIZE

# Defaults that depend on the device: a run of a few minutes on a 2-core CPU, GPT-2 124M on a GPU.
DEVICE_DEFAULTS = {
    "cpu": dict(preset="nano", batch_size=8, seq_len=128, max_steps=200, lr=2e-3, warmup_steps=20, eval_every=50,
                eval_batches=8, micro_batch=8, attn="torch"),
    "cuda": dict(preset="gpt2", batch_size=32, seq_len=1024, max_steps=150, lr=6e-4, warmup_steps=15, eval_every=50,
                 eval_batches=20, micro_batch=16, attn="triton"),
}  # fmt: skip
CPU, GPU = DEVICE_DEFAULTS["cpu"], DEVICE_DEFAULTS["cuda"]
# Flags that override the preset's config.
MODEL_FIELDS = ("vocab_size", "n_layer", "block_size", "pos_emb", "n_kv_head", "window", "dropout")
GROUPS = {
    "model and data": None,
    "batch and schedule": None,
    "evaluation, output and resuming": None,
    "device": None,
    "parallel training": "Under torchrun (RANK/WORLD_SIZE set) the run is DDP, or FSDP with --fsdp; NCCL on CUDA, "
    "gloo on CPU. --batch-size stays the global batch: each optimizer step reads batch-size sequences in grad-accum "
    "micro-steps, each micro-batch split evenly across the ranks, so a step sees the same data at any world size. "
    "Multi-node: torchrun --nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...",
}


class ConfigError(Exception):
    """Flags, or flags and a checkpoint, that make the run impossible; the message names the flag to change."""


def dflt(key: str) -> str:
    return f"(default: {CPU[key]} on CPU, {GPU[key]} on CUDA)"


def flag(group: str, help: str, default=None, type=None, kind: str = "", **argparse_kwargs):
    """A TrainConfig field: its default, and the metadata its command-line flag is made from."""
    meta = dict(group=group, help=help, type=type, kind=kind, argparse=argparse_kwargs)
    return field(default=default, metadata=meta)


MD, BS, EV, DV, PT = GROUPS  # the group names, in --help order


@dataclass
class TrainConfig:
    # model and data
    preset: str | None = flag(MD, f"model preset {dflt('preset')}", type=str, kind="run", choices=list(PRESETS))
    data: str = flag(
        MD,
        "corpus name (shakespeare), directory or glob of .bin shards, text file(s) or directory of text (tokenized "
        f"into the data cache), 'synthetic', or '{RECALL_DATA}' (multi-query associative recall, drawn from the "
        "seed; see nanogpt2/recall.py) (default: shakespeare)",
        "shakespeare",
        str,
        "run",
    )
    data_order: str = flag(
        MD, "order of the training windows: shuffled (each epoch visits every window once, in an order drawn from "
        "the seed and the epoch) or sequential (the token stream front to back); val is read in order (default: "
        "shuffled)", "shuffled", str, "run", choices=list(DATA_ORDERS)
    )  # fmt: skip
    vocab_size: int | None = flag(
        MD, "token ids the model embeds and predicts, at least the corpus's (default: the corpus's: "
        f"{RECALL_VOCAB} for {RECALL_DATA}, GPT-2's {VOCAB_SIZE:,} otherwise)", type=int, kind="run"
    )  # fmt: skip
    dropout: float | None = flag(MD, "dropout probability (default: the preset's, 0.0)", type=float, kind="run")
    block_size: int | None = flag(MD, "training context of the model (default: the preset's)", type=int, kind="run")
    pos_emb: str | None = flag(
        MD, "learned positions or rotary (default: the preset's)", type=str, kind="run", choices=POS_EMBS
    )
    n_layer: int | None = flag(MD, "transformer blocks (default: the preset's)", type=int, kind="run")
    n_kv_head: int | None = flag(MD, "K/V heads, fewer than heads for GQA (default: the preset's)", None, int, "run")
    window: int | None = flag(
        MD, "sliding-window attention over this many keys (default: the preset's)", type=int, kind="run"
    )
    attn: str = flag(
        MD,
        "attention/RoPE implementation: torch (SDPA) or triton (the kernels in nanogpt2/kernels/, CUDA only; the "
        "attention kernel has no dropout, so with --dropout > 0 training attention runs through SDPA) "
        "(default: auto: triton on CUDA, torch on CPU)",
        "auto",
        str,
        "how",
        choices=["auto", "torch", "triton"],
    )
    # batch and schedule
    max_steps: int | None = flag(BS, f"optimizer steps to train for {dflt('max_steps')}", type=int)
    batch_size: int | None = flag(BS, f"GLOBAL sequences per optimizer step {dflt('batch_size')}", type=int, kind="run")
    seq_len: int | None = flag(
        BS, f"tokens per sequence (default: {CPU['seq_len']} on CPU, {GPU['seq_len']} on CUDA, at most the "
        "model's block size)", type=int, kind="run"
    )  # fmt: skip
    grad_accum: int | None = flag(
        BS,
        "micro-steps per optimizer step; batch-size must divide by grad-accum x world size (default: the most "
        f"micro-steps of at least {CPU['micro_batch']} rows per rank on CPU, {GPU['micro_batch']} on CUDA, that "
        "divide the batch)",
        type=int,
    )
    lr: float | None = flag(BS, f"peak learning rate {dflt('lr')}", type=float, kind="run")
    min_lr: float | None = flag(BS, "learning rate at the cosine decay's end (default: lr / 10)", None, float, "run")
    warmup_steps: int | None = flag(
        BS, f"linear warmup steps (default: max-steps / 10, at most {CPU['warmup_steps']} on CPU, "
        f"{GPU['warmup_steps']} on CUDA)", type=int, kind="run"
    )  # fmt: skip
    decay_steps: int | None = flag(
        BS, "step where the cosine decay reaches min-lr (default: max-steps; kept on resume, so a run resumed with a "
        "larger --max-steps continues at min-lr)", type=int, kind="run"
    )  # fmt: skip
    optimizer: str = flag(
        BS, "adamw (fused on CPU and CUDA), or plain sgd, for checking parallel modes against each other "
        "(default: adamw)", "adamw", str, "run", choices=["adamw", "sgd"]
    )  # fmt: skip
    weight_decay: float = flag(BS, "AdamW weight decay of 2-D weights (default: 0.1)", 0.1, float, "run")
    beta1: float = flag(BS, "AdamW beta1 (default: 0.9)", 0.9, float, "run")
    beta2: float = flag(BS, "AdamW beta2 (default: 0.95)", 0.95, float, "run")
    grad_clip: float = flag(BS, "clip the global grad norm; 0: off (default: 1.0)", 1.0, float, "run")
    seed: int = flag(
        BS, "seed of the weights, dropout, the shuffled data order and synthetic and recall data, in [0, 2**63) "
        "(default: 1337)", 1337, int, "run"
    )  # fmt: skip
    # evaluation, output and resuming
    eval_every: int | None = flag(EV, f"val loss every N steps and at the end; 0: at the end only {dflt('eval_every')}",
                                  type=int)  # fmt: skip
    eval_batches: int | None = flag(EV, f"micro-batches per val loss {dflt('eval_batches')}", type=int)
    sample_every: int = flag(EV, "print a sample every N steps; 0: at the end only (default: 0)", 0, int)
    save_every: int | None = flag(
        EV, "checkpoint every N steps, at the end and on Ctrl-C; 0: those two only (default: eval-every)", type=int
    )
    out_dir: Path | None = flag(
        EV, "where the checkpoint, metrics.jsonl and run.json go (default: out)", type=Path, kind="how"
    )
    resume: Path | None = flag(
        EV, "continue the run whose checkpoint is in OUT_DIR, with its config (flags given again override its "
        "step, logging and device settings); --resume OUT --max-steps N trains the steps past the old --max-steps at "
        "the schedule's final learning rate, --min-lr", type=Path, kind="how", metavar="OUT_DIR"
    )  # fmt: skip
    # device
    device: str = flag(DV, "auto, cpu, cuda or cuda:N (default: auto: cuda if available; a resumed run keeps its own)",
                       "auto", str)  # fmt: skip
    dtype: str = flag(
        DV, "autocast dtype (default: auto: bfloat16 on CUDA, float16 + GradScaler where bf16 is unsupported, "
        "float32 on CPU)", "auto", str, choices=["auto", "float32", "bfloat16", "float16"]
    )  # fmt: skip
    compile: bool = flag(DV, "torch.compile each transformer block", False, kind="how")
    # parallel training
    fsdp: bool = flag(PT, "shard parameters, gradients and optimizer state (FSDP2)", False, kind="how")
    activation_checkpointing: bool = flag(PT, "recompute each block's activations in the backward", False, kind="how")
    dist_timeout: float = flag(
        PT, "seconds a collective may wait for the other ranks before the run fails, e.g. when a rank is stuck "
        "(default: 600)", 600.0, float, "how", metavar="SECONDS"
    )  # fmt: skip

    @staticmethod
    def kind(name: str) -> str:
        return FIELDS[name].metadata["kind"]

    def to_dict(self) -> dict:
        """The config as saved in a checkpoint and run.json (paths as strings; where it writes is not saved)."""
        return {k: v for k, v in asdict(self).items() if k not in ("out_dir", "resume")}

    def torch_device(self) -> torch.device:
        """The device --device names (auto: CUDA when present); ConfigError when this machine has no such device."""
        try:
            return parse_device(self.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def timeout(self) -> float:
        """--dist-timeout, checked before the process group is joined with it."""
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise ConfigError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}")
        return self.dist_timeout

    def finalize(self, device: torch.device, world_size: int, distributed: bool, saved_model: dict | None = None):
        """Fill what is unset from the device's defaults, check everything; returns the model's GPTConfig.

        `saved_model` is a resumed run's GPTConfig (a dict): the model is rebuilt from it, not from the flags.
        """
        defaults = DEVICE_DEFAULTS[device.type]
        self.device = device.type if self.device == "auto" else self.device  # saved, so a resumed run keeps it
        self.attn = defaults["attn"] if self.attn == "auto" else self.attn
        for key in ("preset", "batch_size", "max_steps", "lr", "eval_every", "eval_batches"):
            if getattr(self, key) is None:
                setattr(self, key, defaults[key])
        if self.warmup_steps is None:  # short runs warm up over their first tenth
            self.warmup_steps = min(defaults["warmup_steps"], self.max_steps // 10)
        self.min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        self.decay_steps = self.max_steps if self.decay_steps is None else self.decay_steps
        self.save_every = self.eval_every if self.save_every is None else self.save_every
        self.out_dir = Path("out") if self.out_dir is None else self.out_dir
        model = self.model_config(saved_model)
        if self.seq_len is None:
            self.seq_len = min(defaults["seq_len"], model.block_size)
        self.check(model, device, distributed)
        if self.grad_accum is None:
            self.grad_accum = auto_grad_accum(self.batch_size, world_size, defaults["micro_batch"])
        self.check_batch(world_size)
        return model

    def model_config(self, saved: dict | None = None) -> GPTConfig:
        """The preset with the flags' overrides, or a resumed run's saved config."""
        try:
            if saved is not None:
                return GPTConfig(**{k: v for k, v in saved.items() if k != "attn"})  # older runs saved attn here
            overrides = {key: getattr(self, key) for key in MODEL_FIELDS if getattr(self, key) is not None}
            if self.data == RECALL_DATA:
                overrides.setdefault("vocab_size", RECALL_VOCAB)
            return GPTConfig.from_preset(self.preset, **overrides)
        except (ValueError, TypeError) as e:  # TypeError: a saved config with fields this GPTConfig does not have
            raise ConfigError(f"model config: {e}") from None

    def check(self, model: GPTConfig, device: torch.device, distributed: bool) -> None:
        """Reject impossible values and combinations with a message that names the flag."""
        for key in ("lr", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{flag_name(key)} must be a finite number, got {getattr(self, key)}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in [0, 2**63), got {self.seed}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{flag_name(key)} must be in [0, 1), got {getattr(self, key)}")
        for key in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "lr", "decay_steps"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"{flag_name(key)} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "sample_every", "save_every", "min_lr", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{flag_name(key)} must not be negative, got {getattr(self, key)}")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} exceeds --lr {self.lr}")
        needed = corpus_vocab(self.data)
        if needed is not None and model.vocab_size < needed:
            raise ConfigError(
                f"--vocab-size {model.vocab_size} is smaller than --data {self.data}'s {needed:,} token ids"
            )
        if model.pos_emb == "learned" and self.seq_len > model.block_size:
            raise ConfigError(
                f"--seq-len {self.seq_len} exceeds block_size {model.block_size} of preset {self.preset} "
                "(learned positions stop there)"
            )
        if device.type == "cpu" and self.dtype == "float16":
            raise ConfigError("--dtype float16 needs CUDA; use bfloat16 or float32 on CPU")
        if self.attn == "triton" and device.type != "cuda":
            raise ConfigError("--attn triton needs a CUDA device (tests run the kernels through Triton's interpreter)")
        try:
            check_attn(model, self.attn)
        except ValueError as e:
            raise ConfigError(f"--attn {self.attn}: {e}") from None
        if self.fsdp and not distributed:
            raise ConfigError("--fsdp needs torchrun, e.g. torchrun --standalone --nproc_per_node=2 train.py --fsdp")

    def check_batch(self, world_size: int) -> None:
        if self.batch_size % (self.grad_accum * world_size) != 0:
            raise ConfigError(
                f"--batch-size {self.batch_size} does not divide into --grad-accum {self.grad_accum} x world size "
                f"{world_size} micro-batches of whole sequences"
            )

    def samples_text(self, model: GPTConfig) -> bool:
        """Whether the model's samples are GPT-2 text that the tokenizer can decode."""
        return self.data != RECALL_DATA and model.vocab_size == VOCAB_SIZE

    def notes(self, model: GPTConfig) -> list[str]:
        """What the user should know about how this config runs."""
        notes = []
        if self.attn == "triton" and model.dropout > 0:
            notes.append(f"--attn triton with dropout {model.dropout}: training attention runs through SDPA (the "
                         "Triton attention kernel has no dropout); RoPE and evaluation use the kernels")  # fmt: skip
        notes += self.ineffective_flags(model)
        if not self.samples_text(model):
            why = f"--data {RECALL_DATA}" if self.data == RECALL_DATA else f"a {model.vocab_size:,}-token vocabulary"
            notes.append(f"no text samples: {why} is not GPT-2 text")
        return notes

    def ineffective_flags(self, model: GPTConfig) -> list[str]:
        """A note for each variant setting that trains the same model as without it."""
        notes = []
        if model.window is not None and model.window >= self.seq_len:
            notes.append(f"window {model.window} is at least --seq-len {self.seq_len}: every query sees all earlier "
                         "tokens, so this trains plain causal attention")  # fmt: skip
        if self.n_kv_head is not None and model.n_kv_head == model.n_head:
            notes.append(f"--n-kv-head {self.n_kv_head} equals the model's {model.n_head} heads: plain multi-head "
                         "attention (grouped-query attention needs fewer K/V heads)")  # fmt: skip
        if self.block_size is not None and model.block_size > self.seq_len:
            notes.append(f"--block-size {model.block_size} exceeds --seq-len {self.seq_len}: training sequences stay "
                         f"{self.seq_len} tokens (give --seq-len too to train on longer ones)")  # fmt: skip
        return notes


FIELDS = {f.name: f for f in fields(TrainConfig)}
# What a run saved before a flag existed did, where that differs from the flag's default.
BEFORE_THE_FLAG = {"data_order": "sequential"}


def corpus_vocab(data: str) -> int | None:
    """The vocabulary a --data value needs: recall's, GPT-2's for text, None for synthetic (drawn below the model's)."""
    if data == RECALL_DATA:
        return RECALL_VOCAB
    return None if data == "synthetic" else VOCAB_SIZE


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def auto_grad_accum(batch_size: int, world_size: int, micro_batch: int) -> int:
    """The most micro-steps, each of at least micro_batch rows per rank, into which the batch divides evenly."""
    if batch_size % world_size != 0:
        raise ConfigError(f"--batch-size {batch_size} does not split evenly across {world_size} ranks")
    target = max(1, batch_size // (world_size * micro_batch))
    return next(a for a in range(target, 0, -1) if batch_size % (a * world_size) == 0)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad flag is one line on stderr, like every other bad input (argparse prints the usage too)."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    """train.py's command line, one flag per TrainConfig field; a flag not given leaves no attribute (SUPPRESS)."""
    p = Parser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(name, text) for name, text in GROUPS.items()}
    for f in fields(TrainConfig):
        meta = f.metadata
        kwargs = dict(help=meta["help"], default=argparse.SUPPRESS, **meta["argparse"])
        if f.default is False:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta["type"]
        groups[meta["group"]].add_argument(flag_name(f.name), **kwargs)
    return p


def parse_flags(argv: list[str] | None, description: str = "", epilog: str = "") -> dict:
    """The flags given on the command line, by field name (flags not given are absent)."""
    return vars(build_parser(description, epilog).parse_args(argv))


def from_flags(given: dict, saved: dict | None = None) -> TrainConfig:
    """The config of a fresh run (`saved` None), or of a resumed one: the checkpoint's config, overridden by the flags
    given, which must agree with it on the run fields."""
    if saved is None:
        return TrainConfig(**given)
    if "out_dir" in given and given["out_dir"].resolve() != given["resume"].resolve():
        raise ConfigError(
            f"--out-dir {given['out_dir']} and --resume {given['resume']} differ: a resumed run writes where it was"
        )
    for key, value in given.items():
        if TrainConfig.kind(key) == "run" and key in saved and value != saved[key]:
            raise ConfigError(
                f"{flag_name(key)} {value} differs from the checkpoint's {saved[key]}: a resumed run keeps its model, "
                "data and optimiser settings (start a new run in another --out-dir instead)"
            )
    kept = {k: v for k, v in saved.items() if k in FIELDS and TrainConfig.kind(k) != "how"}
    return TrainConfig(**{**BEFORE_THE_FLAG, **kept, **given, "out_dir": given["resume"]})
