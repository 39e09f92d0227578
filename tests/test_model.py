"""The model against references nobody here wrote: HF transformers' GPT-2 and a naive masked softmax."""

import itertools

import pytest
import torch
from helpers import DEVICE, hf_checkpoint, randomize_residual_projections
from transformers import GPT2LMHeadModel

from nanogpt2.checkpoint import CheckpointError, load_model
from nanogpt2.hf import load_hf_gpt2, save_hf_gpt2
from nanogpt2.kernels.reference import flash_attention_ref
from nanogpt2.model import GPT, PRESETS, GPTConfig, attend
from nanogpt2.sample import KVCache, generate

VARIANTS = {
    "base": {},
    "rope": dict(pos_emb="rope"),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "swa": dict(window=5),
    "all": dict(pos_emb="rope", n_kv_head=2, window=7),
}


HF_SHAPES = [
    dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    dict(vocab_size=257, n_positions=64, n_embd=48, n_layer=3, n_head=3),
    dict(vocab_size=50257, n_positions=128, n_embd=64, n_layer=1, n_head=2),
]


@pytest.mark.parametrize("shape", HF_SHAPES, ids=lambda s: f"L{s['n_layer']}-C{s['n_embd']}-V{s['vocab_size']}")
def test_logits_and_loss_match_hf(tmp_path, shape):
    path, hf = hf_checkpoint(tmp_path, **shape)
    model = load_hf_gpt2(path).eval()
    idx = torch.randint(0, shape["vocab_size"], (2, shape["n_positions"]))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits, loss = model(idx[:, :-1], idx[:, 1:])  # HF shifts the labels itself
        full_logits, _ = model(idx)
    assert (full_logits - ref.logits).abs().max() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-4


def test_loads_pytorch_model_bin(tmp_path):
    path, hf = hf_checkpoint(tmp_path, safe=False, **HF_SHAPES[0])
    assert (path / "pytorch_model.bin").is_file()
    idx = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        assert (load_hf_gpt2(path).eval()(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


def test_padded_vocab_loads_and_matches(tmp_path):
    path, hf = hf_checkpoint(tmp_path, **HF_SHAPES[0])
    model = load_hf_gpt2(path, vocab_pad_multiple=64).eval()
    assert model.transformer.wte.weight.shape[0] == 128
    idx = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        assert (model(idx)[0][..., :101] - hf(idx).logits).abs().max() <= 1e-4
        loss = model(idx[:, :-1], idx[:, 1:])[1]  # the padding columns are no tokens: not in the softmax
        assert abs(loss.item() - hf(idx, labels=idx).loss.item()) <= 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_save_pretrained_round_trips_through_transformers(tmp_path, bias):
    torch.manual_seed(1)
    model = GPT(
        GPTConfig(vocab_size=97, block_size=24, n_layer=2, n_head=2, n_embd=32, bias=bias, vocab_pad_multiple=8)
    )
    with torch.no_grad():  # every weight random (a fresh model's zero projections would hide the blocks' export)
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    save_hf_gpt2(model.eval(), tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        assert (model(idx)[0][..., :97] - hf(idx).logits).abs().max() <= 1e-4
        reloaded = load_hf_gpt2(tmp_path).eval()
        assert (reloaded(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ["rope", "gqa", "swa"])
def test_save_pretrained_refuses_what_gpt2_cannot_express(tmp_path, variant):
    model = GPT(GPTConfig(vocab_size=97, block_size=24, n_layer=1, n_head=4, n_embd=32, **VARIANTS[variant]))
    with pytest.raises(CheckpointError, match="cannot express"):
        save_hf_gpt2(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_from_pretrained_name_not_cached_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"looked in .*models--gpt2.*") as err:
        load_hf_gpt2("gpt2")
    # the hint names no tool we do not require: it says which files to fetch
    assert "download config.json and model.safetensors" in str(err.value) and "huggingface-cli" not in str(err.value)


def test_from_pretrained_name_resolves_through_hf_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "models--openai-community--gpt2" / "snapshots" / "abc123"
    hf_checkpoint(snapshot, **HF_SHAPES[0])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert load_hf_gpt2("gpt2").config.n_layer == 2


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path, _ = hf_checkpoint(tmp_path, **HF_SHAPES[0])
    (path / "config.json").write_text((path / "config.json").read_text().replace('"gpt2"', '"llama"'))
    with pytest.raises(CheckpointError, match="model_type"):
        load_hf_gpt2(path)


def test_load_model_reads_a_hf_directory(tmp_path):
    path, _ = hf_checkpoint(tmp_path, **HF_SHAPES[0])
    assert load_model(path).config.n_embd == 32


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "config.json").write_text("{not json"), "cannot read .*config.json"),
        (lambda p: (p / "config.json").write_text("[1, 2]"), "holds a list"),
        # transformers' defaults fill what config.json leaves out: here n_embd 768, which these weights are not
        (lambda p: (p / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}'), "has shape .* expected"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 100), "cannot read .*model.safetensors"),
    ],
    ids=["bad-json", "not-an-object", "missing-fields", "torn-weights"],
)
def test_damaged_hf_directory_is_one_clear_error(tmp_path, damage, message):
    path, _ = hf_checkpoint(tmp_path, **HF_SHAPES[0])
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_load_model_runs_with_the_attn_impl_asked_for(tmp_path):
    """A run's checkpoint loads for inference with the implementation asked for, whatever trained it."""
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=32, pos_emb="rope")
    torch.save({"model_config": config.to_dict(), "model": GPT(config).state_dict()}, tmp_path / "ckpt.pt")
    assert load_model(tmp_path, device="cpu").attn_impl == "torch"
    model = load_model(tmp_path, device="cpu", attn_impl="triton")
    assert model.attn_impl == "triton" and all(b.attn.attn_impl == "triton" for b in model.transformer.h)
    assert [b.attn.layer_idx for b in model.transformer.h] == [0]


@pytest.mark.parametrize(
    "name, params",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_preset_parameter_counts_match_gpt2(name, params):
    with torch.device("meta"):
        assert GPT(GPTConfig.from_preset(name)).num_params() == params


def test_variant_presets():
    with torch.device("meta"):
        base = GPT(GPTConfig.from_preset("gpt2")).num_params()
        assert GPT(GPTConfig.from_preset("gpt2-rope")).num_params() == base - 1024 * 768  # no wpe
        assert GPT(GPTConfig.from_preset("gpt2-gqa")).num_params() == base - 12 * 2 * (768 - 4 * 64) * (768 + 1)
        assert GPT(GPTConfig.from_preset("gpt2-swa")).num_params() == base
        assert GPTConfig.from_preset("gpt2-all").window == 256
        assert GPT(GPTConfig.from_preset("gpt2", vocab_pad_multiple=64)).transformer.wte.weight.shape[0] == 50304
    assert set(PRESETS) >= {"gpt2", "gpt2-rope", "gpt2-gqa", "gpt2-swa", "gpt2-all", "nano", "pico"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=100, n_head=3), "n_embd"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(window=0), "window"),
        (dict(window=-3), "window"),
        (dict(n_embd=12, n_head=4, pos_emb="rope"), "head dim 3"),
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(dropout=1.0), "dropout"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(rope_base=1.0), "rope_base"),
    ],
)
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{"n_embd": 64, "n_head": 4, **kwargs})


@pytest.mark.parametrize("attn, message", [("cuda", "attn_impl must be one of"), ("triton", "head dim in")])
def test_bad_attention_implementation_is_rejected(attn, message):
    with pytest.raises(ValueError, match=message):
        GPT(GPTConfig(n_embd=96, n_head=4, n_layer=1, vocab_size=97), attn_impl=attn)


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPTConfig.from_preset("gpt3")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T", [1, 9, 33])
def test_sdpa_path_matches_naive_reference(variant, T):
    cfg = GPTConfig(n_head=4, n_embd=64, **{k: v for k, v in VARIANTS[variant].items() if k != "pos_emb"})
    q = torch.randn(2, T, 4, 16, dtype=torch.float64)
    k = torch.randn(2, T, cfg.n_kv_head, 16, dtype=torch.float64)
    v = torch.randn(2, T, cfg.n_kv_head, 16, dtype=torch.float64)
    out = attend(q, k, v, cfg.window)
    ref = flash_attention_ref(q, k, v, causal=True, window=cfg.window)
    assert (out - ref).abs().max() <= 1e-10


def make_model(variant: str, block_size: int = 16) -> GPT:
    """A tiny model of the variant with large random weights, so that its samples are diverse."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=block_size, n_layer=2, n_head=4, n_embd=32, **VARIANTS[variant])
    model = GPT(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_recomputing(variant, temperature):
    model = make_model(variant)
    idx = torch.randint(0, 97, (2, 5))
    # 30 new tokens: past the window (5, 7) and past block_size (16), where learned positions recompute.
    cached = generate(model, idx, 30, temperature, use_cache=True, generator=torch.Generator().manual_seed(3))
    plain = generate(model, idx, 30, temperature, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cached, plain)
    if temperature:
        assert len(set(cached[0].tolist())) > 10  # a collapsed model would make this test vacuous


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_logits_match_full_forward(variant):
    """Feeding a sequence token by token (and in chunks) through the cache gives the full forward's logits.

    A first capacity of 3, below the windows (5, 7), makes the cache grow: to the window, then it rolls.
    """
    model = make_model(variant, block_size=40)
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full, _ = model(idx)
        for capacity, chunks in itertools.product((40, 3), ([1] * 40, [11, 3, 1, 25], [2] * 20)):
            cache = KVCache(model.config, 2, capacity, torch.float32, idx.device)
            start, pieces = 0, []
            for n in chunks:
                pieces.append(model(idx[:, start : start + n], kv_cache=cache)[0])
                start += n
            assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-4


def test_cache_holds_only_kv_heads_and_window():
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, window=8)
    cache = KVCache(cfg, batch=1, capacity=64, dtype=torch.float32, device="cpu")
    assert cache.k.shape == (2, 1, 8, 2, 8)  # (layers, B, window, Hkv, D)
    assert KVCache.bytes_per_token(cfg, torch.bfloat16) == 2 * 2 * 2 * 8 * 2


def test_rope_runs_past_block_size():
    model = make_model("rope", block_size=8)
    with torch.no_grad():
        logits, _ = model(torch.randint(0, 97, (1, 20)))
    assert logits.shape == (1, 20, 97) and torch.isfinite(logits).all()


def test_init_from_scratch():
    """GPT-2's init except zero residual projections and a token embedding at std 0.04 at width 256, scaled as
    1/sqrt(width) (see GPT.__init__)."""
    torch.manual_seed(0)
    for n_embd, wte_std in ((256, 0.04), (64, 0.08)):
        model = GPT(GPTConfig(vocab_size=4096, block_size=256, n_layer=2, n_head=4, n_embd=n_embd))
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith(".bias"):
                assert not p.any(), name
            elif name == "transformer.wte.weight":
                assert abs(p.std().item() - wte_std) <= 0.025 * wte_std and model.lm_head.weight is p
            elif p.dim() == 2:
                assert abs(p.std().item() - 0.02) <= 0.001, name


def test_flops_per_token_count_visible_keys():
    base = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32))
    swa = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, window=8))
    weights = 6 * (base.num_params() - 64 * 32)
    assert base.flops_per_token(64) == weights + 12 * 2 * 32 * 32  # a query sees T/2 keys on average
    assert swa.flops_per_token(64) == weights + 12 * 2 * 32 * (8 - 64 / 128)  # (1 + ... + 8 + 8 * 56) / 64
    assert swa.flops_per_token(8) == base.flops_per_token(8)  # a window >= T is causal attention


def test_learned_positions_refuse_past_block_size():
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        make_model("base")(torch.randint(0, 97, (1, 17)))


def test_training_step_reduces_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32, **VARIANTS["all"])).train()
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    idx = (torch.arange(16)[None, :] * 3 + torch.arange(4)[:, None] * 11) % 97  # (4, 16) learnable progressions
    losses = []
    for _ in range(30):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert all((p.dim() >= 2) == (id(p) in decayed) for p in model.parameters())


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_hf_parity_on_cuda(tmp_path):
    path, hf = hf_checkpoint(tmp_path, **HF_SHAPES[1])
    idx = torch.randint(0, 257, (2, 64), device="cuda")
    with torch.no_grad():
        ours = load_model(path, device="cuda").eval()(idx)[0]
        assert (ours - hf.cuda()(idx).logits).abs().max() <= 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_attention_matches_torch_in_the_model(variant):
    """attn="triton" (flash attention + RoPE kernels) gives the loss and gradients of attn="torch"."""
    torch.manual_seed(0)
    shape = dict(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_embd=64, **VARIANTS[variant])
    models = {impl: GPT(GPTConfig(**shape), attn_impl=impl).to(DEVICE) for impl in ("torch", "triton")}
    randomize_residual_projections(models["torch"])
    models["triton"].load_state_dict(models["torch"].state_dict())
    idx = torch.randint(0, 97, (2, 40), device=DEVICE)
    results = {}
    for impl, model in models.items():
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results[impl] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    assert abs(results["triton"][0] - results["torch"][0]) <= 1e-5
    for name, grad in results["torch"][1].items():
        assert (results["triton"][1][name] - grad).abs().max() <= 1e-5, name


def test_bf16_rope_model_keeps_float32_rotary_tables():
    """model.to(bfloat16) casts buffers; the rotary angles must stay float32, for both attention paths."""
    torch.manual_seed(0)
    shape = dict(vocab_size=97, block_size=32, n_layer=1, n_head=2, n_embd=64, pos_emb="rope")
    models = {impl: GPT(GPTConfig(**shape), attn_impl=impl).to(DEVICE) for impl in ("torch", "triton")}
    randomize_residual_projections(models["torch"])
    models["triton"].load_state_dict(models["torch"].state_dict())
    idx = torch.randint(0, 97, (1, 32), device=DEVICE)
    with torch.no_grad():
        ref = models["torch"](idx)[0].double()
        for model in models.values():
            cos, sin = model.to(torch.bfloat16)._rope(0, 32, DEVICE)
            assert cos.dtype == sin.dtype == torch.float32
            assert (model(idx)[0].double() - ref).abs().max() <= 0.1  # bf16 weights and activations
