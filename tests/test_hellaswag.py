"""HellaSwag (nanogpt2/hellaswag.py, python -m nanogpt2.eval) against an independent scorer: transformers' GPT-2 and
its tokenizer on our HF export, in another process, computing the ending losses build-nanogpt's way."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, assert_bad_input, randomize_residual_projections, run_cli, run_main, snapshot

from nanogpt2.eval import main as eval_main
from nanogpt2.hf import save_hf_gpt2
from nanogpt2.model import GPT, GPTConfig

# HellaSwag's format: the fields scoring reads, and some it does not.
EXAMPLES = [
    dict(ind=4, ctx="A man is sitting on a roof. he", endings=["is using wrap to wrap a pair of skis.",
         "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."], label=3),
    dict(ind=17, ctx="The cat", endings=["sat.", "jumped over the very tall fence in one go.", "x", "is a cat"],
         label=0),
    dict(ind=99, ctx="Then, the woman applies lotion to her arms and", endings=["legs.", "face, smiling at the camera.",
         "walks away", "puts the bottle\ndown."], label=2),
]  # fmt: skip
EXTRA = dict(activity_label="Roof shingle removal", ctx_a="A man is sitting on a roof.", ctx_b="he", split="val",
             split_type="indomain", source_id="activitynet~v_-JhWjGDPHMY")  # fmt: skip

REFERENCE = """
import json, sys, torch
from transformers import AutoTokenizer, GPT2LMHeadModel
hf_dir, data = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(hf_dir)
model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
out = []
for line in open(data):
    ex = json.loads(line)
    ctx = tok.encode(ex["ctx"])
    sums, means = [], []
    for ending in ex["endings"]:
        end = tok.encode(" " + ending)
        ids = torch.tensor([ctx + end])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        nll = [-logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(end)]
        sums.append(sum(nll))
        means.append(sum(nll) / len(nll))
    out.append({"ind": ex["ind"], "sum_loss": sums, "mean_loss": means})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A small random GPT-2-vocabulary model as a training run's directory (ckpt.pt as load_model reads it) and as
    our HF export, and a HellaSwag file."""
    root = tmp_path_factory.mktemp("hellaswag")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    randomize_residual_projections(model)
    (root / "run").mkdir()
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, root / "run" / "ckpt.pt")
    save_hf_gpt2(model, root / "hf")
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({**EXTRA, **ex}) + "\n" for ex in EXAMPLES))
    return root


def test_scores_match_transformers_on_our_export(checkpoints, tmp_path, capfd):
    """Every ending's summed and mean loss, both predictions, and the printed line; the run directory and the HF
    export of the same weights score the same."""
    hf, data = checkpoints / "hf", checkpoints / "val.jsonl"
    ref = subprocess.run([sys.executable, "-c", REFERENCE, str(hf), str(data)], capture_output=True, text=True,
                         timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads(ref.stdout)
    for ckpt in (hf, checkpoints / "run"):
        flags = ["--ckpt", str(ckpt), "--data", str(data), "--json", str(tmp_path / "r.json")]
        done = run_main(eval_main, "hellaswag", *flags, capfd=capfd)
        assert done.returncode == 0, done.stderr
        results = json.loads((tmp_path / "r.json").read_text())
        assert [set(r) for r in results] == [{"ind", "label", "pred", "pred_norm", "sum_loss", "mean_loss"}] * 3
        for got, want, example in zip(results, expected, EXAMPLES, strict=True):
            assert (got["ind"], got["label"]) == (example["ind"], example["label"])
            torch.testing.assert_close(got["sum_loss"], want["sum_loss"], rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(got["mean_loss"], want["mean_loss"], rtol=1e-5, atol=1e-4)
            assert got["pred"] == min(range(4), key=lambda i: want["sum_loss"][i])
            assert got["pred_norm"] == min(range(4), key=lambda i: want["mean_loss"][i])
        acc = sum(r["pred"] == r["label"] for r in results) / 3
        acc_norm = sum(r["pred_norm"] == r["label"] for r in results) / 3
        assert done.stdout.splitlines()[-1] == f"hellaswag: 3 examples, acc {acc:.4f}, acc_norm {acc_norm:.4f}"
    limited = run_main(eval_main, "hellaswag", "--ckpt", str(hf), "--data", str(data), "--limit", "2", capfd=capfd)
    assert limited.stdout.splitlines()[-1].startswith("hellaswag: 2 examples, ")


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json\n", "line 1: not JSON"),
        (json.dumps({"ind": 1, "ctx": "a", "label": 0}) + "\n", "line 1: no field 'endings'"),
        (json.dumps({"ind": 1, "ctx": "a", "endings": ["a", "b"], "label": 0}) + "\n", "a list of 4 strings"),
        (json.dumps({"ind": 1, "ctx": "a", "endings": list("abcd"), "label": 4}) + "\n", "'label' must be 0, 1, 2"),
    ],
)
def test_a_file_that_is_not_hellaswag_is_refused(checkpoints, tmp_path, capfd, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    flags = ["--ckpt", str(checkpoints / "hf"), "--data", str(tmp_path / "bad.jsonl")]
    assert_bad_input(run_main(eval_main, "hellaswag", *flags, capfd=capfd), message)


def test_a_checkpoint_with_another_vocabulary_is_refused(tmp_path, checkpoints, capfd):
    model = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=16))
    (tmp_path / "run").mkdir()
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "run" / "ckpt.pt")
    before = snapshot(tmp_path)
    flags = ["--ckpt", str(tmp_path / "run"), "--data", str(checkpoints / "val.jsonl"), "--json", str(tmp_path / "o")]
    done = run_main(eval_main, "hellaswag", *flags, capfd=capfd)
    assert_bad_input(done, "has a vocabulary of 97 tokens, not GPT-2's 50,257", {tmp_path: before})


def test_ranks_score_disjoint_shares_with_as_many_forwards(checkpoints):
    """Under DDP/FSDP each rank scores every world_size-th example; the counts summed over the ranks are the whole
    set's, and every rank runs the same number of forwards (FSDP's collectives need them in step)."""
    from nanogpt2 import hellaswag
    from nanogpt2.checkpoint import load_model

    model = load_model(checkpoints / "run")
    examples = hellaswag.load_examples(checkpoints / "val.jsonl")  # 3 examples over 2 ranks: 2 and 1
    whole, counts = hellaswag.evaluate(model, examples, 64, torch.device("cpu"))
    forwards, shares = [], []
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for rank in range(2):
        shares.append(hellaswag.evaluate(model, examples, 64, torch.device("cpu"), rank, 2))
        forwards.append(len(calls) - sum(forwards))
    assert forwards == [2, 2]
    assert torch.equal(shares[0][1] + shares[1][1], counts)
    assert sorted(r["ind"] for share, _ in shares for r in share) == sorted(r["ind"] for r in whole)


@pytest.mark.slow
def test_training_scores_hellaswag_and_logs_to_wandb(checkpoints, tmp_path):
    """--hellaswag-every in a run: the metrics row of a scored step holds the accuracy the eval command gives for the
    checkpoint; --wandb gets the same rows (a stand-in wandb module records what it is given)."""
    cache = tmp_path / "cache"
    (cache / "hellaswag").mkdir(parents=True)
    (cache / "hellaswag" / "hellaswag_val.jsonl").write_bytes((checkpoints / "val.jsonl").read_bytes())
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(
        "import json, os\n"
        "class Run:\n"
        "    def log(self, row, step):\n"
        "        open(os.environ['FAKE_WANDB_LOG'], 'a').write(json.dumps({**row, '_step': step}) + '\\n')\n"
        "    def finish(self):\n"
        "        open(os.environ['FAKE_WANDB_LOG'], 'a').write('finish\\n')\n"
        "def init(project, config):\n"
        "    assert project == 'proj' and config['model_config']['vocab_size'] == 50257\n"
        "    return Run()\n"
    )
    env = {"NANOGPT2_DATA_DIR": str(cache), "FAKE_WANDB_LOG": str(tmp_path / "wandb.jsonl"),
           "PYTHONPATH": f"{REPO}{os.pathsep}{fake}"}  # fmt: skip
    flags = ["--preset", "pico", "--max-steps", "2", "--batch-size", "2", "--eval-batches", "1", "--data", "synthetic"]
    done = run_cli("train.py", *flags, "--hellaswag-every", "1", "--wandb", "proj", "--out-dir", str(tmp_path / "out"),
                   cwd=tmp_path, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["hellaswag_examples"] for r in rows] == [3, 3]
    logged = (tmp_path / "wandb.jsonl").read_text().splitlines()
    assert logged[-1] == "finish" and [json.loads(line) for line in logged[:-1]] == [
        {**r, "_step": r["step"]} for r in rows
    ]
    from nanogpt2 import hellaswag
    from nanogpt2.checkpoint import load_model

    model = load_model(tmp_path / "out")
    examples = hellaswag.load_examples(checkpoints / "val.jsonl")
    _, counts = hellaswag.evaluate(model, examples, model.config.block_size, torch.device("cpu"))
    assert rows[-1]["hellaswag_acc_norm"] == counts[2].item() / 3 and rows[-1]["hellaswag_acc"] == counts[1].item() / 3


def test_hellaswag_every_needs_gpt2_vocabulary():
    from helpers import cpu_config

    from nanogpt2.errors import ConfigError

    with pytest.raises(ConfigError, match="--hellaswag-every needs a model of GPT-2's vocabulary"):
        cpu_config("--hellaswag-every", "10", "--vocab-size", "60000")
    with pytest.raises(ConfigError, match="--hellaswag-every needs a model of GPT-2's vocabulary"):
        cpu_config("--hellaswag-every", "10", "--data", "recall", "--preset", "pico")


def test_the_validation_set_is_fetched_once_into_the_cache(checkpoints, tmp_path, capfd, monkeypatch):
    """Without --data: offline, one line that says what to do; online, one download, then the cached file."""
    import io
    import urllib.error

    from nanogpt2 import hellaswag

    monkeypatch.setenv("NANOGPT2_DATA_DIR", str(tmp_path / "cache"))
    fetched = []

    def offline(url, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    def online(url, timeout):
        fetched.append(url)
        return io.BytesIO((checkpoints / "val.jsonl").read_bytes())

    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", offline)
    done = run_main(eval_main, "hellaswag", "--ckpt", str(checkpoints / "hf"), capfd=capfd)
    assert_bad_input(done, "cannot download HellaSwag's validation set from https://raw.githubusercontent.com/rowanz/")
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", online)
    for _ in range(2):
        done = run_main(eval_main, "hellaswag", "--ckpt", str(checkpoints / "hf"), capfd=capfd)
        assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith("hellaswag: 3 examples"), done.stderr
    assert fetched == [hellaswag.VAL_URL]
    assert (tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl").read_bytes() == (
        checkpoints / "val.jsonl"
    ).read_bytes()
