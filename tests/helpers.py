"""What several test files share: the repository path, the device, running a CLI, the makers of test inputs (a token
shard written as llm.c writes it, a Hugging Face GPT-2 directory, random residual projections for a fresh GPT) and the
one check of a bad input's outcome."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from nanogpt2.data import HEADER_INTS, MAGIC, VERSION

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python ARGS...` as a user would run it (e.g. run_cli("train.py", ...) or run_cli("-m", "nanogpt2.sample"))."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if args and args[0] == "train.py":
        args = (str(REPO / "train.py"), *args[1:])
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_main(main, *args: str, capfd) -> subprocess.CompletedProcess:
    """A CLI's `main(argv)` in this process, for tests of what a command does rather than of how its process exits:
    its exit status (argparse's included) and what it wrote to stdout and stderr (`capfd`, pytest's fixture, which
    also catches what bypasses sys.stdout), as run_cli returns them. A Python warning goes to pytest here, not to
    stderr: each CLI keeps a few subprocess cases for its exit status and one-line stderr."""
    capfd.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's refusal of a flag, or --help
        code = e.code
    status = 0 if code is None else code if isinstance(code, int) else 1  # as `sys.exit(code)` would exit
    if not isinstance(code, int | None):
        print(code, file=sys.stderr)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess([main.__module__, *args], status, out, err)


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str | None:
    """The first line of `proc`'s stdout (a text pipe) that starts with `prefix`; None when its output ends first. A
    pipe read line by line has no timeout of its own: after `timeout` seconds the process is killed, which ends it."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        return next((line for line in proc.stdout if line.startswith(prefix)), None)
    finally:
        timer.cancel()


def cpu_config(*flags: str):
    """(TrainConfig, GPTConfig) as train.py builds them from `flags` on a CPU, in one process."""
    from nanogpt2.config import from_flags, parse_flags

    cfg = from_flags(parse_flags(list(flags)))
    cfg.fill_defaults(torch.device("cpu"), world_size=1)
    model = cfg.model_config()
    cfg.check(model, torch.device("cpu"), world_size=1, distributed=False)
    return cfg, model


def llmc_shard(path: Path, tokens, magic: int = MAGIC, version: int = VERSION, count: int | None = None) -> Path:
    """A shard written the way llm.c's dev/data/data_common.py write_datafile does, independently of write_shard."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
    return path


def hf_checkpoint(path: Path, safe: bool = True, **shape):
    """A randomly initialised HF GPT-2 saved to `path`, and the HF model itself (eval mode, fp32).

    safe=False writes the older pytorch_model.bin format (HF's state dict, pickled) instead of model.safetensors.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0, **shape)).eval()
    hf.save_pretrained(path)
    if not safe:
        (path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), path / "pytorch_model.bin")
    return path, hf


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes, to check a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_bad_input(result: subprocess.CompletedProcess, message: str, unchanged: dict[Path, dict] | None = None):
    """A refused input: exit status 1 (2 for a flag argparse refuses), one line `error: ...` naming the problem on
    stderr, no traceback, and every folder in `unchanged` (folder -> its snapshot before) byte-identical."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode in (1, 2), result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert message in lines[0], lines[0]
    for folder, before in (unchanged or {}).items():
        assert snapshot(folder) == before, f"{folder} changed"


def assert_same_model(ckpt: dict, reference: dict, step: int):
    """Two checkpoints at `step` hold bitwise-equal weights; a failure names each differing tensor and by how much."""
    assert ckpt["step"] == reference["step"] == step, (ckpt["step"], reference["step"])
    differ = {
        k: (v.double() - reference["model"][k].double()).abs().max().item()
        for k, v in ckpt["model"].items()
        if not torch.equal(v, reference["model"][k])
    }
    assert not differ, f"{len(differ)} of {len(ckpt['model'])} tensors differ (max |diff|): {differ}"


def assert_matches_ref(out, ref, ref_lowp, factor=2.0, atol=1e-3, fp32_atol=1e-5, fp32_rtol=0.0):
    """Flash-attention's criterion: |out - ref| <= factor * |ref_lowp - ref| + atol (max norms) in fp16/bf16,
    where ref is computed in float64 and ref_lowp in out's dtype; in fp32, |out - ref| <= fp32_atol + fp32_rtol *
    max|ref|. Every element must be finite (with `nan_outputs`, an unwritten one is NaN)."""
    assert torch.isfinite(out).all(), "the kernel left NaN/inf (unwritten) elements"
    err = (out.double() - ref).abs().max().item()
    if out.dtype == torch.float32:
        bound = fp32_atol + fp32_rtol * ref.abs().max().item()
        assert err <= bound, f"fp32 max error {err:.3g} > {bound:.3g}"
    else:
        base = (ref_lowp.double() - ref).abs().max().item()
        assert err <= factor * base + atol, f"max error {err:.3g} > {factor} * {base:.3g} + {atol}"


def randomize_residual_projections(model) -> None:
    """Random c_proj weights: GPT initialises them to zero at the tests' small widths, which would keep attention out
    of the loss and of the gradients of everything before it."""
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, std=0.02)
