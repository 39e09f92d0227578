"""Hugging Face GPT-2 checkpoints in and out (offline): a directory or a name in the local HF cache -> GPT, and back.

HF's GPT-2 stores its four projections as Conv1D, weight (in, out): they are transposed to nn.Linear's (out, in).
Everything else maps one to one, since our module names are HF's. This file owns the HF format; training checkpoints
and loading a model for inference from either kind are checkpoint.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from nanogpt2.errors import CheckpointError
from nanogpt2.files import user_cache_home, write_atomic
from nanogpt2.model import GPT, GPTConfig
from nanogpt2.tokenizer import EOT, VOCAB_SIZE, bpe_files

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers versions
HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation, two names
HF_GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")  # looked up in the HF cache by name
HF_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}


def hf_cache_dirs() -> list[Path]:
    """Where Hugging Face keeps downloaded models on this machine, by huggingface_hub's rules."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second is the older name
        if os.environ.get(variable):
            return [Path(os.environ[variable])]
    cache_home = user_cache_home()
    return [Path(os.environ.get("HF_HOME") or cache_home / "huggingface") / "hub"]


def resolve_hf_dir(name_or_path: str | Path) -> Path:
    """A checkpoint directory, or a model name ("gpt2", "openai-community/gpt2") looked up in the local HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{name}: not a checkpoint directory (expected one holding config.json)")
    repo_id = name.count("/") == 1 and not name.startswith((".", "/"))
    if not repo_id and name not in HF_GPT2_NAMES:
        raise CheckpointError(f"{name}: no such file or directory")
    candidates = [name] if "/" in name else [name, f"openai-community/{name}"]
    looked = []
    for cache in hf_cache_dirs():
        for repo in candidates:
            snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
            looked.append(str(snapshots))
            found = (
                sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
            )
            if found:
                return found[-1].parent
    raise CheckpointError(
        f"{name}: no such file or directory, nor a model of that name in the Hugging Face cache (looked in "
        f"{', '.join(looked)}); "
        f"for GPT-2's weights, download config.json and model.safetensors from huggingface.co/{candidates[-1]} into a "
        "directory and pass that directory"
    )


def read_hf_config(hf_dir: Path, **overrides) -> GPTConfig:
    """Our config for a HF GPT-2 config.json; raises CheckpointError for features we do not implement."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint directory")
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {config_path}: {err}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path} holds a {type(hf).__name__}, not a config object")
    hf = {**HF_DEFAULTS, **hf}  # fields a config.json may leave out, with transformers' GPT2Config defaults
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{config_path}: model_type is {hf.get('model_type')!r}, expected 'gpt2'")
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") not in HF_ACTIVATIONS),
        "layer_norm_epsilon": abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12,
        "n_inner": hf.get("n_inner") not in (None, 4 * hf["n_embd"]),
        "scale_attn_weights": not hf.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": hf.get("add_cross_attention", False),
    }
    bad = [f"{key}={hf.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise CheckpointError(f"{config_path}: unsupported GPT-2 settings {', '.join(bad)}")
    fields = dict(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
    )
    return GPTConfig(**{**fields, **overrides})


def read_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors (preferred) or pytorch_model.bin."""
    from safetensors.torch import load_file

    for name, load in (
        ("model.safetensors", load_file),
        ("pytorch_model.bin", lambda f: torch.load(f, map_location="cpu", weights_only=True)),
    ):
        if (hf_dir / name).is_file():
            try:
                return load(hf_dir / name)
            except Exception as err:  # torn, truncated or foreign files raise many types; all mean the same here
                message = f"cannot read {hf_dir / name}: {type(err).__name__}: {err}"
                raise CheckpointError(message.splitlines()[0]) from None
    raise CheckpointError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin")


def load_hf_gpt2(name_or_path: str | Path, attn_impl: str = "torch", **overrides) -> GPT:
    """A GPT with the weights of a HF GPT-2 checkpoint (GPT2LMHeadModel or GPT2Model), loaded offline.

    `attn_impl` is the attention implementation (GPT's argument); `overrides` change fields of the config read.
    """
    hf_dir = resolve_hf_dir(name_or_path)
    config = read_hf_config(hf_dir, **overrides)
    hf_state = read_hf_state_dict(hf_dir)
    state = {}
    for key, tensor in hf_state.items():
        key = key.removeprefix("transformer.")
        if key.endswith(HF_BUFFERS) or key == "lm_head.weight":
            continue
        state[f"transformer.{key}"] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    wte = state.get("transformer.wte.weight")
    if "lm_head.weight" in hf_state and wte is not None and not torch.equal(hf_state["lm_head.weight"], wte):
        raise CheckpointError(f"{hf_dir}: lm_head is not tied to wte, which GPT-2 requires")
    model = GPT(config, attn_impl=attn_impl)
    if wte is not None and config.padded_vocab_size > wte.shape[0]:  # pad the vocab rows, padding never targeted
        state["transformer.wte.weight"] = torch.cat(
            [wte, wte.new_zeros(config.padded_vocab_size - wte.shape[0], wte.shape[1])]
        )
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{hf_dir}: weights do not match GPT-2: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{hf_dir}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False)  # lm_head.weight is wte.weight
    return model


def check_hf_expressible(cfg: GPTConfig) -> None:
    """CheckpointError unless Hugging Face's GPT2LMHeadModel can hold this config (a plain GPT-2)."""
    unsupported = {
        "pos_emb": cfg.pos_emb != "learned",
        "n_kv_head": cfg.n_kv_head != cfg.n_head,
        "window": cfg.window is not None,
    }
    bad = [f"{key}={getattr(cfg, key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise CheckpointError(
            f"Hugging Face's GPT-2 cannot express {', '.join(bad)}; save a nanogpt2 checkpoint instead"
        )


def save_hf_gpt2(model: GPT, path: str | Path) -> None:
    """Write `model` as a HF GPT-2 directory (config.json + model.safetensors); only plain GPT-2s can be.

    transformers.GPT2LMHeadModel.from_pretrained loads the directory, and AutoTokenizer.from_pretrained GPT-2's
    tokenizer when the model has GPT-2's vocabulary (`save_hf_tokenizer`). Each file is written atomically.
    """
    from safetensors.torch import save

    check_hf_expressible(model.config)
    cfg = model.config
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        tensor = tensor.detach().float().cpu()
        if key == "transformer.wte.weight":
            tensor = tensor[: cfg.vocab_size]
        state[key] = (tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor).contiguous()
    if not cfg.bias:  # GPT-2 always has biases; zeros are exactly a model without them
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and name != "lm_head":
                state[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    hf_config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": EOT if cfg.vocab_size > EOT else None,
        "eos_token_id": EOT if cfg.vocab_size > EOT else None,
        "torch_dtype": "float32",
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "model.safetensors", save(state, metadata={"format": "pt"}))
    write_atomic(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
    if cfg.vocab_size == VOCAB_SIZE:  # another vocabulary (e.g. --data recall's) has no tokenizer to ship
        save_hf_tokenizer(out, cfg.block_size)


def save_hf_tokenizer(out: Path, max_length: int) -> None:
    """GPT-2's tokenizer files, as HF's gpt2 repository has them: vocab.json and merges.txt are the BPE files
    tiktoken's encoding is built from (the same bytes), with `<|endoftext|>` as the begin, end and unknown token."""
    encoder_json, vocab_bpe = bpe_files()
    eot = "<|endoftext|>"
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": max_length,
        "add_prefix_space": False,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
    }
    write_atomic(out / "vocab.json", encoder_json.read_bytes())
    write_atomic(out / "merges.txt", vocab_bpe.read_bytes())
    write_atomic(out / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
