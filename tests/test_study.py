"""The variant study at a toy budget, end to end, and the loss plot CLI."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, assert_bad_input, run_cli

from nanogpt2.study import VARIANTS


def run_module(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run_cli("-m", module, *args, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory) -> Path:
    """The study at its toy budget, every variant, run once for the tests below."""
    tmp = tmp_path_factory.mktemp("study")
    result = run_module("nanogpt2.study", "--budget", "toy", "--out", str(tmp / "study"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return tmp / "study"


def test_study_writes_every_file_variant_and_column(toy_study):
    out = toy_study
    readme = (out / "README.md").read_text()
    for column in ("params", "train loss", "val loss", "tokens/s", "peak mem", "KV bytes/token", "gen tokens/s"):
        assert column in readme
    for variant in VARIANTS:
        assert f"| {variant} |" in readme
        assert f"**{variant}**" in readme or variant == "base"
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == set(VARIANTS)
    for row in results["summary"].values():
        assert row["val_loss"] > 0 and row["tokens_per_s"] > 0 and row["gen_tokens_per_s"] > 0
        assert abs(row["val_loss_1x"] - row["val_loss"]) <= 1e-4  # the same val tokens as train.py's evaluation
    # Learned positions cannot be evaluated past block_size; rotary ones can.
    assert results["summary"]["base"]["val_loss_4x"] is None
    assert results["summary"]["rope"]["val_loss_4x"] > 0
    assert results["summary"]["all"]["kv_bytes_long_context"] < results["summary"]["base"]["kv_bytes_long_context"]


def test_study_rerun_reuses_or_retrains_each_run(toy_study, tmp_path):
    """Complete runs are reused; an interrupted one, one without its checkpoint (as committed results have none) or
    one made by another command trains again; a relative --out works from any directory."""
    out = tmp_path / "study"
    shutil.copytree(toy_study, out)
    (out / "runs" / "base-seed0" / "summary.json").unlink()  # interrupted after its last checkpoint
    (out / "runs" / "rope-seed0" / "ckpt.pt").unlink()
    run_json = out / "runs" / "gqa-seed0" / "run.json"
    run_json.write_text(run_json.read_text().replace('"max_steps": 6', '"max_steps": 5'))
    result = run_module("nanogpt2.study", "--budget", "toy", "--out", "study", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    done = dict(line.rsplit(": ", 1) for line in result.stdout.splitlines() if line.startswith(f"[study] {out}"))
    assert done == {
        f"[study] {out / 'runs' / name}-seed0": what
        for name, what in [("base", "trained"), ("rope", "trained"), ("gqa", "trained"), ("swa", "complete, reused"),
                           ("all", "complete, reused")]
    }  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == set(VARIANTS)


def test_plot_cli_draws_runs(tmp_path):
    for name, shift in (("a", 0.0), ("b", 0.3)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": 5 - s / 10 + shift, "lr": 1e-3, "tokens": 1000 * s} for s in range(1, 11)]
        rows += [{"step": 10, "tokens": 10000, "val_loss": 4.2 + shift}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "loss.png"
    result = run_module("nanogpt2.plot", str(tmp_path / "a" / "metrics.jsonl"), str(tmp_path / "b"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_cli_missing_file_is_one_clear_line(tmp_path):
    result = run_module("nanogpt2.plot", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x.png"))
    assert_bad_input(result, f"error: no metrics file at {tmp_path / 'missing.jsonl'}")
