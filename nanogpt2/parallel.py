"""How the model is spread over processes: plain, DDP or FSDP2, from torchrun's environment.

- plain: no RANK/WORLD_SIZE in the environment, one process.
- ddp:   under torchrun; every rank holds the whole model, gradients are all-reduced.
- fsdp:  under torchrun with --fsdp; `fully_shard` (FSDP2) on every transformer block, then on the root (which holds
         the tied wte/lm_head), so parameters, gradients and optimizer state are sharded across ranks.

NCCL on CUDA (one device per LOCAL_RANK), gloo on CPU, so every mode also runs on a CPU-only machine. Owns joining
the process group, the order of activation checkpointing / compilation / sharding, gradient sync and clipping in
every mode, and the small collectives train.py needs (print0, barrier, mean, any). The process's device, dtype and
lifetime are runtime.py's; what the model is, model.py's; what a checkpoint holds, checkpoint.py's.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from nanogpt2.runtime import die_with_parent

# How gloo and NCCL word a collective whose peer exited or stopped answering (raised as RuntimeError or DistError).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "Timed out waiting")


def is_distributed() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


@dataclass
class DistEnv:
    """Where this process stands: its rank among world_size, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    launcher: int | None = None  # the pid of torchrun's launcher, this process's parent
    distributed: bool = False  # joined a process group (under torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE), or stay a single process.

    On CUDA under torchrun each rank takes cuda:LOCAL_RANK. A collective that waits longer than `timeout_s` (a rank
    stopped or stuck) fails. A rank dies with its launcher (`die_with_parent`).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    launcher = die_with_parent()  # before joining, which waits for every rank
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, local_rank, world_size, device, launcher, distributed=True)


def parallel_mode(fsdp: bool, env: DistEnv) -> str:
    """plain (one process), ddp (under torchrun) or fsdp (under torchrun with --fsdp)."""
    return "fsdp" if fsdp else "ddp" if env.distributed else "plain"


def parallelize(
    model: nn.Module,
    mode: str,
    env: DistEnv,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
) -> nn.Module:
    """Prepare `model` (already on env.device) for `mode` ("plain", "ddp", "fsdp"), in torchtitan's order:
    activation checkpointing of each block, then compiling, then wrapping (DDP) or sharding (FSDP).

    Compiling (`compile_mode`: torch.compile's mode, e.g. "reduce-overhead" for CUDA graphs) takes the whole model as
    one graph (forward, fused loss and backward: cross-block fusion) for plain and DDP, as nanoGPT does: the returned
    module is compiled, `model` itself stays eager (sampling, checkpoints). FSDP compiles each block in place
    (`Module.compile`) before sharding it, as torchtitan does, since its per-block all-gathers sit between blocks.
    Parameter names stay the same in every mode. Under FSDP with a low-precision `dtype`, parameters are all-gathered
    and computed in it, gradients reduced in fp32. FSDP shards `model` in place, so build the optimizer after this;
    DDP returns a wrapper around `model`.
    """
    for block in model.transformer.h:
        if activation_checkpointing:  # recompute each block's activations in the backward
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if compile and mode == "fsdp":
            block.compile(mode=compile_mode)
    if compile and mode != "fsdp":
        # Compiled inside DDP's wrapper, as nanoGPT does, so DDP's hooks and no_sync() work as in eager mode.
        model = torch.compile(model, mode=compile_mode)
    if mode == "plain":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        param_dtype = dtype if dtype != torch.float32 else None
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # the root: embeddings (tied with lm_head), ln_f
        return model
    raise ValueError(f"unknown parallel mode {mode!r}: expected plain, ddp or fsdp")


def grad_sync(model: nn.Module, enabled: bool):
    """Context for one micro-step's backward: gradients are synchronised across ranks only when `enabled`.

    With gradient accumulation only the last micro-step syncs, so the inner ones cost no communication.
    """
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def _norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The L2 norm of every element of `tensors` together, in float64, on `device`: three kernels
    (`_foreach_norm` launches one per dtype and device group), whatever the number of tensors."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)))


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `grads` as a float64 scalar on their device (no host sync), summed in float64, so it is the
    same number however the gradients are sharded.

    FSDP's gradients are DTensors sharded over one mesh: each rank sums the squares of its own shards and the sums are
    all-reduced over that mesh. Plain tensors (one process, DDP's already all-reduced gradients) are whole on every
    rank. In fp32 the norm's rounding error depends on the sharding, enough to move clipped FSDP runs 5e-5 away from
    one process in 10 steps.
    """
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    sharded = [g for g in grads if hasattr(g, "to_local")]
    norm = _norm([g for g in grads if not hasattr(g, "to_local")], grads[0].device)
    if sharded:
        shards = _norm([g.to_local() for g in sharded], grads[0].device).square()
        if is_distributed():
            dist.all_reduce(shards, group=sharded[0].device_mesh.get_group())
        norm = (norm.square() + shards).sqrt()
    return norm


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to max_norm (0: no clipping) in any mode; returns the norm before clipping, a
    float64 scalar on the device: nothing waits for the device.

    As torch.nn.utils.clip_grad_norm_(foreach=True) does, gradients are scaled by min(1, max_norm / (norm + 1e-6)), a
    factor that stays on the device, with the norm from `grad_norm`, which every mode and world size computes alike.
    A non-finite norm makes the gradients non-finite: train.py stops the run before saving them (fp16's GradScaler
    skips such a step itself).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = grad_norm(grads)
    if max_norm and grads:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        torch._foreach_mul_(local, scale.to(local[0].dtype))
    return norm


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself when not distributed)."""
    if is_distributed():
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (a failure one rank saw stops all of them)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def peer_failed(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another rank stopped (exited, or did not answer within the
    process group's timeout), rather than a problem of this rank's own. Gloo reports a peer's exit as a plain
    RuntimeError, hence the messages."""
    return is_distributed() and (isinstance(err, dist.DistError) or any(m in str(err) for m in PEER_GONE))


def report_to_launcher(line: str) -> None:
    """Make `line` the root cause torchrun reports for this rank: written, as torch.distributed.elastic's error
    reporting writes an exception, to the error file torchrun gives each rank ($TORCHELASTIC_ERROR_FILE), with the line
    in place of a traceback (a known error is one line, not a bug to debug). Nothing outside torchrun."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps(record))


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (every process when not distributed), flushed."""
    if not is_distributed() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    """Wait for every rank (nothing to wait for when not distributed)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if is_distributed():
        dist.destroy_process_group()
