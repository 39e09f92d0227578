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

from nanogpt2 import hellaswag
from nanogpt2.checkpoint import TRAIN_CKPT, load_checkpoint, restore_checkpoint, save_checkpoint
from nanogpt2.config import TrainConfig, from_flags, parse_flags
from nanogpt2.data import Loader
from nanogpt2.errors import USER_ERRORS, CheckpointError, ConfigError, DivergedError, WriteError
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
from nanogpt2.prepare import check_data, data_root, open_corpus
from nanogpt2.run import (
    Interrupted,
    StopRequest,
    append_metrics,
    log_memory,
    open_metrics,
    prepare_out_dir,
    refuse_taken_out_dir,
    resume_hint,
    run_line,
    run_record,
    run_summary,
    write_json,
)
from nanogpt2.runtime import compute_dtype, keep_freed_memory, launcher_gone, peak_flops, synchronize
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
    """AdamW (decay on 2-D weights, fused on CPU and CUDA), or plain SGD, whose steps are linear in the gradients.

    With --cuda-graphs the AdamW is capturable, its lr a float32 tensor on the device (what CUDA's fused AdamW reads):
    a graph may replay its step, and a new lr is written into the tensor rather than baked into the graph."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.type)
    if cfg.cuda_graphs:
        for group in optimizer.param_groups:
            group.update(capturable=True, lr=torch.tensor(cfg.lr, dtype=torch.float32, device=device))
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every parameter group; a tensor lr (--cuda-graphs) is filled in place on the device."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


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


def hellaswag_scores(model: GPT, examples: list, env: DistEnv, autocast) -> dict:
    """HellaSwag's acc and acc_norm, each rank scoring its share of the examples (model: the GPT itself, unwrapped)."""
    _, counts = hellaswag.evaluate(model, examples, model.config.block_size, env.device, env.rank, env.world_size,
                                   autocast)  # fmt: skip
    n, correct, correct_norm = (all_reduce_mean(counts) * env.world_size).tolist()
    return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n, "hellaswag_examples": int(n)}


def wandb_run(project: str, record: dict):
    """A Weights & Biases run that gets metrics.jsonl's rows (WANDB_MODE=offline keeps them on this machine)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=project, config=record)


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


class StaticInputs:
    """Fixed device buffers that every micro-batch is copied into, so CUDA graphs (--cuda-graphs) replay from the
    addresses they were captured with instead of copying each new batch into their own."""

    def __init__(self, rows: int, seq_len: int, device: torch.device):
        self.x = torch.zeros(rows, seq_len, dtype=torch.long, device=device)  # (B, T)
        self.y = torch.zeros(rows, seq_len, dtype=torch.long, device=device)  # (B, T)
        torch._dynamo.mark_static_address(self.x)
        torch._dynamo.mark_static_address(self.y)

    def fill(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.copy_(x, non_blocking=True), self.y.copy_(y, non_blocking=True)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: Loader,
    cfg: TrainConfig,
    autocast,
    static: StaticInputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over cfg.grad_accum micro-batches: returns (mean loss, grad norm before clipping), both
    still on the device: nothing here waits for it, so the host queues the next step while the device runs this one.

    A non-finite loss or norm (bf16/fp32) is found when the losses are read (`Interval.read`), which stops the run
    before anything is saved; with fp16 the GradScaler skips steps with inf gradients itself and lowers its scale.
    """
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if static is not None:
            x, y = static.fill(x, y)
        with grad_sync(model, micro == cfg.grad_accum - 1):  # ranks exchange gradients on the last micro-step only
            with autocast():
                _, loss = model(x, y)
            loss = loss / cfg.grad_accum  # the mean over the whole step's batch
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = clip_grad_norm(model, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return all_reduce_mean(loss_sum), norm  # the whole global batch's mean loss


class Interval:
    """The steps since the last log line: their losses and norms stay on the device until `read`, which waits for the
    device once, times the interval and copies them to the host in one transfer."""

    def __init__(self):
        self.steps: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, norm)
        self.t0 = time.perf_counter()

    def add(self, step: int, lr: float, loss: torch.Tensor, norm: torch.Tensor) -> None:
        self.steps.append((step, lr, loss, norm))

    def read(self, device: torch.device) -> tuple[list[tuple[int, float, float, float]], float]:
        """((step, lr, loss, norm) of each step, seconds per step) of the interval, which then starts afresh."""
        synchronize(device)  # the interval's queued kernels count in its time, not the next one's
        dt = (time.perf_counter() - self.t0) / len(self.steps)
        values = torch.stack([v.double().to(device) for _, _, loss, norm in self.steps for v in (loss, norm)]).tolist()
        steps = [(step, lr, values[2 * i], values[2 * i + 1]) for i, (step, lr, _, _) in enumerate(self.steps)]
        self.steps = []
        return steps, dt

    def restart(self) -> None:
        """Start the clock of the next interval (after an eval, save or sample, which are not training time)."""
        self.t0 = time.perf_counter()


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
    fit = cfg.fit_micro_batch(model_cfg, device, env.world_size) if device.type == "cuda" else None
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
    compile_mode = "reduce-overhead" if cfg.cuda_graphs else None  # torch.compile's CUDA graphs
    model = parallelize(raw_model, mode, env, dtype, cfg.activation_checkpointing, cfg.compile, compile_mode)
    optimizer = build_optimizer(raw_model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = restore_checkpoint(cfg.out_dir, ckpt, raw_model, optimizer, scaler, train_loader) if ckpt else 0

    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    record = run_record(cfg, model_cfg, device, dtype, env.world_size, raw_model.num_params()) | {"parallel": mode}
    record_path = cfg.out_dir / (f"run-resume-{step}.json" if ckpt else "run.json")
    if env.is_main:
        write_json(record_path, record)
    print0((f"resuming at step {step}: " if ckpt else "run: ") + run_line(record, record_path))
    for line in [line for line in (note, fit) if line] + cfg.notes(model_cfg):
        print0(f"note: {line}")
    eval_batches = min(cfg.eval_batches, val_loader.batches_per_epoch or cfg.eval_batches)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops_per_step = raw_model.flops_per_token(cfg.seq_len) * tokens_per_step
    peak = peak_flops(device)
    samples = cfg.can_decode_samples(model_cfg)
    metrics = open_metrics(cfg.out_dir, step) if env.is_main else None
    tracker = wandb_run(cfg.wandb, record) if cfg.wandb and env.is_main else None
    examples = hellaswag.load_examples(hellaswag.val_file(data_root())) if cfg.hellaswag_every else []

    saved_step, save_s = (step if ckpt else None), 0.0

    def save(step: int) -> None:
        nonlocal saved_step, save_s
        t0 = time.perf_counter()
        save_checkpoint(cfg.out_dir, step, raw_model, optimizer, scaler, train_loader, model_cfg, cfg.to_dict(),
                        sharded=mode == "fsdp", is_main=env.is_main)  # fmt: skip
        saved_step, save_s = step, time.perf_counter() - t0

    # The loop: steps queue on the device without waiting for it; at each log point (every --log-every steps, the
    # first step, and wherever an eval, save or sample is due: the same steps on every rank) the interval's losses are
    # read, checked and logged, then eval, checkpoint, sample and stop requests are handled.
    stop = StopRequest(cfg.time_limit)
    first_loss = last_loss = val_loss = None
    step_times: list[float] = []
    rows_per_rank = cfg.batch_size // (cfg.grad_accum * env.world_size)
    static = StaticInputs(rows_per_rank, cfg.seq_len, device) if cfg.cuda_graphs else None
    interval = Interval()
    t_start = time.perf_counter()
    try:
        while step < cfg.max_steps:
            if launcher_gone(env.launcher):  # torchrun was killed (a fallback where PR_SET_PDEATHSIG is not available)
                print(f"error: [rank {env.rank}] stopped: the torchrun launcher is gone", file=sys.stderr, flush=True)
                os._exit(1)
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            interval.add(step + 1, lr, *train_step(model, optimizer, scaler, train_loader, cfg, autocast, static))
            step += 1
            last_step = step == cfg.max_steps
            evaluating = (cfg.eval_every and step % cfg.eval_every == 0) or last_step
            saving = (cfg.save_every and step % cfg.save_every == 0) or last_step
            sampling = cfg.sample_every and step % cfg.sample_every == 0 and not last_step and samples
            scoring = cfg.hellaswag_every and (step % cfg.hellaswag_every == 0 or last_step)
            if step % cfg.log_every and step_times and not (evaluating or saving or sampling or scoring):
                continue
            steps, dt = interval.read(device)
            rows = []
            for s, lr_s, loss_s, norm_s in steps:
                if not finite(loss_s, norm_s, scaler):  # stopped before anything is saved
                    raise DivergedError(
                        f"loss {loss_s} / grad norm {norm_s} at step {s} is not finite: stopped (a lower --lr in "
                        f"a new run may help); {resume_hint(cfg.out_dir, saved_step)}"
                    )
                rows.append({"step": s, "loss": loss_s, "lr": lr_s, "norm": norm_s, "ms": dt * 1e3,
                             "tok_s": tokens_per_step / dt, "tokens": s * tokens_per_step})  # fmt: skip
                if peak:
                    rows[-1]["mfu"] = flops_per_step / dt / (peak * env.world_size)
            row = rows[-1]
            first_loss = rows[0]["loss"] if first_loss is None else first_loss
            last_loss = row["loss"]
            line = (
                f"step {step}/{cfg.max_steps} | loss {last_loss:.3f} | lr {lr:.1e} | norm {row['norm']:.2f} | "
                f"{dt * 1e3:.0f} ms | {tokens_per_step / dt:,.0f} tok/s"
            )
            print0(line + (f" | mfu {100 * row['mfu']:.1f}%" if peak else ""))
            if not step_times:
                if cfg.compile:
                    print0(f"compile: the first step took {dt:.1f} s, compiling included")
                log_memory(raw_model, optimizer, env.world_size)
            step_times += [dt] * len(rows)
            if evaluating:
                val_loss = row["val_loss"] = evaluate(model, val_loader, eval_batches, autocast)
                print0(f"step {step}/{cfg.max_steps} | val loss {val_loss:.3f}")
            if scoring:
                row.update(hellaswag_scores(raw_model, examples, env, autocast))
                print0(f"step {step}/{cfg.max_steps} | hellaswag acc_norm {row['hellaswag_acc_norm']:.4f} (acc "
                       f"{row['hellaswag_acc']:.4f}; GPT-2 124M: acc_norm {hellaswag.GPT2_ACC_NORM})")  # fmt: skip
            if metrics:
                for r in rows:
                    append_metrics(metrics, r)
            if tracker:
                for r in rows:
                    tracker.log(r, step=r["step"])
            # Time for the steps up to the next log point and a save?
            why = stop.reason(max(step_times[-10:]) * cfg.log_every, save_s)
            stopping = any_rank(why is not None, device)  # the same step on every rank, whichever saw the reason
            if saving or stopping:
                save(step)
            if sampling:
                print0(f"sample:\n{sample_text(raw_model, cfg.seed, device)}")  # every rank: FSDP's forward
            if stopping and not last_step:
                print0(f"stopped by {why or 'another rank'} after step {step}: {resume_hint(cfg.out_dir, saved_step)}")
                return stop.exit_status()
            interval.restart()  # eval, save and sample are not training time
    except (CheckpointError, WriteError) as e:  # a save or a record failed: the last good checkpoint is intact
        e.args = (f"{e}; {resume_hint(cfg.out_dir, saved_step)}",)
        raise
    finally:
        stop.restore()
        if metrics:
            metrics.close()
        if tracker:
            tracker.finish()

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
