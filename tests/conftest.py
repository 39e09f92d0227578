"""Test setup: run Triton kernels through the interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so this happens here, before any test
module imports `kernels`.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def nan_outputs(monkeypatch):
    """Poison every tensor the ops allocate with torch.empty, so an element a kernel never writes shows as NaN."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def assert_matches_ref(out, ref, ref_lowp, factor=2.0, atol=1e-3, fp32_atol=1e-5, fp32_rtol=0.0):
    """Flash-attention's criterion: |out - ref| <= factor * |ref_lowp - ref| + atol (max norms) in fp16/bf16,
    where ref is computed in float64 and ref_lowp in out's dtype; in fp32, |out - ref| <= fp32_atol + fp32_rtol *
    max|ref|. Every element must be finite (with `nan_outputs`, an unwritten one is NaN)."""
    assert torch.isfinite(out).all(), "the kernel left NaN/inf (unwritten) elements"
    err = (out.double() - ref).abs().max().item()
    if out.dtype == torch.float32:
        bound = fp32_atol + fp32_rtol * ref.abs().max().item()
        assert err <= bound, f"fp32 max error {err:.3g} > {bound:.3g}"
    else:
        base = (ref_lowp.double() - ref).abs().max().item()
        assert err <= factor * base + atol, f"max error {err:.3g} > {factor} * {base:.3g} + {atol}"


# Whole files of multi-process (torchrun) and study runs: `pytest -m "not slow"` leaves them out of the inner loop.
SLOW_FILES = {"test_distributed.py", "test_study.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
