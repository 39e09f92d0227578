"""Static checks of the kernels for an H100/H200 without one: every config the autotuner may choose on the TMA
paths compiles for sm_90, spills no register, fits shared memory and (in bf16) runs its dots on wgmma; the TMA paths
use TMA (`python -m benches.sass` prints the full table; this runs its --quick set); and every case has such a
config."""

import itertools
import os
import subprocess
import sys

import pytest
import triton
from helpers import DEVICE

from nanogpt2.kernels import SUPPORTED_HEAD_DIMS, attention


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels compile for real in every other test")
@pytest.mark.skipif(
    tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9), reason="uses triton 3.9's compiler API"
)
def test_choosable_configs_compile_for_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "benches.sass", "--quick", "--jobs", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_every_case_has_a_spill_free_path(head_dim):
    """Each kernel a launch can take has a config listed as spill-free: the forward and dQ kernels on both load
    paths, the dK/dV kernel on the path `_resolve_path` falls back to."""
    for group, tma, atomic in itertools.product((1, 3), (True, False), (True, False)):
        assert attention.allowed_tiles("fwd", head_dim, group, tma, False)
        assert attention.allowed_tiles("dq", head_dim, group, tma, False)
        tma_used, atomic_used = attention._resolve_path(head_dim, group, tma, atomic)
        assert attention.allowed_tiles("dkdv", head_dim, group, tma_used, atomic_used)
        if attention.allowed_tiles("dkdv", head_dim, group, tma, atomic):
            assert (tma_used, atomic_used) == (tma, atomic)
