"""Training the study's runs through train.py: reuse the finished ones, retrain the rest, a few at a time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanogpt2.config import DEVICE_DEFAULTS, MODEL_FIELDS
from variant_study.plan import REPO


def made_by(run_dir: Path, cmd: list[str]) -> bool:
    """Whether the run in run_dir was started by this train.py command line (wherever its directory now is): every
    flag given as recorded, and every model flag not given left at its default (unset, or the device's default: the
    study trains on the CPU)."""
    try:
        recorded = json.loads((run_dir / "run.json").read_text())["train_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    flags = cmd[2:]
    wanted = {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
    wanted.pop("out_dir")
    unset = [name for name in MODEL_FIELDS if name not in wanted]
    return all(str(recorded.get(name)) == value for name, value in wanted.items()) and all(
        recorded.get(name) in (None, DEVICE_DEFAULTS["cpu"].get(name)) for name in unset
    )


def is_complete(run_dir: Path, cmd: list[str]) -> bool:
    """Finished by this command: checkpoint and summary written, and the command recorded is this one."""
    return all((run_dir / name).is_file() for name in ("ckpt.pt", "summary.json")) and made_by(run_dir, cmd)


def train(run_dir: Path, cmd: list[str], threads: int | None) -> tuple[bool, float]:
    """Train one run anew into run_dir (cleared first: the study owns runs/); (success, seconds). The output goes to
    run_dir + '.log'."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0 = time.perf_counter()
    with open(f"{run_dir}.log", "w") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    return done.returncode == 0, time.perf_counter() - t0


_print_lock = threading.Lock()


def say(line: str) -> None:
    """Print one progress line whole: the runs' threads print at once, and print() writes text and newline apart."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def train_all(jobs: dict[Path, list[str]], workers: int, cpu: bool) -> dict[Path, str]:
    """Bring every run (run_dir -> its command) to its end, `workers` at a time, printing a line per run.

    Returns what was done per run: "complete, reused", "trained" or "failed". On a CPU each run gets an equal share of
    the cores, so `workers` runs together use them all.
    """
    threads = max(1, (os.cpu_count() or 1) // workers) if cpu else None
    outcome = {}
    todo = {}
    for run_dir, cmd in jobs.items():
        if is_complete(run_dir, cmd):
            outcome[run_dir] = "complete, reused"
            say(f"[study] {run_dir}: complete, reused")
        else:
            todo[run_dir] = cmd

    def one(item: tuple[Path, list[str]]) -> None:
        run_dir, cmd = item
        say(f"[study] training {run_dir.name}: {' '.join(cmd[1:])}")
        ok, seconds = train(run_dir, cmd, threads)
        outcome[run_dir] = "trained" if ok else "failed"
        say(f"[study] {run_dir}: {outcome[run_dir]} in {seconds:.0f} s")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, todo.items()))
    return outcome
