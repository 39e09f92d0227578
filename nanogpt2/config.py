"""The training configuration: `TrainConfig`, its command line, every default and every check, in one place.

Each field is one flag of train.py (`--batch-size` is `batch_size`), declared with its default, its --help group and
text, and how a resumed run treats it (`kind`):

- run: defines the model, the data or the optimisation; a resumed run keeps the checkpoint's, and a flag given again
  must agree with it;
- how: how the run executes (parallel mode, compilation, attention kernels, where it writes); never taken from a
  checkpoint, chosen afresh on every start;
- the rest (steps, logging, device, dtype, grad-accum) come from the checkpoint unless given again.

train.py makes a config in three named calls: `fill_defaults` sets what was left None from the device's defaults
(DEVICE_DEFAULTS), `model_config` builds the GPTConfig (the preset and the model flags, or a resumed run's), and
`check` rejects impossible values with a ConfigError that names the flag to change.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from nanogpt2.data import DATA_ORDERS
from nanogpt2.errors import ConfigError
from nanogpt2.fineweb import NAME as FINEWEB
from nanogpt2.model import POS_EMBS, PRESETS, GPTConfig, check_attn_impl
from nanogpt2.prepare import TASKS, data_vocab
from nanogpt2.runtime import parse_device
from nanogpt2.tokenizer import VOCAB_SIZE

# Defaults that depend on the device: a run of a few minutes on a 2-core CPU, GPT-2 124M on a GPU.
DEVICE_DEFAULTS = {
    "cpu": dict(preset="nano", batch_size=8, seq_len=128, max_steps=200, lr=2e-3, warmup_steps=20, eval_every=50,
                eval_batches=8, micro_batch=8, attn="torch", log_every=1, vocab_pad_multiple=1),
    "cuda": dict(preset="gpt2", batch_size=32, seq_len=1024, max_steps=150, lr=6e-4, warmup_steps=15, eval_every=50,
                 eval_batches=20, micro_batch=None, attn="triton", log_every=10, vocab_pad_multiple=64),
}  # fmt: skip
CPU, GPU = DEVICE_DEFAULTS["cpu"], DEVICE_DEFAULTS["cuda"]
# README's "Reproduce GPT-2 (124M)": the defaults of --preset gpt2 --data fineweb10B, GPT-2's 0.5M-token batch over
# 10B tokens (build-nanogpt's and llm.c's recipe; warmup, cosine to lr / 10, weight decay 0.1 are the usual defaults).
GPT2_RECIPE = dict(batch_size=512, seq_len=1024, max_steps=19_073, lr=6e-4, warmup_steps=700, eval_every=250,
                   hellaswag_every=250)  # fmt: skip
# What one sequence position keeps for the backward, per layer and per unit of width, in bytes: an estimate for
# bf16 autocast with an fp32 residual stream and flash attention (Korthikanti et al. 2022 count 34 for pure 16-bit
# activations), rounded up so the estimate errs towards fitting; the CUDA micro-batch is sized with it.
ACTIVATION_BYTES = 64
MEMORY_HEADROOM = 0.85  # of the free memory: the allocator's fragmentation, the CUDA context, compile's workspaces
# Flags that override the preset's config.
MODEL_FIELDS = ("vocab_size", "vocab_pad_multiple", "n_layer", "block_size", "pos_emb", "n_kv_head", "window",
                "dropout")  # fmt: skip

# The --help groups, in order, and the text under each.
MODEL_AND_DATA = "model and data"
BATCH_AND_SCHEDULE = "batch and schedule"
EVAL_AND_OUTPUT = "evaluation, output and resuming"
DEVICE = "device"
PARALLEL = "parallel training"
GROUPS = (MODEL_AND_DATA, BATCH_AND_SCHEDULE, EVAL_AND_OUTPUT, DEVICE, PARALLEL)
GROUP_TEXT = {
    PARALLEL: "Under torchrun (RANK/WORLD_SIZE set) the run is DDP, or FSDP with --fsdp; NCCL on CUDA, gloo on CPU. "
    "--batch-size stays the global batch: each optimizer step reads batch-size sequences in grad-accum micro-steps, "
    "each micro-batch split evenly across the ranks, so a step sees the same data at any world size. Multi-node: "
    "torchrun --nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...",
}


def by_device(key: str) -> str:
    """The help text's "(default: ...)" for a default that depends on the device."""
    return f"(default: {CPU[key]} on CPU, {GPU[key]} on CUDA)"


def flag(*, group: str, help: str, default=None, type=None, kind: str = "", **argparse_kwargs):
    """A TrainConfig field: its default, and the metadata its command-line flag is made from."""
    return field(default=default, metadata=dict(group=group, help=help, type=type, kind=kind, argparse=argparse_kwargs))


# fmt: off
@dataclass
class TrainConfig:
    # model and data
    preset: str | None = flag(group=MODEL_AND_DATA, type=str, kind="run", choices=list(PRESETS), help=f"model preset {by_device('preset')}")
    data: str = flag(group=MODEL_AND_DATA, default="shakespeare", type=str, kind="run", help="corpus name (shakespeare, or fineweb10B once downloaded by python -m nanogpt2.prepare fineweb10B), directory or glob of .bin shards, text file(s) or directory of text (tokenized into the data cache), 'synthetic' (random tokens), or a task of the repository: " + ", ".join(f"'{name}' ({module.replace('.', '/')}.py)" for name, module in TASKS.items()) + " (default: shakespeare)")
    data_order: str = flag(group=MODEL_AND_DATA, default="shuffled", type=str, kind="run", choices=list(DATA_ORDERS), help="order of the training windows: shuffled (each epoch visits every window once, in an order drawn from the seed and the epoch) or sequential (the token stream front to back); val is read in order (default: shuffled)")
    vocab_size: int | None = flag(group=MODEL_AND_DATA, type=int, kind="run", help=f"token ids the model embeds and predicts, at least the data's (default: the data's: GPT-2's {VOCAB_SIZE:,} for text, a task's own)")
    dropout: float | None = flag(group=MODEL_AND_DATA, type=float, kind="run", help="dropout probability (default: the preset's, 0.0)")
    block_size: int | None = flag(group=MODEL_AND_DATA, type=int, kind="run", help="training context of the model (default: the preset's)")
    pos_emb: str | None = flag(group=MODEL_AND_DATA, type=str, kind="run", choices=POS_EMBS, help="learned positions or rotary (default: the preset's)")
    n_layer: int | None = flag(group=MODEL_AND_DATA, type=int, kind="run", help="transformer blocks (default: the preset's)")
    n_kv_head: int | None = flag(group=MODEL_AND_DATA, type=int, kind="run", help="K/V heads, fewer than heads for GQA (default: the preset's)")
    window: int | None = flag(group=MODEL_AND_DATA, type=int, kind="run", help="sliding-window attention over this many keys (default: the preset's)")
    vocab_pad_multiple: int | None = flag(group=MODEL_AND_DATA, type=int, kind="run", help=f"pad the embedding's (and tied lm_head's) rows to a multiple of this, as nanoGPT does (GPT-2's 50,257 -> 50,304 at 64): aligned matmul widths on a GPU; padding rows are outside the softmax and never targeted {by_device('vocab_pad_multiple')}")
    attn: str = flag(group=MODEL_AND_DATA, default="auto", type=str, kind="how", choices=["auto", "torch", "triton"], help="attention/RoPE implementation: torch (SDPA) or triton (the kernels in nanogpt2/kernels/, CUDA only; the attention kernel has no dropout, so with --dropout > 0 training attention runs through SDPA) (default: auto: triton on CUDA, torch on CPU)")
    # batch and schedule
    max_steps: int | None = flag(group=BATCH_AND_SCHEDULE, type=int, help=f"optimizer steps to train for {by_device('max_steps')}")
    batch_size: int | None = flag(group=BATCH_AND_SCHEDULE, type=int, kind="run", help=f"GLOBAL sequences per optimizer step {by_device('batch_size')}")
    seq_len: int | None = flag(group=BATCH_AND_SCHEDULE, type=int, kind="run", help=f"tokens per sequence (default: {CPU['seq_len']} on CPU, {GPU['seq_len']} on CUDA, at most the model's block size)")
    grad_accum: int | None = flag(group=BATCH_AND_SCHEDULE, type=int, help=f"micro-steps per optimizer step; batch-size must divide by grad-accum x world size (default: the most micro-steps of at least {CPU['micro_batch']} rows per rank on CPU; on CUDA the fewest whose micro-batch fits the GPU's free memory, estimated and printed at the start)")
    lr: float | None = flag(group=BATCH_AND_SCHEDULE, type=float, kind="run", help=f"peak learning rate {by_device('lr')}")
    min_lr: float | None = flag(group=BATCH_AND_SCHEDULE, type=float, kind="run", help="learning rate at the cosine decay's end (default: lr / 10)")
    warmup_steps: int | None = flag(group=BATCH_AND_SCHEDULE, type=int, kind="run", help=f"linear warmup steps (default: max-steps / 10, at most {CPU['warmup_steps']} on CPU, {GPU['warmup_steps']} on CUDA)")
    decay_steps: int | None = flag(group=BATCH_AND_SCHEDULE, type=int, kind="run", help="step where the cosine decay reaches min-lr (default: max-steps; kept on resume, so a run resumed with a larger --max-steps continues at min-lr)")
    optimizer: str = flag(group=BATCH_AND_SCHEDULE, default="adamw", type=str, kind="run", choices=["adamw", "sgd"], help="adamw (fused on CPU and CUDA), or plain sgd, for checking parallel modes against each other (default: adamw)")
    weight_decay: float = flag(group=BATCH_AND_SCHEDULE, default=0.1, type=float, kind="run", help="AdamW weight decay of 2-D weights (default: 0.1)")
    beta1: float = flag(group=BATCH_AND_SCHEDULE, default=0.9, type=float, kind="run", help="AdamW beta1 (default: 0.9)")
    beta2: float = flag(group=BATCH_AND_SCHEDULE, default=0.95, type=float, kind="run", help="AdamW beta2 (default: 0.95)")
    grad_clip: float = flag(group=BATCH_AND_SCHEDULE, default=1.0, type=float, kind="run", help="clip the global grad norm; 0: off (default: 1.0)")
    seed: int = flag(group=BATCH_AND_SCHEDULE, default=1337, type=int, kind="run", help="seed of the weights, dropout, the shuffled data order and synthetic and task data, in [0, 2**63) (default: 1337)")
    # evaluation, output and resuming
    eval_every: int | None = flag(group=EVAL_AND_OUTPUT, type=int, help=f"val loss every N steps and at the end; 0: at the end only {by_device('eval_every')}")
    eval_batches: int | None = flag(group=EVAL_AND_OUTPUT, type=int, help=f"micro-batches per val loss {by_device('eval_batches')}")
    log_every: int | None = flag(group=EVAL_AND_OUTPUT, type=int, help=f"print a log line every N steps (and at each eval, save and the end): only then is the device waited for and the losses read, so steps in between queue without a host sync; metrics.jsonl still gets every step, timed over the interval {by_device('log_every')}")
    hellaswag_every: int | None = flag(group=EVAL_AND_OUTPUT, type=int, help="HellaSwag accuracy every N steps and at the end (the validation set, fetched once into the data cache; its examples split across the ranks), for models of GPT-2's vocabulary; 0: never (default: 0; 250 in the GPT-2 recipe, --preset gpt2 --data fineweb10B)")
    wandb: str | None = flag(group=EVAL_AND_OUTPUT, type=str, kind="how", metavar="PROJECT", help="also log metrics.jsonl's rows to this Weights & Biases project (needs `pip install wandb`; WANDB_MODE=offline logs locally) (default: off)")
    sample_every: int = flag(group=EVAL_AND_OUTPUT, default=0, type=int, help="print a sample every N steps; 0: at the end only (default: 0)")
    save_every: int | None = flag(group=EVAL_AND_OUTPUT, type=int, help="checkpoint every N steps, at the end and on Ctrl-C; 0: those two only (default: eval-every)")
    out_dir: Path | None = flag(group=EVAL_AND_OUTPUT, type=Path, kind="how", help="where the checkpoint, metrics.jsonl and run.json go (default: out)")
    time_limit: float | None = flag(group=EVAL_AND_OUTPUT, type=lambda text: parse_duration(text), kind="how", metavar="DURATION", help="stop with a checkpoint before this much wall-clock time has passed (e.g. 3h50m, 90m, 45s, or seconds), as a batch job's limit requires; the run exits 0 and continues with --resume (default: none)")
    resume: Path | None = flag(group=EVAL_AND_OUTPUT, type=Path, kind="how", metavar="OUT_DIR", help="continue the run whose checkpoint is in OUT_DIR, with its config (flags given again override its step, logging and device settings); --resume OUT --max-steps N trains the steps past the old --max-steps at the schedule's final learning rate, --min-lr")
    # device
    device: str = flag(group=DEVICE, default="auto", type=str, help="auto, cpu, cuda or cuda:N (default: auto: cuda if available; a resumed run keeps its own)")
    dtype: str = flag(group=DEVICE, default="auto", type=str, choices=["auto", "float32", "bfloat16", "float16"], help="autocast dtype (default: auto: bfloat16 on CUDA, float16 + GradScaler where bf16 is unsupported, float32 on CPU)")
    compile: bool | None = flag(group=DEVICE, kind="how", action=argparse.BooleanOptionalAction, help="torch.compile the whole model, forward, fused loss and backward (each block, then sharded, under --fsdp); the first step's time includes compiling, printed once (default: on for CUDA, off on CPU)")
    cuda_graphs: bool = flag(group=DEVICE, default=False, kind="how", help="replay each micro-step's compiled forward and backward as CUDA graphs (torch.compile's reduce-overhead mode: static input buffers, a capturable fused AdamW with the lr as a tensor); CUDA with --compile only")
    # parallel training
    fsdp: bool = flag(group=PARALLEL, default=False, kind="how", help="shard parameters, gradients and optimizer state (FSDP2)")
    activation_checkpointing: bool = flag(group=PARALLEL, default=False, kind="how", help="recompute each block's activations in the backward")
    dist_timeout: float = flag(group=PARALLEL, default=600.0, type=float, kind="how", metavar="SECONDS", help="seconds a collective may wait for the other ranks before the run fails, e.g. when a rank is stuck (default: 600)")
    # fmt: on

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

    def fill_defaults(self, device: torch.device, world_size: int) -> None:
        """Set every field left None (or "auto") from the device's defaults; a resumed run has most of them saved."""
        defaults = DEVICE_DEFAULTS[device.type]
        if (self.preset or defaults["preset"]) == "gpt2" and self.data == FINEWEB:
            defaults = {**defaults, **GPT2_RECIPE}
        self.hellaswag_every = defaults.get("hellaswag_every", 0) if self.hellaswag_every is None else self.hellaswag_every
        self.device = device.type if self.device == "auto" else self.device  # saved, so a resumed run keeps it
        self.attn = defaults["attn"] if self.attn == "auto" else self.attn
        self.compile = device.type == "cuda" if self.compile is None else self.compile
        for key in ("preset", "batch_size", "max_steps", "lr", "eval_every", "eval_batches", "log_every", "vocab_pad_multiple"):
            if getattr(self, key) is None:
                setattr(self, key, defaults[key])
        if self.warmup_steps is None:  # short runs warm up over their first tenth
            self.warmup_steps = min(defaults["warmup_steps"], self.max_steps // 10)
        self.min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        self.decay_steps = self.max_steps if self.decay_steps is None else self.decay_steps
        self.save_every = self.eval_every if self.save_every is None else self.save_every
        self.out_dir = Path("out") if self.out_dir is None else self.out_dir
        if self.seq_len is None:
            block_size = self.block_size or GPTConfig.from_preset(self.preset).block_size
            self.seq_len = min(defaults["seq_len"], block_size)
        if self.grad_accum is None and defaults["micro_batch"] is not None:  # CUDA's: `fit_micro_batch`, from memory
            self.grad_accum = auto_grad_accum(self.batch_size, world_size, defaults["micro_batch"])

    def fit_micro_batch(self, model: GPTConfig, device: torch.device, world_size: int) -> str | None:
        """On CUDA with --grad-accum not given: the fewest micro-steps whose micro-batch (rows per rank) fits the
        device's free memory by `micro_batch_fit`'s estimate; returns the line that says what it found (else None)."""
        if self.grad_accum is not None:
            return None
        free, _ = torch.cuda.mem_get_info(device)
        rows, per_row = micro_batch_fit(model, self.seq_len, free)
        self.grad_accum = fitting_grad_accum(self.batch_size, world_size, rows)
        micro = self.batch_size // (self.grad_accum * world_size)
        return (f"micro-batch {micro} x {self.seq_len} tokens per rank, {self.grad_accum} micro-steps: {free / 2**30:.1f} "
                f"GiB free on {torch.cuda.get_device_name(device)} fits {rows} sequences of ~{per_row / 2**30:.2f} GiB")  # fmt: skip

    def model_config(self, saved: dict | None = None) -> GPTConfig:
        """The preset with the model flags' overrides (and the data's vocabulary), or a resumed run's saved config."""
        try:
            if saved is not None:
                return GPTConfig(**saved)
            overrides = {key: getattr(self, key) for key in MODEL_FIELDS if getattr(self, key) is not None}
            vocab = data_vocab(self.data)
            if vocab is not None:
                overrides.setdefault("vocab_size", vocab)
            return GPTConfig.from_preset(self.preset, **overrides)
        except (ValueError, TypeError) as e:  # TypeError: a saved config with fields this GPTConfig does not have
            raise ConfigError(f"model config: {e}") from None

    def check(self, model: GPTConfig, device: torch.device, world_size: int, distributed: bool) -> None:
        """Reject impossible values and combinations with a message that names the flag."""
        for key in ("lr", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{flag_name(key)} must be a finite number, got {getattr(self, key)}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in [0, 2**63), got {self.seed}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{flag_name(key)} must be in [0, 1), got {getattr(self, key)}")
        for key in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "lr", "decay_steps", "time_limit", "log_every"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"{flag_name(key)} must be positive, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "sample_every", "save_every", "min_lr", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{flag_name(key)} must not be negative, got {getattr(self, key)}")
        if self.hellaswag_every < 0:
            raise ConfigError(f"--hellaswag-every must not be negative, got {self.hellaswag_every}")
        if self.hellaswag_every and (model.vocab_size != VOCAB_SIZE or data_vocab(self.data) not in (None, VOCAB_SIZE)):
            raise ConfigError(
                f"--hellaswag-every needs a model of GPT-2's vocabulary ({VOCAB_SIZE:,} tokens) trained on GPT-2 "
                f"tokens; this one has {model.vocab_size:,} and --data {self.data}"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} exceeds --lr {self.lr}")
        needed = data_vocab(self.data)
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
        if self.cuda_graphs and (device.type != "cuda" or not self.compile):
            raise ConfigError("--cuda-graphs needs a CUDA device and --compile (it replays the compiled micro-step)")
        if self.attn == "triton" and device.type != "cuda":
            raise ConfigError("--attn triton needs a CUDA device (tests run the kernels through Triton's interpreter)")
        try:
            check_attn_impl(model, self.attn)
        except ValueError as e:
            raise ConfigError(f"--attn {self.attn}: {e}") from None
        if self.fsdp and not distributed:
            raise ConfigError("--fsdp needs torchrun, e.g. torchrun --standalone --nproc_per_node=2 train.py --fsdp")
        if self.batch_size % (self.grad_accum * world_size) != 0:
            raise ConfigError(
                f"--batch-size {self.batch_size} does not divide into --grad-accum {self.grad_accum} x world size "
                f"{world_size} micro-batches of whole sequences"
            )

    def can_decode_samples(self, model: GPTConfig) -> bool:
        """Whether the model's samples are GPT-2 text that the tokenizer can decode."""
        return model.vocab_size == VOCAB_SIZE and data_vocab(self.data) in (None, VOCAB_SIZE)

    def notes(self, model: GPTConfig) -> list[str]:
        """What the user should know about how this config runs."""
        notes = []
        if self.attn == "triton" and model.dropout > 0:
            notes.append(f"--attn triton with dropout {model.dropout}: training attention runs through SDPA (the "
                         "Triton attention kernel has no dropout); RoPE and evaluation use the kernels")  # fmt: skip
        notes += self.ineffective_flags(model)
        if not self.can_decode_samples(model):
            text = data_vocab(self.data) in (None, VOCAB_SIZE)
            why = f"a {model.vocab_size:,}-token vocabulary" if text else f"--data {self.data}"
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


def parse_duration(text: str) -> float:
    """Seconds of a duration such as 3h50m, 90m, 1h30m15s or 3600; argparse's error for anything else."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 3h50m, 90m, 45s or 3600)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def micro_batch_fit(model: GPTConfig, seq_len: int, free_bytes: int) -> tuple[int, int]:
    """(sequences, bytes per sequence): the largest power-of-two micro-batch of seq_len-token sequences whose training
    step fits MEMORY_HEADROOM of free_bytes, by an estimate: fp32 weights, gradients and AdamW's two moments (16 bytes
    a parameter), the fused loss's chunk buffers and fp32 W gradient, and ACTIVATION_BYTES per position, layer and
    unit of width. At least 1 (a step that does not fit fails with CUDA's out-of-memory error)."""
    from nanogpt2.loss import CHUNK_ROWS

    C, Vp = model.n_embd, model.padded_vocab_size
    n_params = 12 * model.n_layer * C * C + Vp * C + (model.block_size * C if model.pos_emb == "learned" else 0)
    fixed = 16 * n_params + CHUNK_ROWS * Vp * 6 + Vp * C * 4
    per_row = seq_len * (model.n_layer * C * ACTIVATION_BYTES + 16 * C)  # the blocks, and h / grad_h of the loss
    rows = max(1, int((MEMORY_HEADROOM * free_bytes - fixed) // per_row))
    return 2 ** (rows.bit_length() - 1), per_row


def fitting_grad_accum(batch_size: int, world_size: int, max_rows: int) -> int:
    """The fewest micro-steps, each of at most max_rows rows per rank, into which the batch divides evenly."""
    if batch_size % world_size != 0:
        raise ConfigError(f"--batch-size {batch_size} does not split evenly across {world_size} ranks")
    per_rank = batch_size // world_size
    return next(a for a in range(math.ceil(per_rank / max_rows), per_rank + 1) if per_rank % a == 0)


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
    groups = {name: p.add_argument_group(name, GROUP_TEXT.get(name)) for name in GROUPS}
    for f in fields(TrainConfig):
        meta = f.metadata
        kwargs = dict(help=meta["help"], default=argparse.SUPPRESS, **meta["argparse"])
        if f.default is False:
            kwargs["action"] = "store_true"
        elif "action" not in kwargs:  # --compile / --no-compile come with their own action
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
    return TrainConfig(**{**kept, **given, "out_dir": given["resume"]})
