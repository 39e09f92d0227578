"""How the model is spread over processes: plain, DDP or FSDP2, chosen from torchrun's environment.

- plain: no RANK/WORLD_SIZE in the environment, one process.
- ddp:   under torchrun; every rank holds the whole model, gradients are all-reduced.
- fsdp:  under torchrun with --fsdp; `fully_shard` (FSDP2) on every transformer block, then on the root (which holds
         the tied wte/lm_head), so parameters, gradients and optimizer state are sharded across ranks.

NCCL on CUDA (one device per LOCAL_RANK), gloo on CPU, so every mode also runs on a CPU-only machine.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


@dataclass
class DistEnv:
    """Where this process stands: its rank among world_size, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE), or stay a single process.

    `device` None picks CUDA when present (cuda:LOCAL_RANK under torchrun), else CPU.
    """
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(device=torch.device(device or ("cuda" if want_cuda else "cpu")))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if want_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, local_rank, world_size, dev)


def parallelize(
    model: nn.Module,
    mode: str,
    env: DistEnv,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Prepare `model` (already on env.device) for `mode` ("plain", "ddp", "fsdp").

    param_dtype (FSDP only) is the dtype parameters are all-gathered and computed in; gradients are reduced in fp32.
    """
    if activation_checkpointing:
        for block in model.transformer.h:
            # Recompute each block's activations in the backward; instance-level, so parameter names stay the same.
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if mode == "plain":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # the root: embeddings (tied with lm_head), ln_f
        return model
    raise ValueError(f"unknown parallel mode {mode!r}: expected plain, ddp or fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


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


def local_numel(tensors) -> int:
    """Elements this rank holds of `tensors` (a DTensor counts its local shard only)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in tensors)


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Elements of parameters and optimizer state held by this rank, and the device's peak memory."""
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    report = {"param_elems": local_numel(model.parameters()), "optim_state_elems": local_numel(states)}
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        report["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return report


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (a failure one rank saw stops all of them)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
