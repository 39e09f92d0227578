"""Test setup: run Triton kernels through the interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so this happens here, before any test
module imports `nanogpt2.kernels`.
"""

import os

import pytest
import torch
import torch.utils._device

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def nan_outputs(monkeypatch):
    """Poison every tensor the ops allocate with torch.empty, so an element a kernel never writes shows as NaN."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    yield
    monkeypatch.undo()
    # `with torch.device(...)` caches the set of factory functions it redirects on first use; a set cached while
    # torch.empty was the stand-in above would leave every later model built "on meta" allocated on the CPU.
    torch.utils._device._device_constructors.cache_clear()


# Whole files of multi-process (torchrun), study, README-command and ahead-of-time compile runs, beside the slowest
# single tests marked where they stand: `pytest -m "not slow"` leaves them out of the inner loop (CI runs them all).
SLOW_FILES = {"test_distributed.py", "test_study.py", "test_docs_commands.py", "test_sass.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
