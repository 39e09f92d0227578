"""The sampling CLI, run as a user would: a real HF checkpoint directory in, text out."""

import subprocess
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parents[1]


def run_sample(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nanogpt2.sample", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_sample_cli_continues_the_prompt(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    args = ["--ckpt", str(tmp_path), "--prompt", "To be, or not", "--max-new-tokens", "8", "--seed", "1"]
    first, second = run_sample(*args, "--device", "cpu"), run_sample(*args, "--device", "cpu", "--no-cache")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("To be, or not")
    assert first.stdout == second.stdout  # the seed fixes the sample, with or without the KV cache


def test_sample_cli_missing_checkpoint_is_one_clear_line(tmp_path):
    result = run_sample("--ckpt", str(tmp_path / "nope"), "--device", "cpu")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "nope" in result.stderr


def test_sample_cli_bad_input_is_one_clear_line(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path
    )
    cases = {
        "past the model's vocabulary of 101": ["--ckpt", str(tmp_path), "--prompt", "Hello", "--device", "cpu"],
        "--device gpu": ["--ckpt", str(tmp_path), "--device", "gpu"],
    }
    if not torch.cuda.is_available():
        cases["no CUDA device"] = ["--ckpt", str(tmp_path), "--device", "cuda"]
    for message, args in cases.items():
        result = run_sample(*args)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr
