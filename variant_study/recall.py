"""Multi-query associative recall (MQAR, after the Zoology work): the task that compares attention mechanisms.

A sequence opens with `pairs` key-value pairs, then asks questions at random places in the rest of the sequence,
filler between: a question is one of the pairs' keys, and the model must emit that pair's value next (the sequence
then holds the value, as an answer would). Only the answers are scored (every other target is -1, which the loss
ignores). The distance of a question is the number of positions back to its pair: a model whose window holds W keys
can look the pair up directly only while that distance is below W.

Each pair is one token that names its key and its value (Zoology spells a pair as two tokens, key then value, which
needs an induction circuit across two layers; small models on a CPU did not form one in 3,000 steps, where this form
is learnt in about 500). Keys are asked with replacement, so which keys are still unasked tells nothing.

Token ids: 0 filler; PAIR0 + k * N_VALUES + v the pair (key k, value v); KEY0 + k the question for key k; VALUE0 + v
the answer v; RECALL_VOCAB in all. Every sequence is drawn from (seed, split, index) alone, so a batch is the same at
any world size or split. `RecallLoader` serves them to train.py (`--data recall`) as BatchLoader serves text: the
corpus factory (nanogpt2/prepare.py, TASKS) imports this module and uses its VOCAB_SIZE and `corpus()`.
"""

from __future__ import annotations

import numpy as np
import torch

from nanogpt2.data import DataError, check_micro_batch

RECALL_DATA = "recall"  # the --data value
RECALL_PAIRS = 8
N_KEYS = N_VALUES = 16
FILLER = 0
PAIR0 = 1
KEY0 = PAIR0 + N_KEYS * N_VALUES
VALUE0 = KEY0 + N_KEYS
RECALL_VOCAB = VALUE0 + N_VALUES  # 289
VOCAB_SIZE = RECALL_VOCAB  # what the corpus factory reads: the token ids the task needs


def min_length(pairs: int = RECALL_PAIRS) -> int:
    """The shortest sequence with room for `pairs` pairs and as many questions."""
    return 3 * pairs


def recall_sequence(
    length: int,
    rng: np.random.Generator,
    pairs: int = RECALL_PAIRS,
    questions: int | None = None,
    distinct: bool = False,
) -> tuple[np.ndarray, ...]:
    """One sequence: its tokens (length + 1,: x is [:-1]), targets (length,) and distances (length,).

    targets[p] is the answer the model must emit after reading the question at p, -1 elsewhere; distances[p] is p
    minus the position of the pair asked about, -1 elsewhere. Pairs fill positions 0 .. pairs - 1; questions (question
    token, answer token) sit at pairs + 2s, never overlapping. `questions`: how many (None: drawn between `pairs` and
    every slot, so training sees sparse and dense sequences alike). `distinct`: ask each key at most once, so the
    pair is the only place the answer stood before (the study measures this way: an earlier answer to the same key
    inside a window would otherwise count as recall from beyond it).
    """
    slots = (length - pairs) // 2
    if not 1 <= pairs <= N_KEYS or length < min_length(pairs):
        raise ValueError(f"a recall sequence of {length} tokens has no room for {pairs} pairs and their questions")
    if questions is None:
        questions = int(rng.integers(pairs, slots + 1))
    elif not 1 <= questions <= (pairs if distinct else slots):
        raise ValueError(f"{questions} questions do not fit a recall sequence of {length} tokens with {pairs} pairs")
    keys = rng.choice(N_KEYS, size=pairs, replace=False)  # (pairs,) distinct
    values = rng.integers(0, N_VALUES, size=pairs)  # (pairs,)
    tokens = np.full(length + 1, FILLER, dtype=np.int64)
    tokens[:pairs] = PAIR0 + keys * N_VALUES + values
    where = pairs + 2 * np.sort(rng.choice(slots, size=questions, replace=False))  # (questions,) question positions
    if distinct:  # which pair each question asks about
        asked = rng.choice(pairs, size=questions, replace=False)
    else:
        asked = rng.integers(0, pairs, size=questions)
    tokens[where], tokens[where + 1] = KEY0 + keys[asked], VALUE0 + values[asked]
    targets = np.full(length, -1, dtype=np.int64)
    distances = np.full(length, -1, dtype=np.int64)
    targets[where], distances[where] = VALUE0 + values[asked], where - asked
    return tokens, targets, distances


def recall_batch(
    first: int,
    rows: int,
    length: int,
    seed: int,
    split: int,
    pairs: int = RECALL_PAIRS,
    questions: int | None = None,
    distinct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences first .. first + rows - 1 of a split (0 train, 1 val): x, y and distances, each (rows, length).

    y is -1 except at answers; distances, questions and distinct as in recall_sequence. Sequence i is drawn from
    (seed, split, i) alone.
    """
    x = np.empty((rows, length), dtype=np.int64)
    y = np.empty((rows, length), dtype=np.int64)
    d = np.empty((rows, length), dtype=np.int64)
    for r in range(rows):
        rng = np.random.default_rng([seed, split, first + r])
        tokens, y[r], d[r] = recall_sequence(length, rng, pairs, questions, distinct)
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
        check_micro_batch(rows, seq_len, rank, world_size)
        if seq_len < min_length():  # the pairs, then room for a (question, answer) per pair
            raise DataError(
                f"--data {RECALL_DATA} needs --seq-len of at least {min_length()} ({RECALL_PAIRS} key-value pairs "
                f"and their questions), got {seq_len}"
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
        return {"source": RECALL_DATA, "index": self.index, "seed": self.seed, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        if state.get("source") != RECALL_DATA:
            raise DataError(
                f"the checkpoint's loader read a text corpus, not --data {RECALL_DATA}: resume with the same --data"
            )
        if state["seed"] != self.seed:
            raise DataError(
                f"the checkpoint drew its recall sequences with seed {state['seed']}, this run has {self.seed}"
            )
        self.index = state["index"]


class RecallCorpus:
    """`--data recall` as the corpus factory returns it: train (split 0) and val (split 1) loaders from the seed."""

    name, note = RECALL_DATA, ""

    def loaders(
        self, rows: int, seq_len: int, rank: int, world_size: int, vocab_size: int, order: str, seed: int, batch: int
    ) -> tuple[RecallLoader, RecallLoader]:
        """nanogpt2.data.Corpus.loaders' signature; the sequences never run out, and their order is the seed's."""
        common = dict(rows=rows, seq_len=seq_len, rank=rank, world_size=world_size, seed=seed)
        return RecallLoader(split=0, **common), RecallLoader(split=1, **common)


def corpus() -> RecallCorpus:
    return RecallCorpus()
