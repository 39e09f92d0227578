"""Hugging Face GPT-2 checkpoints in and out, and loading any checkpoint for inference.

HF's GPT-2 stores its four projections as Conv1D, weight (in, out): they are transposed to nn.Linear's (out, in).
Everything else maps one to one, since our module names are HF's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nanogpt2.model import GPT, GPTConfig

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers versions
EOT_TOKEN = 50256  # <|endoftext|> in the GPT-2 vocabulary
HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation, two names
HF_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or not of the model that wants it."""


def hf_cache_dirs() -> list[Path]:
    """Where Hugging Face keeps downloaded models on this machine, by huggingface_hub's rules."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second is the older name
        if os.environ.get(variable):
            return [Path(os.environ[variable])]
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [Path(os.environ.get("HF_HOME") or cache_home / "huggingface") / "hub"]


def resolve_hf_dir(name_or_path: str | Path) -> Path:
    """A checkpoint directory, or a model name ("gpt2", "openai-community/gpt2") looked up in the local HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
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
        f"no checkpoint directory {name!r} and no cached copy of it (looked in {', '.join(looked)}); "
        f"download it where a network is at hand, e.g. `huggingface-cli download openai-community/{name}`, "
        "or pass the directory holding config.json and model.safetensors"
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


def load_hf_gpt2(name_or_path: str | Path, **overrides) -> GPT:
    """A GPT with the weights of a HF GPT-2 checkpoint (GPT2LMHeadModel or GPT2Model), loaded offline."""
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
    model = GPT(config)
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


def save_hf_gpt2(model: GPT, path: str | Path) -> None:
    """Write `model` as a HF GPT-2 directory (config.json + model.safetensors); only plain GPT-2s can be."""
    from safetensors.torch import save_file

    cfg = model.config
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
        "bos_token_id": EOT_TOKEN if cfg.vocab_size > EOT_TOKEN else None,
        "eos_token_id": EOT_TOKEN if cfg.vocab_size > EOT_TOKEN else None,
        "torch_dtype": "float32",
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def load_model(path: str | Path, device: str | torch.device = "cpu", **overrides) -> GPT:
    """A model for inference from a HF directory or cached name, or a training run (its directory or ckpt.pt file).

    A sharded (FSDP) training checkpoint is consolidated into one model here, in a single process.
    """
    path = Path(path)
    ckpt_file = path / TRAIN_CKPT if path.is_dir() else path
    if not ckpt_file.is_file():
        return load_hf_gpt2(path, **overrides).to(device)
    try:
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        config = {**ckpt["config"], **overrides}
        if config.get("attn") == "triton" and "attn" not in overrides and torch.device(device).type != "cuda":
            config["attn"] = "torch"  # trained on a GPU: the Triton kernels need one, PyTorch's attention does not
        model = GPT(GPTConfig(**config))
        if "sharded" in ckpt:
            state = {"model": model.state_dict()}
            with warnings.catch_warnings():  # loading without a process group, which DCP warns about
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, checkpoint_id=ckpt_file.parent / ckpt["sharded"])
            model.load_state_dict(state["model"])
        else:
            model.load_state_dict(ckpt["model"])
    except (Exception, dcp.CheckpointException) as err:  # torch.load and DCP raise many types on torn files
        raise CheckpointError(
            f"cannot load checkpoint {ckpt_file}: {type(err).__name__}: {err}".splitlines()[0]
        ) from None
    return model.to(device)


def export_main(argv: list[str] | None = None) -> int:
    """python -m nanogpt2.checkpoint RUN_DIR --out FILE [--hf DIR]: one consolidated file (and a HF directory)."""
    parser = argparse.ArgumentParser(
        prog="python -m nanogpt2.checkpoint",
        description="Consolidate a training run's checkpoint (sharded or not) into one file of the full model, "
        "for sampling, and optionally into a Hugging Face GPT-2 directory.",
    )
    parser.add_argument("run", help="training output directory (or its ckpt.pt)")
    parser.add_argument("--out", help="file to write: {'model': full state dict, 'config': ...}")
    parser.add_argument("--hf", help="also write a Hugging Face GPT-2 directory here (plain GPT-2 configs only)")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.run)
        if args.out:
            out = Path(args.out)
            if out.exists():
                raise CheckpointError(f"{out} exists; not overwriting it")
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, tmp)
            os.replace(tmp, out)
            print(f"wrote {out}")
        if args.hf:
            save_hf_gpt2(model, args.hf)
            print(f"wrote {args.hf}")
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


# Training checkpoints (train.py): everything a run needs to continue exactly where it stopped.

TRAIN_CKPT = "ckpt.pt"
TRAIN_CKPT_KEYS = ("config", "step", "loader", "rng", "args")  # plus model + optimizer, or sharded
SHARDS_DIR = "shards"  # FSDP's sharded checkpoints, one torch.distributed.checkpoint directory per saved step


def save_training_checkpoint(out_dir: str | Path, state: dict) -> Path:
    """Write `state` (TRAIN_CKPT_KEYS, and more) to out_dir/ckpt.pt atomically.

    The temp file is fsynced before os.replace, so a process killed at any moment, mid-save included, leaves either
    the previous checkpoint or the new one, never a torn file.
    """
    path = Path(out_dir) / TRAIN_CKPT
    tmp = path.with_name(f".{TRAIN_CKPT}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from None
    for stale in path.parent.glob(f".{TRAIN_CKPT}.tmp-*"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    return path


def load_training_checkpoint(out_dir: str | Path) -> dict:
    """The training checkpoint in out_dir, checked to hold every key a resumed run needs."""
    out_dir = Path(out_dir)
    path = out_dir / TRAIN_CKPT
    if not out_dir.is_dir():
        raise CheckpointError(f"cannot resume: {out_dir} is not a directory")
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {out_dir} holds no checkpoint ({TRAIN_CKPT})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types on a torn or foreign file; all mean the same here
        raise CheckpointError(f"cannot resume: {path} is not a readable checkpoint ({type(err).__name__})") from None
    missing = [k for k in TRAIN_CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if not missing and "sharded" not in ckpt:
        missing = [k for k in ("model", "optimizer") if k not in ckpt]
    if missing:
        raise CheckpointError(f"cannot resume: {path} is not a training checkpoint (missing {', '.join(missing)})")
    if "sharded" in ckpt and not (out_dir / ckpt["sharded"] / ".metadata").is_file():
        raise CheckpointError(f"cannot resume: {path} points to {out_dir / ckpt['sharded']}, which is missing or torn")
    return ckpt


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_train_state(
    out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict, sharded: bool, is_main: bool
) -> None:
    """Checkpoint a run, whatever its parallel mode; every rank calls this.

    Model and optimizer state are taken by parameter name (torch.distributed.checkpoint.state_dict), so any mode and
    world size can resume them. Unsharded: rank 0 writes them with `meta` into ckpt.pt. Sharded (FSDP): every rank
    writes its own shards under shards/step_N/ (no rank gathers the whole model), then rank 0 writes ckpt.pt with
    `meta` and a pointer to them. ckpt.pt is replaced atomically last, so a run killed mid-save resumes from the
    previous checkpoint.
    """
    out_dir = Path(out_dir)
    if not sharded:
        model_state, optim_state = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if is_main:
            save_training_checkpoint(out_dir, {**meta, "model": model_state, "optimizer": optim_state})
            shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)  # of a sharded run this one resumed
        barrier()
        return
    name = f"{SHARDS_DIR}/step_{meta['step']:08d}"
    if is_main:  # left by a run killed before its ckpt.pt pointed there: not this run's state
        shutil.rmtree(out_dir / name, ignore_errors=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=out_dir / name)
    except (dcp.CheckpointException, OSError) as err:
        raise CheckpointError(f"cannot write sharded checkpoint {out_dir / name}: {err}".splitlines()[0]) from None
    barrier()
    if is_main:
        save_training_checkpoint(out_dir, {**meta, "sharded": name})
        for old in (out_dir / SHARDS_DIR).iterdir():
            if old.name != Path(name).name:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_train_state(run_dir: str | Path, ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint's model and optimizer state into this run's (possibly sharded) model and optimizer.

    A whole-model checkpoint is sliced into this rank's shards; a sharded one is resharded to this run's layout,
    whatever world size wrote it.
    """
    if "sharded" in ckpt:
        model_state, optim_state = get_state_dict(model, optimizer)  # this run's layout, as the template to fill
        state = {"model": model_state, "optimizer": optim_state}
        with warnings.catch_warnings():  # a single process loads without a process group, which DCP warns about
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp.load(state, checkpoint_id=Path(run_dir) / ckpt["sharded"])
            except dcp.CheckpointException as err:  # a BaseException: every shard's failure, gathered
                shards = Path(run_dir) / ckpt["sharded"]
                raise CheckpointError(f"cannot resume from {shards}: {err}".splitlines()[0]) from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        options = StateDictOptions(full_state_dict=True)
        set_state_dict(
            model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"], options=options
        )


if __name__ == "__main__":
    sys.exit(export_main())
