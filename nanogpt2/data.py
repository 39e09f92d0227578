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
from typing import Protocol

import numpy as np
import torch

from nanogpt2.errors import DataError
from nanogpt2.files import write_atomic
from nanogpt2.tokenizer import VOCAB_SIZE

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


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

    def __init__(self, paths: list[Path], name: str | None = None):
        self.paths = paths
        self.shards = [read_shard(p) for p in paths]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards]).tolist()  # start of each shard in the stream
        self.n_tokens = self.offsets[-1]
        self.name = name or (str(paths[0]) if len(paths) == 1 else f"{len(paths)} shards in {paths[0].parent}")

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


class Loader(Protocol):
    """What training and evaluation read micro-batches from: a BatchLoader, or a task's own loader."""

    batches_per_epoch: int | None  # global micro-batches in one pass (None: endless)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def reset(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Corpus:
    """The train and val token streams a `--data` value names."""

    name: str
    train: TokenStream
    val: TokenStream
    note: str = ""  # what the user should know about the split (e.g. val falls back to train)

    def loaders(
        self, rows: int, seq_len: int, rank: int, world_size: int, vocab_size: int, order: str, seed: int, batch: int
    ) -> tuple[Loader, Loader]:
        """This rank's train loader (in `order`) and val loader (in order), over global micro-batches of `rows`
        sequences; DataError when the training data holds fewer windows than one step's `batch` sequences."""
        common = dict(rows=rows, seq_len=seq_len, rank=rank, world_size=world_size, vocab_size=vocab_size)
        train = BatchLoader(self.train, order=order, seed=seed, **common)
        windows = train.windows_per_epoch
        if windows is not None and windows < batch:
            raise DataError(
                f"{self.train.name} holds {windows} training windows of {seq_len} + 1 tokens, fewer than one step's "
                f"--batch-size {batch}; use a smaller --batch-size or --seq-len, or more data"
            )
        return train, BatchLoader(self.val, **common)


def shard_corpus(name: str, shards: list[Path]) -> Corpus:
    """The corpus of a list of shards, split into train and val by their names."""
    val = [p for p in shards if is_val_shard(p)]
    train = [p for p in shards if not is_val_shard(p)]
    if not train:
        raise DataError(f"{name}: only val shards found (a 'val' field in the name); no training data")
    note = "" if val else f"{name} has no val shards (a 'val' field in the name): evaluating on the training shards"
    train_split = ShardStream(train, f"{name}'s train split")  # the user's name in messages, not the cache's
    return Corpus(name, train_split, ShardStream(val, f"{name}'s val split") if val else train_split, note)


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


def check_micro_batch(rows: int, seq_len: int, rank: int, world_size: int) -> None:
    """DataError unless `rows` sequences of seq_len tokens split evenly over the ranks and `rank` is one of them."""
    if rows < 1 or seq_len < 1:
        raise DataError(f"batch rows ({rows}) and seq_len ({seq_len}) must be positive")
    if rows % world_size != 0:
        raise DataError(f"{rows} rows per micro-batch do not split evenly across {world_size} ranks")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")


class BatchLoader:
    """(x, y) micro-batches of shape (rows // world_size, seq_len), int64, from a token stream.

    A global micro-batch is `rows` windows of seq_len + 1 tokens; rank r takes rows [r * rows / world_size,
    (r + 1) * rows / world_size). The windows form one sequence that micro-batches consume in turn, so which tokens
    a micro-batch holds depends on `rows` only, never on world_size, and a step of `rows * grad_accum` windows reads
    the same windows however it is split into micro-batches. The order of the sequence:
    - "shuffled" (training's default): each epoch visits every window once, in an order drawn from `seed` and the
      epoch (ShuffledWindows); reads stay memory-mapped.
    - "sequential": consecutive windows of the stream, each overlapping the next by one token, as in llm.c; a
      micro-batch that would run past the end of the stream starts over at its beginning (the next epoch), so at an
      epoch's end, and only there, which windows a step reads depends on its micro-batch size (evaluation reads val
      this way, from the start every time).
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
        check_micro_batch(rows, seq_len, rank, world_size)
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
            "source": "tokens",
            "order": self.order,
            "position": self.position,
            "epoch": self.epoch,
            "window": self.window,
            "seed": self.seed,
            "n_tokens": self.stream.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("source") != "tokens":  # a task's loader (e.g. --data recall) saved this state
            raise DataError(
                f"the checkpoint's loader read --data {state.get('source')}, not {self.stream.name}: resume with the "
                "same --data"
            )
        saved = state["order"]
        if state["n_tokens"] != self.stream.n_tokens:
            raise DataError(
                f"the checkpoint's loader read a stream of {state['n_tokens']} tokens, {self.stream.name} has "
                f"{self.stream.n_tokens}: resume with the same --data"
            )
        if saved != self.order:
            raise DataError(
                f"the checkpoint read its training data in {saved} order, this run asks for {self.order}: "
                f"resume with --data-order {saved}"
            )
        if saved == "shuffled" and state["seed"] != self.seed:
            raise DataError(f"the checkpoint shuffled its data with seed {state['seed']}, this run has {self.seed}")
        self.position, self.epoch, self.window = state["position"], state["epoch"], state["window"]
