"""benches.train_modes, the GPU check's training modes: its dry run (the same torchrun commands, gloo, one rank, pico)
and its verdict, which fails a resume that does not continue exactly or losses that leave the plain run's."""

import json
from pathlib import Path

import pytest
from helpers import run_cli

from benches import summary, train_modes


@pytest.mark.slow
def test_dry_run_trains_saves_resumes_and_consolidates(tmp_path):
    """FSDP, the mode with a sharded checkpoint: every command runs, the table and summary.py's rows say PASS."""
    result = run_cli("-m", "benches.train_modes", "--dry-run", "--modes", "fsdp", "--json", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "m.json").read_text())
    fsdp = data["modes"]["fsdp"]
    assert {phase: fsdp["runs"][phase]["status"] for phase in train_modes.PHASES} == dict.fromkeys(
        train_modes.PHASES, "ok"
    )
    assert sorted(fsdp["losses"]["full"]) == sorted(data["plain"]["losses"]) == ["1", "2", "3"]
    assert fsdp["resume_diff"] == 0.0 and fsdp["loss_diff"] <= train_modes.LOSS_TOL and fsdp["verdict"] == "PASS"
    assert fsdp["tokens_per_s"] > 0 and fsdp["peak_gib"] > 0
    (tmp_path / "train_modes.json").write_text((tmp_path / "m.json").read_text())
    rows = {row[0]: row[3] for row in summary.targets(tmp_path)}
    assert rows["training fsdp, torchrun x1"] == "PASS" and rows["training ddp, torchrun x1"] == "MISSING"


def fake_run(run_dir: Path, losses: dict[int, float]) -> None:
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in losses.items())
    )


@pytest.mark.parametrize(
    "split_step_6, full_step_1, verdict",
    [(4.0, 9.0, "PASS"), (4.0 + 1e-6, 9.0, "FAIL"), (4.0, 9.0 + 2 * train_modes.LOSS_TOL, "FAIL")],
    ids=["agree", "resume differs", "loss leaves plain"],
)
def test_verdict(tmp_path, split_step_6, full_step_1, verdict):
    plain = {s: 10.0 - s for s in range(1, 7)}
    fake_run(tmp_path / "full", {**plain, 1: full_step_1})
    fake_run(tmp_path / "split", {**plain, 1: full_step_1, 6: split_step_6})
    runs = {phase: {"status": "ok"} for phase in train_modes.PHASES}
    dirs = {"full": tmp_path / "full", "split": tmp_path / "split"}
    mode = train_modes.analyse("fsdp", runs, dirs, {"status": "ok", "losses": plain}, steps=6)
    assert mode["verdict"] == verdict


def test_a_mode_whose_timed_run_did_not_run_is_missing(tmp_path):
    runs = {"first": {"status": "ok"}, "resumed": {"status": "ok"}, "consolidated": {"status": "ok"}}
    dirs = {"full": tmp_path / "full", "split": tmp_path / "split"}
    mode = train_modes.analyse("ddp", runs, dirs, {"status": "ok", "losses": {1: 10.0}}, steps=3)
    assert mode["verdict"] == "MISSING"
    assert train_modes.targets({"modes": {"ddp": mode}})[0] == (
        "training ddp, torchrun x1",
        "-",
        "loss +-0.01, resume exact",
        "MISSING",
    )
