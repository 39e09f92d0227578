"""A full disk loses nothing: a write of a save or of a run record that fails (ENOSPC, injected) leaves the last good
checkpoint and the records intact, no temp file behind, one line naming the path and the errno and where to resume;
the resumed run then ends bitwise where an uninterrupted one does.

The failure is injected below train.py: a wrapper script makes every write to the n-th file opened whose name holds
a given text raise OSError(ENOSPC), whoever opens it (write_atomic, torch.save, the metrics log, DCP's shard writer).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_bad_input, assert_same_model

INJECT = """
import builtins, errno, io, os, runpy, sys

target, nth, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
opened = 0


class FullDisk:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def injecting(real_open, name_of):
    def open_(*args, **kwargs):
        global opened
        f = real_open(*args, **kwargs)
        mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        if any(c in mode for c in "wax+") and target in str(name_of(args)):
            opened += 1
            if opened == nth:
                return FullDisk(f)
        return f
    return open_


builtins.open = io.open = injecting(io.open, lambda args: args[0])
os.fdopen = injecting(os.fdopen, lambda args: os.readlink(f"/proc/self/fd/{args[0]}"))
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""
pytestmark = pytest.mark.slow  # subprocess runs of train.py

TINY = ["--preset", "pico", "--data", "synthetic", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1"]
TINY += ["--eval-every", "2", "--save-every", "2", "--max-steps", "4", "--device", "cpu"]


def train(tmp: Path, *args: str, inject: tuple[str, int] | None = None, ranks: int = 1):
    wrapper = tmp / "inject.py"
    wrapper.write_text(INJECT)
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    script = str(REPO / "train.py")
    cmd = [*launcher, str(wrapper), *map(str, inject), script] if inject else [*launcher, script]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": str(REPO), "NANOGPT2_DATA_DIR": str(tmp / "data")}
    return subprocess.run([*cmd, *TINY, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    done = train(tmp)
    assert done.returncode == 0, done.stderr
    return tmp / "out"


@pytest.mark.parametrize(
    "target, nth, message, saved",
    [
        ("ckpt.pt", 2, "cannot write out/ckpt.pt: ENOSPC (No space left on device); last good checkpoint: step 2 in "
                       "out; continue with --resume out", 2),
        ("metrics.jsonl", 1, "cannot write out/metrics.jsonl: ENOSPC (No space left on device); no checkpoint was "
                             "written yet", None),
        ("run.json", 1, "cannot write out/run.json: ENOSPC (No space left on device)", None),
        ("summary.json", 1, "cannot write out/summary.json: ENOSPC (No space left on device)", 4),
    ],
)  # fmt: skip
def test_a_failed_write_keeps_the_last_checkpoint_and_names_the_errno(
    tmp_path, uninterrupted, target, nth, message, saved
):
    done = train(tmp_path, inject=(target, nth))
    assert_bad_input(done, message)
    out = tmp_path / "out"
    assert not list(out.glob(".*.tmp-*")), "a temp file was left behind"
    if saved is None:
        assert not (out / "ckpt.pt").exists()
        return
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == saved
    if saved < 4:  # the resumed run ends bitwise where the uninterrupted one did
        resumed = train(tmp_path, "--resume", "out")
        assert resumed.returncode == 0, resumed.stderr
    assert_same_model(*(torch.load(d / "ckpt.pt", weights_only=True) for d in (out, uninterrupted)), step=4)


@pytest.mark.slow
def test_a_failed_shard_write_keeps_the_last_sharded_checkpoint(tmp_path):
    """FSDP on 2 gloo ranks: a shard file of the second save fails; every rank stops, ckpt.pt still points to the
    first save's shards, and the run resumes from them."""
    done = train(tmp_path, "--fsdp", inject=(".distcp", 2), ranks=2)
    assert done.returncode != 0 and f'File "{REPO}' not in done.stderr, done.stderr[-3000:]  # no traceback of ours
    for rank in (0, 1):
        assert (
            f"error: [rank {rank}] cannot write sharded checkpoint out/shards/step_00000004: rank 0: ENOSPC (No "
            "space left on device); last good checkpoint: step 2 in out"
        ) in done.stderr, done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and (tmp_path / "out" / ckpt["sharded"] / ".metadata").is_file()
    resumed = train(tmp_path, "--fsdp", "--resume", "out", ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 4


@pytest.fixture
def small_filesystem(tmp_path):
    """A 60 MB tmpfs: room for one pico checkpoint (40 MB), not for the temp file of the next beside it."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount)], capture_output=True, timeout=30
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_a_real_full_disk_keeps_the_last_checkpoint(tmp_path, small_filesystem, uninterrupted):
    out = small_filesystem / "out"
    done = train(tmp_path, "--out-dir", str(out))
    assert_bad_input(done, f"cannot write {out}/ckpt.pt: ENOSPC (No space left on device); last good checkpoint: "
                           f"step 2 in {out}; continue with --resume {out}")  # fmt: skip
    assert not list(out.glob(".*.tmp-*")), "a temp file was left behind"
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # resumed where there is room
    resumed = train(tmp_path, "--resume", str(moved))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_model(*(torch.load(d / "ckpt.pt", weights_only=True) for d in (moved, uninterrupted)), step=4)
