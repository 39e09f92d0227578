"""Correctness of EVERY GPU config (tuning.TILES) of every attention kernel, forced one at a time, on a GPU.

    python -m benches.configs --json RESULTS/configs.json [--deadline 150]
    python -m benches.configs --dry-run          # CPU interpreter, tiny cases: exercises the code only

The tests run one config per kernel (NANOGPT2_AUTOTUNE=0); a pipelining or layout bug that shows only for some tile
shape on real hardware would hide there. Here every (forward, dK/dV, dQ) config runs on every code path its Tile
lists (TMA or pointer loads; atomic or deterministic dQ) on ragged T with GQA and a window, at head dims 64 and 128,
in bf16 and fp16, against a float64 reference with flash-attention's criterion (|err| <= 2 |err of PyTorch in the
same dtype| + 1e-3, 3x for dq). The i-th configs of the three kernels run together, so each config compiles once
per case and path.
Exit status 1 when any run fails or is wrong.
"""

import os
import sys
import time

import torch

from benches import common

# name: (B, T, H, Hkv, D, window); ragged T (not a multiple of any tile), GQA, windows.
CASES = {
    "gqa-window-d64": (2, 1000, 6, 2, 64, 256),
    "mha-d128": (1, 777, 4, 4, 128, None),
}
DRY_CASES = {"gqa-window-d64": (1, 150, 4, 2, 64, 40), "mha-d128": (1, 70, 2, 2, 128, None)}
PATHS = {
    "tma+atomic": dict(tma=True, deterministic=False),
    "tma+det": dict(tma=True, deterministic=True),
    "ptr+atomic": dict(tma=False, deterministic=False),
    "ptr+det": dict(tma=False, deterministic=True),
}


def attention_and_grads(fn, q, k, v, dout, window):
    out = fn(q, k, v, causal=True, window=window)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def check(case: tuple, dtype: torch.dtype, configs: dict, path: dict, device: str) -> dict:
    """Run the op with the forced configs on one case; the error of each output against the float64 reference."""
    from nanogpt2.kernels import attention, tuning
    from nanogpt2.kernels.reference import flash_attention_ref

    B, T, H, Hkv, D, window = case
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g, device=device, dtype=dtype)
    q, k, v = (t.view(B, T, -1, D).detach().requires_grad_() for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    dout = torch.randn(B, T, H, D, generator=g, device=device, dtype=dtype)
    with tuning.forced_configs(**configs):
        got = attention_and_grads(
            lambda *a, **kw: attention.flash_attention(*a, **kw, **path), q, k, v, dout, window
        )  # fmt: skip
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_and_grads(flash_attention_ref, q64, k64, v64, dout.double(), window)
    lowp = attention_and_grads(flash_attention_ref, q, k, v, dout, window)
    result = {}
    for name, o, r, lp in zip(("out", "dq", "dk", "dv"), got, ref, lowp, strict=True):
        err = (o.double() - r).abs().max().item()
        bound = (3.0 if name == "dq" else 2.0) * (lp.double() - r).abs().max().item() + 1e-3
        result[name] = {"err": err, "bound": bound, "ok": bool(torch.isfinite(o).all()) and err <= bound}
    return result


def main(argv: list[str] | None = None) -> None:
    args = common.parser(
        __doc__, "write every run to this JSON file (rewritten after each run)", "start no run after S seconds"
    ).parse_args(argv)
    device = common.select_device(args.dry_run, "benches.configs")
    os.environ["NANOGPT2_AUTOTUNE"] = "0"  # nothing autotunes: every launch here is forced
    from nanogpt2.kernels import tuning

    deadline = time.monotonic() + args.deadline
    runs, failed, skipped = [], 0, 0
    # In priority order: bf16 first (training's dtype), then fp16; one dtype x case x path x config set per run.
    plan = [
        (dtype, case_name, path_name, i)
        for dtype in (torch.bfloat16, torch.float16)
        for case_name in CASES
        for path_name in PATHS
        for i in range(max(len(tiles) for lists in tuning.TILES.values() for tiles in lists.values()))
    ]
    if args.dry_run:  # the interpreter is slow: two config sets per case and path, bf16
        plan = [p for p in plan if p[0] == torch.bfloat16 and p[3] < 2]
    for dtype, case_name, path_name, i in plan:
        case = (DRY_CASES if args.dry_run else CASES)[case_name]
        D, group = case[4], case[2] // case[3]
        configs, names = {}, {}
        path = PATHS[path_name]
        # The backward runs on the path resolve_path gives (the one asked for where its dK/dV kernel has configs).
        bwd_path = tuning.resolve_path(D, group, path["tma"], not path["deterministic"])
        for kernel in tuning.TILES:
            tma, atomic = (path["tma"], False) if kernel == "fwd" else bwd_path
            if kernel == "dq" and atomic:
                continue  # the atomic path has no dQ kernel
            tiles = tuning.allowed_tiles(kernel, D, group, tma, atomic)
            tile = tiles[i % len(tiles)]
            configs[kernel] = tile
            names[kernel] = f"{tile.block_m}x{tile.block_n} w{tile.warps} s{tile.stages}"
        run = {"dtype": str(dtype).removeprefix("torch."), "case": case_name, "path": path_name, "configs": names}
        if time.monotonic() > deadline:
            skipped += 1
            continue
        t0 = time.monotonic()
        try:
            run["errors"] = check(case, dtype, configs, PATHS[path_name], device)
            run["ok"] = all(e["ok"] for e in run["errors"].values())
        except Exception as e:  # a config that does not compile or crashes is a finding
            run["ok"], run["exception"] = False, f"{type(e).__name__}: {str(e)[:500]}"
        run["seconds"] = time.monotonic() - t0
        failed += not run["ok"]
        runs.append(run)
        errors = run.get("errors", {}).items()
        detail = run.get("exception") or ", ".join(f"{n} {e['err']:.1e}/{e['bound']:.1e}" for n, e in errors)
        tiles = " ".join(f"{k}={v}" for k, v in names.items())
        status = "ok  " if run["ok"] else "FAIL"
        seconds = f"{run['seconds']:5.1f}s"
        print(f"{status} {run['dtype']:<9} {case_name:<15} {path_name:<11} {tiles:<62} {seconds}  {detail}", flush=True)
        if args.json:
            common.write_json(args.json, {"runs": runs, "skipped": skipped})
    skipped = len(plan) - len(runs)
    print(f"configs: {len(runs)} runs, {failed} failed, {skipped} not run (deadline)")
    if args.json:
        common.write_json(args.json, {"runs": runs, "skipped": skipped})
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
