"""The kernels' host path on a fake sm_90 GPU (benches/host.py): launches per call, no zero-filled gradients, and
under torch.compile one graph with no break whose kernels launch without the ops' Python bodies. Times are the
bench's business, not a test's."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a subprocess that imports torch and traces two compiled models


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("host") / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "benches.host", "--quick", "--compile", "--json", str(path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(path.read_text())


def test_launches_per_call_and_no_zero_fills(report):
    launches = {case["case"]: case["launches"] for case in report["cases"]}
    assert launches == {
        "attention fwd": 1,
        "attention fwd+bwd MHA": 4,  # backward: preprocess, dK/dV (+ atomic dQ), dQ conversion
        "attention fwd+bwd GQA": 4,
        "attention fwd+bwd window 256": 4,
        "packed qkv + RoPE fwd+bwd": 5,  # RoPE forward; no RoPE backward, no cat: both inside the attention backward
        "rope fwd+bwd": 2,
    }
    assert all(case["fills"] == 0 for case in report["cases"]), report["cases"]


def test_compiled_model_launches_the_kernels_from_one_graph(report):
    for row in report["compiled"]:
        assert row["graphs"] == 1 and row["graph_breaks"] == 0, row
        assert row["op_bodies_run"] == 0, row  # Inductor's graph calls the kernels, not our Python
        assert row["launches_per_step"] >= 8, row  # 2 layers x (forward 1 + backward 3), RoPE forwards besides
