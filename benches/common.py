"""What the GPU-run scripts share: their common flags, the choice between a CUDA device and the dry run, the JSON they
write and the environment they record."""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def parser(doc: str, json_help: str, deadline_help: str) -> argparse.ArgumentParser:
    """An argument parser with --json, --deadline and --dry-run; `doc` is the script's docstring."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--json", type=Path, help=json_help)
    p.add_argument("--deadline", type=float, default=float("inf"), help=deadline_help)
    p.add_argument(
        "--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes: checks the code only"
    )
    return p


def select_device(dry_run: bool, tool: str) -> str:
    """ "cpu" with the interpreter switched on for a dry run (call before importing kernels), else "cuda", or exit."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        return "cpu"
    if not torch.cuda.is_available():
        sys.exit(f"{tool} needs a CUDA device (none found); --dry-run exercises it on CPU")
    return "cuda"


def write_json(path: Path, data: object) -> None:
    """Write JSON through a temporary file and a rename, so a step killed by its timeout leaves the previous
    complete file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def environment(dry_run: bool) -> dict:
    """The machine, the versions and the commit, recorded with every result."""
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "device": "cpu (dry run)" if dry_run else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def model_loss(model, tokens, fused: bool):
    """The training loss of a GPT on tokens (B, T + 1): its own fused loss, or the same loss from the full logits
    (the unfused baseline), which holds the (B, T, vocab) logits and their gradient."""
    from nanogpt2.loss import cross_entropy_of_logits

    x, y = tokens[:, :-1], tokens[:, 1:]
    if fused:
        return model(x, y)[1]
    return cross_entropy_of_logits(model(x)[0], y, model.config.vocab_size)
