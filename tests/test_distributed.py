"""DDP and FSDP under torchrun (2 ranks, gloo on CPU) against a single process, and resuming across modes.

Every run is the real command line: `python -m torch.distributed.run --nproc_per_node=2 train.py ...`.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, llmc_shard, run_cli, wait_for_line

from nanogpt2.checkpoint import load_model
from nanogpt2.model import GPT, GPTConfig

TINY = ["--preset", "pico", "--data", "synthetic", "--batch-size", "8", "--seq-len", "32", "--device", "cpu"]
TINY += ["--eval-batches", "1", "--eval-every", "2", "--decay-steps", "4", "--warmup-steps", "1"]


def train(out_dir: Path, *args: str, ranks: int = 1, fsdp: bool = False, check: bool = True):
    """Run train.py as one plain process, or under torchrun: DDP with ranks > 1, FSDP with fsdp=True."""
    launcher = [sys.executable]
    if ranks > 1 or fsdp:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*launcher, str(REPO / "train.py"), *TINY, "--out-dir", str(out_dir), *args] + (["--fsdp"] if fsdp else [])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss, the last record of each step (a resumed run appends)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def max_weight_diff(a: Path, b: Path) -> float:
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs several tests compare, made once: SGD and AdamW, in each mode. They are independent, so they train
    three at a time (most of each is process start-up)."""
    root = tmp_path_factory.mktemp("dist")
    jobs = {}  # name -> (args, train keywords)
    for accum in ("1", "2"):
        # 10 steps, each clipped: with the norm summed in fp32, whose error depends on the sharding, FSDP ended 1.7e-6
        # away from one process here (5e-5 on Shakespeare), DDP 6e-8
        sgd = ["--optimizer", "sgd", "--lr", "0.5", "--max-steps", "10", "--decay-steps", "10", "--grad-clip", "0.2"]
        sgd += ["--grad-accum", accum]
        for mode, kw in (("plain", {}), ("ddp", {"ranks": 2}), ("fsdp", {"ranks": 2, "fsdp": True})):
            jobs[f"sgd-{mode}-{accum}"] = (sgd, kw)
    adamw = ["--lr", "3e-3", "--max-steps", "4"]
    jobs["adamw-plain"], jobs["adamw-fsdp"] = (adamw, {}), (adamw, {"ranks": 2, "fsdp": True})
    for mode, kw in (("fsdp", {"ranks": 2, "fsdp": True}), ("ddp", {"ranks": 2})):  # the first half, to resume
        jobs[f"half-{mode}"] = (["--lr", "3e-3", "--max-steps", "2"], kw)
    made = {name: root / name for name in jobs}
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = {name: pool.submit(train, made[name], *args, **kw) for name, (args, kw) in jobs.items()}
    for future in done.values():
        future.result()  # raises a failed run's assertion
    made["adamw-fsdp-log"] = done["adamw-fsdp"].result().stdout
    return made


@pytest.mark.parametrize("accum", ["1", "2"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sgd_weights_equal_single_process(runs, mode, accum):
    assert min(row["norm"] for row in metrics(runs[f"sgd-plain-{accum}"])) > 0.2  # every step was clipped
    assert max_weight_diff(runs[f"sgd-{mode}-{accum}"], runs[f"sgd-plain-{accum}"]) <= 1e-6
    single = losses(runs[f"sgd-plain-{accum}"])
    assert all(abs(loss - single[step]) <= 1e-5 for step, loss in losses(runs[f"sgd-{mode}-{accum}"]).items())


def test_sgd_training_moved_the_weights(runs):
    """Guards the equivalence test against runs that change nothing: the weights left their initial values."""
    torch.manual_seed(1337)  # train.py's default --seed, set before the model is built
    start = GPT(GPTConfig.from_preset("pico")).state_dict()
    end = load_model(runs["sgd-plain-1"]).state_dict()
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 1e-3


def test_adamw_losses_agree(runs):
    plain, fsdp = losses(runs["adamw-plain"]), losses(runs["adamw-fsdp"])
    assert sorted(plain) == sorted(fsdp) == [1, 2, 3, 4]
    assert all(abs(plain[s] - fsdp[s]) <= 1e-4 for s in plain)


def test_fsdp_shards_parameters_and_optimizer_state(runs):
    total = load_model(runs["adamw-plain"]).num_params()
    lines = [line for line in runs["adamw-fsdp-log"].splitlines() if line.startswith("memory rank")]
    assert len(lines) == 2
    for line in lines:
        params = int(line.split(":")[1].split("param")[0].replace(",", ""))
        optim = int(line.split("|")[1].split("optim")[0].replace(",", ""))
        assert abs(params - total / 2) <= 0.01 * total  # each rank holds half the parameters
        assert abs(optim - total) <= 0.02 * total  # and half of AdamW's two moments (2 x total / 2)
    assert (runs["adamw-fsdp"] / "shards").is_dir()  # sharded checkpoint: no rank wrote the whole model


def test_consolidated_export_of_a_sharded_checkpoint(runs, tmp_path):
    result = run_cli("-m", "nanogpt2.checkpoint", str(runs["adamw-fsdp"]), "--out", str(tmp_path / "model.pt"))
    assert result.returncode == 0, result.stderr
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert exported["model_config"]["n_layer"] == 2
    assert max_weight_diff(tmp_path / "model.pt", runs["adamw-fsdp"]) == 0.0


RESUMES = [("fsdp", "plain"), ("fsdp", "fsdp"), ("fsdp", "ddp"), ("ddp", "fsdp")]  # (first half's mode, then)
MODES = {"plain": {}, "ddp": {"ranks": 2}, "fsdp": {"ranks": 2, "fsdp": True}}  # train()'s keywords


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
    """(first, then) -> (run directory, process) of the first half of `runs` in mode `first`, resumed to step 4 in
    mode `then`; three at a time, like `runs`."""
    root = tmp_path_factory.mktemp("resumed")

    def resume(first: str, then: str):
        run_dir = root / f"{first}-{then}"
        shutil.copytree(runs[f"half-{first}"], run_dir)
        return run_dir, train(run_dir, "--resume", str(run_dir), "--max-steps", "4", check=False, **MODES[then])

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case: pool.submit(resume, *case) for case in RESUMES}
    return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("first, then", RESUMES, ids=lambda m: m)
def test_resume_across_modes_and_world_sizes(runs, resumed, first, then):
    run_dir, result = resumed[first, then]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    uninterrupted, split = losses(runs["adamw-plain"]), losses(run_dir)
    assert all(abs(split[s] - uninterrupted[s]) <= 1e-4 for s in (3, 4))
    assert (run_dir / "shards").is_dir() == (then == "fsdp")  # a whole-file checkpoint leaves no stale shards


@pytest.mark.parametrize("damage", ["one shard file", "all shards"])
def test_damaged_sharded_checkpoint_is_one_clear_error(runs, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["half-fsdp"], run_dir)
    if damage == "one shard file":
        next((run_dir / "shards").glob("*/*.distcp")).unlink()
    else:
        shutil.rmtree(run_dir / "shards")
    result = train(run_dir, "--resume", str(run_dir), "--max-steps", "4", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot resume")
    assert (run_dir / "ckpt.pt").is_file()  # nothing written over


def test_ctrl_c_on_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """SIGINT that reaches one rank only: all ranks agree to save and stop at the same step, none hangs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py")]
    cmd += [*TINY, "--out-dir", str(tmp_path / "out"), "--max-steps", "100000", "--save-every", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if wait_for_line(proc, "step 3/", timeout=120):
            ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, timeout=10)
            os.kill(int(max(ranks.stdout.split(), key=int)), signal.SIGINT)  # the later-started worker only
        out, err = proc.communicate(timeout=60)
    finally:  # a hang fails the test above; leave no job behind
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], timeout=10)
        proc.kill()
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert f"stopped by another rank after step {ckpt['step']}: last good checkpoint" in out, err[-3000:]
    assert ckpt["step"] >= 3 and ckpt["step"] == losses(tmp_path / "out").popitem()[0]


def test_sigterm_to_the_torchrun_group_saves_and_stops_every_rank(tmp_path):
    """What SLURM or Kubernetes does on preemption: SIGTERM to torchrun and its ranks (torchrun forwards it once
    more). Every rank ends its step, the checkpoint is saved, rank 0 says where to resume, no traceback of ours."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py")]
    cmd += [*TINY, "--out-dir", str(tmp_path / "out"), "--max-steps", "100000", "--save-every", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        if wait_for_line(proc, "step 3/", timeout=120):
            os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    step = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"]
    # rank 0 names the signal, or "another rank" when a peer saw it first: both stop after the same step
    stop_line = f"after step {step}: last good checkpoint: step {step}"
    assert any(f"stopped by {who} {stop_line}" in out for who in ("SIGTERM", "another rank")), out[-3000:]
    assert step >= 3 and step == losses(tmp_path / "out").popitem()[0]
    assert proc.returncode != 0 and f'File "{REPO}' not in err, err[-3000:]


def bad_data_on_rank_1(tmp_path: Path) -> list[str]:
    """Flags of shards with a bad token id that rank 1 reads in the first step, rank 0 never."""
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.random.default_rng(0).integers(0, 50000, 4000).astype(np.uint16)
    tokens[200] = 60000  # in rank 1's half of the first micro-batch (8 rows of 32: rank 0 reads tokens 0..128)
    llmc_shard(data / "train_000000.bin", tokens)
    llmc_shard(data / "val_000000.bin", tokens[:1000] % 50000)
    return ["--data", str(data), "--data-order", "sequential"]


def test_bad_data_on_one_rank_stops_every_rank(tmp_path):
    t0 = time.perf_counter()
    result = train(tmp_path / "out", *bad_data_on_rank_1(tmp_path), "--max-steps", "4", ranks=2, check=False)
    assert result.returncode != 0
    assert time.perf_counter() - t0 < 60
    assert "error: [rank 1] token id 60000 >= vocab size 50257" in result.stderr
    # torchrun's summary names that line as the rank's failure, read from the error file the rank wrote
    failure = result.stderr.split("rank      : 1 (local_rank: 1)")[1].split("------")[0]
    assert "traceback : error: [rank 1] token id 60000 >= vocab size 50257" in failure, result.stderr[-3000:]


def test_a_failing_ranks_peer_stops_with_one_line(tmp_path):
    """Rank 1 stops on bad data while rank 0 waits in a collective: rank 0 says so in one line, no traceback.

    The ranks are started by hand (torchrun's environment without torchrun), so no launcher stops rank 0 first and
    each rank's stderr is its own.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, *bad_data_on_rank_1(tmp_path), "--max-steps", "4"]
    cmd += ["--out-dir", str(tmp_path / "out"), "--dist-timeout", "60"]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [1, 1], errs
    shard = tmp_path / "data" / "train_000000.bin"
    assert errs[1].strip().splitlines() == [
        f"error: [rank 1] token id 60000 >= vocab size 50257 at {shard} (token 200)"
    ]
    peer = "error: [rank 0] stopped: another rank failed or timed out (see above)"
    assert errs[0].strip().splitlines() == [peer], errs[0][-3000:]


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_launcher_leaves_no_rank_and_one_writer(tmp_path):
    """kill -9 of torchrun's process group: its ranks (in sessions of their own) die too, within seconds. While they
    run, a second run on their directory is refused, naming rank 0's pid; once they are gone, it may resume."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py")]
    cmd += [*TINY, "--out-dir", str(out), "--max-steps", "100000", "--save-every", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # fmt: skip
    workers: list[int] = []
    try:
        if wait_for_line(proc, "step 3/", timeout=120):
            ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, timeout=10)
            workers = [int(pid) for pid in ranks.stdout.split()]
        assert len(workers) == 2
        second = train(out, "--resume", str(out), "--max-steps", "100000", check=False)
        assert second.returncode == 1 and "is in use by a running run (pid " in second.stderr, second.stderr[-3000:]
        assert any(f"(pid {pid})" in second.stderr for pid in workers)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, workers)), "a rank outlived its launcher"
    finally:
        for pid in [proc.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    resumed = train(out, "--resume", str(out), "--max-steps", "6")
    assert resumed.returncode == 0


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device")
def test_fsdp_on_nccl(tmp_path):
    train(tmp_path / "out", "--device", "cuda", "--max-steps", "2", ranks=1, fsdp=True)
    assert (tmp_path / "out" / "shards").is_dir()
