#!/usr/bin/env bash
# Everything one GPU run can tell us about nanogpt2's kernels and training, ending in a verdict, in at most 8 minutes
# on one H100/H200 (benches/README.md says what each step does and what to do with the results):
#   bash benches/gpu_check.sh [RESULTS_DIR]             # default gpu-results/; run from the repository root
#   bash benches/gpu_check.sh --dry-run [RESULTS_DIR]   # on CPU: every step on tiny shapes, Triton's interpreter
#   GPU_CHECK_BUDGET_S=400 GPU_CHECK_SKIP="configs" bash benches/gpu_check.sh   # a shorter rerun: budget, steps left out
# Every step does not fit one 8-minute run: a session lent a GPU for the kernels (issue 25) runs it as is (the
# training steps get what is left); one for training (issues 26, 29) skips the kernel steps:
#   GPU_CHECK_SKIP="configs tests bench" bash benches/gpu_check.sh gpu-results
# Steps, in priority order, each under its own timeout (a failure is reported, never fatal): 1. machine and versions;
# 2. wheels from .whl/ (the GPU machine has no network); 3. every autotune config of every attention kernel, forced
# one at a time, against the reference (benches.configs); 4. the attention and RoPE test files; 5. benchmarks of every
# candidate path against SDPA / FlexAttention / eager RoPE (benches.kernels); 6. GPT-2 training, --attn triton vs
# torch; 7. the training step with the fused loss against the full logits, over micro-batches up to ones the full
# logits cannot fit (benches.train_loss); 8. the verdict (benches.summary): PASS/FAIL per target, RESULTS_DIR/summary.md
# and defaults.json; 9. the rest of the test suite, only with the time left. Logs: RESULTS_DIR/<step>.log.
set -u
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
RESULTS=$(realpath -m "${1:-gpu-results}")
mkdir -p "$RESULTS"
SCRATCH=$(mktemp -d)  # wheels and training checkpoints: too big to bring back with the results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1  # triton >= 3.9 warns when unset; fusion on, as on older versions
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}  # the whole script: 8 minutes unless set (the dry run, on CPU, is given 30)
SUMMARY=()

# train.py's flags, named only here (its CLI is being refactored: check `python train.py --help` when a step fails).
TRAIN_FLAGS=(--preset gpt2 --data synthetic --max-steps 30 --eval-every 0 --eval-batches 2)
TRAIN_ATTN=(triton torch)  # values of --attn compared
DRY=()
if [ "$DRY_RUN" = 1 ]; then
  TRAIN_FLAGS=(--preset pico --data synthetic --max-steps 3 --seq-len 64 --batch-size 4 --eval-every 0 --eval-batches 1
    --device cpu)
  TRAIN_ATTN=(torch torch)  # --attn triton needs CUDA: the dry run checks the plumbing with torch twice
  DRY=(--dry-run)
  BUDGET_S=1800
fi

# step NAME TIMEOUT_S CMD...: run CMD under min(TIMEOUT_S, time left), log to RESULTS/NAME.log (and the screen),
# record the outcome; skipped when less than 10 s are left, or when GPU_CHECK_SKIP (names, space-separated) has NAME.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    SUMMARY+=("$(printf '%-14s %-16s' "$name" "SKIPPED (asked)")"); return
  fi
  if [ "$left" -lt 10 ]; then SUMMARY+=("$(printf '%-14s %-16s' "$name" "SKIPPED (time)")"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]} status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAILED (rc $rc)"; fi
  SUMMARY+=("$(printf '%-14s %-16s %5ss' "$name" "$status" "$((SECONDS - t0))")")
}

if [ "$DRY_RUN" = 1 ]; then
  step machine 30 bash -c 'echo "dry run: no GPU queried"; python -c "import torch, triton; print(\"torch\",
    torch.__version__, \"| triton\", triton.__version__)"; git log -1 --format="commit %h %s"'
else
  step machine 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv &&
    python -c "import torch, triton; print(\"torch\", torch.__version__, \"| triton\", triton.__version__,
    \"| cuda\", torch.version.cuda, \"|\", torch.cuda.get_device_name())" && git log -1 --format="commit %h %s"'
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 60 pip install --no-index --no-deps --target "$SCRATCH/site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$SCRATCH/site"
fi

# Each Python step gets a --deadline 20 s inside its timeout, so it stops between runs and leaves complete JSON.
step configs 150 python -m benches.configs "${DRY[@]}" --deadline 130 --json "$RESULTS/configs.json"
# The test files with their own settings, one config per kernel (every config was checked above).
if [ "$DRY_RUN" = 1 ]; then
  step tests 90 python -m pytest -x -q tests/test_rope.py -k "rejects or slices"
else
  step tests 90 env NANOGPT2_AUTOTUNE=0 python -m pytest -x -q tests/test_attention.py tests/test_rope.py
fi
step bench 190 python -m benches.kernels "${DRY[@]}" --deadline 150 --json "$RESULTS/bench_kernels.json"
for run in "triton:${TRAIN_ATTN[0]}" "torch:${TRAIN_ATTN[1]}"; do
  name=train-${run%%:*} attn=${run#*:}
  step "$name" 50 python train.py "${TRAIN_FLAGS[@]}" --attn "$attn" --out-dir "$SCRATCH/$name"
  cp "$SCRATCH/$name/metrics.jsonl" "$RESULTS/$name.metrics.jsonl" 2>/dev/null
done
# Fused loss against the full logits (a report, not a target: after the training runs). Its deadline leaves 20 s of
# its timeout, or of what is left of the budget when less: it is the last timed step before the optional rest.
loss_deadline=$((BUDGET_S - SECONDS - 20))
[ "$loss_deadline" -gt 60 ] && loss_deadline=60
step loss 80 python -m benches.train_loss "${DRY[@]}" --deadline "$loss_deadline" --json "$RESULTS/train_loss.json"
# DDP, FSDP, FSDP + activation checkpointing, FSDP + compile under torchrun (a world of one, NCCL), each against a
# plain run, saved, resumed and consolidated (benches.train_modes; the dry run's pico takes 80-160 s on 2 CPU cores).
step train-modes $((DRY_RUN ? 240 : 120)) python -m benches.train_modes "${DRY[@]}" --deadline $((DRY_RUN ? 200 : 85)) \
  --json "$RESULTS/train_modes.json" --work-dir "$SCRATCH"
# GPT-2 124M beside an unmodified nanoGPT (NANOGPT_DIR) on this GPU: ours eager, compiled, compiled + CUDA graphs.
step train-peer 300 python -m benches.train_peer "${DRY[@]}" --nanogpt "${NANOGPT_DIR:-../shared/peers/nanoGPT}" \
  --steps $((DRY_RUN ? 6 : 30)) --deadline 270 --json "$RESULTS/train_peer.json"

echo
echo "=================================== VERDICT ==================================="
python -m benches.summary "$RESULTS" 2>&1 | tee "$RESULTS/summary.log"
# Whatever time is left: the rest of the test suite on CUDA (the model, training and sampling on the real device).
if [ "$DRY_RUN" = 0 ]; then
  step tests-rest 600 env NANOGPT2_AUTOTUNE=0 python -m pytest -x -q tests --ignore tests/test_attention.py \
    --ignore tests/test_rope.py
fi
rm -rf "$SCRATCH"  # last: tests-rest imports the wheels installed there
echo "step           status           time"
printf '%s\n' "${SUMMARY[@]}"
echo "logs, JSON, summary.md (for BENCHMARKS.md) and defaults.json (fastest path): $RESULTS"
