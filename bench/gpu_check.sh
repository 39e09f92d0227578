#!/usr/bin/env bash
# Everything a GPU can tell us about nanogpt2, in under 8 minutes on an H100 (see ../shared/gpu/README.md):
#   bash bench/gpu_check.sh [RESULTS_DIR]        # default gpu-results/; run from the repository root
# 1. names the machine and versions; 2. installs wheels from .whl/ (no network) into a --target dir;
# 3. the test suite on CUDA (kernels compiled for real, one autotune config each); 4. python -m bench.kernels;
# 5. a short GPT-2 training benchmark: --attn triton, --attn torch, FSDP on one rank; 6. a summary table, last.
# Every step runs under its own timeout; a failure is reported, never fatal. Logs: RESULTS_DIR/<step>.log.
set -u
cd "$(dirname "$0")/.."
RESULTS=$(realpath -m "${1:-gpu-results}")
mkdir -p "$RESULTS"
SCRATCH=$(mktemp -d)  # wheels and training checkpoints: too big to bring back with the results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY=()

# step NAME TIMEOUT_S CMD...: run CMD under timeout, log to RESULTS/NAME.log (and the screen), record the outcome.
step() {
  local name=$1 limit=$2; shift 2
  echo "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]} status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAILED (rc $rc)"; fi
  SUMMARY+=("$(printf '%-14s %-16s %5ss' "$name" "$status" "$((SECONDS - t0))")")
}

step machine 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv &&
  python -c "import torch, triton; print(\"torch\", torch.__version__, \"| triton\", triton.__version__,
  \"| cuda\", torch.version.cuda, \"|\", torch.cuda.get_device_name())" && git log -1 --format="commit %h %s"'

if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 120 pip install --no-index --no-deps --target "$SCRATCH/site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$SCRATCH/site"
fi

# Tests check correctness, not speed: one config per kernel keeps the compilations to one per variant.
step tests 180 env NANOGPT2_AUTOTUNE=0 python -m pytest -x -q tests
step bench 150 python -m bench.kernels --json "$RESULTS/bench_kernels.json"
TRAIN=(--preset gpt2 --data synthetic --max-steps 30 --eval-batches 2)
for attn in triton torch; do
  step "train-$attn" 60 python train.py "${TRAIN[@]}" --attn "$attn" --out-dir "$SCRATCH/train-$attn"
  cp "$SCRATCH/train-$attn/metrics.jsonl" "$RESULTS/train-$attn.metrics.jsonl" 2>/dev/null
done
# FSDP on NCCL with one rank: the sharding machinery (all-gathers, reduce-scatters) against the plain run above.
step train-fsdp 60 python -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${TRAIN[@]}" --fsdp \
  --out-dir "$SCRATCH/train-fsdp"
cp "$SCRATCH/train-fsdp/metrics.jsonl" "$RESULTS/train-fsdp.metrics.jsonl" 2>/dev/null
rm -rf "$SCRATCH"

echo
echo "=================================== SUMMARY ==================================="
python - "$RESULTS" <<'EOF'
import json, statistics, sys
from pathlib import Path

results = Path(sys.argv[1])
bench = results / "bench_kernels.json"
if bench.exists():
    data = json.loads(bench.read_text())
    print(f"{data['device']} | torch {data['torch']} | triton {data['triton']} | commit {data['commit']}")
    print(f"copy bandwidth {data['copy_gbs']:.0f} GB/s; ratios are baseline ms / triton ms (> 1: triton faster)")
    for r in data["rows"]:
        rate = "tflops" if r["kernel"] == "attention" else "gbs"
        line = f"{r['kernel']:<9} {r['case']:<11} {r['mode']:<7} triton "
        line += f"{r['triton_ms']:8.3f} ms {r[f'triton_{rate}']:6.1f}" if "triton_ms" in r else "FAILED".rjust(18)
        for impl in ("sdpa", "flex", "eager"):
            if f"x_{impl}" in r:
                line += f" | x{r[f'x_{impl}']:.2f} vs {impl}"
            elif f"{impl}_error" in r:
                line += f" | {impl} failed"
        if "of_copy" in r:
            line += f" | {100 * r['of_copy']:.0f}% of copy"
        if "max_diff" in r:
            line += f" | max|diff| {r['max_diff']:.1e}"
        print(line)
else:
    print("no kernel benchmark results")
for attn in ("triton", "torch", "fsdp"):
    path = results / f"train-{attn}.metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if r["step"] > 10] or rows  # past warm-up and compilation
    if not rows:
        print(f"train {attn}: no metrics")
        continue
    ms = statistics.median(r["ms"] for r in rows)
    tok_s = statistics.median(r["tok_s"] for r in rows)
    mfu = statistics.median(r.get("mfu", 0.0) for r in rows)
    print(f"train {attn:<7}: {ms:7.1f} ms/step | {tok_s:10,.0f} tok/s | mfu {100 * mfu:4.1f}% "
          f"| loss {rows[-1]['loss']:.3f} (median of {len(rows)} steps)")
EOF
echo "step           status           time"
printf '%s\n' "${SUMMARY[@]}"
echo "logs and JSON: $RESULTS"
