"""A training run's life outside the model: its directory, records and when it stops.

What train.py writes besides the checkpoint (checkpoint.py's) lives here: the run record (config, versions, device, git
commit), the output directory's preparation and lock, the metrics log (trimmed on resume so every step is logged
once), peak memory and the run's headline numbers; and the requests to stop early (a signal, the
time limit) with the line that says where to resume. Nothing here trains or changes a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanogpt2.checkpoint import TRAIN_CKPT
from nanogpt2.config import TrainConfig
from nanogpt2.errors import ConfigError, WriteError
from nanogpt2.files import write_atomic
from nanogpt2.model import GPTConfig
from nanogpt2.parallel import is_distributed, print0

# What a run that failed before its first checkpoint leaves, removed when a fresh run takes its directory over.
STALE_RECORDS = ("metrics.jsonl", "run.json", "summary.json")


def git_commit() -> str:
    """The repository's commit, with -dirty when the working tree has changes; "unknown" outside git."""
    try:
        repo = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"


def run_record(
    cfg: TrainConfig, model: GPTConfig, device: torch.device, dtype: torch.dtype, world_size: int, n_params: int
) -> dict:
    """What run.json records: the config, the model, versions, device, git commit and start time."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("triton", "tiktoken"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {
        "train_config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
        "model_config": model.to_dict(),
        "n_params": n_params,
        "device": device_name,
        "dtype": str(dtype).split(".")[-1],
        "world_size": world_size,
        "versions": versions,
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_line(record: dict, record_path: Path) -> str:
    """One line that sums a run record up for the log (the whole record is in run.json)."""
    args, model = record["train_config"], record["model_config"]
    shape = f"{model['n_layer']} layers x {model['n_embd']} wide, {record['n_params'] / 1e6:.1f}M parameters"
    return (
        f"{args['preset']} ({shape}) on {args['data']} | {args['max_steps']} steps of {args['batch_size']} x "
        f"{args['seq_len']} tokens, lr {args['lr']:g} | {record['device']}, {record['dtype']}, attn {args['attn']}, "
        f"{record['parallel']} x {record['world_size']} | full record: {record_path}"
    )


def holder_pid(path: Path) -> int | None:
    """The pid holding a flock on `path`, from Linux's /proc/locks (None where that is not known)."""
    try:
        inode = path.stat().st_ino
        with open("/proc/locks") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 25080 fe:00:2301953 0 EOF"
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def lock_out_dir(out_dir: Path) -> int:
    """Hold an exclusive flock on out_dir itself for the life of this process: one writer per run directory.

    Locking the directory, not a file in it, leaves the directory as it was. The kernel drops the lock when the
    process dies, however it dies. Returns the descriptor, which stays open; ConfigError when another process holds it.
    """
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = holder_pid(out_dir)
        holder = f"pid {pid}" if pid else "another process"
        raise ConfigError(
            f"{out_dir} is in use by a running run ({holder}): wait for it, stop it, or choose another --out-dir"
        ) from None
    return fd


def refuse_taken_out_dir(out_dir: Path, resuming: bool, probe_lock: bool) -> None:
    """ConfigError when a fresh run's out_dir holds a checkpoint, or (`probe_lock`: the writer, before it locks) when
    a running run holds the directory. Writes nothing, so train.py asks before it tokenizes a corpus; prepare_out_dir
    asks again, holding the lock."""
    if probe_lock and out_dir.is_dir():
        os.close(lock_out_dir(out_dir))  # a lock taken and dropped at once: refused while another run holds it
    if not resuming and (out_dir / TRAIN_CKPT).exists():
        raise ConfigError(
            f"{out_dir} already holds a checkpoint: continue it with --resume {out_dir}, or choose another --out-dir"
        )


def prepare_out_dir(out_dir: Path, resuming: bool, writer: bool = True) -> int | None:
    """Create out_dir and make this process its one writer; returns the lock's descriptor (None when not `writer`).

    A fresh run refuses a directory that holds a checkpoint, so nothing is overwritten; one without a completed
    checkpoint (a run that failed before its first) is taken over: its records are removed. Temp files of saves
    killed midway are removed too. Only the `writer` (rank 0) locks and cleans: the other ranks check it is writable.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_out_dir(out_dir) if writer else None
        refuse_taken_out_dir(out_dir, resuming, probe_lock=False)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to --out-dir {out_dir}: {e.strerror or e}") from None
    if writer:
        stale = [p for p in out_dir.iterdir() if p.name in STALE_RECORDS or p.match("run-resume-*.json")]
        if stale and not resuming:
            print(f"note: {out_dir} holds the records of a run that left no checkpoint; replacing them", flush=True)
            for path in stale:
                path.unlink()
        for path in out_dir.glob(".*.tmp-*"):  # write_atomic's temp files, left by processes killed mid-write
            if path.is_file():
                path.unlink(missing_ok=True)
    return lock


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line torn by a crash mid-write, which is then dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def append_metrics(metrics, row: dict) -> None:
    """One row appended to the open metrics.jsonl, flushed; WriteError when the disk refuses it."""
    try:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
    except OSError as err:
        raise WriteError(metrics.name, err) from None


def open_metrics(out_dir: Path, step: int):
    """metrics.jsonl for appending, first without the rows of steps after `step` (a resumed run repeats them) and
    torn rows, so every step is logged once."""
    path = out_dir / "metrics.jsonl"
    if path.exists():
        with open(path) as f:
            rows = [line for line in f if line.strip()]
        kept = [line for line in rows if logged_step(line) <= step]
        if len(kept) < len(rows):
            write_atomic(path, "".join(kept))
    return open(path, "a")


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def local_numel(tensors) -> int:
    """Elements this rank holds of `tensors` (a DTensor counts its local shard only)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in tensors)


def log_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int) -> None:
    """One line per rank: the parameters and optimizer state it holds (1/world of them under FSDP), peak GPU memory."""
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    report = {"param_elems": local_numel(model.parameters()), "optim_state_elems": local_numel(states)}
    device = next(model.parameters()).device
    if device.type == "cuda":
        report["peak_mem_gib"] = peak_memory_mib(device) / 1024
    reports = [report]
    if is_distributed():
        reports = [None] * world_size
        dist.all_gather_object(reports, report)
    for rank, r in enumerate(reports):
        peak = f" | peak {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else ""
        print0(f"memory rank {rank}: {r['param_elems']:,} param elems | {r['optim_state_elems']:,} optim elems{peak}")


def run_summary(
    step: int,
    step_times: list[float],
    tokens_per_step: int,
    wall: float,
    loss: float,
    val_loss: float,
    device: torch.device,
) -> dict:
    """The run's headline numbers, for scripts (the variant study): median speed after the first step, peak memory.

    `steps` is the step the run reached, `steps_this_run` those trained since this process started (fewer after a
    resume), as the final log line says.
    """
    steady = step_times[1:] or step_times
    return {
        "steps": step,
        "steps_this_run": len(step_times),
        "tokens_per_s": tokens_per_step / statistics.median(steady),
        "peak_mem_mib": peak_memory_mib(device),
        "wall_s": wall,
        "train_loss": loss,
        "val_loss": val_loss,
    }


class Interrupted(BaseException):
    """A second SIGTERM (as KeyboardInterrupt is a second Ctrl-C): stop at once, without a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Why a run should checkpoint and stop at the end of its current step: the first SIGINT (Ctrl-C) or SIGTERM (what
    `timeout`, SLURM, Kubernetes and a preempted instance send), or --time-limit about to run out. A second signal
    aborts at once, leaving the last checkpoint as it was."""

    SAME_REQUEST_S = 1.0  # a signal repeated this soon is the same request: torchrun forwards the one a group got

    def __init__(self, time_limit_s: float | None):
        self.signum: int | None = None
        self.first_at = 0.0
        self.deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            if time.monotonic() - self.first_at < self.SAME_REQUEST_S:
                return
            raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)
        self.signum, self.first_at = signum, time.monotonic()
        name = signal.Signals(signum).name
        print(f"\n{name}: saving a checkpoint at the end of this step ({name} again to abort)", flush=True)

    def reason(self, step_s: float, save_s: float) -> str | None:
        """Why to stop now: a signal's name, or "--time-limit" when another step and a save would overrun it."""
        if self.signum is not None:
            return signal.Signals(self.signum).name
        if self.deadline is not None and time.monotonic() + step_s + save_s > self.deadline:
            return "--time-limit"
        return None

    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process a signal ended; 0 for the time limit."""
        return 128 + self.signum if self.signum is not None else 0

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def resume_hint(out_dir: Path, saved_step: int | None) -> str:
    """Where an early stop leaves the run: the last good checkpoint's step and the command that continues it."""
    if saved_step is None:
        return "no checkpoint was written yet"
    return f"last good checkpoint: step {saved_step} in {out_dir}; continue with --resume {out_dir}"
