"""train.py through its real CLI: a run whose loss falls, bitwise resume, Ctrl-C, and every bad input.

Runs are subprocesses, or run in this process (`run_in_process`) where how the process exits is not the subject; all
with cwd and NANOGPT2_DATA_DIR in tmp_path, so nothing is written into the repository.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, assert_bad_input, cpu_config, llmc_shard, run_cli, run_main, snapshot, wait_for_line

import train as train_script
from nanogpt2.checkpoint import export_main, load_checkpoint, load_model
from nanogpt2.config import (
    ConfigError,
    TrainConfig,
    auto_grad_accum,
    build_parser,
    fitting_grad_accum,
    micro_batch_fit,
    parse_duration,
    parse_flags,
)
from nanogpt2.model import GPTConfig
from nanogpt2.prepare import prepare
from nanogpt2.runtime import card_peak_flops
from nanogpt2.tokenizer import EOT, VOCAB_SIZE, get_encoding

TINY = ["--preset", "pico", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2"]


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *args]


def env_for(tmp: Path) -> dict:
    return {**os.environ, "NANOGPT2_DATA_DIR": str(tmp / "data-cache"), "PYTHONPATH": str(REPO)}


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("train.py", *args, cwd=tmp, env=env_for(tmp))


def run_in_process(tmp: Path, monkeypatch, capfd, *args: str) -> subprocess.CompletedProcess:
    """`run` without the process start: train.py's main(args) through run_main, with cwd and NANOGPT2_DATA_DIR in
    `tmp`. What a run leaves set in its process is put back or kept out: malloc's settings (process-wide: not
    changed), torch's RNG and fp32 matmul precision, the signal handlers, and the run directory's lock (held till the
    process exits: closed)."""
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("NANOGPT2_DATA_DIR", str(tmp / "data-cache"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, as `run` starts it
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(train_script, "keep_freed_memory", lambda: False)
    opened_before = open_files_under(tmp)
    precision = torch.get_float32_matmul_precision()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with torch.random.fork_rng():
            return run_main(train_script.main, *args, capfd=capfd)
    finally:
        torch.set_float32_matmul_precision(precision)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for fd, path in open_files_under(tmp).items():
            if opened_before.get(fd) != path:
                os.close(fd)


def open_files_under(folder: Path) -> dict[int, str]:
    """This process's open descriptors of paths in `folder` (itself included): descriptor -> path."""
    root, found = str(folder.resolve()), {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir used is gone
            path = os.readlink(f"/proc/self/fd/{name}")
            if path == root or path.startswith(root + os.sep):
                found[int(name)] = path
    return found


@pytest.fixture
def run_here(tmp_path, monkeypatch, capfd):
    """`run` in tmp_path, in this process: run_here(*args) is run_in_process(tmp_path, ..., *args)."""
    return functools.partial(run_in_process, tmp_path, monkeypatch, capfd)


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
    assert record["model_config"]["n_layer"] == 2 and record["train_config"]["max_steps"] == 30 and record["git_commit"]
    assert {"torch", "python"} <= record["versions"].keys() and record["device"].startswith("cpu")
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["loader"]["order"] == "shuffled" and ckpt["loader"]["window"] == 30 * 4


@pytest.mark.slow
def test_resume_is_bitwise(tmp_path, shards):
    common = [*TINY, "--data", str(shards), "--dropout", "0.1", "--grad-accum", "2", "--eval-every", "3"]
    with ThreadPoolExecutor(max_workers=2) as pool:  # independent runs, mostly process start-up: side by side
        straight, first = pool.map(
            lambda args: run(tmp_path, *common, *args),
            [
                ["--max-steps", "8", "--out-dir", "straight"],
                ["--max-steps", "4", "--decay-steps", "8", "--out-dir", "split"],
            ],
        )
    assert straight.returncode == 0, straight.stderr
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


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, signum):
    """Ctrl-C, or SIGTERM as timeout, SLURM, Kubernetes and preemptions send it: the step ends, a checkpoint is
    saved, the last line says where to resume, and the exit status is the signal's (130, 143)."""
    cmd = train_cmd(*TINY, "--data", "synthetic", "--max-steps", "100000", "--save-every", "0", "--eval-every", "0")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    if wait_for_line(proc, "step 3/", timeout=120):
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    step = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"]
    last = out.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert (
        last == f"stopped by {name} after step {step}: last good checkpoint: step {step} in out; continue with "
        "--resume out"
    )
    assert step >= 3 and metrics(tmp_path / "out")[-1]["step"] == step
    resumed = run(tmp_path, "--resume", "out", "--max-steps", str(step + 2))
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {step + 2}/{step + 2}" in resumed.stdout


def test_time_limit_stops_with_a_checkpoint_before_it_runs_out(tmp_path):
    started = time.monotonic()
    done = run(
        tmp_path, *TINY, "--data", "synthetic", "--max-steps", "100000", "--eval-every", "0", "--time-limit", "4s"
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60  # stopped by the limit, not by --max-steps
    step = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"]
    assert step >= 1 and metrics(tmp_path / "out")[-1]["step"] == step
    assert done.stdout.strip().splitlines()[-1] == (
        f"stopped by --time-limit after step {step}: last good checkpoint: step {step} in out; continue with "
        "--resume out"
    )


@pytest.mark.parametrize("text, seconds", [("3h50m", 13800), ("90m", 5400), ("1h30m15s", 5415), ("45s", 45),
                                           ("3600", 3600), ("2.5h", 9000)])  # fmt: skip
def test_durations_read_as_a_batch_job_writes_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "3d", "1h-5m", "m"])
def test_a_bad_duration_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a duration"):
        parse_duration(text)


def bad_shard(tmp: Path, kind: str) -> str:
    folder = tmp / kind
    folder.mkdir()
    tokens = np.arange(5000) % 1000
    if kind == "big-ids":
        tokens[200] = 50257  # in the second batch (each reads 4 x 32 + 1 tokens)
    kwargs = {"magic": dict(magic=12345), "version": dict(version=2), "truncated": dict(count=5000)}.get(kind, {})
    length = {"short": 50, "one-step": 100, "truncated": 500}.get(kind, len(tokens))
    llmc_shard(folder / "train_000000.bin", tokens[:length], **kwargs)
    return str(folder)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t: ["--data", str(t / "missing.txt")], "missing.txt: no such file or directory"),
        (lambda t: ["--data", bad_shard(t, "magic")], "not a token shard (magic 12345"),
        (lambda t: ["--data", bad_shard(t, "version")], "unsupported shard version 2"),
        (lambda t: ["--data", bad_shard(t, "truncated")], "file has 2024 bytes (truncated?)"),
        (lambda t: ["--data", str(t / "empties")], "holds no non-empty text files"),
        (lambda t: ["--data", str(t / "empty.txt")], "empty.txt: the file is empty"),
        (lambda t: ["--data", bad_shard(t, "big-ids")], "token id 50257 >= vocab size 50257"),
        (lambda t: ["--data", bad_shard(t, "short")], "fewer than one micro-batch needs"),
        (lambda t: ["--data", bad_shard(t, "one-step"), "--grad-accum", "2"], "fewer than one step's --batch-size 4"),
        (lambda t: ["--data", "synthetic", "--data-order", "random"], "--data-order: invalid choice: 'random'"),
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
        (lambda t: ["--data", str(t / "latin1.txt")], "latin1.txt: byte 3 (0xe9) is not UTF-8"),
        (lambda t: ["--data", "synthetic", "--dist-timeout", "0"], "--dist-timeout must be a positive number"),
        (lambda t: ["--data", "synthetic", "--cuda-graphs"], "--cuda-graphs needs a CUDA device and --compile"),
        (lambda t: ["--data", "synthetic", "--log-every", "0"], "--log-every must be positive"),
    ],
)
def test_bad_input(tmp_path, run_here, make_args, message):
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empties").mkdir()
    (tmp_path / "empties" / "a.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("Café au lait".encode("latin-1"))
    done = run_here(*TINY, "--max-steps", "2", *make_args(tmp_path))
    assert_bad_input(done, message)
    if "token id" not in message:  # found in the first batches only, after the run began
        assert not (tmp_path / "out").exists() and not (tmp_path / "data-cache").exists()  # nothing left behind


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--data", "synthetic", "--data-order", "random"], 2, "--data-order: invalid choice: 'random'"),
        (["--data", "synthetic", "--batch-size", "0"], 1, "--batch-size must be positive"),
        (["--data", "missing.txt"], 1, "missing.txt: no such file or directory"),
    ],
)
def test_bad_input_exits_with_its_status_and_one_line(tmp_path, args, status, message):
    """What the in-process cases above cannot see, for one refused flag of argparse's, one of the config's and one
    bad corpus: the process's exit status, and a stderr of one line (no warning, no traceback)."""
    done = run(tmp_path, *TINY, "--max-steps", "2", *args)
    assert done.returncode == status, done.stderr[-3000:]
    assert_bad_input(done, message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data-cache").exists()


def copy_run(trained: Path, tmp: Path) -> Path:
    out = tmp / "out"
    shutil.copytree(trained, out)
    return out


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path, trained, run_here):
    out = copy_run(trained, tmp_path)
    raw = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(raw[: len(raw) // 2])
    done = run_here("--resume", "out", "--max-steps", "40")
    assert done.returncode == 1 and "is not a readable checkpoint" in done.stderr and "Traceback" not in done.stderr
    assert (out / "ckpt.pt").read_bytes() == raw[: len(raw) // 2]


def test_checkpoint_of_another_model_is_refused(tmp_path, trained, run_here):
    out = copy_run(trained, tmp_path)
    done = run_here("--resume", "out", "--preset", "nano")
    assert done.returncode == 1 and "--preset nano differs from the checkpoint's pico" in done.stderr
    assert (out / "ckpt.pt").read_bytes() == (trained / "ckpt.pt").read_bytes()


def test_fresh_run_never_overwrites_a_checkpoint(tmp_path, trained, run_here):
    out = copy_run(trained, tmp_path)
    done = run_here(*TINY, "--data", "synthetic", "--max-steps", "2")
    assert done.returncode == 1 and f"continue it with --resume {Path('out')}" in done.stderr
    assert (out / "ckpt.pt").read_bytes() == (trained / "ckpt.pt").read_bytes()
    assert metrics(out) == metrics(trained)


# A process that holds a run directory as a running run does.
HOLD = "import sys, time; from pathlib import Path; from nanogpt2.run import lock_out_dir; "
HOLD += "lock_out_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)"


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "fresh"])
def test_a_second_writer_is_refused_and_changes_nothing(tmp_path, trained, run_here, resume):
    out = copy_run(trained, tmp_path)
    (out / ".ckpt.pt.tmp-99999").write_bytes(b"a killed save's")  # the running run's to clean, not the refused one's
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env_for(tmp_path), stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert wait_for_line(holder, "locked", timeout=60) == "locked\n"
        before = snapshot(out)
        done = run_here(*(["--resume", "out"] if resume else [*TINY, "--data", "synthetic", "--max-steps", "2"]))
        assert_bad_input(done, f"out is in use by a running run (pid {holder.pid})", unchanged={out: before})
    finally:
        holder.kill()
        holder.wait(timeout=60)


@pytest.mark.slow
def test_a_run_that_failed_before_its_first_checkpoint_can_be_rerun(tmp_path, run_here):
    """It left metrics.jsonl and run.json but no checkpoint: the same command, once the data is fixed, runs."""
    data = tmp_path / "shards"
    data.mkdir()
    tokens = np.arange(5000) % 1000
    llmc_shard(data / "val_000000.bin", tokens[:1000])
    tokens[300] = 50257  # read in step 3: each step reads 4 x 32 + 1 tokens, in order
    llmc_shard(data / "train_000000.bin", tokens)
    args = [*TINY, "--data", str(data), "--data-order", "sequential", "--max-steps", "4"]
    assert_bad_input(run_here(*args), "token id 50257 >= vocab size 50257")
    out = tmp_path / "out"
    assert [row["step"] for row in metrics(out)] == [1, 2] and not (out / "ckpt.pt").exists()
    tokens[300] = 7
    llmc_shard(data / "train_000000.bin", tokens)
    rerun = run_here(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "holds the records of a run that left no checkpoint; replacing them" in rerun.stdout
    assert [row["step"] for row in metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "run.json").read_text())["train_config"]["max_steps"] == 4


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "fresh"])
def test_temp_files_of_killed_saves_are_removed(tmp_path, trained, run_here, resume):
    out = copy_run(trained, tmp_path) if resume else tmp_path / "out"
    out.mkdir(exist_ok=True)
    stale = [out / ".ckpt.pt.tmp-99999", out / ".metrics.jsonl.tmp-12345", out / ".run.json.tmp-4242"]
    for path in stale:
        path.write_bytes(b"left by a process killed mid-write")
    done = run_here(*(["--resume", "out", "--max-steps", "31"] if resume else [*TINY, "--data", "synthetic",
                                                                              "--max-steps", "1"]))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not any(path.exists() for path in stale)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, run_here):
    done = run_here(*TINY, "--data", "synthetic", "--max-steps", "50", "--lr", "1e10", "--warmup-steps", "0",
                    "--save-every", "1", "--grad-clip", "0")  # fmt: skip
    assert done.returncode == 1 and "is not finite: stopped" in done.stderr and "Traceback" not in done.stderr
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert 1 <= ckpt["step"] < 50 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert f"step {ckpt['step'] + 1} is not finite" in done.stderr
    hint = f"last good checkpoint: step {ckpt['step']} in out; continue with --resume out"
    assert done.stderr.rstrip().endswith(hint)


def test_help_documents_every_flag(run_here):
    done = run_here("--help")
    assert done.returncode == 0
    actions = [a for a in build_parser()._actions if a.dest != "help"]
    assert {a.dest for a in actions} == set(TrainConfig.__dataclass_fields__)  # every config field is a flag
    for action in actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
        assert action.option_strings[0] in done.stdout
    attn_help = next(a.help for a in actions if a.dest == "attn")
    assert "dropout" in attn_help and "SDPA" in attn_help  # --attn triton with dropout: what runs is said


def test_triton_with_dropout_says_attention_runs_through_sdpa():
    notes = TrainConfig(attn="triton").notes(GPTConfig(dropout=0.1))
    assert len(notes) == 1 and "SDPA" in notes[0]
    assert (
        TrainConfig(attn="triton").notes(GPTConfig()) == []
        and TrainConfig(attn="torch").notes(GPTConfig(dropout=0.1)) == []
    )


@pytest.mark.parametrize(
    "flags, note",
    [
        (["--window", "256"], "window 256 is at least --seq-len 128: every query sees all earlier tokens"),
        (["--window", "1000", "--block-size", "256"], "window 1000 is at least --seq-len 128"),
        (["--window", "128"], "window 128 is at least --seq-len 128"),
        (["--n-kv-head", "4"], "--n-kv-head 4 equals the model's 4 heads: plain multi-head attention"),
        (["--block-size", "2048"], "--block-size 2048 exceeds --seq-len 128: training sequences stay 128 tokens"),
    ],
)
def test_a_variant_flag_that_changes_nothing_says_so(flags, note):
    cfg, model = cpu_config(*flags)
    assert any(line.startswith(note) for line in cfg.notes(model)), cfg.notes(model)


@pytest.mark.parametrize(
    "flags", [["--window", "127"], ["--n-kv-head", "2"], ["--block-size", "512", "--seq-len", "512"]]
)
def test_a_variant_flag_that_changes_the_model_draws_no_note(flags):
    cfg, model = cpu_config(*flags)
    plain_cfg, plain_model = cpu_config()
    assert cfg.ineffective_flags(model) == [] and (model, cfg.seq_len) != (plain_model, plain_cfg.seq_len)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("batch_size", [1, 4, 8, 12, 20, 44, 48, 64, 100, 96])
def test_automatic_grad_accum_divides_the_batch(batch_size, world_size):
    if batch_size % world_size:
        with pytest.raises(ConfigError, match=f"--batch-size {batch_size} does not split evenly across"):
            auto_grad_accum(batch_size, world_size, 8)
        return
    accum = auto_grad_accum(batch_size, world_size, 8)
    assert batch_size % (accum * world_size) == 0 and batch_size // (accum * world_size) >= min(
        8, batch_size // world_size
    )


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("max_rows", [1, 7, 16, 64, 512])
def test_cuda_micro_batch_is_the_fewest_micro_steps_that_fit(world_size, max_rows):
    """GPT-2's 0.5M-token batch (--batch-size 512 --seq-len 1024) at any world size: micro-batches of at most the
    rows that fit, the fewest micro-steps, the global batch unchanged."""
    per_rank = 512 // world_size
    accum = fitting_grad_accum(512, world_size, max_rows)
    assert per_rank % accum == 0 and per_rank // accum <= max_rows
    assert all(per_rank % a or per_rank // a > max_rows for a in range(1, accum))


def test_cuda_micro_batch_estimate_scales_with_free_memory():
    """GPT-2 at 1024 tokens: about 0.6 GiB a sequence; 64 sequences on an 80 GB H100 (llm.c's micro-batch there), 128
    on a 141 GB H200, at least one on a card too small (which then fails with CUDA's own out-of-memory error)."""
    gpt2 = GPTConfig.from_preset("gpt2", vocab_pad_multiple=64)
    fits = {gib: micro_batch_fit(gpt2, 1024, gib * 2**30)[0] for gib in (1, 40, 80, 141)}
    assert fits == {1: 1, 40: 32, 80: 64, 141: 128}
    assert micro_batch_fit(gpt2, 512, 80 * 2**30)[0] == 128  # half the tokens a sequence, twice the sequences


def test_defaults_compile_and_pad_the_vocabulary_on_cuda_only():
    cpu = TrainConfig()
    cpu.fill_defaults(torch.device("cpu"), world_size=1)
    cuda = TrainConfig()
    cuda.fill_defaults(torch.device("cuda"), world_size=1)  # no GPU needed: only the defaults are read
    assert (cpu.compile, cpu.log_every, cpu.vocab_pad_multiple) == (False, 1, 1)
    assert (cuda.compile, cuda.log_every, cuda.vocab_pad_multiple, cuda.grad_accum) == (True, 10, 64, None)
    assert cuda.model_config().padded_vocab_size == 50304
    assert TrainConfig(**parse_flags(["--no-compile"])).compile is False


def test_log_every_reads_the_device_at_log_points_and_keeps_every_step(tmp_path, run_here):
    """Log lines every --log-every steps, at the first step and at the end; metrics.jsonl still has every step, each
    timed as its interval's mean."""
    done = run_here(*TINY, "--data", "synthetic", "--max-steps", "8", "--log-every", "3", "--eval-every", "0")
    assert done.returncode == 0, done.stderr
    logged = [int(line.split()[1].split("/")[0]) for line in done.stdout.splitlines() if " | lr " in line]
    assert logged == [1, 3, 6, 8]
    rows = metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[3]["ms"] == rows[4]["ms"] == rows[5]["ms"] != rows[6]["ms"]  # steps 4-6: one interval


def test_batch_size_44_on_cpu_runs(tmp_path, run_here):
    done = run_here("--preset", "pico", "--data", "synthetic", "--batch-size", "44", "--seq-len", "16",
                    "--max-steps", "1", "--eval-batches", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "run.json").read_text())["train_config"]["grad_accum"] == 4


def test_help_example_runs_with_the_default_seq_len(tmp_path, run_here):
    """pico's block size (64) is below the CPU default --seq-len (128): the default shrinks to fit."""
    done = run_here("--preset", "pico", "--data", "synthetic", "--max-steps", "2", "--eval-batches", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "run.json").read_text())["train_config"]["seq_len"] == 64


def test_resumed_run_keeps_its_device(tmp_path, monkeypatch, trained, run_here):
    """A --device cpu run resumed on a machine with a GPU stays on the CPU (here the GPU is pretended)."""
    shutil.copytree(trained, tmp_path / "out")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    done = run_here("--resume", "out", "--max-steps", "31")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "out" / "run-resume-30.json").read_text())
    assert (
        record["train_config"]["device"] == "cpu"
        and record["device"].startswith("cpu")
        and record["train_config"]["attn"] == "torch"
    )


def test_step_time_ends_after_the_optimizer_work(monkeypatch, run_here):
    """Each step's clock stops after its optimizer step and a device sync, so async GPU work is not billed later."""
    events = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW, "step", lambda self, *a, **k: events.append("step") or real_step(self, *a, **k)
    )
    monkeypatch.setattr(train_script, "synchronize", lambda device: events.append("sync"))
    clock = time.perf_counter
    monkeypatch.setattr(train_script.time, "perf_counter", lambda: events.append("clock") or clock())
    done = run_here(*TINY, "--data", "synthetic", "--max-steps", "3")
    assert done.returncode == 0, done.stderr
    order = "".join({"step": "s", "sync": "y", "clock": "c"}[e] for e in events)
    assert order.count("s") == 3 and order.count("syc") == 3, order  # step, sync, then the clock read


def test_resumed_run_reports_the_same_steps_everywhere(tmp_path, trained, run_here):
    out = copy_run(trained, tmp_path)
    done = run_here("--resume", "out", "--max-steps", "33")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 33 and summary["steps_this_run"] == 3
    assert "done: 33 steps (3 in this run) in" in done.stdout
    sample = done.stdout.split("sample:\n", 1)[1]  # printed as text, not as a Python repr
    assert not sample.startswith(("'", '"'))


def test_files_are_readable_by_the_group(trained):
    for path in trained.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, f"{path} is {oct(path.stat().st_mode)}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "nowhere.txt"], "nowhere.txt: no such file or directory"),
        (["--data", "synthetic", "--batch-size", "0"], "--batch-size must be positive"),
        (["--data", "synthetic", "--dropout", "2"], "GPTConfig.dropout must be in [0, 1)"),
        (["--data", "synthetic", "--preset", "gpt5"], "argument --preset: invalid choice: 'gpt5'"),
        (["--data", "synthetic", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    ],
)
def test_the_real_error_comes_before_the_existing_run(tmp_path, trained, run_here, args, message):
    """A fresh run into out/, which holds a run: the bad flag or data is reported, not the run, and out/ is kept."""
    out = copy_run(trained, tmp_path)
    before = snapshot(out)
    done = run_here(*TINY, "--max-steps", "2", *args)
    assert_bad_input(done, message, unchanged={out: before})


@pytest.mark.parametrize("flag", ["--out", "--hf"])
def test_export_refuses_to_overwrite(tmp_path, trained, flag):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    before = snapshot(tmp_path / "taken")
    done = run_cli("-m", "nanogpt2.checkpoint", str(trained), flag, str(tmp_path / "taken"))
    assert_bad_input(done, "exists; not overwriting it", unchanged={tmp_path / "taken": before})


def test_export_checks_the_hf_target_before_writing_anything(tmp_path, capfd, run_here):
    done = run_here(*TINY, "--data", "synthetic", "--pos-emb", "rope", "--max-steps", "1")
    assert done.returncode == 0, done.stderr
    export = run_main(export_main, str(tmp_path / "out"), "--out", str(tmp_path / "m.pt"), "--hf", str(tmp_path / "hf"),
                      capfd=capfd)  # fmt: skip
    assert_bad_input(export, "Hugging Face's GPT-2 cannot express pos_emb='rope'")
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "hf").exists()
    nothing = run_main(export_main, str(tmp_path / "out"), capfd=capfd)
    assert_bad_input(nothing, "nothing to do: give --out FILE, --hf DIR or both")


TOKENIZER_TEXTS = [
    "ROMEO: hello",
    "To be, or not to be, that is the question:",
    "  leading spaces and trailing ones   ",
    "tabs\tand\nnewlines\n\n\nthree of them",
    "Numbers 1234567 and 3.14159, dates 2026-12-05.",
    "naïve café, Übermäßig, smörgåsbord",
    "日本語のテキストと中文",
    "emoji 🤖🚀 and symbols ∑∫√",
    "don't won't it's we'll they've I'm",
    "CamelCaseWords and snake_case_words and URLs https://example.com/a?b=c",
    "<html><body>markup & entities &amp;</body></html>",
    "",
]


def test_export_writes_a_hf_directory_with_gpt2_s_tokenizer(tmp_path, capfd, trained):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    done = run_main(export_main, str(trained), "--hf", str(tmp_path / "hf"), capfd=capfd)
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert written == ["config.json", "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json"]
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(hf_tokenizer) == VOCAB_SIZE and hf_tokenizer.eos_token_id == EOT
    ids = [get_encoding().encode_ordinary(text) for text in TOKENIZER_TEXTS]
    assert [hf_tokenizer.encode(text) for text in TOKENIZER_TEXTS] == ids
    assert [hf_tokenizer.decode(i) for i in ids] == TOKENIZER_TEXTS
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([ids[0]])
    with torch.no_grad():
        assert (hf_model(prompt).logits - load_model(trained)(prompt)[0]).abs().max() <= 1e-4


@pytest.mark.slow
def test_compiled_run_samples_without_recompiling(tmp_path):
    """--compile compiles the whole model for training; the closing sample (KV-cache decoding, a new shape every
    token, over 4 blocks) runs eagerly instead of hitting torch.compile's recompile limit."""
    done = run(tmp_path, *TINY, "--n-layer", "4", "--data", "synthetic", "--max-steps", "1", "--compile")
    assert done.returncode == 0, done.stderr
    assert "sample:" in done.stdout and "recompile" not in done.stderr, done.stderr[-2000:]


# train.py (argv[1], its flags after it) with torch.save stalled inside its third save of a checkpoint to a file:
# half the bytes written into write_atomic's temp file, a line naming that file printed, then a pause to be killed in.
STALL_IN_THIRD_SAVE = """
import io, os, runpy, sys, time
import torch

real_save, saves = torch.save, 0


def stalling_save(obj, f, *args, **kwargs):
    global saves
    if isinstance(f, (str, os.PathLike)):
        return real_save(obj, f, *args, **kwargs)
    saves += 1
    if saves < 3:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print("mid-save", os.readlink(f"/proc/self/fd/{f.fileno()}"), flush=True)
    time.sleep(120)
    f.write(data[len(data) // 2 :])


torch.save = stalling_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names the temp file from /proc/self/fd")
def test_kill_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL inside a checkpoint save, with half of step 3's checkpoint in write_atomic's temp file: ckpt.pt is
    still step 2's, whole; the torn temp file is all that is left of step 3; the run resumes from step 2 and removes
    it."""
    (tmp_path / "stall.py").write_text(STALL_IN_THIRD_SAVE)
    flags = [*TINY, "--data", "synthetic", "--max-steps", "100", "--save-every", "1", "--eval-every", "0"]
    cmd = [sys.executable, str(tmp_path / "stall.py"), str(REPO / "train.py"), *flags]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        marker = wait_for_line(proc, "mid-save ", timeout=120)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert marker is not None, "the run ended, or took over 2 minutes, before its third save"
    out = tmp_path / "out"
    temp = Path(marker.split(" ", 1)[1].strip())
    assert temp == out.resolve() / f".ckpt.pt.tmp-{proc.pid}" and 0 < temp.stat().st_size  # inside write_atomic
    assert load_checkpoint(out)["step"] == 2 and metrics(out)[-1]["step"] == 3  # step 3 was logged, not saved
    resumed = run(tmp_path, "--resume", "out", "--max-steps", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 2" in resumed.stdout and not temp.exists()
    assert load_checkpoint(out)["step"] == 4


def test_checkpoint_of_an_older_format_is_one_clear_line(tmp_path, trained, run_here):
    """A checkpoint of nanogpt2 0.1.0 (its keys "config" and "args", no "format") is refused by name, unchanged."""
    out = copy_run(trained, tmp_path)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["config"], ckpt["args"] = ckpt.pop("model_config"), ckpt.pop("train_config")
    del ckpt["format"]
    torch.save(ckpt, out / "ckpt.pt")
    before = snapshot(out)
    refused = run_here("--resume", str(out), "--max-steps", "40")
    assert_bad_input(refused, "is a checkpoint of another nanogpt2 version (format 1, this version reads 2)",
                     unchanged={out: before})  # fmt: skip


@pytest.mark.parametrize(
    "name, tflops",
    [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
     ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10", 125), ("NVIDIA L4", 121),
     ("NVIDIA L40S", 362), ("NVIDIA A10G", None), ("Tesla T4", None), ("NVIDIA GeForce RTX 4090", None)],
)  # fmt: skip
def test_peak_flops_by_card_name(name, tflops):
    """MFU's peak from the card's name, variants before their family; an unknown card gets none (no MFU printed)."""
    assert card_peak_flops(name) == (tflops * 1e12 if tflops else None)


def test_keep_freed_memory_serves_big_blocks_from_the_heap():
    """After keep_freed_memory a 256 MB tensor comes from malloc's heap (below the program break), where a freed block
    stays mapped for the next one, not from its own mmap (far above it), which glibc unmaps on free; without it, the
    same tensor is mmap'd. Fresh processes: the setting is process-wide. (A page-fault count was tried and dropped:
    ~0 faults when run alone, 65,536 inside the full suite on the same machine, for a reason outside the process.)"""
    code = (
        "import ctypes, sys, torch\n"
        "from nanogpt2.runtime import keep_freed_memory\n"
        "kept = keep_freed_memory() if sys.argv[1] == 'keep' else None\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]\n"
        "x = torch.ones(2**26)\n"
        "print(kept, x.data_ptr() < libc.sbrk(0))\n"
    )
    run = lambda mode: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, mode], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    kept, in_heap = run("keep")
    if kept != "True":
        pytest.skip("no glibc mallopt here")
    assert in_heap == "True"
    assert run("default") == ["None", "False"]  # the control: glibc's default mmaps it
