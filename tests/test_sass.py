"""Static checks of the kernels for an H100/H200 without one: every config the autotuner may choose on the TMA
paths compiles for sm_90, spills no register, fits shared memory and (in bf16) runs its dots on wgmma; the TMA paths
use TMA. `python -m bench.sass` prints the full table; this runs its --quick set."""

import os
import subprocess
import sys

import pytest
import triton
from conftest import DEVICE


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels compile for real in every other test")
@pytest.mark.skipif(
    tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9), reason="uses triton 3.9's compiler API"
)
def test_choosable_configs_compile_for_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.sass", "--quick", "--jobs", "2"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
