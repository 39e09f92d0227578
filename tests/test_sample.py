"""The sampling CLI, run as a user would: a real HF checkpoint directory in, text out."""

import subprocess

import pytest
import torch
from helpers import assert_bad_input, hf_checkpoint, run_cli, run_main

from nanogpt2.sample import main as sample_main


def run_sample(*args: str) -> subprocess.CompletedProcess:
    return run_cli("-m", "nanogpt2.sample", *args, timeout=120)


def test_sample_cli_continues_the_prompt(tmp_path, capfd):
    hf_checkpoint(tmp_path, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    args = ["--ckpt", str(tmp_path), "--prompt", "To be, or not", "--max-new-tokens", "8", "--seed", "1"]
    first = run_sample(*args, "--device", "cpu")
    second = run_main(sample_main, *args, "--device", "cpu", "--no-cache", capfd=capfd)  # no process start needed
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("To be, or not")
    assert first.stdout == second.stdout  # the seed fixes the sample, with or without the KV cache


def test_sample_cli_missing_checkpoint_is_one_clear_line(tmp_path, monkeypatch, capfd):
    assert_bad_input(run_sample("--ckpt", str(tmp_path / "nope"), "--device", "cpu"), "nope: no such file or directory")
    monkeypatch.chdir(tmp_path)  # a bare name: a path first, not a Hugging Face model
    typo = run_main(sample_main, "--ckpt", "typo", "--device", "cpu", capfd=capfd)
    assert_bad_input(typo, "error: typo: no such file or directory")
    assert "Hugging Face" not in typo.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "Hello", "--device", "cpu"], "past the model's vocabulary of 101"),
        (["--device", "gpu"], "--device gpu"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present"),
        ),
    ],
)
def test_sample_cli_bad_input_is_one_clear_line(tmp_path, capfd, args, message):
    hf_checkpoint(tmp_path, vocab_size=101, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    assert_bad_input(run_main(sample_main, "--ckpt", str(tmp_path), *args, capfd=capfd), message)
