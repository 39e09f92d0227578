"""A freshly initialised model of every preset predicts real text about as well as the uniform distribution.

Each preset is measured as it is built, at full depth: above width 256 it starts with GPT-2's init, whose random
blocks shrink the tied embedding's logit for the input token itself; at widths up to 256 every block starts as the
identity (test_small_widths_start_with_identity_blocks). gpt2-large and gpt2-xl take the same init as gpt2 and
gpt2-medium at more width and depth, and 0.8B and 1.6B weights to draw, 40 s of the suite: `python -m
benches.init_width --initial-loss` measures them the same way (BENCHMARKS.md, "The init at GPT-2's width").
"""

import math

import pytest
import torch

from benches.init_width import initial_loss, shakespeare_windows
from nanogpt2.model import GPT, PRESETS, SMALL_INIT_MAX_WIDTH, GPTConfig, init_stds


@pytest.fixture(scope="module")
def shakespeare_val() -> torch.Tensor:
    return shakespeare_windows()


SUITE_PRESETS = [p for p in PRESETS if p not in ("gpt2-large", "gpt2-xl")]
PRESET_PARAMS = [
    pytest.param(p, marks=pytest.mark.slow) if PRESETS[p].get("n_embd", 768) > 768 else p for p in SUITE_PRESETS
]


@pytest.mark.parametrize("preset", PRESET_PARAMS)
def test_initial_loss_is_near_uniform(preset, shakespeare_val):
    """Within 0.5 of ln(vocab): the init before issue 28 started gpt2 at 13.2 and gpt2-rope at 17.2."""
    loss = initial_loss(preset, shakespeare_val)
    assert abs(loss - math.log(GPTConfig.from_preset(preset).vocab_size)) <= 0.5, f"{preset}: initial loss {loss:.3f}"


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_small_widths_start_with_identity_blocks(pos_emb):
    """At widths up to SMALL_INIT_MAX_WIDTH the residual projections start at zero: the model with its blocks after
    the first removed gives the same logits."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, block_size=32, n_layer=3, n_head=4, n_embd=SMALL_INIT_MAX_WIDTH, pos_emb=pos_emb)
    model = GPT(config).eval()
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        deep, _ = model(idx)
        model.transformer.h = model.transformer.h[:1]
        shallow, _ = model(idx)
    assert torch.equal(deep, shallow)


def test_wide_models_start_with_gpt2s_init():
    """Above SMALL_INIT_MAX_WIDTH every matrix and embedding is drawn at 0.02 and the residual projections at
    0.02 / sqrt(2 * n_layer), as GPT-2 (and nanoGPT) initialise them."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, block_size=32, n_layer=3, n_head=4, n_embd=2 * SMALL_INIT_MAX_WIDTH)
    assert init_stds(config) == (0.02, 0.02 / math.sqrt(6))
    for name, p in GPT(config).named_parameters():
        if p.dim() == 2:
            expected = 0.02 / math.sqrt(6) if name.endswith("c_proj.weight") else 0.02
            std = p.std().item()
            assert abs(std / expected - 1) < 0.02, f"{name}: std {std:.4g}, expected {expected:.4g}"
