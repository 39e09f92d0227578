"""Every training mode of train.py on one CUDA GPU under torchrun: DDP, FSDP2, FSDP2 with activation checkpointing and
FSDP2 compiled, each against a plain process at the same seed, saved, resumed and consolidated.

    python -m benches.train_modes                                  # gpt2, bf16, NCCL, a world of one: the table
    python -m benches.train_modes --json out.json --deadline 70    # and the runs as JSON; start no command after 70 s
    python -m benches.train_modes --dry-run                        # CPU, gloo, pico: checks the commands only

A world of one still runs every multi-process code path (NCCL refuses two ranks on one GPU): init_process_group,
DDP's gradient buckets, FSDP2's bf16 parameters with fp32 gradient reduction, activation checkpointing, a DCP sharded
checkpoint written from GPU memory and resumed. Each command is the real command line, in a fresh process:

1. At once, untimed: `python train.py` for STEPS steps, the plain baseline (same seed, same synthetic tokens); and
   per mode `torchrun --standalone --nproc_per_node=1 train.py MODE` for STEPS - 2 steps, `--resume` for the last
   two, then `python -m nanogpt2.checkpoint RUN --out model.pt`.
2. Per mode, one at a time, timed: the same torchrun command for STEPS steps uninterrupted. Its tokens/s (median
   after the first step) and peak memory from its summary.json (torch.cuda.max_memory_allocated; the peak RSS in the
   dry run), beside README's computed figure; its loss at every step against the plain run's (bf16: within 1e-2).
   Resume is exact when the resumed steps' losses equal this run's bit for bit: every run uses one attention tile
   config and the deterministic dQ, so two runs of the same steps agree; "rerun" (the first steps' difference)
   shows whether they did.

Flags train.py may have gained are read from its parser: `--log-every 1` where it exists, and `--no-compile` for every
run but the compiled one where compiling became the default.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benches import common

REPO = Path(__file__).resolve().parent.parent
MODES = {  # name -> train.py's flags under torchrun, in priority order
    "ddp": [],
    "fsdp": ["--fsdp"],
    "fsdp-ac": ["--fsdp", "--activation-checkpointing"],
    "fsdp-compile": ["--fsdp", "--compile"],
}
PHASES = ("first", "resumed", "consolidated", "full")  # a mode's commands: saved, resumed, consolidated; timed
RESUMED_STEPS = 2
LOSS_TOL = 1e-2  # |mode - plain| at each step: bf16 (FSDP computes with bf16 parameters, plain under autocast)
# 16 x 1024 tokens a micro-batch, README's activation figures' micro-batch; few steps: most of each run is start-up.
GPU_FLAGS = ["--preset", "gpt2", "--seq-len", "1024", "--batch-size", "16"]
DRY_RUN_FLAGS = ["--preset", "pico", "--vocab-size", "256", "--seq-len", "32", "--batch-size", "4", "--device", "cpu"]
COMMON_FLAGS = ["--data", "synthetic", "--grad-accum", "1", "--warmup-steps", "1", "--eval-every", "0"]
COMMON_FLAGS += ["--eval-batches", "1", "--save-every", "0", "--seed", "1337"]
FUSED_LOSS_GIB = 0.5  # README: the fused loss's chunk of logits and the tied embedding's gradient at gpt2, 16 x 1024
COMMAND_TIMEOUT_S = 300  # a command that hangs (a collective that never completes) fails instead of holding the GPU
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]


def added_flags() -> tuple[list[str], list[str]]:
    """Flags train.py's parser has gained (issue 19's step loop), as it is now: (for every run: every step logged;
    for the runs that must not compile, where compiling became the default)."""
    from nanogpt2.config import build_parser

    help_text = build_parser().format_help()
    every = ["--log-every", "1"] if "--log-every" in help_text else []
    return every, (["--no-compile"] if "--no-compile" in help_text else [])


def child_env() -> dict:
    """This environment without a torchrun rank's variables, with one attention tile config per kernel and the
    deterministic dQ, so that two runs of the same steps agree bit for bit."""
    rank_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rank_vars}
    path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # gpu_check.sh's wheels stay on it
    return env | {"PYTHONPATH": path, "NANOGPT2_AUTOTUNE": "0", "NANOGPT2_ATTN_DETERMINISTIC": "1"}


def run_command(label: str, cmd: list[str], deadline: float) -> dict:
    """Run `cmd` from the repository root unless the deadline has passed: status "ok", "failed" (with its error
    lines, also printed) or "timeout", and its wall-clock seconds."""
    if time.monotonic() > deadline:
        result = {"status": "not run (deadline)"}
    else:
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S)  # fmt: skip
            result = {"status": "ok" if done.returncode == 0 else "failed"}
            if done.returncode != 0:  # the error lines (torchrun's summary after them says little), or the last
                lines = (done.stdout + done.stderr).splitlines()
                result["tail"] = ([line for line in lines if "error" in line.lower()[:40]] or lines)[-15:]
        except subprocess.TimeoutExpired:
            result = {"status": "timeout"}
        result["wall_s"] = time.perf_counter() - t0
    wall = f" ({result['wall_s']:.1f} s)" if "wall_s" in result else ""
    print("\n    ".join([f"{label:<28} {result['status']}{wall}", *result.get("tail", [])]), flush=True)
    return {"cmd": cmd, **result}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss from a run's metrics.jsonl: the last row of each step (a resumed run appends); rows without
    a step and a loss, or torn, are left out."""
    losses = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return losses
    for line in lines:
        try:
            row = json.loads(line)
            losses[int(row["step"])] = float(row["loss"])
        except (ValueError, TypeError, KeyError):
            continue
    return losses


def readme_gib(record: dict, checkpointed: bool) -> float | None:
    """README's computed peak memory per GPU for a world of one: 16 bytes a parameter (fp32 weights, gradients and
    AdamW's two moments), 34 x n_embd bytes a token and layer of activations (one layer's with activation
    checkpointing), and the fused loss."""
    if not record:
        return None
    model, train = record["model_config"], record["train_config"]
    tokens = train["batch_size"] // train["grad_accum"] * train["seq_len"]  # one micro-batch, on the one rank
    layers = 1 if checkpointed else model["n_layer"]
    return (16 * record["n_params"] + 34 * model["n_embd"] * tokens * layers) / 2**30 + FUSED_LOSS_GIB


def max_diff(a: dict[int, float], b: dict[int, float], steps: range) -> float | None:
    """The largest |a - b| over `steps`; None when either lacks one of them."""
    if any(s not in a or s not in b for s in steps):
        return None
    return max(abs(a[s] - b[s]) for s in steps)


def analyse(name: str, runs: dict, dirs: dict, plain: dict, steps: int) -> dict:
    """One mode's numbers and verdict from its runs, their directories and the plain run (its result and losses):
    FAIL when a command failed or a check did not hold, MISSING when a command (the plain one included) was not run."""
    full, split = step_losses(dirs["full"]), step_losses(dirs["split"])
    summary, record = read_json(dirs["full"] / "summary.json"), read_json(dirs["full"] / "run.json")
    first = steps - RESUMED_STEPS
    out = {
        "flags": MODES[name],
        "runs": runs,
        "losses": {"full": full, "split": split},
        "tokens_per_s": summary.get("tokens_per_s"),
        "peak_gib": summary["peak_mem_mib"] / 1024 if "peak_mem_mib" in summary else None,
        "readme_gib": readme_gib(record, "--activation-checkpointing" in MODES[name]),
        "loss_diff": max_diff(full, plain.get("losses", {}), range(1, steps + 1)),
        "rerun_diff": max_diff(split, full, range(1, first + 1)),
        "resume_diff": max_diff(split, full, range(first + 1, steps + 1)),
    }
    statuses = [plain["status"], *(runs.get(phase, {}).get("status", "not run") for phase in PHASES)]
    if any(s in ("failed", "timeout") for s in statuses):
        out["verdict"] = "FAIL"
    elif any(s != "ok" for s in statuses):
        out["verdict"] = "MISSING"
    else:
        ok = out["loss_diff"] is not None and out["loss_diff"] <= LOSS_TOL and out["resume_diff"] == 0.0
        out["verdict"] = "PASS" if ok else "FAIL"
    return out


def resume_text(mode: dict) -> str:
    """exact, differs by X (and by how much the first steps of two fresh runs differed), or -."""
    diff, rerun = mode["resume_diff"], mode["rerun_diff"]
    if diff is None:
        return "-"
    return "exact" if diff == 0.0 else f"differs by {diff:.1e} (rerun {'-' if rerun is None else f'{rerun:.1e}'})"


def table(data: dict) -> tuple[list[str], list[list[str]]]:
    """The header and one row per mode, as strings: printed here and written as markdown by benches.summary."""
    peak = "peak RSS GiB" if data["device"] == "cpu (dry run)" else "peak GiB"
    header = ["mode", "flags", "tokens/s", peak, "README GiB", "max loss diff vs plain", "resume", "verdict"]

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    rows = []
    for name, m in data["modes"].items():
        rows.append([name, " ".join(m["flags"]) or "(DDP)", num(m["tokens_per_s"], "{:,.0f}"),
                     num(m["peak_gib"], "{:.2f}"), num(m["readme_gib"], "{:.2f}"), num(m["loss_diff"], "{:.1e}"),
                     resume_text(m), m["verdict"]])  # fmt: skip
    return header, rows


def targets(data: dict | None) -> list[tuple[str, str, str, str]]:
    """benches.summary's rows, one per mode: (target, measured, goal, PASS / FAIL / MISSING); MISSING without data."""
    goal = f"loss +-{LOSS_TOL:g}, resume exact"
    rows = []
    for name in MODES:
        m = (data or {}).get("modes", {}).get(name)
        if m is None:
            rows.append((f"training {name}, torchrun x1", "-", goal, "MISSING"))
            continue
        speed = None if m["tokens_per_s"] is None else f"{m['tokens_per_s']:,.0f} tok/s"
        peak = None if m["peak_gib"] is None else f"{m['peak_gib']:.2f} GiB"
        measured = ", ".join(part for part in (speed, peak) if part) or "-"
        rows.append((f"training {name}, torchrun x1", measured, goal, m["verdict"]))
    return rows


def print_table(data: dict) -> None:
    header, rows = table(data)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    plain = data["plain"]
    print(f"plain baseline: {plain['status']}, {data['settings']['steps']} steps; loss tolerance {LOSS_TOL:g}")


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__, "also write the settings, every command and result to this JSON file",
                           "start no command after S seconds")  # fmt: skip
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to run (default: all)")
    parser.add_argument("--steps", type=int, help="steps of the uninterrupted runs (default: 6; 3 in the dry run)")
    parser.add_argument("--jobs", type=int, default=len(MODES) + 1, help="untimed commands at once (default: 5)")
    parser.add_argument("--work-dir", type=Path, help="where the runs' checkpoints go, deleted at the end")
    args = parser.parse_args(argv)
    common.select_device(args.dry_run, "benches.train_modes")
    deadline = time.monotonic() + args.deadline
    steps = args.steps or (3 if args.dry_run else 6)
    if steps <= RESUMED_STEPS:
        sys.exit(f"benches.train_modes: --steps must be more than the {RESUMED_STEPS} resumed steps, got {steps}")
    every, eager = added_flags()
    flags = [*(DRY_RUN_FLAGS if args.dry_run else GPU_FLAGS), *COMMON_FLAGS, "--decay-steps", str(steps), *every]
    env = common.environment(args.dry_run)
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    settings = {"flags": flags, "steps": steps, "resumed_steps": RESUMED_STEPS, "loss_tol": LOSS_TOL}

    def mode_flags(name: str) -> list[str]:
        return MODES[name] + ([] if "--compile" in MODES[name] else eager)

    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="train_modes-") as tmp:
        work = Path(tmp)
        dirs = {name: {"full": work / f"{name}-full", "split": work / f"{name}-split"} for name in args.modes}
        runs = {name: {} for name in args.modes}
        plain = {"status": "not run"}

        def train(label: str, launcher: list[str], out_dir: Path, *extra: str) -> dict:
            return run_command(label, [*launcher, "train.py", *flags, "--out-dir", str(out_dir), *extra], deadline)

        def run_plain() -> None:
            plain.update(train("plain", [sys.executable], work / "plain", "--max-steps", str(steps), *eager))
            plain["losses"] = step_losses(work / "plain")

        def save_resume_consolidate(name: str) -> None:
            split, r = dirs[name]["split"], runs[name]
            first = steps - RESUMED_STEPS
            r["first"] = train(f"{name}: {first} steps", TORCHRUN, split, "--max-steps", str(first), *mode_flags(name))
            if r["first"]["status"] == "ok":
                cmd = [*TORCHRUN, "train.py", "--resume", str(split), "--max-steps", str(steps), *every]
                r["resumed"] = run_command(f"{name}: resumed", cmd + mode_flags(name), deadline)
            if r.get("resumed", {}).get("status") == "ok":
                cmd = [sys.executable, "-m", "nanogpt2.checkpoint", str(split), "--out", str(split / "model.pt")]
                r["consolidated"] = run_command(f"{name}: consolidated", cmd, deadline)

        def report() -> dict:
            """Everything so far, also written to --json (after each run: a step cut short leaves complete JSON)."""
            modes = {name: analyse(name, runs[name], dirs[name], plain, steps) for name in args.modes}
            data = {**env, "settings": settings, "plain": plain, "modes": modes}
            if args.json:
                common.write_json(args.json, data)
            return data

        # Untimed, at once: the plain baseline, and each mode saved, resumed and consolidated (which also fills
        # Triton's and Inductor's caches for the timed runs).
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = [pool.submit(run_plain)] + [pool.submit(save_resume_consolidate, name) for name in args.modes]
            for job in jobs:
                job.result()  # raises what a thread raised
        data = report()
        for name in args.modes:  # timed: one at a time, alone on the device
            runs[name]["full"] = train(f"{name}: {steps} steps", TORCHRUN, dirs[name]["full"], "--max-steps",
                                       str(steps), *mode_flags(name))  # fmt: skip
            data = report()
    print_table(data)
    if any(m["verdict"] == "FAIL" for m in data["modes"].values()):  # a failed plain run fails every mode
        sys.exit(1)


if __name__ == "__main__":
    main()
