"""The variant study at a toy budget, end to end, its bad input, and the loss plot CLI."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, assert_bad_input, run_cli

from variant_study.__main__ import main as study_main
from variant_study.__main__ import parse_args as study_args
from variant_study.plan import BUDGETS, DECODE_VARIANTS, VARIANTS, plan_runs
from variant_study.report import accuracy_between, display_width, few_questions, reach, rebin, recall_reading


def run_module(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run_cli("-m", module, *args, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory) -> Path:
    """The study at its toy budget, every variant, run once for the tests below."""
    tmp = tmp_path_factory.mktemp("study")
    result = run_module("variant_study", "--budget", "toy", "--out", str(tmp / "study"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return tmp / "study"


def test_study_writes_every_section_run_and_plot(toy_study):
    out = toy_study
    readme = (out / "README.md").read_text()
    for section in ("1. Associative recall", "2. Length generalisation", "3. Decoding", "4. Language modelling"):
        assert f"## {section}" in readme
    runs = plan_runs(BUDGETS["toy"], list(VARIANTS))
    for name in {r.name for r in runs if r.kind == "recall"}:
        assert f"| {name} |" in readme and f"**{name}**" in readme
    for variant in VARIANTS:
        assert f"| {variant} |" in readme
    for plot in ("loss.png", "recall.png", "decode.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG")
    results = json.loads((out / "results.json").read_text())
    assert set(results["lm_summary"]) == set(VARIANTS)
    for run in results["lm"]["base"]:
        assert abs(run["val_loss_at"]["1x"] - run["val_loss"]) <= 1e-4  # the same val tokens as train.py's evaluation
    # Learned positions cannot be evaluated past block_size; rotary ones can, in both tasks.
    assert results["lm_summary"]["base"]["val_loss_at"]["2x"] is None
    assert results["lm_summary"]["rope"]["val_loss_at"]["8x"][0] > 0
    assert results["recall"]["base"]["recall"]["2x"] is None
    rope_8x = results["recall"]["rope"]["recall"]["8x"]
    assert 0 <= rope_8x["accuracy"] <= 1 and sum(b["questions"] for b in rope_8x["bins"]) > 0
    assert rope_8x["bin_width"] == 1 and len({b["distance"] for b in rope_8x["bins"]}) == len(rope_8x["bins"])
    assert results["recall"]["gqa-kv1"]["config"]["n_kv_head"] == 1
    assert results["recall"]["all-w16-L4"]["config"]["n_layer"] == 4


def test_study_decoding_cache_stays_at_the_window(toy_study):
    decode = json.loads((toy_study / "results.json").read_text())["decode"]
    assert set(decode) == set(DECODE_VARIANTS)
    window = BUDGETS["toy"].lm.window
    for variant, rows in decode.items():
        sizes = [r["cache_bytes"] for r in rows]
        assert all(r["tokens_per_s"] > 0 for r in rows)
        if variant in ("swa", "all"):
            assert len(set(sizes)) == 1 and rows[0]["cache_positions"] == window
        else:
            assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert decode["gqa"][-1]["cache_bytes"] < decode["base"][-1]["cache_bytes"]


def test_study_rerun_reuses_or_retrains_each_run(toy_study, tmp_path):
    """Complete runs are reused; an interrupted one, one without its checkpoint (as committed results have none)
    or one made by another command trains again; a relative --out works from any directory."""
    out = tmp_path / "study"
    shutil.copytree(toy_study, out)
    (out / "runs" / "lm-base-seed0" / "summary.json").unlink()  # interrupted after its last checkpoint
    (out / "runs" / "recall-rope-seed0" / "ckpt.pt").unlink()
    run_json = out / "runs" / "lm-gqa-seed0" / "run.json"
    run_json.write_text(run_json.read_text().replace('"max_steps": 4', '"max_steps": 3'))
    args = ("--budget", "toy", "--variants", "rope", "gqa", "--out", "study")
    result = run_module("variant_study", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line.split(" in ")[0] for line in result.stdout.splitlines() if line.startswith(f"[study] {out}")]
    done = dict(line.rsplit(": ", 1) for line in lines)  # "trained in 12 s" -> "trained"
    retrained = {"lm-base-seed0", "recall-rope-seed0", "lm-gqa-seed0"}
    runs = plan_runs(BUDGETS["toy"], ["base", "rope", "gqa"])
    assert done == {
        f"[study] {out / 'runs' / r.dir_name}": "trained" if r.dir_name in retrained else "complete, reused"
        for r in runs
    }
    assert set(json.loads((out / "results.json").read_text())["lm_summary"]) == {"base", "rope", "gqa"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "base", "mamba"], "error: unknown variant 'mamba'; the variants are base, rope, gqa, swa, all"),
        (["--budget", "huge"], "error: unknown budget 'huge'; the budgets are toy, cpu, gpu"),
        (["--window", "100"], "error: budget toy: lm: the window (100) is larger than the context (32)"),
        (["--kv-heads", "3"], "error: budget toy: lm: 3 K/V heads do not divide 2 heads"),
        (["--seeds", "0"], "error: budget toy: --seeds must be at least 1, got 0"),
    ],
)
def test_study_bad_input_is_one_clear_line(args, message, tmp_path, capsys):
    """In-process (the checks run before anything is trained); the first case also through the CLI."""
    argv = ["--budget", "toy", *args, "--out", str(tmp_path / "study")]
    code = study_main(argv)
    captured = capsys.readouterr()
    assert_bad_input(subprocess.CompletedProcess(argv, code, captured.out, captured.err), message)
    assert not (tmp_path / "study").exists()
    if "mamba" in args:
        assert_bad_input(run_module("variant_study", *argv), message)


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_study_never_writes_into_the_committed_results_by_default(budget):
    out = Path(study_args(["--budget", budget]).out)
    assert out == Path("runs") / f"study-{budget}" and "results" not in out.parts
    assert study_args(["--budget", budget, "--out", "results/study"]).out == "results/study"  # only when asked


def test_study_out_naming_a_file_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code = study_main(["--budget", "toy", "--out", str(tmp_path / "f")])
    captured = capsys.readouterr()
    assert_bad_input(subprocess.CompletedProcess([], code, captured.out, captured.err), "is a file, not a directory")


def windowed_run(inside: float, band: float, beyond: float) -> dict:
    """A recall result at the training length 64 with a window of 16 over 2 layers, measured per distance as the
    study measures: `inside` below 16, `band` from 16 to 2 x (16 - 1) = 30 (not a multiple of the plots' bins),
    `beyond` after."""
    bins = [{"distance": d, "accuracy": inside if d < 16 else band if d <= 30 else beyond, "questions": 10}
            for d in range(1, 64)]  # fmt: skip
    config = {"window": 16, "n_layer": 2, "pos_emb": "learned"}
    return {"recall": {"1x": {"accuracy": 0.5, "bin_width": 1, "bins": bins}, "2x": None}, "config": config}


@pytest.mark.parametrize(
    "accuracies, verdict",
    [
        ((1.0, 0.06, 0.06), "recall stops at the window; 2 layers do not carry the pairs further"),
        ((1.0, 0.95, 0.06), "the layers relay what the window cannot see"),
        ((1.0, 0.4, 0.06), "the layers relay a little of what the window cannot see"),
        ((0.07, 0.06, 0.06), "it does not recall reliably even inside its window"),  # never learnt: no relay claimed
    ],
)
def test_recall_reading_says_where_a_window_stops(accuracies, verdict):
    line = recall_reading({"swa": windowed_run(*accuracies)}, BUDGETS["cpu"])[0]
    assert line.endswith(f"{verdict}; learned positions end at the training length.")
    inside, band, beyond = accuracies
    assert f"{inside:.2f} at distances below its window of 16" in line
    assert f"{band:.2f} from 16 to L x (W - 1) = 30 (reachable only by relaying), {beyond:.2f} beyond" in line


def test_accuracy_between_and_reach_count_questions_not_bins():
    at = {"bin_width": 8, "bins": [{"distance": 0, "accuracy": 1.0, "questions": 300},
                                   {"distance": 8, "accuracy": 0.5, "questions": 100},
                                   {"distance": 16, "accuracy": 0.0, "questions": 100}]}  # fmt: skip
    assert accuracy_between(at, 0, 16) == pytest.approx(350 / 400)
    assert accuracy_between(at, 16) == 0.0 and accuracy_between(at, 24) is None
    assert reach(at) == 8 and reach(at, floor=0.4) == 16 and reach({**at, "bins": at["bins"][:1]}) is None
    assert few_questions(at, 16, enough=101) == " (100 questions)" and few_questions(at, 16) == ""
    assert few_questions(at, 24, enough=101) == ""  # no questions: the figure itself says n/a


def test_rebin_counts_questions_not_bins():
    bins = [{"distance": d, "accuracy": 1.0 if d < 2 else 0.0, "questions": d + 1} for d in range(6)]
    at = {"accuracy": 0.3, "bin_width": 1, "bins": bins}
    binned = rebin(at, 4)
    assert binned["bin_width"] == 4 and binned["accuracy"] == 0.3
    assert binned["bins"] == [{"distance": 0, "accuracy": 3 / 10, "questions": 10},
                              {"distance": 4, "accuracy": 0.0, "questions": 11}]  # fmt: skip
    assert display_width(BUDGETS["cpu"]) == BUDGETS["cpu"].recall.window // 4


def test_plot_cli_draws_runs(tmp_path):
    for name, shift in (("a", 0.0), ("b", 0.3)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": 5 - s / 10 + shift, "lr": 1e-3, "tokens": 1000 * s} for s in range(1, 11)]
        rows += [{"step": 10, "tokens": 10000, "val_loss": 4.2 + shift}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "loss.png"
    metrics = str(tmp_path / "a" / "metrics.jsonl")
    result = run_module("variant_study.plot", metrics, str(tmp_path / "b"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_cli_missing_file_is_one_clear_line(tmp_path):
    result = run_module("variant_study.plot", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x.png"))
    assert_bad_input(result, f"error: no metrics file at {tmp_path / 'missing.jsonl'}")
