"""Static checks of the kernels for an H100/H200 without one: the configs a launch may choose compile for sm_90 with
the installed Triton's ptxas, spill no register, keep their wgmma instructions async (no ptxas warning C7515), fit
shared memory and (in bf16) run their dots on wgmma, the TMA paths through TMA (`python -m benches.sass` prints the
full table; this runs its --quick set); and every case a launch can take has such a config."""

import itertools
import os
import subprocess
import sys

import pytest
from helpers import DEVICE

from nanogpt2.kernels import SUPPORTED_HEAD_DIMS, tuning


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels compile for real in every other test")
def test_choosable_configs_compile_for_hopper_without_spills_or_serialized_wgmma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "benches.sass", "--quick", "--jobs", "2", "--no-cache"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_every_launch_has_a_clean_config(head_dim):
    """Each kernel a launch can take has a config listed as clean (no spill, no C7515): the forward on both load
    paths; the dK/dV kernel on the path `resolve_path` gives, which is the one asked for whenever it has a config; the
    dQ kernel on that path when it is deterministic."""
    for group, tma, atomic in itertools.product((1, 3), (True, False), (True, False)):
        assert tuning.allowed_tiles("fwd", head_dim, group, tma, False), (group, tma)
        tma_used, atomic_used = tuning.resolve_path(head_dim, group, tma, atomic)
        assert tuning.allowed_tiles("dkdv", head_dim, group, tma_used, atomic_used)
        if not atomic_used:
            assert tuning.allowed_tiles("dq", head_dim, group, tma_used, False), (group, tma_used)
        if tuning.allowed_tiles("dkdv", head_dim, group, tma, atomic):
            assert (tma_used, atomic_used) == (tma, atomic)
