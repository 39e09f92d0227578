"""Token shards, token streams and the distributed, resumable batch loader.

Shards use the llm.c / modded-nanogpt format, so FineWeb shards made by those projects load unchanged: a header of
256 int32 (magic 20240520, version 1, token count, zeros), then the tokens as uint16. A shard belongs to the val split
when a `_`-separated field of its name is `val` (`fineweb_val_000000.bin`, `val_000000.bin`), else to train.

This file reads and writes shards and serves batches from them; turning text or a `--data` value into shards (the
text cache, the Shakespeare download, the prepare CLI) is nanogpt2/prepare.py's.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanogpt2.files import write_atomic
from nanogpt2.tokenizer import VOCAB_SIZE

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class DataError(Exception):
    """Data that cannot be used: a missing path, a malformed shard, out-of-vocabulary tokens, too few tokens."""


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
    write_atomic(path, header.tobytes() + tokens.astype(np.uint16).tobytes())


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


def is_val_shard(path: Path) -> bool:
    """Whether a shard is val data by its name's split field: `fineweb_val_000000.bin` is, `interval.bin` is not."""
    return "val" in path.stem.split("_")


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


def shard_corpus(name: str, shards: list[Path]) -> Corpus:
    """The corpus of a list of shards, split into train and val by their names."""
    val = [p for p in shards if is_val_shard(p)]
    train = [p for p in shards if not is_val_shard(p)]
    if not train:
        raise DataError(f"{name}: only val shards found (a 'val' field in the name); no training data")
    note = "" if val else f"{name} has no val shards (a 'val' field in the name): evaluating on the training shards"
    return Corpus(name, ShardStream(train), ShardStream(val or train), note)


# ---------------------------------------------------------------------------------------------------------------------
# The batch loader


class BatchLoader:
    """(x, y) micro-batches of shape (rows // world_size, seq_len), int64, read in order from a token stream.

    A global micro-batch is `rows` consecutive windows of seq_len + 1 tokens (each overlapping the next by one, as in
    llm.c); rank r takes rows [r * rows / world_size, (r + 1) * rows / world_size). Which tokens a micro-batch holds
    therefore depends on `rows` only, never on world_size. At the end of the stream the loader starts over (the next
    epoch). `state_dict()` captures the position, so a resumed run reads exactly the batch it would have read next.
    """

    def __init__(
        self,
        stream: TokenStream,
        rows: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int = VOCAB_SIZE,
    ):
        if rows < 1 or seq_len < 1:
            raise DataError(f"batch rows ({rows}) and seq_len ({seq_len}) must be positive")
        if rows % world_size != 0:
            raise DataError(f"{rows} rows per micro-batch do not split evenly across {world_size} ranks")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.stream, self.rows, self.seq_len = stream, rows, seq_len
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        self.local_rows = rows // world_size
        self.span = rows * seq_len  # tokens a global micro-batch advances the stream by
        n = stream.n_tokens
        if n is not None and n < self.span + 1:
            raise DataError(
                f"{stream.name} holds {n} tokens, fewer than one micro-batch needs "
                f"({rows} rows x {seq_len} tokens + 1 = {self.span + 1}); use a smaller --batch-size or --seq-len"
            )
        self.position = 0
        self.epoch = 0

    @property
    def batches_per_epoch(self) -> int | None:
        """Global micro-batches in one pass over the stream (None for an endless stream)."""
        n = self.stream.n_tokens
        return None if n is None else (n - 1) // self.span

    def reset(self) -> None:
        """Back to the start of the stream (evaluation reads the same val batches every time)."""
        self.position, self.epoch = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) of the next global micro-batch."""
        n = self.stream.n_tokens
        if n is not None and self.position + self.span + 1 > n:
            self.position, self.epoch = 0, self.epoch + 1
        start = self.position + self.rank * self.local_rows * self.seq_len
        buf = self.stream.read(start, self.local_rows * self.seq_len + 1)
        bad = np.flatnonzero(buf >= self.vocab_size)
        if bad.size:
            where = self.stream.locate(start + int(bad[0]))
            raise DataError(f"token id {buf[bad[0]]} >= vocab size {self.vocab_size} at {where}")
        self.position += self.span
        t = torch.from_numpy(buf)
        x = t[:-1].view(self.local_rows, self.seq_len)  # (B, T)
        y = t[1:].view(self.local_rows, self.seq_len)  # (B, T), x shifted by one
        return x, y

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "n_tokens": self.stream.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        if state["n_tokens"] != self.stream.n_tokens:
            raise DataError(
                f"the checkpoint's loader read a stream of {state['n_tokens']} tokens, {self.stream.name} has "
                f"{self.stream.n_tokens}: resume with the same --data"
            )
        self.position, self.epoch = state["position"], state["epoch"]
