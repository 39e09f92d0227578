"""Train a GPT.

    python train.py                                  # CPU: the nano preset on Shakespeare, ~4 minutes on 2 cores
                                                     # CUDA: GPT-2 124M on Shakespeare
    python train.py --preset pico --data synthetic --max-steps 50
    python train.py --resume out                     # continue the run in out/ exactly where it stopped

The parts, in order: parse_args -> setup_distributed (rank / world size) -> build_model -> build_loaders (each rank
its share of every micro-batch) -> wrap_model (the one place the model is compiled or parallelised) -> train (the
loop: grad accumulation, clipping, warmup + cosine LR, eval, sample, atomic checkpoints). --batch-size is the global
number of sequences per optimizer step: split into --grad-accum micro-steps, each micro-batch split across ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nanogpt2.checkpoint import (
    TRAIN_CKPT,
    CheckpointError,
    load_train_state,
    load_training_checkpoint,
    save_train_state,
)
from nanogpt2.data import BatchLoader, DataError, open_corpus
from nanogpt2.model import GPT, POS_EMBS, PRESETS, GPTConfig
from nanogpt2.parallel import (
    DistEnv,
    all_reduce_mean,
    any_rank,
    cleanup,
    grad_sync,
    init_distributed,
    memory_report,
    parallelize,
)
from nanogpt2.tokenizer import EOT, decode

# Defaults that depend on the device: a run of a few minutes on a 2-core CPU, GPT-2 124M on a GPU.
DEVICE_DEFAULTS = {
    "cpu": dict(preset="nano", batch_size=8, seq_len=128, max_steps=200, lr=2e-3, warmup_steps=20, eval_every=50,
                eval_batches=8, micro_batch=8),
    "cuda": dict(preset="gpt2", batch_size=32, seq_len=1024, max_steps=150, lr=6e-4, warmup_steps=15, eval_every=50,
                 eval_batches=20, micro_batch=16),
}  # fmt: skip
# A resumed run keeps these from its checkpoint (they define the model, the data and the optimisation);
# every other flag (steps, logging, device, dtype, compile, grad-accum) may change on resume.
RUN_FLAGS = ("preset", "data", "batch_size", "seq_len", "lr", "min_lr", "warmup_steps", "decay_steps",
             "weight_decay", "grad_clip", "seed", "dropout", "beta1", "beta2", "optimizer", "block_size", "pos_emb",
             "n_kv_head", "window")  # fmt: skip
HOW_FLAGS = ("fsdp", "activation_checkpointing", "compile", "attn")  # how to run: a resumed run chooses afresh
MODEL_FLAGS = ("block_size", "pos_emb", "n_kv_head", "window", "dropout")  # flags that override the preset's config
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks, for MFU
SAMPLE_TOKENS = 64


class UsageError(Exception):
    """Flags, paths or a training state that make the run impossible."""


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    cpu, gpu = DEVICE_DEFAULTS["cpu"], DEVICE_DEFAULTS["cuda"]

    def dflt(key: str) -> str:
        return f"(default: {cpu[key]} on CPU, {gpu[key]} on CUDA)"

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", choices=list(PRESETS), help=f"model preset {dflt('preset')}")
    g.add_argument(
        "--data",
        default="shakespeare",
        help="corpus name (shakespeare), directory or glob of .bin shards, text file(s) or directory of "
        "text (tokenized into the data cache), or 'synthetic' (default: shakespeare)",
    )
    g.add_argument("--dropout", type=float, help="dropout probability (default: the preset's, 0.0)")
    g.add_argument("--block-size", type=int, help="training context of the model (default: the preset's)")
    g.add_argument("--pos-emb", choices=POS_EMBS, help="learned positions or rotary (default: the preset's)")
    g.add_argument("--n-kv-head", type=int, help="K/V heads, fewer than heads for GQA (default: the preset's)")
    g.add_argument("--window", type=int, help="sliding-window attention over this many keys (default: the preset's)")
    g.add_argument(
        "--attn",
        choices=["auto", "torch", "triton"],
        default="auto",
        help="attention/RoPE implementation: torch (SDPA) or triton (the kernels in kernels/, CUDA only) "
        "(default: auto: triton on CUDA, torch on CPU)",
    )
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--max-steps", type=int, help=f"optimizer steps to train for {dflt('max_steps')}")
    g.add_argument("--batch-size", type=int, help=f"GLOBAL sequences per optimizer step {dflt('batch_size')}")
    g.add_argument("--seq-len", type=int, help=f"tokens per sequence {dflt('seq_len')}")
    g.add_argument(
        "--grad-accum",
        type=int,
        help="micro-steps per optimizer step; batch-size must divide by grad-accum x world size "
        f"(default: micro-batches of {cpu['micro_batch']} rows per rank on CPU, "
        f"{gpu['micro_batch']} on CUDA)",
    )
    g.add_argument("--lr", type=float, help=f"peak learning rate {dflt('lr')}")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay (default: lr / 10)")
    g.add_argument(
        "--warmup-steps",
        type=int,
        help=f"linear warmup steps (default: max-steps / 10, at most {cpu['warmup_steps']} on CPU, "
        f"{gpu['warmup_steps']} on CUDA)",
    )
    g.add_argument(
        "--decay-steps",
        type=int,
        help="step where the cosine decay reaches min-lr (default: max-steps; kept on resume, so a run "
        "resumed with a larger --max-steps continues at min-lr)",
    )
    g.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default="adamw",
        help="adamw (fused on CUDA), or plain sgd, for checking parallel modes against each other (default: adamw)",
    )
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of 2-D weights (default: 0.1)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (default: 0.9)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (default: 0.95)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm; 0: off (default: 1.0)")
    g.add_argument("--seed", type=int, default=1337, help="seed of weights, dropout, synthetic data (default: 1337)")
    g = p.add_argument_group("evaluation, output and resuming")
    g.add_argument(
        "--eval-every", type=int, help=f"val loss every N steps and at the end; 0: at the end only {dflt('eval_every')}"
    )
    g.add_argument("--eval-batches", type=int, help=f"micro-batches per val loss {dflt('eval_batches')}")
    g.add_argument("--sample-every", type=int, default=0, help="print a sample every N steps; 0: at the end only")
    g.add_argument(
        "--save-every",
        type=int,
        help="checkpoint every N steps, at the end and on Ctrl-C; 0: those two only (default: eval-every)",
    )
    g.add_argument("--out-dir", type=Path, help="where the checkpoint, metrics.jsonl and run.json go (default: out)")
    g.add_argument(
        "--resume",
        type=Path,
        metavar="OUT_DIR",
        help="continue the run whose checkpoint is in OUT_DIR, with its config (only step, logging and "
        "device flags may change)",
    )
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto: cuda if available)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast dtype (default: auto: bfloat16 on CUDA, float16 + GradScaler where bf16 is "
        "unsupported, float32 on CPU)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group(
        "parallel training",
        "Under torchrun (RANK/WORLD_SIZE set) the run is DDP, or FSDP with --fsdp; NCCL on CUDA, gloo on CPU. "
        "--batch-size stays the global batch: each optimizer step reads batch-size sequences in grad-accum "
        "micro-steps, each micro-batch split evenly across the ranks, so a step sees the same data at any world "
        "size. Multi-node: torchrun --nnodes N --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...",
    )
    g.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2)")
    g.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block's activations in the backward"
    )
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """The parsed flags, and the names of those given on the command line (which win over a checkpoint's)."""
    args = build_parser().parse_args(argv)
    probe = build_parser()
    for action in probe._actions:  # unset flags then leave no attribute behind
        action.default = argparse.SUPPRESS
    return args, set(vars(probe.parse_args(argv)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def fill_defaults(args: argparse.Namespace, device: torch.device, world_size: int) -> None:
    """Fill the flags left unset with the device's defaults."""
    defaults = DEVICE_DEFAULTS[device.type]
    if args.attn == "auto":
        args.attn = "triton" if device.type == "cuda" else "torch"
    for key in ("preset", "batch_size", "seq_len", "max_steps", "lr", "eval_every", "eval_batches"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.warmup_steps is None:  # short runs warm up over their first tenth
        args.warmup_steps = min(defaults["warmup_steps"], args.max_steps // 10)
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.decay_steps is None:
        args.decay_steps = args.max_steps
    if args.save_every is None:
        args.save_every = args.eval_every
    if args.out_dir is None:
        args.out_dir = Path("out")
    if args.grad_accum is None and args.batch_size > 0:
        args.grad_accum = max(1, args.batch_size // (world_size * defaults["micro_batch"]))


def merge_resumed(args: argparse.Namespace, explicit: set[str], saved: dict) -> None:
    """Take the checkpoint's flags; flags given now override, except RUN_FLAGS, which must agree.

    How the run is executed (HOW_FLAGS: parallel mode, compilation) is never taken from the checkpoint: a run saved
    under FSDP resumes as a plain process unless --fsdp is given again.
    """
    for key, value in saved.items():
        if key in ("resume", "out_dir", *HOW_FLAGS):
            continue
        if key in explicit:
            if key in RUN_FLAGS and getattr(args, key) != value:
                flag = "--" + key.replace("_", "-")
                raise UsageError(
                    f"{flag} {getattr(args, key)} differs from the checkpoint's {value}: a resumed run keeps its "
                    "model, data and optimiser settings (start a new run in another --out-dir instead)"
                )
        else:
            setattr(args, key, value)


def model_config(args: argparse.Namespace, saved: dict | None = None) -> GPTConfig:
    """The preset with the flags' overrides; a resumed run rebuilds the checkpoint's config (attn may change)."""
    overrides = {"attn": args.attn}
    overrides |= {key: getattr(args, key) for key in MODEL_FLAGS if getattr(args, key) is not None}
    try:
        if saved is not None:
            return GPTConfig(**{**saved, "attn": args.attn})
        return GPTConfig.from_preset(args.preset, **overrides)
    except (ValueError, TypeError) as e:  # TypeError: a saved config with fields this GPTConfig does not have
        raise UsageError(f"model config: {e}") from None


def check_args(args: argparse.Namespace, config: GPTConfig, world_size: int, device: torch.device) -> None:
    """Reject impossible flag combinations with a message that names the flag."""
    for key in ("lr", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2"):
        if not math.isfinite(getattr(args, key)):
            raise UsageError(f"--{key.replace('_', '-')} must be a finite number, got {getattr(args, key)}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(args, key) < 1.0:
            raise UsageError(f"--{key} must be in [0, 1), got {getattr(args, key)}")
    positive = ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "lr", "decay_steps")
    for key in positive:
        if getattr(args, key) <= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    for key in ("warmup_steps", "eval_every", "sample_every", "save_every", "min_lr", "weight_decay", "grad_clip"):
        if getattr(args, key) < 0:
            raise UsageError(f"--{key.replace('_', '-')} must not be negative, got {getattr(args, key)}")
    if args.min_lr > args.lr:
        raise UsageError(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    if args.batch_size % (args.grad_accum * world_size) != 0:
        raise UsageError(
            f"--batch-size {args.batch_size} does not divide into --grad-accum {args.grad_accum} x world size "
            f"{world_size} micro-batches of whole sequences"
        )
    if config.pos_emb == "learned" and args.seq_len > config.block_size:
        raise UsageError(
            f"--seq-len {args.seq_len} exceeds block_size {config.block_size} of preset {args.preset} "
            "(learned positions stop there)"
        )
    if device.type == "cpu" and args.dtype == "float16":
        raise UsageError("--dtype float16 needs CUDA; use bfloat16 or float32 on CPU")
    if args.attn == "triton" and device.type != "cuda":
        raise UsageError("--attn triton needs a CUDA device (tests run the kernels through Triton's interpreter)")


# ---------------------------------------------------------------------------------------------------------------------
# Setup: distributed, precision, model, loaders


def print0(dist: DistEnv, *args, **kwargs) -> None:
    if dist.is_main:
        print(*args, **kwargs, flush=True)


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    if args.dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, args.dtype)


def build_model(config: GPTConfig, device: torch.device) -> GPT:
    return GPT(config).to(device)


def parallel_mode(args: argparse.Namespace, dist: DistEnv) -> str:
    """plain (one process), ddp (under torchrun) or fsdp (under torchrun with --fsdp)."""
    if args.fsdp and not dist.distributed:
        raise UsageError("--fsdp needs torchrun, e.g. torchrun --standalone --nproc_per_node=2 train.py --fsdp")
    return "fsdp" if args.fsdp else "ddp" if dist.distributed else "plain"


def wrap_model(model: GPT, args: argparse.Namespace, dist: DistEnv, mode: str, dtype: torch.dtype) -> torch.nn.Module:
    """The one place the model is parallelised (DDP / FSDP) and compiled.

    FSDP shards `model` in place, so the optimizer must be built after this; with DDP, `model` stays the plain module
    inside the wrapper (checkpoints and sampling use it).
    """
    param_dtype = dtype if mode == "fsdp" and dtype != torch.float32 else None  # FSDP's mixed precision on CUDA
    wrapped = parallelize(model, mode, dist, param_dtype, args.activation_checkpointing)
    return torch.compile(wrapped) if args.compile else wrapped


def build_optimizer(model: GPT, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (decay on 2-D weights, fused on CUDA), or plain SGD, whose steps are linear in the gradients."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr)
    return model.configure_optimizers(args.weight_decay, args.lr, (args.beta1, args.beta2), device.type)


def build_loaders(args: argparse.Namespace, config: GPTConfig, dist: DistEnv) -> tuple[BatchLoader, BatchLoader, str]:
    """Train and val loaders for this rank: each reads its contiguous share of every global micro-batch."""
    corpus = open_corpus(args.data, vocab_size=config.vocab_size, seed=args.seed)
    rows = args.batch_size // args.grad_accum  # global rows per micro-batch
    common = dict(
        rows=rows, seq_len=args.seq_len, rank=dist.rank, world_size=dist.world_size, vocab_size=config.vocab_size
    )
    return BatchLoader(corpus.train, **common), BatchLoader(corpus.val, **common), corpus.note


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min-lr at decay-steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if step >= args.decay_steps:
        return args.min_lr
    progress = (step - args.warmup_steps) / max(1, args.decay_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


# ---------------------------------------------------------------------------------------------------------------------
# Recording the run


def git_commit() -> str:
    try:
        repo = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"


def run_record(
    args: argparse.Namespace, config: GPTConfig, device: torch.device, dtype: torch.dtype, dist: DistEnv, n_params: int
) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("triton", "tiktoken"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": config.to_dict(),
        "n_params": n_params,
        "device": device_name,
        "dtype": str(dtype).split(".")[-1],
        "world_size": dist.world_size,
        "versions": versions,
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def prepare_out_dir(out_dir: Path, resuming: bool) -> None:
    """Create out_dir; a fresh run refuses a directory that already holds a run, so nothing is overwritten."""
    if not resuming:
        if (out_dir / TRAIN_CKPT).exists():
            raise UsageError(
                f"{out_dir} already holds a checkpoint: continue it with --resume {out_dir}, "
                "or choose another --out-dir"
            )
        if (out_dir / "metrics.jsonl").exists():
            raise UsageError(f"{out_dir} already holds a run (metrics.jsonl): choose another --out-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out-dir {out_dir}: {e.strerror or e}") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file renamed over `path`: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line torn by a crash mid-write, which is then dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def trim_metrics(path: Path, step: int) -> None:
    """Drop the rows of steps after `step` (a resumed run repeats them) and torn rows: every step is logged once."""
    if not path.exists():
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    kept = [line for line in rows if logged_step(line) <= step]
    if len(kept) < len(rows):
        write_text_atomic(path, "".join(kept))


def log_memory(model: GPT, optimizer: torch.optim.Optimizer, dist: DistEnv) -> None:
    """One line per rank: the parameters and optimizer state it holds (1/world of them under FSDP), peak memory."""
    report = memory_report(model, optimizer)
    reports = [report]
    if dist.distributed:
        reports = [None] * dist.world_size
        torch.distributed.all_gather_object(reports, report)
    for rank, r in enumerate(reports):
        peak = f" | peak {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else ""
        print0(
            dist, f"memory rank {rank}: {r['param_elems']:,} param elems | {r['optim_state_elems']:,} optim elems{peak}"
        )


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_summary(
    step_times: list[float], tokens_per_step: int, wall: float, loss: float, val_loss: float, device: torch.device
) -> dict:
    """The run's headline numbers, for scripts (the variant study): median speed after the first step, peak memory."""
    steady = step_times[1:] or step_times
    return {
        "steps": len(step_times),
        "tokens_per_s": tokens_per_step / statistics.median(steady),
        "peak_mem_mib": peak_memory_mib(device),
        "wall_s": wall,
        "train_loss": loss,
        "val_loss": val_loss,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation and sampling


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: BatchLoader, n_batches: int, autocast) -> float:
    """Mean loss over the first n_batches val micro-batches (the same ones every time)."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=next(model.parameters()).device)
    for _ in range(n_batches):
        x, y = loader.next_batch()
        with autocast():
            _, loss = model(x.to(total.device), y.to(total.device))
        total += loss.float()
    model.train()
    return all_reduce_mean(total / n_batches).item()  # each rank evaluated its share of the val batches


def sample_text(model: GPT, seed: int, device: torch.device) -> str:
    """A short top-k sample from <|endoftext|>, drawn from its own generator so training's RNG is untouched."""
    from nanogpt2.sample import generate

    model.eval()
    idx = torch.full((1, 1), EOT, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        out = generate(model, idx, SAMPLE_TOKENS, temperature=0.8, top_k=50, generator=gen)
    model.train()
    return decode(out[0, 1:].tolist())


# ---------------------------------------------------------------------------------------------------------------------
# Training


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StopFlag:
    """Turns the first Ctrl-C into a request to checkpoint and stop at the end of the current step."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: saving a checkpoint at the end of this step (Ctrl-C again to abort)", flush=True)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: BatchLoader,
    lr: float,
    args: argparse.Namespace,
    autocast,
) -> tuple[float, float]:
    """One optimizer step over args.grad_accum micro-batches: returns (mean loss, grad norm before clipping).

    A non-finite loss or norm (bf16/fp32) leaves the weights untouched; the caller stops the run. With fp16 the
    GradScaler skips steps with inf gradients itself and lowers its scale.
    """
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for micro in range(args.grad_accum):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with grad_sync(model, micro == args.grad_accum - 1):  # ranks exchange gradients on the last micro-step only
            with autocast():
                _, loss = model(x, y)
            loss = loss / args.grad_accum  # the mean over the whole step's batch
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor of the shards
    loss_value = all_reduce_mean(loss_sum).item()  # the whole global batch's mean loss
    if math.isfinite(loss_value) and (scaler.is_enabled() or math.isfinite(norm)):
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm


def train(argv: list[str] | None = None) -> int:
    args, explicit = parse_args(argv)
    device = resolve_device(args.device)
    dist = init_distributed(str(device))
    device = dist.device
    mode = parallel_mode(args, dist)
    ckpt = None
    if args.resume is not None:
        if "out_dir" in explicit and args.out_dir.resolve() != args.resume.resolve():
            raise UsageError(
                f"--out-dir {args.out_dir} and --resume {args.resume} differ: a resumed run writes where it was"
            )
        ckpt = load_training_checkpoint(args.resume)
        merge_resumed(args, explicit, ckpt["args"])
        args.out_dir = args.resume
    fill_defaults(args, device, dist.world_size)
    config = model_config(args, ckpt["config"] if ckpt else None)
    check_args(args, config, dist.world_size, device)
    prepare_out_dir(args.out_dir, resuming=ckpt is not None)
    dtype = autocast_dtype(args, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # tf32 for what autocast leaves in fp32
    torch.manual_seed(args.seed)

    raw_model = build_model(config, device)
    model = wrap_model(raw_model, args, dist, mode, dtype)  # raw_model: the GPT itself (sharded in place by FSDP)
    optimizer = build_optimizer(raw_model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    train_loader, val_loader, note = build_loaders(args, config, dist)
    step = 0
    if ckpt is not None:
        try:
            load_train_state(args.resume, ckpt, raw_model, optimizer)
            if scaler.is_enabled() and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            train_loader.load_state_dict(ckpt["loader"])
            set_rng_state(ckpt["rng"], device)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{args.resume}/{TRAIN_CKPT} does not fit this run: {e}".splitlines()[0]) from None
        step = ckpt["step"]

    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    record = run_record(args, config, device, dtype, dist, raw_model.num_params())
    record["parallel"] = mode
    if dist.is_main:
        write_json(args.out_dir / (f"run-resume-{step}.json" if ckpt else "run.json"), record)
    print0(dist, (f"resuming at step {step}: " if ckpt else "run: ") + json.dumps(record))
    if note:
        print0(dist, f"note: {note}")
    eval_batches = min(args.eval_batches, val_loader.batches_per_epoch or args.eval_batches)
    tokens_per_step = args.batch_size * args.seq_len
    flops_per_step = raw_model.flops_per_token(args.seq_len) * tokens_per_step
    peak = peak_flops(device)
    if dist.is_main and ckpt:
        trim_metrics(args.out_dir / "metrics.jsonl", step)
    metrics = open(args.out_dir / "metrics.jsonl", "a") if dist.is_main else None

    def save(step: int) -> None:
        saved_args = {k: v for k, v in vars(args).items() if k not in ("resume", "out_dir")}
        meta = {"step": step, "scaler": scaler.state_dict(), "config": config.to_dict(), "args": saved_args}
        meta |= {"loader": train_loader.state_dict(), "rng": rng_state(device)}
        save_train_state(args.out_dir, raw_model, optimizer, meta, sharded=mode == "fsdp", is_main=dist.is_main)

    stop = StopFlag()
    first_loss = last_loss = val_loss = None
    step_times: list[float] = []
    t_start = time.perf_counter()
    try:
        while step < args.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, args)
            loss_value, norm = train_step(model, optimizer, scaler, train_loader, lr, args, autocast)
            if not math.isfinite(loss_value) or (not scaler.is_enabled() and not math.isfinite(norm)):
                last = f"{args.out_dir}/{TRAIN_CKPT}" if (args.out_dir / TRAIN_CKPT).exists() else "none yet"
                raise UsageError(
                    f"loss {loss_value} / grad norm {norm} at step {step + 1} is not finite: stopped "
                    f"(last good checkpoint: {last}); try a lower --lr"
                )
            step += 1
            dt = time.perf_counter() - t0
            first_loss = loss_value if first_loss is None else first_loss
            last_loss = loss_value
            row = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "norm": norm,
                "ms": dt * 1e3,
                "tok_s": tokens_per_step / dt,
                "tokens": step * tokens_per_step,
            }
            line = (
                f"step {step}/{args.max_steps} | loss {loss_value:.3f} | lr {lr:.1e} | norm {norm:.2f} | "
                f"{dt * 1e3:.0f} ms | {tokens_per_step / dt:,.0f} tok/s"
            )
            if peak:
                row["mfu"] = flops_per_step / dt / (peak * dist.world_size)
                line += f" | mfu {100 * row['mfu']:.1f}%"
            print0(dist, line)
            if len(step_times) == 0:
                log_memory(raw_model, optimizer, dist)
            step_times.append(dt)
            last_step = step == args.max_steps
            if (args.eval_every and step % args.eval_every == 0) or last_step:
                val_loss = row["val_loss"] = evaluate(model, val_loader, eval_batches, autocast)
                print0(dist, f"step {step}/{args.max_steps} | val loss {val_loss:.3f}")
            if metrics:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            stopping = any_rank(stop.requested, device)  # a Ctrl-C that reached some ranks stops them all
            if (args.save_every and step % args.save_every == 0) or last_step or stopping:
                save(step)
            if args.sample_every and step % args.sample_every == 0 and not last_step:
                print0(dist, f"sample: {sample_text(raw_model, args.seed, device)!r}")  # every rank: FSDP's forward
            if stopping:
                print0(
                    dist,
                    f"interrupted: checkpoint at step {step} in {args.out_dir}; continue with --resume {args.out_dir}",
                )
                return 130
    finally:
        stop.restore()
        if metrics:
            metrics.close()
    wall = time.perf_counter() - t_start
    print0(dist, f"sample: {sample_text(raw_model, args.seed, device)!r}")
    if dist.is_main and step_times:
        write_json(
            args.out_dir / "summary.json", run_summary(step_times, tokens_per_step, wall, last_loss, val_loss, device)
        )
    if first_loss is not None:
        print0(
            dist,
            f"done: {step} steps in {wall:.0f} s | train loss {first_loss:.3f} -> {last_loss:.3f} | "
            f"val loss {val_loss:.3f} | checkpoint {args.out_dir / TRAIN_CKPT}",
        )
    else:
        print0(dist, f"done: already at step {step} of --max-steps {args.max_steps}; nothing to train")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run train(); a problem with the input ends in one line on stderr and exit status 1."""
    try:
        status = train(argv)
    except (UsageError, DataError, CheckpointError) as e:  # anything else is a bug and keeps its traceback
        if torch.distributed.is_initialized():
            # The other ranks wait in a collective that will never come: exit at once, and torchrun stops them.
            print(f"error: [rank {torch.distributed.get_rank()}] {e}", file=sys.stderr, flush=True)
            os._exit(1)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; checkpoints already written are intact", file=sys.stderr)
        return 130
    cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
