"""Multi-query associative recall (MQAR, as in the Zoology work): the task that compares attention mechanisms.

A sequence opens with `pairs` key-value pairs (k1 v1 k2 v2 ...), then asks `pairs` questions at random places in the
rest of the sequence, filler tokens between: a question is one of the pairs' keys, and the model must emit its value
next (the sequence then holds that value, as an answer would). Only the answers are scored (every other target is -1,
which the loss ignores). Keys are asked with replacement, so which keys are still unasked tells nothing; a key asked
twice can be answered from its last occurrence, so the distance of a question is the number of positions back to the
latest place its key stood with its value. A model whose window holds W keys can look the value up directly only while
that distance is below W (the value sits one position after its key).

Token ids: 0 is the filler, keys are 1..16, values 17..32 (small sets, so that small models learn the task in a few
minutes on a CPU), RECALL_VOCAB = 64. Every sequence is drawn from (seed, split, index) alone, so a batch is the same
at any world size or split. `RecallLoader` serves them to train.py (`--data recall`) as BatchLoader serves text.
"""

from __future__ import annotations

import numpy as np
import torch

from nanogpt2.data import DataError

RECALL_DATA = "recall"  # the --data value
RECALL_VOCAB = 64
RECALL_PAIRS = 8
FILLER = 0
KEYS = range(1, 17)
VALUES = range(17, 33)


def recall_sequence(
    length: int, rng: np.random.Generator, pairs: int = RECALL_PAIRS, questions: int | None = None
) -> tuple[np.ndarray, ...]:
    """One sequence of length + 1 tokens (x is [:-1], y [1:]), its targets (length,), and the distances (length,).

    targets[p] is the value the model must emit after reading the question's key at p, -1 elsewhere; distances[p] is
    p minus the position of the latest earlier occurrence of that key (a pair or an earlier question), -1 elsewhere.
    Questions sit at even offsets after the pairs, never overlapping, so length must leave room for `pairs` of them
    after the 2 * pairs pair tokens. `questions`: how many (None: drawn between `pairs` and every slot, so training
    sees sparse and dense sequences alike; the study measures with `pairs`, so that distances span the length).
    """
    slots = (length - 2 * pairs) // 2  # question slots: (key, value) at 2 * pairs + 2s, 2 * pairs + 2s + 1
    if not 1 <= pairs <= len(KEYS) or slots < pairs:
        raise ValueError(f"a recall sequence of {length} tokens has no room for {pairs} pairs and their questions")
    if questions is None:
        questions = int(rng.integers(pairs, slots + 1))
    elif not pairs <= questions <= slots:
        raise ValueError(f"{questions} questions do not fit a recall sequence of {length} tokens with {pairs} pairs")
    keys = rng.choice(np.asarray(KEYS), size=pairs, replace=False)  # (pairs,) distinct
    values = rng.choice(np.asarray(VALUES), size=pairs)  # (pairs,)
    tokens = np.full(length + 1, FILLER, dtype=np.int64)
    tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2] = keys, values
    targets = np.full(length, -1, dtype=np.int64)
    distances = np.full(length, -1, dtype=np.int64)
    where = 2 * pairs + 2 * np.sort(rng.choice(slots, size=questions, replace=False))  # (questions,) key positions
    asked = rng.integers(0, pairs, size=questions)  # which pair each question asks for, with replacement
    last_seen = 2 * np.arange(pairs)  # (pairs,) where each key last stood with its value
    for p, i in zip(where, asked, strict=True):
        tokens[p], tokens[p + 1] = keys[i], values[i]
        targets[p], distances[p] = values[i], p - last_seen[i]
        last_seen[i] = p
    return tokens, targets, distances


def recall_batch(
    first: int,
    rows: int,
    length: int,
    seed: int,
    split: int,
    pairs: int = RECALL_PAIRS,
    questions: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences first .. first + rows - 1 of a split (0 train, 1 val): x, y and distances, each (rows, length).

    y is -1 except at answers; distances and questions as in recall_sequence. Sequence i is drawn from (seed, split,
    i) alone.
    """
    x = np.empty((rows, length), dtype=np.int64)
    y = np.empty((rows, length), dtype=np.int64)
    d = np.empty((rows, length), dtype=np.int64)
    for r in range(rows):
        rng = np.random.default_rng([seed, split, first + r])
        tokens, y[r], d[r] = recall_sequence(length, rng, pairs, questions)
        x[r] = tokens[:-1]
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(d)


class RecallLoader:
    """(x, y) micro-batches of recall sequences, int64 (rows // world_size, seq_len), with BatchLoader's interface.

    Global micro-batch b holds sequences b * rows .. (b + 1) * rows - 1 of the split (0 train, 1 val), rank r rows
    [r * rows / world_size, (r + 1) * rows / world_size), so a step reads the same sequences at any world size or
    grad-accum split. The sequences never run out (no epochs); `state_dict()` is the next sequence's index and the seed.
    """

    windows_per_epoch = None  # endless
    batches_per_epoch = None

    def __init__(self, rows: int, seq_len: int, rank: int = 0, world_size: int = 1, seed: int = 0, split: int = 0):
        if rows < 1 or seq_len < 1:
            raise DataError(f"batch rows ({rows}) and seq_len ({seq_len}) must be positive")
        if rows % world_size != 0:
            raise DataError(f"{rows} rows per micro-batch do not split evenly across {world_size} ranks")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if seq_len < 4 * RECALL_PAIRS:  # the pairs, then room for a (key, value) query per pair
            raise DataError(
                f"--data {RECALL_DATA} needs --seq-len of at least {4 * RECALL_PAIRS} ({RECALL_PAIRS} key-value pairs "
                f"and their queries), got {seq_len}"
            )
        self.rows, self.seq_len, self.rank, self.world_size = rows, seq_len, rank, world_size
        self.seed, self.split = seed, split
        self.local_rows = rows // world_size
        self.index = 0  # the next global micro-batch's first sequence

    def reset(self) -> None:
        """Back to the first sequence (evaluation reads the same val batches every time)."""
        self.index = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) of the next global micro-batch."""
        first = self.index + self.rank * self.local_rows
        x, y, _ = recall_batch(first, self.local_rows, self.seq_len, self.seed, self.split)
        self.index += self.rows
        return x, y

    def state_dict(self) -> dict:
        return {"order": RECALL_DATA, "index": self.index, "seed": self.seed, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        if state.get("order") != RECALL_DATA:
            raise DataError(
                f"the checkpoint's loader read a text corpus, not --data {RECALL_DATA}: resume with the same --data"
            )
        if state["seed"] != self.seed:
            raise DataError(
                f"the checkpoint drew its recall sequences with seed {state['seed']}, this run has {self.seed}"
            )
        self.index = state["index"]
