"""Benchmark the Triton kernels against their PyTorch baselines, in one process on one CUDA device.

    python -m bench.kernels                      # the table
    python -m bench.kernels --json out.json      # and the rows as JSON (device, versions, commit included)

Attention (bf16, forward and forward+backward) against F.scaled_dot_product_attention on the flash backend
(enable_gqa for GQA; it has no sliding window) and FlexAttention with causal / sliding-window block masks; TFLOP/s
count only the visible (query, key) pairs: 4 * B * H * D * pairs forward, 2.5x that for the backward. RoPE against
the eager reference, in GB/s of the bytes that must move, beside a measured device-to-device copy bandwidth.
Every Triton result is also checked against the first baseline's (max abs difference), so a fast but wrong config
shows. Ratios are baseline ms / Triton ms: above 1, Triton is faster.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from kernels import apply_rope, flash_attention
from kernels.reference import apply_rope_ref

DEVICE = "cuda"
DTYPE = torch.bfloat16
# name: (B, T, H, Hkv, D, window); all causal; in order of importance, should a timeout cut the run short.
ATTENTION_CASES = {
    "gpt2": (16, 1024, 12, 12, 64, None),
    "gpt2-gqa": (16, 1024, 12, 4, 64, None),
    "long-w1024": (2, 8192, 12, 12, 64, 1024),
    "long": (2, 8192, 12, 12, 64, None),
    "long-w256": (2, 8192, 12, 12, 64, 256),
    "hd128": (8, 1024, 6, 6, 128, None),
}
# name: (B, T, H, Hkv, D)
ROPE_CASES = {"gpt2": (16, 1024, 12, 12, 64), "gpt2-gqa": (16, 1024, 12, 4, 64)}


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn() after warm-up (triton.testing.do_bench: CUDA events, L2 flushed)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def visible_pairs(T: int, window: int | None) -> int:
    """(query, key) pairs a causal (optionally windowed) attention over T positions computes."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written) of a 1 GiB buffer: the ceiling for RoPE."""
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e6


def runner(op: Callable, args: tuple, mode: str, wrt: tuple, douts: tuple) -> Callable[[], tuple]:
    """A no-argument function that runs op(*args) ("fwd"), or op and the gradients of wrt for douts ("fwd+bwd")."""

    def run() -> tuple:
        out = op(*args)
        out = out if isinstance(out, tuple) else (out,)
        return out if mode == "fwd" else (*out, *torch.autograd.grad(out, wrt, douts))

    return run


def attention_baselines(T: int, window: int | None, gqa: bool) -> dict[str, Callable]:
    """Baseline attentions on (B, T, heads, D) inputs (transposed views for PyTorch's (B, heads, T, D) layout)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    baselines = {}
    if window is None:

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=gqa
                )
            return out.transpose(1, 2)

        baselines["sdpa"] = sdpa
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return baselines

    def mask_mod(b, h, q_idx, kv_idx):
        visible = q_idx >= kv_idx
        return visible if window is None else visible & (q_idx - kv_idx < window)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=DEVICE)
    flex = torch.compile(flex_attention, dynamic=False)  # FlexAttention is only fast compiled

    def flex_attn(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=gqa)
        return out.transpose(1, 2)

    baselines["flex"] = flex_attn
    return baselines


def max_diff(a: tuple, b: tuple) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


def bench_attention(record: Callable[[dict], None]) -> None:
    for name, (B, T, H, Hkv, D, window) in ATTENTION_CASES.items():
        qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEVICE, dtype=DTYPE)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)  # views of a fused projection, as in the model
        q, k, v = (t.view(B, T, -1, D).detach().requires_grad_() for t in (q, k, v))
        dout = torch.randn(B, T, H, D, device=DEVICE, dtype=DTYPE)
        fwd_flops = 4 * B * H * D * visible_pairs(T, window)
        impls = {"triton": lambda q, k, v, w=window: flash_attention(q, k, v, causal=True, window=w)}
        try:
            impls |= attention_baselines(T, window, gqa=Hkv != H)
        except Exception as e:  # a missing or broken baseline must not hide the Triton numbers
            print(f"{name}: baselines unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
            row = {"kernel": "attention", "case": name, "shape": [B, T, H, Hkv, D], "window": window, "mode": mode}
            results = {}
            for impl, attn in impls.items():
                fn = runner(attn, (q, k, v), mode, (q, k, v), (dout,))
                try:
                    results[impl] = fn()
                    row[f"{impl}_ms"] = bench_ms(fn)
                    row[f"{impl}_tflops"] = flops / row[f"{impl}_ms"] / 1e9
                except Exception as e:
                    row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            for impl in impls:
                if impl != "triton" and f"{impl}_ms" in row and "triton_ms" in row:
                    row[f"x_{impl}"] = row[f"{impl}_ms"] / row["triton_ms"]
            baseline = next((r for i, r in results.items() if i != "triton"), None)
            if baseline is not None and "triton" in results:
                row["max_diff"] = max_diff(results["triton"], baseline)
            record(row)


def bench_rope(copy_gbs: float, record: Callable[[dict], None]) -> None:
    for name, (B, T, H, Hkv, D) in ROPE_CASES.items():
        qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEVICE, dtype=DTYPE)
        q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k = q.view(B, T, H, D).detach().requires_grad_(), k.view(B, T, Hkv, D).detach().requires_grad_()
        angles = torch.arange(T, device=DEVICE)[:, None] * 10000 ** -(torch.arange(D // 2, device=DEVICE) / (D // 2))
        cos, sin = angles.cos().float(), angles.sin().float()
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        # Read q and k, write their rotations (backward: the same for the gradients); cos/sin once.
        fwd_bytes = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * 4
        for mode, nbytes in (("fwd", fwd_bytes), ("fwd+bwd", 2 * fwd_bytes)):
            row = {"kernel": "rope", "case": name, "shape": [B, T, H, Hkv, D], "mode": mode, "copy_gbs": copy_gbs}
            results = {}
            for impl, rope in (("triton", apply_rope), ("eager", apply_rope_ref)):
                fn = runner(rope, (q, k, cos, sin), mode, (q, k), (dq, dk))
                results[impl] = fn()
                row[f"{impl}_ms"] = bench_ms(fn)
                row[f"{impl}_gbs"] = nbytes / row[f"{impl}_ms"] / 1e6
            row["x_eager"] = row["eager_ms"] / row["triton_ms"]
            row["of_copy"] = row["triton_gbs"] / copy_gbs
            row["max_diff"] = max_diff(results["triton"], results["eager"])
            record(row)


def print_row(row: dict) -> None:
    """One line per (kernel, case, mode): Triton's time and rate, then each baseline's with the ratio."""
    rate = "tflops" if row["kernel"] == "attention" else "gbs"
    unit = "TFLOP/s" if rate == "tflops" else "GB/s"
    parts = [f"{row['kernel']:<9} {row['case']:<11} {row['mode']:<7}"]
    for impl in ("triton", "sdpa", "flex", "eager"):
        if f"{impl}_ms" in row:
            ratio = f" (x{row[f'x_{impl}']:.2f})" if f"x_{impl}" in row else ""
            parts.append(f"{impl} {row[f'{impl}_ms']:8.3f} ms {row[f'{impl}_{rate}']:7.1f} {unit}{ratio}")
        elif f"{impl}_error" in row:
            parts.append(f"{impl} FAILED: {row[f'{impl}_error'][:80]}")
    if "of_copy" in row:
        parts.append(f"{100 * row['of_copy']:.0f}% of copy")
    if "max_diff" in row:
        parts.append(f"max|diff| {row['max_diff']:.2e}")
    print(" | ".join(parts), flush=True)


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the environment and every row to this JSON file")
    parser.add_argument(
        "--only", choices=["attention", "rope"], help="run one kernel's benchmarks (default: both, RoPE first)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.kernels needs a CUDA device (none found); the kernels' correctness is tested on CPU by pytest")
    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    copy_gbs = copy_bandwidth_gbs()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s", flush=True)
    rows = []

    def record(row: dict) -> None:
        # Rewritten after every row, so a run cut short by a timeout still leaves its results.
        rows.append(row)
        print_row(row)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**env, "copy_gbs": copy_gbs, "rows": rows}, indent=1))

    if args.only in (None, "rope"):
        bench_rope(copy_gbs, record)
    if args.only in (None, "attention"):
        bench_attention(record)


if __name__ == "__main__":
    main()
