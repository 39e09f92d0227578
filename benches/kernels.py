"""Benchmark the Triton kernels and their candidate code paths against PyTorch baselines, in one process on one GPU.

    python -m benches.kernels                              # every case, the table
    python -m benches.kernels --json out.json --deadline 200   # rows as JSON; start no case after 200 s
    python -m benches.kernels --dry-run                    # CPU, interpreter, tiny shapes: exercises the code only

Attention (bf16, causal, forward and forward+backward), cases in priority order (a deadline cuts the tail): each
Triton candidate (TMA or pointer loads; atomic or deterministic dQ) against F.scaled_dot_product_attention (the first
backend among flash, cuDNN, efficient that runs, named in the row) and FlexAttention with causal / sliding-window
block masks. TFLOP/s count only the visible (query, key) pairs: 4 * B * H * D * pairs forward, 2.5x that for the
backward. Each implementation is timed three ways: launched as a user calls it (`ms`, do_bench), the kernels' own
time (`kernel_ms`: the sum of the kernel durations in a torch.profiler trace, per call), and, for the small cases,
as a CUDA-graph replay (`graph_ms`, inputs made before capture: launch gaps removed; the baselines' forward only,
as capturing their backward breaks the CUDA RNG's state for the rest of the process). Launched minus kernel time is
host overhead. RoPE against the eager
reference, in GB/s of the bytes that must move, beside a measured device-to-device copy bandwidth. Every Triton
result is checked against the first baseline's (max abs difference), so a fast but wrong path shows. Ratios are
baseline ms / Triton ms (the fastest candidate): above 1, Triton is faster.
"""

import functools
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benches import common

DTYPE = torch.bfloat16
# name: (B, T, H, Hkv, D, window); all causal; in priority order, should the deadline cut the run short.
ATTENTION_CASES = {
    "gpt2": (16, 1024, 12, 12, 64, None),
    "long": (2, 8192, 12, 12, 64, None),
    "long-w1024": (2, 8192, 12, 12, 64, 1024),
    "gpt2-gqa": (16, 1024, 12, 4, 64, None),
    "long-w256": (2, 8192, 12, 12, 64, 256),
    "hd128": (8, 1024, 6, 6, 128, None),
}
GRAPH_CASES = ("gpt2", "gpt2-gqa", "hd128")  # short enough (tens of microseconds) to be launch-bound
# name: (B, T, H, Hkv, D)
ROPE_CASES = {"gpt2": (16, 1024, 12, 12, 64), "gpt2-gqa": (16, 1024, 12, 4, 64)}
# Triton candidates: keyword arguments of flash_attention. The forward does not depend on the dQ path.
CANDIDATES = {
    "tma+atomic": dict(tma=True, deterministic=False),
    "tma+det": dict(tma=True, deterministic=True),
    "ptr+atomic": dict(tma=False, deterministic=False),
    "ptr+det": dict(tma=False, deterministic=True),
}
FWD_CANDIDATES = {"tma": dict(tma=True), "ptr": dict(tma=False)}


class Bench:
    """Where and how to time: a CUDA device with do_bench, or (dry run) the CPU interpreter with a wall clock."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"

    def ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn() after warm-up (triton.testing.do_bench: CUDA events, L2 flushed)."""
        if self.dry_run:
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def kernel_ms(self, fn: Callable[[], object], calls: int = 10) -> float:
        """Milliseconds of GPU kernel time per fn() call: the sum of the kernel durations torch.profiler records."""
        if self.dry_run:
            return self.ms(fn)
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        return sum(e.device_time for e in events) / calls / 1e3

    def graph_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn() replayed from a CUDA graph (launch gaps removed)."""
        if self.dry_run:
            return self.ms(fn)
        import triton

        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def visible_pairs(T: int, window: int | None) -> int:
    """(query, key) pairs a causal (optionally windowed) attention over T positions computes."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def visible_tiles(T: int, window: int | None, block: int = 128) -> int:
    """(block x block) score tiles with at least one visible pair: the work of a tiled kernel."""
    window = T if window is None else window
    tiles = 0
    for m in range(0, T, block):
        last_row = min(m + block, T) - 1
        tiles += last_row // block - max(m - window + 1, 0) // block + 1
    return tiles


def copy_bandwidth_gbs(bench: Bench) -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written) of a 1 GiB buffer: the ceiling for RoPE."""
    src = torch.empty(2**20 if bench.dry_run else 2**30, dtype=torch.uint8, device=bench.device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench.ms(lambda: dst.copy_(src)) / 1e6


def runner(op: Callable, args: tuple, mode: str, wrt: tuple, douts: tuple) -> Callable[[], tuple]:
    """A no-argument function that runs op(*args) ("fwd"), or op and the gradients of wrt for douts ("fwd+bwd")."""

    def run() -> tuple:
        out = op(*args)
        out = out if isinstance(out, tuple) else (out,)
        return out if mode == "fwd" else (*out, *torch.autograd.grad(out, wrt, douts))

    return run


def sdpa_baseline(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bench: Bench) -> tuple[str, Callable] | None:
    """PyTorch SDPA on (B, T, heads, D) inputs through the first backend among flash, cuDNN, efficient that runs
    this problem (GQA included), with that backend's name; None when none does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = k.shape[2] != q.shape[2]
    backends = [SDPBackend.MATH] if bench.dry_run else [
        SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION
    ]  # fmt: skip
    for backend in backends:

        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=gqa
                )
            return out.transpose(1, 2)

        try:
            sdpa(q, k, v)
        except RuntimeError:
            continue
        return backend.name.lower(), sdpa
    return None


def flex_baseline(T: int, window: int | None, gqa: bool, bench: Bench) -> Callable:
    """FlexAttention with a causal or sliding-window block mask, compiled (it is only fast compiled; eager on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        visible = q_idx >= kv_idx
        return visible if window is None else visible & (q_idx - kv_idx < window)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=bench.device)
    flex = flex_attention if bench.dry_run else torch.compile(flex_attention, dynamic=False)

    def flex_attn(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=gqa)
        return out.transpose(1, 2)

    return flex_attn


def max_diff(a: tuple, b: tuple) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


def time_impl(row: dict, impl: str, fn: Callable, flops_or_bytes: float, rate: str, bench: Bench) -> tuple | None:
    """Run and time one implementation into row["results"][impl]; return its outputs (None if it failed)."""
    try:
        out = fn()
        ms = bench.ms(fn)
        row["results"][impl] = {"ms": ms, rate: flops_or_bytes / ms / (1e9 if rate == "tflops" else 1e6)}
    except Exception as e:  # a broken candidate or baseline must not hide the others
        row["results"][impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        return None
    try:
        row["results"][impl]["kernel_ms"] = bench.kernel_ms(fn)
    except Exception as e:  # the profiler's failure leaves the launched time standing
        row["results"][impl]["kernel_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def finish_row(row: dict, outputs: dict[str, tuple], baselines: list[str]) -> None:
    """The fastest Triton candidate, each baseline's ratio to it, and its max difference to the first baseline."""
    timed = {i: r["ms"] for i, r in row["results"].items() if "ms" in r}
    triton_impls = [i for i in timed if i.startswith("triton")]
    if not triton_impls:
        return
    best = min(triton_impls, key=timed.get)
    row["best"] = best
    for b in baselines:
        if b in timed:
            row[f"x_{b}"] = timed[b] / timed[best]
            kernel = {i: row["results"][i].get("kernel_ms") for i in (b, best)}
            if all(kernel.values()):
                row[f"x_{b}_kernel"] = kernel[b] / kernel[best]
    reference = next((outputs[b] for b in baselines if outputs.get(b) is not None), None)
    if reference is not None:
        row["max_diff"] = {i: max_diff(outputs[i], reference) for i in triton_impls if outputs.get(i) is not None}


def bench_attention(cases: dict, bench: Bench, record: Callable[[dict], None], deadline: float) -> None:
    from nanogpt2.kernels import flash_attention

    for name, (B, T, H, Hkv, D, window) in cases.items():
        if time.monotonic() > deadline:
            record({"kernel": "attention", "case": name, "skipped": "deadline"})
            continue
        qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=bench.device, dtype=DTYPE)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)  # views of a fused projection, as in the model
        q, k, v = (t.view(B, T, -1, D).detach().requires_grad_() for t in (q, k, v))
        dout = torch.randn(B, T, H, D, device=bench.device, dtype=DTYPE)
        fwd_flops = 4 * B * H * D * visible_pairs(T, window)
        baselines = {}
        try:
            sdpa = sdpa_baseline(q, k, v, bench) if window is None else None
            if sdpa is not None:
                baselines["sdpa"] = sdpa[1]
            baselines["flex"] = flex_baseline(T, window, Hkv != H, bench)
        except Exception as e:
            print(f"{name}: a baseline is unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        for mode, flops, candidates in (("fwd", fwd_flops, FWD_CANDIDATES), ("fwd+bwd", 3.5 * fwd_flops, CANDIDATES)):
            row = {"kernel": "attention", "case": name, "shape": [B, T, H, Hkv, D], "window": window, "mode": mode,
                   "tiles": visible_tiles(T, window), "results": {}}  # fmt: skip
            if "sdpa" in baselines:
                row["sdpa_backend"] = sdpa[0]
            impls = {
                f"triton[{c}]": functools.partial(flash_attention, causal=True, window=window, **kw)
                for c, kw in candidates.items()
            }
            impls |= baselines
            outputs = {}
            for impl, attn in impls.items():
                fn = runner(attn, (q, k, v), mode, (q, k, v), (dout,))
                outputs[impl] = time_impl(row, impl, fn, flops, "tflops", bench)
            finish_row(row, outputs, list(baselines))
            if name in GRAPH_CASES and "best" in row:
                for impl in (row["best"], *(baselines if mode == "fwd" else ())):
                    try:
                        fn = runner(impls[impl], (q, k, v), mode, (q, k, v), (dout,))
                        row["results"][impl]["graph_ms"] = bench.graph_ms(fn)
                    except Exception as e:
                        row["results"][impl]["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            record(row)


def bench_rope(cases: dict, copy_gbs: float, bench: Bench, record: Callable[[dict], None]) -> None:
    from nanogpt2.kernels import apply_rope
    from nanogpt2.kernels.reference import apply_rope_ref

    for name, (B, T, H, Hkv, D) in cases.items():
        qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=bench.device, dtype=DTYPE)
        q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k = q.view(B, T, H, D).detach().requires_grad_(), k.view(B, T, Hkv, D).detach().requires_grad_()
        pos = torch.arange(T, device=bench.device)[:, None]
        angles = pos * 10000 ** -(torch.arange(D // 2, device=bench.device) / (D // 2))
        cos, sin = angles.cos().float(), angles.sin().float()
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        # Read q and k, write their rotations (backward: the same for the gradients); cos/sin once.
        fwd_bytes = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * 4
        for mode, nbytes in (("fwd", fwd_bytes), ("fwd+bwd", 2 * fwd_bytes)):
            row = {"kernel": "rope", "case": name, "shape": [B, T, H, Hkv, D], "mode": mode, "copy_gbs": copy_gbs,
                   "results": {}}  # fmt: skip
            outputs = {}
            for impl, rope in (("triton", apply_rope), ("eager", apply_rope_ref)):
                fn = runner(rope, (q, k, cos, sin), mode, (q, k), (dq, dk))
                outputs[impl] = time_impl(row, impl, fn, nbytes, "gbs", bench)
            finish_row(row, outputs, ["eager"])
            if "gbs" in row["results"]["triton"]:
                row["of_copy"] = row["results"]["triton"]["gbs"] / copy_gbs
            record(row)


def format_row(row: dict) -> str:
    """One line per (kernel, case, mode): each implementation's time and rate, the best Triton's ratios."""
    if "skipped" in row:
        return f"{row['kernel']:<9} {row['case']:<11} skipped ({row['skipped']})"
    unit = "TFLOP/s" if row["kernel"] == "attention" else "GB/s"
    rate = "tflops" if row["kernel"] == "attention" else "gbs"
    parts = [f"{row['kernel']:<9} {row['case']:<11} {row['mode']:<7}"]
    for impl, r in row["results"].items():
        if "ms" in r:
            graph = f" (kernels {r['kernel_ms']:.3f})" if "kernel_ms" in r else ""
            graph += f" (graph {r['graph_ms']:.3f})" if "graph_ms" in r else ""
            parts.append(f"{impl} {r['ms']:.3f} ms{graph} {r[rate]:.1f} {unit}")
        else:
            parts.append(f"{impl} FAILED: {r['error'][:80]}")
    ratios = [f"x{row[key]:.2f} vs {key[2:].replace('_', ' ')}" for key in row if key.startswith("x_")]
    if "best" in row:
        parts.append(f"best {row['best']}" + (f" ({', '.join(ratios)})" if ratios else ""))
    if "sdpa_backend" in row:
        parts.append(f"sdpa backend {row['sdpa_backend']}")
    if "of_copy" in row:
        parts.append(f"{100 * row['of_copy']:.0f}% of copy")
    if row.get("max_diff"):
        parts.append(f"max|diff| {max(row['max_diff'].values()):.2e}")
    return " | ".join(parts)


def dry_run_cases() -> tuple[dict, dict]:
    """Tiny stand-ins for every case (same names, windows scaled down), for the interpreter."""
    attention = {name: (1, 96, 2, 2 if Hkv == H else 1, D, window and window // 64)
                 for name, (B, T, H, Hkv, D, window) in ATTENTION_CASES.items()}  # fmt: skip
    rope = {name: (1, 16, 2, 2 if Hkv == H else 1, D) for name, (B, T, H, Hkv, D) in ROPE_CASES.items()}
    return attention, rope


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(
        __doc__, "also write the environment and every row to this JSON file", "start no attention case after S seconds"
    )
    parser.add_argument("--only", choices=["attention", "rope"], help="one kernel's benchmarks (default: both)")
    args = parser.parse_args(argv)
    common.select_device(args.dry_run, "benches.kernels")
    bench = Bench(args.dry_run)
    deadline = time.monotonic() + args.deadline
    attention_cases, rope_cases = dry_run_cases() if args.dry_run else (ATTENTION_CASES, ROPE_CASES)
    env = common.environment(args.dry_run)
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    copy_gbs = copy_bandwidth_gbs(bench)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s", flush=True)
    rows = []

    def record(row: dict) -> None:
        # Rewritten after every row, so a run cut short by a timeout still leaves its results.
        rows.append(row)
        print(format_row(row), flush=True)
        if args.json:
            common.write_json(args.json, {**env, "copy_gbs": copy_gbs, "rows": rows})

    if args.only in (None, "rope"):  # first: seconds, no autotuning
        bench_rope(rope_cases, copy_gbs, bench, record)
    if args.only in (None, "attention"):
        bench_attention(attention_cases, bench, record, deadline)


if __name__ == "__main__":
    main()
