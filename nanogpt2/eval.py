"""Evaluate a trained model on a benchmark (HellaSwag today):

    python -m nanogpt2.eval hellaswag --ckpt RUN_OR_HF_DIR [--data FILE] [--limit N] [--json PATH] [--device D]

--ckpt takes what nanogpt2.sample takes: a training run's directory (or its ckpt.pt) or a Hugging Face GPT-2
directory. The last line printed is `hellaswag: N examples, acc A, acc_norm B`; --json writes each example's
{"ind", "label", "pred", "pred_norm", "sum_loss": [4], "mean_loss": [4]} as a JSON list.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nanogpt2 import hellaswag
from nanogpt2.checkpoint import load_model
from nanogpt2.errors import CheckpointError, DataError, WriteError
from nanogpt2.files import write_atomic
from nanogpt2.prepare import data_root
from nanogpt2.runtime import parse_device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanogpt2.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("benchmark", choices=["hellaswag"], help="the benchmark to run")
    p.add_argument("--ckpt", required=True, help="training output dir / checkpoint file, or a HF GPT-2 dir/name")
    p.add_argument(
        "--data", type=Path, help="a HellaSwag jsonl file (default: the validation set, fetched once into the cache)"
    )
    p.add_argument("--limit", type=int, help="score the first N examples only (default: all)")
    p.add_argument("--json", type=Path, help="write each example's losses and predictions here (a JSON list)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise DataError(f"--limit must be positive, got {args.limit}")
        device = parse_device(args.device)
        model = load_model(args.ckpt, device=device).eval()
        hellaswag.check_vocab(model.config.vocab_size, f"--ckpt {args.ckpt}")
        examples = hellaswag.load_examples(args.data or hellaswag.val_file(data_root()), args.limit)
        t0 = time.perf_counter()
        results, counts = hellaswag.evaluate(model, examples, model.config.block_size, device)
        print(f"scored in {time.perf_counter() - t0:.1f} s on {device}")
        if args.json:
            write_atomic(args.json, json.dumps(results))
    except (CheckpointError, DataError, WriteError, ValueError) as e:  # ValueError: parse_device's
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    print(hellaswag.summary(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
