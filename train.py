"""Train a GPT.

    python train.py                                  # CPU: the nano preset on Shakespeare, ~2 minutes on 2 cores
                                                     # CUDA: GPT-2 124M on Shakespeare
    python train.py --preset pico --data synthetic --max-steps 50
    python train.py --data recall --preset micro --seq-len 128   # associative recall (variant_study/recall.py)
    python train.py --resume out                     # continue the run in out/ exactly where it stopped

The script reads top to bottom: parse the config (nanogpt2/config.py), set up the device and process group, the data
(each rank its share of every micro-batch), the model (compiled and parallelised in nanogpt2/parallel.py), the
optimizer and a resumed state (nanogpt2/checkpoint.py), then the loop: grad accumulation, clipping, warmup + cosine
LR, eval, sample, atomic checkpoints, with the run's records in nanogpt2/run.py. --batch-size is the global number of
sequences per optimizer step: split into --grad-accum micro-steps, each micro-batch split across ranks.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from nanogpt2.checkpoint import TRAIN_CKPT, load_checkpoint, restore_checkpoint, save_checkpoint
from nanogpt2.config import TrainConfig, from_flags, parse_flags
from nanogpt2.data import Loader
from nanogpt2.errors import USER_ERRORS, CheckpointError, DivergedError, WriteError
from nanogpt2.model import GPT
from nanogpt2.parallel import (
    DistEnv,
    all_reduce_mean,
    any_rank,
    cleanup,
    clip_grad_norm,
    grad_sync,
    init_distributed,
    is_distributed,
    parallel_mode,
    parallelize,
    peer_failed,
    print0,
    report_to_launcher,
)
from nanogpt2.prepare import check_data, open_corpus
from nanogpt2.run import (
    Interrupted,
    StopRequest,
    append_metrics,
    log_memory,
    open_metrics,
    peak_flops,
    prepare_out_dir,
    refuse_taken_out_dir,
    resume_hint,
    run_line,
    run_record,
    run_summary,
    write_json,
)
from nanogpt2.runtime import compute_dtype, keep_freed_memory, launcher_gone, synchronize
from nanogpt2.sample import generate
from nanogpt2.tokenizer import EOT, decode

SAMPLE_TOKENS = 64


def build_loaders(cfg: TrainConfig, vocab_size: int, env: DistEnv) -> tuple[Loader, Loader, str]:
    """Train (in --data-order) and val (in order) loaders for this rank, each reading its share of every micro-batch,
    and what the user should know about the data (or "")."""
    corpus = open_corpus(cfg.data, vocab_size=vocab_size, seed=cfg.seed)
    rows = cfg.batch_size // cfg.grad_accum  # global rows per micro-batch
    train, val = corpus.loaders(
        rows=rows, seq_len=cfg.seq_len, rank=env.rank, world_size=env.world_size, vocab_size=vocab_size,
        order=cfg.data_order, seed=cfg.seed, batch=cfg.batch_size,
    )  # fmt: skip
    return train, val, corpus.note


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (decay on 2-D weights, fused on CPU and CUDA), or plain SGD, whose steps are linear in the gradients."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    return model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.type)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min-lr at decay-steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Loader, n_batches: int, autocast) -> float:
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
    """A short top-k sample from <|endoftext|>, drawn from its own generator so training's RNG is untouched.

    Compiled blocks (--compile) run eagerly here: each decoding step's new shapes would recompile them."""
    model.eval()
    idx = torch.full((1, 1), EOT, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        out = generate(model, idx, SAMPLE_TOKENS, temperature=0.8, top_k=50, generator=gen)
    model.train()
    return decode(out[0, 1:].tolist())


# ---------------------------------------------------------------------------------------------------------------------
# Training


def finite(loss: float, norm: float, scaler: torch.amp.GradScaler) -> bool:
    """Whether a step's loss and grad norm are finite (with fp16 the GradScaler handles inf gradients itself)."""
    return math.isfinite(loss) and (scaler.is_enabled() or math.isfinite(norm))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: Loader,
    lr: float,
    cfg: TrainConfig,
    autocast,
) -> tuple[float, float]:
    """One optimizer step over cfg.grad_accum micro-batches: returns (mean loss, grad norm before clipping).

    A non-finite loss or norm (bf16/fp32) leaves the weights untouched; the caller stops the run. With fp16 the
    GradScaler skips steps with inf gradients itself and lowers its scale.
    """
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with grad_sync(model, micro == cfg.grad_accum - 1):  # ranks exchange gradients on the last micro-step only
            with autocast():
                _, loss = model(x, y)
            loss = loss / cfg.grad_accum  # the mean over the whole step's batch
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = clip_grad_norm(model, cfg.grad_clip)
    loss_value = all_reduce_mean(loss_sum).item()  # the whole global batch's mean loss
    if finite(loss_value, norm, scaler):
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm


def train(argv: list[str] | None = None) -> int:
    # Config: the flags given, over a resumed run's saved config; every default and check is in nanogpt2/config.py.
    given = parse_flags(argv, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    ckpt = load_checkpoint(given["resume"]) if given.get("resume") is not None else None
    cfg = from_flags(given, ckpt["train_config"] if ckpt else None)
    env = init_distributed(cfg.torch_device(), cfg.timeout())
    device = env.device
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on the big per-step tensors
    cfg.fill_defaults(device, env.world_size)
    model_cfg = cfg.model_config(ckpt["model_config"] if ckpt else None)
    cfg.check(model_cfg, device, env.world_size, env.distributed)

    # Set up: data first (its errors before anything is written; a taken --out-dir before any tokenizing), then the
    # output directory, model and optimizer.
    check_data(cfg.data)  # a --data that names nothing is the error to report, before a taken --out-dir
    refuse_taken_out_dir(cfg.out_dir, resuming=ckpt is not None, probe_lock=env.is_main)
    train_loader, val_loader, note = build_loaders(cfg, model_cfg.vocab_size, env)
    prepare_out_dir(cfg.out_dir, resuming=ckpt is not None, writer=env.is_main)  # rank 0 locks it till it exits
    dtype = compute_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # tf32 for what autocast leaves in fp32
    torch.manual_seed(cfg.seed)
    raw_model = GPT(model_cfg, attn_impl=cfg.attn).to(device)  # the GPT itself (sharded in place by FSDP)
    mode = parallel_mode(cfg.fsdp, env)
    model = parallelize(raw_model, mode, env, dtype, cfg.activation_checkpointing, cfg.compile)
    optimizer = build_optimizer(raw_model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = restore_checkpoint(cfg.out_dir, ckpt, raw_model, optimizer, scaler, train_loader) if ckpt else 0

    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    record = run_record(cfg, model_cfg, device, dtype, env.world_size, raw_model.num_params()) | {"parallel": mode}
    record_path = cfg.out_dir / (f"run-resume-{step}.json" if ckpt else "run.json")
    if env.is_main:
        write_json(record_path, record)
    print0((f"resuming at step {step}: " if ckpt else "run: ") + run_line(record, record_path))
    for line in ([note] if note else []) + cfg.notes(model_cfg):
        print0(f"note: {line}")
    eval_batches = min(cfg.eval_batches, val_loader.batches_per_epoch or cfg.eval_batches)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops_per_step = raw_model.flops_per_token(cfg.seq_len) * tokens_per_step
    peak = peak_flops(device)
    samples = cfg.can_decode_samples(model_cfg)
    metrics = open_metrics(cfg.out_dir, step) if env.is_main else None

    saved_step, save_s = (step if ckpt else None), 0.0

    def save(step: int) -> None:
        nonlocal saved_step, save_s
        t0 = time.perf_counter()
        save_checkpoint(cfg.out_dir, step, raw_model, optimizer, scaler, train_loader, model_cfg, cfg.to_dict(),
                        sharded=mode == "fsdp", is_main=env.is_main)  # fmt: skip
        saved_step, save_s = step, time.perf_counter() - t0

    # The loop: one optimizer step, its log line and metrics row, then eval, checkpoint and sample when due.
    stop = StopRequest(cfg.time_limit)
    first_loss = last_loss = val_loss = None
    step_times: list[float] = []
    t_start = time.perf_counter()
    try:
        while step < cfg.max_steps:
            if launcher_gone(env.launcher):  # torchrun was killed (a fallback where PR_SET_PDEATHSIG is not available)
                print(f"error: [rank {env.rank}] stopped: the torchrun launcher is gone", file=sys.stderr, flush=True)
                os._exit(1)
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            loss_value, norm = train_step(model, optimizer, scaler, train_loader, lr, cfg, autocast)
            synchronize(device)  # the optimizer's queued kernels count in this step's time, not the next one's
            dt = time.perf_counter() - t0
            if not finite(loss_value, norm, scaler):
                raise DivergedError(
                    f"loss {loss_value} / grad norm {norm} at step {step + 1} is not finite: stopped (a lower --lr in "
                    f"a new run may help); {resume_hint(cfg.out_dir, saved_step)}"
                )
            step += 1
            first_loss = loss_value if first_loss is None else first_loss
            last_loss = loss_value
            row = {"step": step, "loss": loss_value, "lr": lr, "norm": norm, "ms": dt * 1e3,
                   "tok_s": tokens_per_step / dt, "tokens": step * tokens_per_step}  # fmt: skip
            line = (
                f"step {step}/{cfg.max_steps} | loss {loss_value:.3f} | lr {lr:.1e} | norm {norm:.2f} | "
                f"{dt * 1e3:.0f} ms | {tokens_per_step / dt:,.0f} tok/s"
            )
            if peak:
                row["mfu"] = flops_per_step / dt / (peak * env.world_size)
                line += f" | mfu {100 * row['mfu']:.1f}%"
            print0(line)
            if not step_times:
                log_memory(raw_model, optimizer, env.world_size)
            step_times.append(dt)
            last_step = step == cfg.max_steps
            if (cfg.eval_every and step % cfg.eval_every == 0) or last_step:
                val_loss = row["val_loss"] = evaluate(model, val_loader, eval_batches, autocast)
                print0(f"step {step}/{cfg.max_steps} | val loss {val_loss:.3f}")
            if metrics:
                append_metrics(metrics, row)
            why = stop.reason(max(step_times[-10:]), save_s)
            stopping = any_rank(why is not None, device)  # the same step on every rank, whichever saw the reason
            if (cfg.save_every and step % cfg.save_every == 0) or last_step or stopping:
                save(step)
            if cfg.sample_every and step % cfg.sample_every == 0 and not last_step and samples:
                print0(f"sample:\n{sample_text(raw_model, cfg.seed, device)}")  # every rank: FSDP's forward
            if stopping and not last_step:
                print0(f"stopped by {why or 'another rank'} after step {step}: {resume_hint(cfg.out_dir, saved_step)}")
                return stop.exit_status()
    except (CheckpointError, WriteError) as e:  # a save or a record failed: the last good checkpoint is intact
        e.args = (f"{e}; {resume_hint(cfg.out_dir, saved_step)}",)
        raise
    finally:
        stop.restore()
        if metrics:
            metrics.close()

    # Finish: a sample, the summary, and one line that says what was done.
    wall = time.perf_counter() - t_start
    if samples:
        print0(f"sample:\n{sample_text(raw_model, cfg.seed, device)}")
    if env.is_main and step_times:
        summary = run_summary(step, step_times, tokens_per_step, wall, last_loss, val_loss, device)
        write_json(cfg.out_dir / "summary.json", summary)
    if first_loss is not None:
        trained = "" if len(step_times) == step else f" ({len(step_times)} in this run)"
        print0(
            f"done: {step} steps{trained} in {wall:.0f} s | train loss {first_loss:.3f} -> {last_loss:.3f} | "
            f"val loss {val_loss:.3f} | checkpoint {cfg.out_dir / TRAIN_CKPT}"
        )
    else:
        print0(f"done: already at step {step} of --max-steps {cfg.max_steps}; nothing to train")
    return 0


@record  # under torchrun, a bug's traceback becomes the job's reported root cause
def main(argv: list[str] | None = None) -> int:
    """Run train(); a problem with the input ends in one line on stderr and exit status 1, under torchrun on the rank
    that found it (also the root cause torchrun reports) and, for its peers, whose collectives then fail, a line that
    says so."""
    try:
        status = train(argv)
    except USER_ERRORS as e:  # anything else is a bug and keeps its traceback
        if is_distributed():
            # The other ranks wait in a collective that will never come: exit at once, and torchrun stops them.
            line = f"error: [rank {torch.distributed.get_rank()}] {e}"
            print(line, file=sys.stderr, flush=True)
            report_to_launcher(line)
            os._exit(1)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # torch.distributed.DistError included
        if not peer_failed(e):
            raise
        # A collective failed: a peer stopped (its own error line says why) or stopped answering for --dist-timeout.
        line = f"error: [rank {torch.distributed.get_rank()}] stopped: another rank failed or timed out (see above)"
        print(line, file=sys.stderr, flush=True)
        os._exit(1)
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        print(f"error: {name} again: stopped at once; checkpoints already written are intact", file=sys.stderr)
        return 128 + signum
    cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
