"""train.py through its real CLI: a run whose loss falls, bitwise resume, Ctrl-C, and every bad input.

Every run is a subprocess with cwd and NANOGPT2_DATA_DIR in tmp_path, so nothing is written into the repository.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogpt2.checkpoint import load_training_checkpoint
from nanogpt2.data import HEADER_INTS, MAGIC, prepare, write_shard

REPO = Path(__file__).resolve().parent.parent
TINY = ["--preset", "pico", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2"]


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *args]


def env_for(tmp: Path) -> dict:
    return {**os.environ, "NANOGPT2_DATA_DIR": str(tmp / "data-cache"), "PYTHONPATH": str(REPO)}


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args), cwd=tmp, env=env_for(tmp), capture_output=True, text=True, timeout=300)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small text corpus (some 25k tokens of repetitive prose) as train/val shards."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = "the king and queen of a small country walked to the sea every morning while birds sang".split()
    for i in range(4):
        text = " ".join(" ".join(rng.permutation(words[: 6 + i])) + "." for _ in range(600))
        (root / f"doc{i}.txt").write_text(text)
    prepare([root], root / "shards", val_fraction=0.1)
    return root / "shards"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards) -> Path:
    """A finished 30-step pico run; tests copy it before changing anything."""
    tmp = tmp_path_factory.mktemp("trained")
    done = run(tmp, *TINY, "--data", str(shards), "--max-steps", "30", "--lr", "1e-2", "--eval-every", "10")
    assert done.returncode == 0, done.stderr
    return tmp / "out"


def test_loss_falls_and_run_is_recorded(trained):
    rows = metrics(trained)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[0]["loss"] > 10 and rows[-1]["loss"] < rows[0]["loss"] - 4  # from ln(50257) = 10.8 to below 6.8
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30] and rows[-1]["val_loss"] < 7
    assert rows[-1]["tokens"] == 30 * 4 * 32 and all({"lr", "norm", "tok_s"} <= r.keys() for r in rows)
    record = json.loads((trained / "run.json").read_text())
    assert record["model"]["n_layer"] == 2 and record["args"]["max_steps"] == 30 and record["git_commit"]
    assert {"torch", "python"} <= record["versions"].keys() and record["device"].startswith("cpu")
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["loader"]["position"] == 30 * 4 * 32


def test_resume_is_bitwise(tmp_path, shards):
    common = [*TINY, "--data", str(shards), "--dropout", "0.1", "--grad-accum", "2", "--eval-every", "3"]
    straight = run(tmp_path, *common, "--max-steps", "8", "--out-dir", "straight")
    assert straight.returncode == 0, straight.stderr
    first = run(tmp_path, *common, "--max-steps", "4", "--decay-steps", "8", "--out-dir", "split")
    assert first.returncode == 0, first.stderr
    # A crash after step 6 was logged but before it was saved, mid-way through a line: the checkpoint is still step
    # 4's, the log runs to 6 and ends in a torn line.
    shutil.copy(tmp_path / "split" / "ckpt.pt", tmp_path / "ckpt-step4.pt")
    assert run(tmp_path, "--resume", "split", "--max-steps", "6").returncode == 0
    shutil.copy(tmp_path / "ckpt-step4.pt", tmp_path / "split" / "ckpt.pt")
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1')
    second = run(tmp_path, "--resume", "split", "--max-steps", "8")
    assert second.returncode == 0, second.stderr
    assert "resuming at step 4" in second.stdout
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["rng"][k], b["rng"][k]) for k in a["rng"]) and a["loader"] == b["loader"]
    keys = ("step", "loss", "lr", "norm", "tokens")  # val_loss differs: the split runs also evaluate at their ends
    assert [[r[k] for k in keys] for r in metrics(tmp_path / "straight")] == [
        [r[k] for k in keys] for r in metrics(tmp_path / "split")
    ]


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    cmd = train_cmd(*TINY, "--data", "synthetic", "--max-steps", "100000", "--save-every", "0", "--eval-every", "0")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: checkpoint at step" in out
    step = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"]
    assert step >= 3 and metrics(tmp_path / "out")[-1]["step"] == step
    resumed = run(tmp_path, "--resume", "out", "--max-steps", str(step + 2))
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {step + 2}/{step + 2}" in resumed.stdout


def bad_shard(tmp: Path, kind: str) -> str:
    folder = tmp / kind
    folder.mkdir()
    tokens = np.arange(5000) % 1000
    if kind == "big-ids":
        tokens[200] = 50257  # in the second batch (each reads 4 x 32 + 1 tokens)
    write_shard(folder / "train_000000.bin", tokens[:50] if kind == "short" else tokens)
    raw = bytearray((folder / "train_000000.bin").read_bytes())
    if kind == "magic":
        raw[:4] = np.int32(12345).tobytes()
    elif kind == "version":
        raw[4:8] = np.int32(2).tobytes()
    elif kind == "truncated":
        raw = raw[: HEADER_INTS * 4 + 1000]
    (folder / "train_000000.bin").write_bytes(bytes(raw))
    assert np.frombuffer(bytes(raw[:4]), dtype=np.int32)[0] == (12345 if kind == "magic" else MAGIC)
    return str(folder)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t: ["--data", str(t / "missing.txt")], "missing.txt: no such file or directory"),
        (lambda t: ["--data", bad_shard(t, "magic")], "not a token shard (magic 12345"),
        (lambda t: ["--data", bad_shard(t, "version")], "unsupported shard version 2"),
        (lambda t: ["--data", bad_shard(t, "truncated")], "file has 2024 bytes (truncated?)"),
        (lambda t: ["--data", bad_shard(t, "big-ids")], "token id 50257 >= vocab size 50257"),
        (lambda t: ["--data", bad_shard(t, "short")], "fewer than one micro-batch needs"),
        (lambda t: ["--data", "synthetic", "--seq-len", "65"], "--seq-len 65 exceeds block_size 64"),
        (lambda t: ["--data", "synthetic", "--batch-size", "0"], "--batch-size must be positive"),
        (lambda t: ["--data", "synthetic", "--grad-accum", "3"], "--batch-size 4 does not divide into --grad-accum 3"),
        (lambda t: ["--data", "synthetic", "--dropout", "1.5"], "GPTConfig.dropout must be in [0, 1)"),
        (lambda t: ["--data", "synthetic", "--min-lr", "1"], "--min-lr 1.0 exceeds --lr"),
        (lambda t: ["--data", "synthetic", "--beta1", "1.5"], "--beta1 must be in [0, 1), got 1.5"),
        (lambda t: ["--data", "synthetic", "--beta2", "-1"], "--beta2 must be in [0, 1), got -1.0"),
        (lambda t: ["--data", "synthetic", "--lr", "nan"], "--lr must be a finite number, got nan"),
        (lambda t: ["--data", "synthetic", "--out-dir", str(t / "file" / "out")], "cannot write to --out-dir"),
        (lambda t: ["--resume", str(t / "nowhere")], "is not a directory"),
        (lambda t: ["--resume", str(t)], "holds no checkpoint (ckpt.pt)"),
    ],
)
def test_bad_input(tmp_path, make_args, message):
    (tmp_path / "file").write_text("a regular file")
    done = run(tmp_path, *TINY, "--max-steps", "2", *make_args(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr
    assert message in done.stderr
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "ckpt.pt").exists()


def copy_run(trained: Path, tmp: Path) -> Path:
    out = tmp / "out"
    shutil.copytree(trained, out)
    return out


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path, trained):
    out = copy_run(trained, tmp_path)
    raw = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(raw[: len(raw) // 2])
    done = run(tmp_path, "--resume", "out", "--max-steps", "40")
    assert done.returncode == 1 and "is not a readable checkpoint" in done.stderr and "Traceback" not in done.stderr
    assert (out / "ckpt.pt").read_bytes() == raw[: len(raw) // 2]


def test_checkpoint_of_another_model_is_refused(tmp_path, trained):
    out = copy_run(trained, tmp_path)
    done = run(tmp_path, "--resume", "out", "--preset", "nano")
    assert done.returncode == 1 and "--preset nano differs from the checkpoint's pico" in done.stderr
    assert (out / "ckpt.pt").read_bytes() == (trained / "ckpt.pt").read_bytes()


def test_fresh_run_never_overwrites_a_checkpoint(tmp_path, trained):
    out = copy_run(trained, tmp_path)
    done = run(tmp_path, *TINY, "--data", "synthetic", "--max-steps", "2")
    assert done.returncode == 1 and f"continue it with --resume {Path('out')}" in done.stderr
    assert (out / "ckpt.pt").read_bytes() == (trained / "ckpt.pt").read_bytes()
    assert metrics(out) == metrics(trained)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    done = run(tmp_path, *TINY, "--data", "synthetic", "--max-steps", "50", "--lr", "1e10", "--warmup-steps", "0",
               "--save-every", "1", "--grad-clip", "0")  # fmt: skip
    assert done.returncode == 1 and "is not finite: stopped" in done.stderr and "Traceback" not in done.stderr
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert 1 <= ckpt["step"] < 50 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert f"step {ckpt['step'] + 1} is not finite" in done.stderr


def test_help_documents_every_flag():
    done = subprocess.run(train_cmd("--help"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for flag in ("--preset", "--data", "--max-steps", "--batch-size", "--seq-len", "--grad-accum", "--lr", "--min-lr",
                 "--warmup-steps", "--weight-decay", "--grad-clip", "--eval-every", "--eval-batches", "--sample-every",
                 "--out-dir", "--resume", "--seed", "--device", "--dtype", "--attn", "--compile"):  # fmt: skip
        assert flag in done.stdout


def test_kill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL while checkpoints are written every step (a save takes about as long as a step): never a torn file."""
    cmd = train_cmd(*TINY, "--data", "synthetic", "--max-steps", "100000", "--save-every", "1", "--eval-every", "0")
    for attempt, delay in enumerate((0.0, 0.02, 0.05)):
        proc = subprocess.Popen(cmd if attempt == 0 else train_cmd("--resume", "out", "--max-steps", "100000"),
                                cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE, text=True)  # fmt: skip
        for line in proc.stdout:
            if line.startswith("step ") and int(line.split()[1].split("/")[0]) % 4 == 3:
                time.sleep(delay)
                proc.kill()
                break
        proc.wait(timeout=60)
        ckpt = load_training_checkpoint(tmp_path / "out")
        assert ckpt["step"] >= 2
    resumed = run(tmp_path, "--resume", "out", "--max-steps", str(ckpt["step"] + 1))
    assert resumed.returncode == 0, resumed.stderr
