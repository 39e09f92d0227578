"""The whole model compiles as one graph: `torch.compile(fullgraph=True)` of forward, fused loss and backward, with no
graph break, for every preset's architecture at a tiny size, with either attention implementation; the compiled
loss and gradients equal eager mode's.

aot_eager traces forward and backward as Inductor would (Dynamo, then AOTAutograd) but runs the traced graphs
without generating code, so a graph break or an untraceable op fails here in seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE

from nanogpt2.model import GPT, PRESETS, GPTConfig


def architectures() -> dict[str, list[str]]:
    """One preset per architecture (positions, grouped K/V heads, window), named after the first with it; sizes do not
    change what is traced, so the others of the group are the same graph at another width."""
    groups: dict[tuple, list[str]] = {}
    for name in PRESETS:
        cfg = GPTConfig.from_preset(name)
        groups.setdefault((cfg.pos_emb, cfg.n_kv_head < cfg.n_head, cfg.window is not None), []).append(name)
    return {names[0]: names for names in groups.values()}


def tiny(name: str) -> GPTConfig:
    """The preset's architecture at 1 layer x 64 wide, 4 heads (2 K/V heads for GQA), window 8 for windowed ones."""
    cfg = GPTConfig.from_preset(name)
    return GPTConfig.from_preset(
        name, n_layer=1, n_head=4, n_embd=64, block_size=32, vocab_size=97, vocab_pad_multiple=64,
        n_kv_head=2 if cfg.n_kv_head < cfg.n_head else None, window=8 if cfg.window else None,
    )  # fmt: skip


def loss_and_grads(forward, model: GPT, idx: torch.Tensor, targets: torch.Tensor):
    """The loss of `forward` (the model or its compiled form) and the gradients it leaves in the model's parameters."""
    model.zero_grad(set_to_none=True)
    _, loss = forward(idx, targets)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["torch", "triton"])
@pytest.mark.parametrize("preset", list(architectures()), ids=lambda name: "/".join(architectures()[name]))
def test_whole_model_is_one_graph_forward_loss_and_backward(preset, attn):
    torch.manual_seed(0)
    model = GPT(tiny(preset), attn_impl=attn).to(DEVICE)
    idx = torch.randint(0, 97, (2, 17), device=DEVICE)  # T=17: not a multiple of any kernel block
    targets = torch.randint(0, 97, (2, 17), device=DEVICE)
    targets[0, 3] = -1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fails on any graph break
    loss, grads = loss_and_grads(compiled, model, idx, targets)
    ref_loss, ref_grads = loss_and_grads(model, model, idx, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
