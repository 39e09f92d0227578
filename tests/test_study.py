"""The variant study at a toy budget, end to end, and the loss plot CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

from nanogpt2.study import VARIANTS

REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_study_writes_every_file_variant_and_column(tmp_path):
    out = tmp_path / "study"
    result = run_module(
        "nanogpt2.study", "--budget", "toy", "--out", str(out), env_extra={"NANOGPT2_DATA_DIR": str(tmp_path)}
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
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
    # Learned positions cannot be evaluated past block_size; rotary ones can.
    assert results["summary"]["base"]["val_loss_4x"] is None
    assert results["summary"]["rope"]["val_loss_4x"] > 0
    assert results["summary"]["all"]["kv_bytes_long_context"] < results["summary"]["base"]["kv_bytes_long_context"]


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
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: no metrics file at {tmp_path / 'missing.jsonl'}"
