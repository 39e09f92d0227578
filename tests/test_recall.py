"""Multi-query associative recall: the generator's sequences, the loader train.py reads them through, and a run.

Every train.py run is a subprocess with cwd in tmp_path, so nothing is written into the repository.
"""

import numpy as np
import pytest
import torch
from helpers import assert_bad_input, run_cli, snapshot

from nanogpt2.checkpoint import load_checkpoint
from nanogpt2.config import TrainConfig
from nanogpt2.data import BatchLoader, DataError, SyntheticStream
from nanogpt2.tokenizer import VOCAB_SIZE
from variant_study.recall import (
    KEY0,
    N_KEYS,
    N_VALUES,
    PAIR0,
    RECALL_PAIRS,
    RECALL_VOCAB,
    VALUE0,
    RecallLoader,
    min_length,
    recall_batch,
)

RUN = ["--data", "recall", "--preset", "pico", "--seq-len", "64", "--batch-size", "4", "--eval-every", "2",
       "--eval-batches", "2", "--device", "cpu"]  # fmt: skip


def run(tmp, *args):
    return run_cli("train.py", *args, cwd=tmp, env={"NANOGPT2_DATA_DIR": str(tmp / "data-cache")})


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_sequences_are_drawn_from_the_seed():
    a = recall_batch(3, 4, 96, seed=1, split=0)
    assert same(a, recall_batch(3, 4, 96, seed=1, split=0))
    assert not torch.equal(a[0], recall_batch(3, 4, 96, seed=2, split=0)[0])
    assert not torch.equal(a[0], recall_batch(3, 4, 96, seed=1, split=1)[0])
    assert torch.equal(a[0][1:], recall_batch(4, 3, 96, seed=1, split=0)[0])  # sequence i depends on i, not the batch


@pytest.mark.parametrize("length", [64, 65, 100, 256])
def test_answers_sit_at_the_queries_and_name_their_pairs_values(length):
    x, y, d = recall_batch(0, 8, length, seed=5, split=0)
    assert x.shape == y.shape == d.shape == (8, length) and x.dtype == y.dtype == torch.int64
    assert 0 <= x.min() and x.max() < RECALL_VOCAB
    for xr, yr, dr in zip(x.tolist(), y.tolist(), d.tolist(), strict=True):
        answers = [p for p in range(length) if yr[p] >= 0]
        assert answers == [p for p in range(length) if dr[p] >= 0] and RECALL_PAIRS <= len(answers) <= length // 2
        for p in answers:
            pair = xr[p - dr[p]]  # the pair asked about: one token naming its key and value
            assert KEY0 <= xr[p] < KEY0 + N_KEYS and VALUE0 <= yr[p] < VALUE0 + N_VALUES  # a question, its answer
            assert 0 <= p - dr[p] < RECALL_PAIRS
            assert (pair - PAIR0) // N_VALUES == xr[p] - KEY0 and (pair - PAIR0) % N_VALUES == yr[p] - VALUE0
            assert xr[p + 1] == yr[p]  # the answer follows its question
        keys = [(t - PAIR0) // N_VALUES for t in xr[:RECALL_PAIRS]]
        assert len(set(keys)) == RECALL_PAIRS  # the pairs' keys are distinct, so each question has one answer


def test_questions_ask_with_replacement_and_reach_far_back():
    """Keys are asked with replacement (no shortcut from the keys still unasked) and distances span the length."""
    _, y, d = recall_batch(0, 256, 256, seed=1, split=0)
    distances = d[y >= 0]
    assert distances.min() <= 4 and distances.max() >= 200
    x, y, _ = recall_batch(0, 64, 64, seed=1, split=0, questions=RECALL_PAIRS)
    assert ((y >= 0).sum(dim=1) == RECALL_PAIRS).all()
    repeats = sum(len(set(row[y[i] >= 0].tolist())) < RECALL_PAIRS for i, row in enumerate(x))
    assert repeats > 32  # most sequences ask some key twice
    counts = (recall_batch(0, 64, 64, seed=1, split=0)[1] >= 0).sum(dim=1)  # training: sparse to dense
    assert counts.min() < 12 and counts.max() > 20
    x, y, d = recall_batch(0, 64, 64, seed=1, split=1, questions=4, distinct=True)  # how the study measures
    for row, targets in zip(x, y, strict=True):
        asked = row[targets >= 0].tolist()
        assert len(asked) == 4 and len(set(asked)) == 4  # each key once: the pair is the answer's only source
    with pytest.raises(ValueError, match="9 questions do not fit"):
        recall_batch(0, 1, 64, seed=0, split=0, questions=RECALL_PAIRS + 1, distinct=True)
    with pytest.raises(ValueError, match="29 questions do not fit"):
        recall_batch(0, 1, 64, seed=0, split=0, questions=29)


def test_a_length_without_room_for_the_queries_is_refused():
    with pytest.raises(ValueError, match=f"no room for {RECALL_PAIRS} pairs"):
        recall_batch(0, 1, min_length() - 1, seed=0, split=0)
    with pytest.raises(DataError, match=f"--data recall needs --seq-len of at least {min_length()}"):
        RecallLoader(4, min_length() - 1)


def global_batches(rows: int, world_size: int, n: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n global micro-batches of `rows`, each the concatenation of its ranks' rows."""
    loaders = [RecallLoader(rows, 64, rank, world_size, seed) for rank in range(world_size)]
    out = []
    for _ in range(n):
        parts = [loader.next_batch() for loader in loaders]
        out.append((torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])))
    return out


def test_a_step_reads_the_same_sequences_at_any_world_size_and_grad_accum():
    whole = global_batches(8, 1, 2)  # two steps of 8 sequences, one micro-batch each
    assert whole[0][0].shape == (8, 64) and whole[0][0].dtype == torch.int64
    assert not torch.equal(whole[0][0], whole[1][0])
    for world_size in (2, 4):
        assert all(same(u, v) for u, v in zip(whole, global_batches(8, world_size, 2), strict=True))
    for rows, world_size in ((4, 1), (4, 2), (2, 2)):  # each step in 8 // rows micro-batches
        split = global_batches(rows, world_size, 16 // rows)
        per_step = 8 // rows
        for step in range(2):
            micro = split[step * per_step : (step + 1) * per_step]
            assert torch.equal(torch.cat([x for x, _ in micro]), whole[step][0])
            assert torch.equal(torch.cat([y for _, y in micro]), whole[step][1])


def test_the_val_loader_reads_its_own_split_from_the_start_after_reset():
    train, val = RecallLoader(4, 64, seed=3, split=0), RecallLoader(4, 64, seed=3, split=1)
    first = val.next_batch()
    assert not torch.equal(first[0], train.next_batch()[0])
    val.next_batch()
    val.reset()
    assert torch.equal(val.next_batch()[0], first[0])
    assert val.windows_per_epoch is None and val.batches_per_epoch is None  # endless


def test_state_round_trip_resumes_at_the_next_batch():
    loader = RecallLoader(4, 64, rank=1, world_size=2, seed=11)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    resumed = RecallLoader(4, 64, rank=1, world_size=2, seed=11)
    resumed.load_state_dict(state)
    assert same(loader.next_batch(), resumed.next_batch())


def test_a_state_of_another_loader_or_seed_is_refused():
    text = BatchLoader(SyntheticStream(1000, seed=0), 4, 64, vocab_size=1000)
    with pytest.raises(DataError, match="read a text corpus, not --data recall"):
        RecallLoader(4, 64).load_state_dict(text.state_dict())
    with pytest.raises(DataError, match="with seed 1, this run has 2"):
        RecallLoader(4, 64, seed=2).load_state_dict(RecallLoader(4, 64, seed=1).state_dict())
    with pytest.raises(DataError, match="read --data recall, not synthetic"):
        text.load_state_dict(RecallLoader(4, 64).state_dict())


@pytest.mark.parametrize("data, vocab", [("recall", RECALL_VOCAB), ("shakespeare", VOCAB_SIZE)])
def test_the_vocabulary_defaults_to_the_corpus(data, vocab):
    assert TrainConfig(data=data, preset="pico").model_config().vocab_size == vocab
    assert TrainConfig(data=data, preset="pico", vocab_size=60000).model_config().vocab_size == 60000


def test_a_recall_run_trains_and_resumes(tmp_path):
    done = run(tmp_path, *RUN, "--max-steps", "4")
    assert done.returncode == 0, done.stderr
    assert "step 4/4 | val loss" in done.stdout and "sample:" not in done.stdout
    assert "note: no text samples: --data recall is not GPT-2 text" in done.stdout
    ckpt = load_checkpoint(tmp_path / "out")
    assert ckpt["model_config"]["vocab_size"] == RECALL_VOCAB and ckpt["step"] == 4
    assert ckpt["loader"]["index"] == 4 * 4  # 4 steps of 4 sequences
    resumed = run(tmp_path, "--resume", "out", "--max-steps", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert "step 6/6 | val loss" in resumed.stdout and "sample:" not in resumed.stdout
    assert load_checkpoint(tmp_path / "out")["loader"]["index"] == 6 * 4
    losses = [float(line.split("| loss ")[1].split()[0]) for line in resumed.stdout.splitlines() if "| loss " in line]
    assert len(losses) == 2 and np.isfinite(losses).all()


def test_a_vocabulary_smaller_than_recalls_is_refused(tmp_path):
    before = snapshot(tmp_path)
    done = run(tmp_path, *RUN, "--max-steps", "2", "--vocab-size", "50")
    assert_bad_input(done, "--vocab-size 50 is smaller than --data recall's 289 token ids", {tmp_path: before})
