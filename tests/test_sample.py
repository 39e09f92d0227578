"""The sampling CLI, run as a user would: a real HF checkpoint directory in, text out."""

import subprocess

import torch
from helpers import assert_bad_input, hf_checkpoint, run_cli


def run_sample(*args: str) -> subprocess.CompletedProcess:
    return run_cli("-m", "nanogpt2.sample", *args, timeout=120)


def test_sample_cli_continues_the_prompt(tmp_path):
    hf_checkpoint(tmp_path, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    args = ["--ckpt", str(tmp_path), "--prompt", "To be, or not", "--max-new-tokens", "8", "--seed", "1"]
    first, second = run_sample(*args, "--device", "cpu"), run_sample(*args, "--device", "cpu", "--no-cache")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("To be, or not")
    assert first.stdout == second.stdout  # the seed fixes the sample, with or without the KV cache


def test_sample_cli_missing_checkpoint_is_one_clear_line(tmp_path):
    assert_bad_input(run_sample("--ckpt", str(tmp_path / "nope"), "--device", "cpu"), "nope: no such file or directory")
    typo = run_sample("--ckpt", "typo", "--device", "cpu")  # a bare name: a path first, not a Hugging Face model
    assert_bad_input(typo, "error: typo: no such file or directory")
    assert "Hugging Face" not in typo.stderr


def test_sample_cli_bad_input_is_one_clear_line(tmp_path):
    hf_checkpoint(tmp_path, vocab_size=101, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    cases = {
        "past the model's vocabulary of 101": ["--ckpt", str(tmp_path), "--prompt", "Hello", "--device", "cpu"],
        "--device gpu": ["--ckpt", str(tmp_path), "--device", "gpu"],
    }
    if not torch.cuda.is_available():
        cases["no CUDA device"] = ["--ckpt", str(tmp_path), "--device", "cuda"]
    for message, args in cases.items():
        assert_bad_input(run_sample(*args), message)
