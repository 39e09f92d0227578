"""Training checkpoints: the schema of ckpt.pt, written, checked and read here, and nowhere else.

A training checkpoint holds everything a run needs to continue exactly where it stopped:

    format        FORMAT, this layout's version   step          optimizer steps done
    model_config  the GPTConfig (a dict)          train_config  the TrainConfig (a dict)
    loader        the train loader's position     rng           torch's RNG state(s)     scaler  fp16 GradScaler state
    model + optimizer (state dicts by parameter name), or sharded: the directory of FSDP's shards beside ckpt.pt

`save_checkpoint` writes it (every rank calls it), `load_checkpoint` reads and checks it before the model exists,
`restore_checkpoint` puts it back into the model, optimizer, scaler and loader. `load_model` turns a training run or
a Hugging Face directory into a model for inference (the HF format itself is hf.py's), and the CLI consolidates a run
into one file:

    python -m nanogpt2.checkpoint RUN_DIR --out model.pt [--hf DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nanogpt2.errors import CheckpointError, WriteError, os_error_text
from nanogpt2.files import write_atomic
from nanogpt2.hf import check_hf_expressible, load_hf_gpt2, save_hf_gpt2
from nanogpt2.model import GPT, GPTConfig
from nanogpt2.parallel import barrier

__all__ = ["load_checkpoint", "load_model", "restore_checkpoint", "save_checkpoint"]

TRAIN_CKPT = "ckpt.pt"
FORMAT = 2  # the layout above; 1 was nanogpt2 0.1.0's (keys "config" and "args"), which this version cannot resume
TRAIN_CKPT_KEYS = ("format", "model_config", "train_config", "step", "loader", "rng")  # + model/optimizer or sharded
SHARDS_DIR = "shards"  # FSDP's sharded checkpoints, one torch.distributed.checkpoint directory per saved step


@contextlib.contextmanager
def dcp_without_process_group():
    """torch.distributed.checkpoint in a single process: DCP warns that no process group is joined, which is meant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader,
    model_config: GPTConfig,
    train_config: dict,
    sharded: bool,
    is_main: bool,
) -> None:
    """Checkpoint a run after `step` optimizer steps, whatever its parallel mode; every rank calls this.

    Model and optimizer state are taken by parameter name (torch.distributed.checkpoint.state_dict), so any mode and
    world size can resume them. Unsharded: rank 0 writes them into ckpt.pt. Sharded (FSDP): every rank writes its own
    shards under shards/step_N/ (no rank gathers the whole model), then rank 0 writes ckpt.pt pointing to them.
    ckpt.pt is replaced atomically last, so a run killed at any moment, mid-save included, resumes from the previous
    checkpoint or the new one, never a torn file.
    """
    device = next(model.parameters()).device
    meta = {"format": FORMAT, "step": step, "model_config": model_config.to_dict(), "train_config": train_config,
            "loader": loader.state_dict(), "rng": rng_state(device), "scaler": scaler.state_dict()}  # fmt: skip
    if not sharded:
        model_state, optim_state = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if is_main:
            _write_ckpt_file(out_dir, {**meta, "model": model_state, "optimizer": optim_state})
            shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)  # of a sharded run this one resumed
        barrier()
        return
    name = f"{SHARDS_DIR}/step_{step:08d}"
    if is_main:  # left by a run killed before its ckpt.pt pointed there: not this run's state
        shutil.rmtree(out_dir / name, ignore_errors=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=out_dir / name)
    except OSError as err:
        raise WriteError(out_dir / name, err) from None
    except dcp.CheckpointException as err:  # every rank's failures, gathered: name the first one's
        rank, failure = min(err.failures.items())
        cause = os_error_text(failure[0] if isinstance(failure, tuple) else failure)
        raise CheckpointError(f"cannot write sharded checkpoint {out_dir / name}: rank {rank}: {cause}") from None
    barrier()
    if is_main:
        _write_ckpt_file(out_dir, {**meta, "sharded": name})
        for old in (out_dir / SHARDS_DIR).iterdir():
            if old.name != Path(name).name:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def _write_ckpt_file(out_dir: Path, state: dict) -> None:
    path = out_dir / TRAIN_CKPT
    write_atomic(path, lambda f: torch.save(state, f))  # WriteError when it fails: the previous ckpt.pt stays
    for stale in path.parent.glob(f".{TRAIN_CKPT}.tmp-*"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)


def rng_state(device: torch.device) -> dict:
    """torch's RNG state: the CPU generator's, and the device's on CUDA (dropout draws from it)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def load_checkpoint(out_dir: str | Path) -> dict:
    """The training checkpoint in out_dir, checked to be of this format and to hold every key a resumed run needs."""
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
    if isinstance(ckpt, dict) and "step" in ckpt and ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"cannot resume: {path} is a checkpoint of another nanogpt2 version (format {ckpt.get('format', 1)}, this "
            f"version reads {FORMAT}): resume it with the version that wrote it"
        )
    missing = [k for k in TRAIN_CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if not missing and "sharded" not in ckpt:
        missing = [k for k in ("model", "optimizer") if k not in ckpt]
    if missing:
        raise CheckpointError(f"cannot resume: {path} is not a training checkpoint (missing {', '.join(missing)})")
    if "sharded" in ckpt and not (out_dir / ckpt["sharded"] / ".metadata").is_file():
        raise CheckpointError(f"cannot resume: {path} points to {out_dir / ckpt['sharded']}, which is missing or torn")
    return ckpt


def restore_checkpoint(
    run_dir: Path,
    ckpt: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader,
) -> int:
    """Put a checkpoint (from load_checkpoint) back into this run's objects; returns the step to go on from.

    A whole-model checkpoint is sliced into this rank's shards; a sharded one is resharded to this run's layout,
    whatever world size wrote it.
    """
    device = next(model.parameters()).device
    try:
        if "sharded" in ckpt:
            model_state, optim_state = get_state_dict(model, optimizer)  # this run's layout, as the template to fill
            state = {"model": model_state, "optimizer": optim_state}
            shards = Path(run_dir) / ckpt["sharded"]
            try:
                with dcp_without_process_group():
                    dcp.load(state, checkpoint_id=shards)
            except dcp.CheckpointException as err:  # a BaseException: every shard's failure, gathered
                raise CheckpointError(f"cannot resume from {shards}: {err}".splitlines()[0]) from None
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        else:
            options = StateDictOptions(full_state_dict=True)
            set_state_dict(
                model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"], options=options
            )
        if scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{run_dir}/{TRAIN_CKPT} does not fit this run: {e}".splitlines()[0]) from None
    return ckpt["step"]


def load_model(path: str | Path, device: str | torch.device = "cpu", attn_impl: str = "torch", **overrides) -> GPT:
    """A model for inference from a HF directory or cached name, or a training run (its directory or ckpt.pt file).

    `attn_impl` is the attention implementation to run with ("triton" needs CUDA), whatever the run trained with;
    `overrides` change config fields. A sharded (FSDP) training checkpoint is consolidated here, in one process.
    """
    path = Path(path)
    ckpt_file = path / TRAIN_CKPT if path.is_dir() else path
    if not ckpt_file.is_file():
        return load_hf_gpt2(path, attn_impl=attn_impl, **overrides).to(device)
    try:
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**{**ckpt["model_config"], **overrides}), attn_impl=attn_impl)
        if "sharded" in ckpt:
            state = {"model": model.state_dict()}
            with dcp_without_process_group():
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
    parser.add_argument(
        "--out", help="file to write, which must not exist: {'model': full state dict, 'model_config': GPTConfig dict}"
    )
    parser.add_argument(
        "--hf", help="also write a Hugging Face GPT-2 directory here, which must not exist (plain GPT-2 configs only)"
    )
    args = parser.parse_args(argv)
    try:
        for target in (args.out, args.hf):
            if target and Path(target).exists():
                raise CheckpointError(f"{target} exists; not overwriting it")
        if not (args.out or args.hf):
            raise CheckpointError("nothing to do: give --out FILE, --hf DIR or both")
        model = load_model(args.run)
        if args.hf:
            check_hf_expressible(model.config)  # before anything is written
        if args.out:
            exported = {"model": model.state_dict(), "model_config": model.config.to_dict()}
            write_atomic(args.out, lambda f: torch.save(exported, f))
            print(f"wrote {args.out}")
        if args.hf:
            save_hf_gpt2(model, args.hf)
            print(f"wrote {args.hf}")
    except (CheckpointError, WriteError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
