"""FineWeb's download (nanogpt2/fineweb.py) against local fakes of the Hub repo: a directory laid out like it, and an
HTTP server that answers range requests as the Hub does, at HF_ENDPOINT; then --data fineweb10B."""

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, assert_bad_input, cpu_config, llmc_shard, run_main, snapshot

from nanogpt2 import fineweb
from nanogpt2.data import HEADER_BYTES
from nanogpt2.errors import DataError
from nanogpt2.model import GPTConfig
from nanogpt2.prepare import main as prepare_main
from nanogpt2.prepare import open_corpus


def fake_hub(folder: Path, n_train: int = 3, tokens: int = 3000) -> Path:
    """A folder laid out like kjj0/fineweb10B-gpt2: the val shard and train shards 1..n_train of distinct tokens."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in fineweb.shard_names(n_train):
        llmc_shard(folder / name, rng.integers(0, 50257, tokens))
    return folder


def test_download_fetches_the_val_and_the_first_train_shards(tmp_path):
    hub = fake_hub(tmp_path / "hub")
    with pytest.raises(DataError, match=r"no train shards in .*download them with `python -m nanogpt2.prepare fineweb"):
        open_corpus("fineweb10B", root=tmp_path / "data")
    paths = fineweb.download(tmp_path / "data" / "fineweb10B", 2, hub)
    assert [p.name for p in paths] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert sorted(p.name for p in (tmp_path / "data" / "fineweb10B").iterdir()) == sorted(p.name for p in paths)
    assert all(p.read_bytes() == (hub / p.name).read_bytes() for p in paths)
    corpus = open_corpus("fineweb10B", root=tmp_path / "data")
    assert (corpus.train.n_tokens, corpus.val.n_tokens) == (6000, 3000)


@pytest.mark.parametrize("leftover", ["partial", "truncated"])
def test_a_partial_download_resumes_where_it_stopped(tmp_path, leftover):
    """Our `.partial`, or a shard cut short by another tool, is appended to, not fetched again: its bytes differ from
    the source's here, and they stay."""
    hub = fake_hub(tmp_path / "hub", n_train=1)
    source = (hub / "fineweb_train_000001.bin").read_bytes()
    kept = source[: HEADER_BYTES + 1000]
    kept = kept[:HEADER_BYTES] + bytes(255 - b for b in kept[HEADER_BYTES:])  # other tokens than the source's
    name = "fineweb_train_000001.bin" + (".partial" if leftover == "partial" else "")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / name).write_bytes(kept)
    fineweb.download(tmp_path / "data", 1, hub)
    assert (tmp_path / "data" / "fineweb_train_000001.bin").read_bytes() == kept + source[len(kept) :]
    assert not (tmp_path / "data" / "fineweb_train_000001.bin.partial").exists()


def test_a_source_shard_with_a_corrupt_header_is_refused_before_it_is_kept(tmp_path):
    hub = fake_hub(tmp_path / "hub", n_train=2)
    llmc_shard(hub / "fineweb_train_000002.bin", np.arange(3000), magic=1234)
    with pytest.raises(DataError, match=r"fineweb_train_000002.bin from .*hub: not an llm.c token shard \(magic 1234"):
        fineweb.download(tmp_path / "data", 2, hub)
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert names == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]  # the good shards stay, nothing of the bad


def test_a_shard_whose_size_disagrees_with_its_header_stays_partial(tmp_path):
    hub = fake_hub(tmp_path / "hub", n_train=1)
    llmc_shard(hub / "fineweb_train_000001.bin", np.arange(3000), count=4000)  # promises 1000 tokens more
    with pytest.raises(DataError, match="the source announced 7024 and the header promises 9024"):
        fineweb.download(tmp_path / "fineweb10B", 1, hub)
    assert (tmp_path / "fineweb10B" / "fineweb_train_000001.bin.partial").stat().st_size == 7024
    with pytest.raises(DataError, match=r"fineweb_train_000001.bin.partial is a download that did not finish"):
        open_corpus("fineweb10B", root=tmp_path)


def test_training_refuses_a_half_downloaded_shard(tmp_path, capfd):
    """`--data fineweb10B` while a shard's download is unfinished, or with a shard cut short by another tool: one
    line, nothing trained or changed."""
    import train

    hub = fake_hub(tmp_path / "hub", n_train=2)
    fineweb.download(tmp_path / "data" / "fineweb10B", 1, hub)
    partial = tmp_path / "data" / "fineweb10B" / "fineweb_train_000002.bin.partial"
    partial.write_bytes((hub / "fineweb_train_000002.bin").read_bytes()[:3000])
    before = snapshot(tmp_path / "data")
    flags = ["--data", "fineweb10B", "--preset", "pico", "--max-steps", "1", "--out-dir", str(tmp_path / "out")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOGPT2_DATA_DIR", str(tmp_path / "data"))
        result = run_main(train.main, *flags, capfd=capfd)
        assert_bad_input(
            result, "fineweb_train_000002.bin.partial is a download that did not finish", {tmp_path / "data": before}
        )
        partial.rename(partial.with_suffix(""))  # the same bytes as a .bin: its header promises more than it holds
        result = run_main(train.main, *flags, capfd=capfd)
        assert_bad_input(result, "fineweb_train_000002.bin: header promises 3000 tokens (7024 bytes), file has 3000")
    assert not (tmp_path / "out").exists()


def test_a_shard_missing_from_the_source_is_named(tmp_path):
    hub = fake_hub(tmp_path / "hub", n_train=2)
    with pytest.raises(DataError, match=r"fineweb_train_000003.bin: not found in .*hub"):
        fineweb.download(tmp_path / "data", 3, hub)
    assert len(list((tmp_path / "data").iterdir())) == 3  # what came before it stays


def test_more_shards_than_the_hub_holds_are_refused(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("NANOGPT2_DATA_DIR", str(tmp_path / "data"))
    hub = fake_hub(tmp_path / "hub", n_train=1)
    assert run_main(prepare_main, "fineweb10B", "--shards", "1", "--source", str(hub), capfd=capfd).returncode == 0
    before = snapshot(tmp_path / "data")
    result = run_main(prepare_main, "fineweb10B", "--shards", "104", "--source", str(hub), capfd=capfd)
    assert_bad_input(result, "--shards 104: the Hub repo kjj0/fineweb10B-gpt2 holds train shards 1 to 103",
                     {tmp_path / "data": before})  # fmt: skip


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves a folder the way the Hub serves /datasets/REPO/resolve/main/NAME: range requests answered 206 with a
    Content-Range. The first request for `cut` is cut off after half its bytes, as by a broken connection."""

    folder: Path
    cut: str
    requests: list[str]

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        self.requests.append(f"{name} {self.headers.get('Range')}")
        path = self.folder / name
        if not self.path.startswith(f"/datasets/{fineweb.HUB_REPO}/resolve/main/") or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"])[1])
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if name == self.cut and sum(r.startswith(name) for r in self.requests) == 1:
            self.wfile.write(data[start : len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


def test_the_hub_download_resumes_over_http(tmp_path, capfd, monkeypatch):
    """The command against a local server at the Hub's address (what HF_ENDPOINT sets): a connection cut mid-shard
    is one error and a kept partial; the same command again resumes it with a range request from where it stopped."""
    from huggingface_hub import constants

    hub = fake_hub(tmp_path / "hub", n_train=1, tokens=200_000)
    handler = type("Handler", (RangeHandler,), dict(folder=hub, cut="fineweb_train_000001.bin", requests=[]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NANOGPT2_DATA_DIR", str(tmp_path / "data"))
    try:
        first = run_main(prepare_main, "fineweb10B", "--shards", "1", capfd=capfd)
        assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr  # progress lines, then:
        last = first.stderr.splitlines()[-1]
        assert last.startswith("error: fineweb_train_000001.bin: 200512 bytes downloaded, the source announced 401024")
        size = HEADER_BYTES + 2 * 200_000
        assert (tmp_path / "data/fineweb10B/fineweb_train_000001.bin.partial").stat().st_size == size // 2
        second = run_main(prepare_main, "fineweb10B", "--shards", "1", capfd=capfd)
        assert second.returncode == 0, second.stderr
    finally:
        server.shutdown()
    assert handler.requests == [
        "fineweb_val_000000.bin bytes=0-",
        "fineweb_train_000001.bin bytes=0-",
        f"fineweb_train_000001.bin bytes={size // 2}-",
    ]
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin"):
        assert (tmp_path / "data/fineweb10B" / name).read_bytes() == (hub / name).read_bytes()


def test_offline_says_what_to_do(tmp_path, capfd, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("NANOGPT2_DATA_DIR", str(tmp_path / "data"))
    result = run_main(prepare_main, "fineweb10B", "--shards", "1", capfd=capfd)
    assert_bad_input(result, "HF_HUB_OFFLINE is set: unset it to download fineweb_val_000000.bin from the Hub")


def test_without_huggingface_hub_says_what_to_install(tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    monkeypatch.setenv("NANOGPT2_DATA_DIR", str(tmp_path / "data"))
    result = run_main(prepare_main, "fineweb10B", "--shards", "1", capfd=capfd)
    assert_bad_input(result, "downloading FineWeb needs huggingface_hub: pip install -r requirements-hub.txt")


def test_gpt2_with_fineweb_defaults_to_the_recipe():
    cfg, model = cpu_config("--preset", "gpt2", "--data", "fineweb10B")
    recipe = (cfg.batch_size, cfg.seq_len, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps)
    assert recipe == (512, 1024, 19_073, 6e-4, 6e-4 / 10, 700, 19_073)
    evals = (cfg.eval_every, cfg.hellaswag_every, cfg.save_every)
    assert (cfg.weight_decay, cfg.grad_clip, *evals) == (0.1, 1.0, 250, 250, 250)
    assert cfg.max_steps == 10**10 // (cfg.batch_size * cfg.seq_len) and model == GPTConfig.from_preset("gpt2")
    given, _ = cpu_config("--preset", "gpt2", "--data", "fineweb10B", "--lr", "1e-3", "--hellaswag-every", "0")
    assert (given.lr, given.min_lr, given.hellaswag_every, given.max_steps) == (1e-3, 1e-4, 0, 19_073)
    other, _ = cpu_config("--preset", "gpt2", "--data", "synthetic")  # the recipe is FineWeb's only
    assert (other.batch_size, other.hellaswag_every) == (8, 0)


@pytest.mark.slow
def test_readme_recipe_runs_on_cpu_with_tiny_flags(tmp_path):
    """README's "Reproduce GPT-2 (124M)" commands as shown, against a local fake of the Hub (all 103 train shards,
    small), with test_docs_commands' short flags (2 steps of 2 sequences) and a 1-layer model on 32-token sequences;
    HellaSwag from a small file in the data cache. The torchrun command trains the same flags under DDP, which
    test_distributed.py covers: here its flags are only checked (two ranks of GPT-2's embedding cost a minute)."""
    from test_docs_commands import argv_for, readme_commands

    commands = [c for c in readme_commands() if "fineweb10B" in c and not c.startswith("pip ")]
    assert [c.split()[:3] for c in commands] == [["python", "-m", "nanogpt2.prepare"], ["torchrun", "--standalone",
            "--nproc_per_node=8"], ["python", "train.py", "--preset"], ["python", "-m", "nanogpt2.eval"]]  # fmt: skip
    hub = fake_hub(tmp_path / "hub", n_train=fineweb.TRAIN_SHARDS, tokens=3000)
    handler = type("Handler", (RangeHandler,), dict(folder=hub, cut="", requests=[]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = tmp_path / "cache"
    (cache / "hellaswag").mkdir(parents=True)
    example = {"ind": 0, "ctx": "The cat sat on the", "endings": ["mat.", "moon.", "dog", "sky"], "label": 0}
    (cache / "hellaswag" / "hellaswag_val.jsonl").write_text(json.dumps(example) + "\n")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": "0",
           "NANOGPT2_DATA_DIR": str(cache), "PYTHONPATH": str(REPO)}  # fmt: skip
    cpu_config(*commands[1].split("train.py")[1].split())
    cwd = tmp_path
    try:
        for i, command in enumerate(c for c in commands if not c.startswith("torchrun")):
            argv = argv_for(command)
            if "train.py" in command:
                argv += ["--n-layer", "1", "--seq-len", "32"]
                cwd = tmp_path / f"run{i}"
                cwd.mkdir()
            done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{command}:\n{done.stderr[-3000:]}"
            if "train.py" in command:
                assert "hellaswag acc_norm" in done.stdout and "val loss" in done.stdout, done.stdout
    finally:
        server.shutdown()
    assert len(list((cache / "fineweb10B").glob("fineweb_train_*.bin"))) == fineweb.TRAIN_SHARDS
    assert done.stdout.splitlines()[-1].startswith("hellaswag: 1 examples, acc ")
