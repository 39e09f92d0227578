"""A training step queues its work without waiting for the device: no host sync in forward, loss, backward, clipping
or the optimizer step, in every parallel mode; clipping is a handful of ops whatever the number of parameters.

The step runs under a TorchDispatchMode that fails on the ops that make the host wait for a device's values
(`.item()`'s `_local_scalar_dense`, `nonzero`, ...) and on device-to-host copies. On CPU nothing really waits, but the
same ops would on a GPU, so the check holds there (it runs unchanged on CUDA). DDP and FSDP run in this process on a
one-rank gloo group: their hooks, collectives and DTensor gradients are exercised without starting processes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from helpers import DEVICE
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import train as train_script
from nanogpt2.config import TrainConfig
from nanogpt2.model import GPT, GPTConfig
from nanogpt2.parallel import DistEnv, clip_grad_norm, parallelize

aten = torch.ops.aten
# Ops whose result the host must read before it can go on (their output's size or value depends on the data).
SYNCING = {
    aten._local_scalar_dense,  # .item(), float(t), bool(t), int(t)
    aten.nonzero,
    aten.is_nonzero,
    aten.equal,
    aten.masked_select,
    aten._unique2,
    aten.unique_consecutive,
    aten.repeat_interleave,
}


class NoHostSync(TorchDispatchMode):
    """Fails on a syncing op or a device-to-host copy; counts the ops it sees. The Python body of this project's
    custom ops (the fused loss) runs under the mode too, so what happens inside them is checked as well."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        if func.overloadpacket in SYNCING:
            raise AssertionError(f"{func} waits for the device inside a training step")
        if func.namespace == "nanogpt2" and func._schema.name in OPDEFS:
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if func.overloadpacket in (aten._to_copy, aten.copy_):
            src, dst = args[1] if func.overloadpacket is aten.copy_ else args[0], out
            if src.device.type != "cpu" and dst.device.type == "cpu":
                raise AssertionError(f"{func} copies from {src.device} to the host inside a training step")
        return out


class Batches:
    """A loader of fixed random batches, made before the step (the real loader's host-side reading is not the
    device's work)."""

    def __init__(self, vocab_size: int, rows: int, seq_len: int):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randint(0, vocab_size, (2, rows, seq_len), generator=g)

    def next_batch(self):
        return self.x, self.y


@contextlib.contextmanager
def one_rank_group():
    """A one-rank gloo process group in this process, left when done."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DistEnv(world_size=1, device=torch.device(DEVICE), distributed=True)
    finally:
        dist.destroy_process_group()


def tiny_run(mode: str, env: DistEnv, **flags):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, vocab_pad_multiple=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    raw = GPT(config).to(env.device)
    model = parallelize(raw, mode, env)
    cfg = TrainConfig(**{"lr": 1e-3, "grad_accum": 2, "batch_size": 4, "seq_len": 16, **flags})
    optimizer = train_script.build_optimizer(raw, cfg, env.device)
    return model, optimizer, cfg


@pytest.mark.parametrize("mode", ["plain", "ddp", "fsdp"])
def test_training_step_never_waits_for_the_device(mode):
    with one_rank_group() if mode != "plain" else contextlib.nullcontext(DistEnv(device=torch.device(DEVICE))) as env:
        model, optimizer, cfg = tiny_run(mode, env)
        scaler = torch.amp.GradScaler(DEVICE, enabled=False)
        autocast = contextlib.nullcontext
        loader = Batches(97, 2, 16)
        train_script.set_lr(optimizer, 1e-3)
        train_script.train_step(model, optimizer, scaler, loader, cfg, autocast)  # optimizer state made eagerly
        with NoHostSync() as mode_ops:
            loss, norm = train_script.train_step(model, optimizer, scaler, loader, cfg, autocast)
        assert loss.isfinite() and norm > 0  # read at the log point, outside the step
        assert any("linear_cross_entropy" in op for op in mode_ops.ops) and any("adamw" in op for op in mode_ops.ops)


def test_the_check_catches_a_sync():
    """The mode fails on .item() of a device value and on the old loss's data-dependent nonzero."""
    t = torch.ones(3, device=DEVICE)
    for sync in (lambda: t.sum().item(), lambda: (t > 0).nonzero(), lambda: bool(t.sum() > 0)):
        with pytest.raises(AssertionError, match="waits for the device"), NoHostSync():
            sync()


def test_clipping_is_a_handful_of_ops():
    """The global norm and the clip factor stay on the device: ~10 ops for 26 parameters, not several per parameter."""
    model, _, _ = tiny_run("plain", DistEnv(device=torch.device(DEVICE)))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type=2.0).double()
    before = [p.grad.clone() for p in model.parameters()]
    with NoHostSync() as ops:
        norm = clip_grad_norm(model, max_norm=1.0)
    assert len(list(model.parameters())) >= 20 and len(ops.ops) <= 10, ops.ops
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    scale = 1.0 / (expected + 1e-6)
    for p, g in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, g * scale.float(), rtol=1e-6, atol=0)


def test_graph_ready_step_equals_the_plain_step():
    """--cuda-graphs' step without the graphs (what the CPU can run): batches copied into static buffers, a capturable
    AdamW whose lr is a float32 tensor filled each step, gives bit for bit the weights of the plain step at the same
    learning rates (rounded to float32, as CUDA's fused AdamW reads a tensor lr)."""
    env = DistEnv(device=torch.device(DEVICE))
    lrs = [torch.tensor(lr, dtype=torch.float32).item() for lr in (1e-3, 3e-3, 2e-3)]
    weights = []
    for graphs in (False, True):
        model, optimizer, cfg = tiny_run("plain", env, cuda_graphs=graphs)
        static = train_script.StaticInputs(2, 16, env.device) if graphs else None
        loader = Batches(97, 2, 16)
        for lr in lrs:
            train_script.set_lr(optimizer, lr)
            train_script.train_step(model, optimizer, torch.amp.GradScaler(DEVICE, enabled=False), loader, cfg,
                                    contextlib.nullcontext, static)  # fmt: skip
        assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor) == graphs
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
