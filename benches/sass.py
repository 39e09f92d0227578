"""Static sm_90 report of the kernels, on any machine (no GPU needed): compile every autotune config of every kernel
for an H100/H200 with Triton's bundled ptxas and print registers, spill bytes, shared memory, and whether the PTX
uses Hopper's tensor-core (wgmma) and TMA (cp.async.bulk.tensor) instructions.

    python -m benches.sass                        # bf16, head dims 64 and 128, every path: the table
    python -m benches.sass --head-dims 16 32 64 128 --dtypes bf16 fp16 --json sass.json
    python -m benches.sass --choosable            # only what the autotuner may choose
    python -m benches.sass --quick                # tests/test_sass.py's set: the choosable TMA-path configs

Exit status 1 when a config the autotuner may choose spills registers or a bf16/fp16 attention kernel lacks wgmma.
Compiled as a launch would specialize: unit last strides, 16-byte aligned pointers and strides, T a multiple of 16
(as at T = 1024), G == 1 (MHA) or not (GQA). Needs triton >= 3.9's compiler API (ASTSource with attrs); run it without
TRITON_INTERPRET.
"""

import argparse
import contextlib
import io
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

os.environ.pop("TRITON_INTERPRET", None)  # before kernels import triton's jit: compile, never interpret
if "NANOGPT2_SASS_CACHE" not in os.environ:  # a fresh cache (a cache hit logs no ptxas report), shared with workers
    os.environ["NANOGPT2_SASS_CACHE"] = os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sass-cache-")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benches import common  # noqa: E402
from nanogpt2.kernels import attention, rope  # noqa: E402

_INT_ARGS = ("T", "H", "G", "HKV", "WINDOW", "BH_BUCKET")
_FP32_POINTERS = ("LSE", "DELTA", "DQ_ACC", "cos_ptr", "sin_ptr")
_SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on sm_90


class Variant(NamedTuple):
    """One compilation: a kernel, its constexprs (config included), warps, stages, and whether the autotuner may
    choose it (a spill there fails the check)."""

    kernel: str
    dtype: str
    head_dim: int
    group: int
    path: str  # "tma" / "ptr", with "+atomic" / "+det" for the dK/dV kernel
    tile: str  # "BLOCK_MxBLOCK_N wW sS"
    constexprs: dict
    warps: int
    stages: int
    choosable: bool


class Report(NamedTuple):
    variant: Variant
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    wgmma: bool
    tma: bool
    error: str = ""


def _tile_variants(dtypes: list[str], head_dims: list[int], choosable_only: bool) -> list[Variant]:
    """The autotuned kernels over every Tile (and fp32's small one), paths, head dims, dtypes and MHA/GQA."""
    out = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for kernel, group, tma, atomic in (
                *[("fwd", 1, tma, False) for tma in (True, False)],
                *[("dkdv", g, tma, at) for g in (1, 3) for tma in (True, False) for at in (True, False)],
                *[("dq", 1, tma, False) for tma in (True, False)],
            ):
                if dtype == "fp32":
                    tiles = allowed = [attention.SMALL_TILES[kernel]]
                else:
                    tiles = attention.TILES[kernel][(64 if head_dim <= 64 else 128, group > 1)]
                    allowed = attention.allowed_tiles(kernel, head_dim, group, tma, atomic)
                for tile in tiles:
                    if choosable_only and tile not in allowed:
                        continue
                    path = ("tma" if tma else "ptr") + (("+atomic" if atomic else "+det") if kernel == "dkdv" else "")
                    constexprs = dict(
                        HEAD_DIM=head_dim, IS_CAUSAL=True, USE_TMA=tma, ATOMIC_DQ=atomic, UPCAST=False,
                        ROUND_BF16=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                    )  # fmt: skip
                    if group == 1:
                        constexprs["G"] = 1
                    name = f"{tile.block_m}x{tile.block_n} w{tile.warps} s{tile.stages}"
                    out.append(
                        Variant(kernel, dtype, head_dim, group, path, name, constexprs, tile.warps, tile.stages,
                                tile in allowed)
                    )  # fmt: skip
    return out


def _other_variants(dtypes: list[str], head_dims: list[int]) -> list[Variant]:
    """The kernels launched with fixed tiles: the backward's preprocess and dQ convert, RoPE."""
    out = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for kernel, constexprs, warps in (
                ("preprocess", dict(HEAD_DIM=head_dim, ZERO_DQ=True, BLOCK_M=128), 4),
                ("dq_convert", dict(HEAD_DIM=head_dim, ROUND_BF16=False, BLOCK_M=128), 4),
                (
                    "rope",
                    dict(
                        HALF=head_dim // 2,
                        BLOCK_T=8,
                        BLOCK_H=16,
                        BLOCK_HALF=head_dim // 2,
                        INVERSE=False,
                        ROUND_BF16=False,
                    ),
                    4,
                ),  # fmt: skip
            ):
                out.append(Variant(kernel, dtype, head_dim, 1, "ptr", "fixed", constexprs, warps, 1, True))
    return out


_KERNELS = {
    "fwd": attention._attn_fwd,
    "dkdv": attention._attn_bwd_dkdv,
    "dq": attention._attn_bwd_dq,
    "preprocess": attention._attn_bwd_preprocess,
    "dq_convert": attention._attn_bwd_dq_convert,
    "rope": rope._rope_kernel,
}


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Argument types and launch-time divisibility hints of a @triton.jit function, from its argument names."""
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in _FP32_POINTERS:
            sig[a] = "*fp32"
        elif a.endswith("_ptr") or (a.isupper() and a not in _INT_ARGS):
            sig[a] = "*" + dtype
        else:
            sig[a] = "fp32" if a.endswith("scale") else "i32"
        if sig[a].startswith("*") or a.startswith("stride_") or a == "T":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_variant(v: Variant) -> Report:
    """Compile one variant for sm_90 and read ptxas's report and the PTX."""
    kernel = _KERNELS[v.kernel]
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the JITFunction under an autotuner
    sig, attrs = _signature(fn, v.dtype, v.constexprs)
    src = ASTSource(fn, sig, constexprs=v.constexprs, attrs=attrs)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src, target=GPUTarget("cuda", 90, 32), options={"num_warps": v.warps, "num_stages": v.stages}
            )
    except Exception as e:  # a config that does not compile is a finding, not a crash of the report
        return Report(v, 0, 0, 0, 0, False, False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    text = log.getvalue()
    used = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    ptx = compiled.asm["ptx"]
    return Report(
        v,
        int(used.group(1)) if used else -1,
        int(spills.group(1)) if spills else -1,
        int(spills.group(2)) if spills else -1,
        compiled.metadata.shared,
        "wgmma" in ptx,
        "cp.async.bulk.tensor" in ptx,
    )


def problems(r: Report) -> list[str]:
    """What is wrong with a compiled variant: a choosable config that fails, spills or overflows shared memory, or
    a 16-bit attention kernel with dots but no wgmma (the TMA paths must also use TMA). fp32's spills are reported,
    not failed: its IEEE dots run on FMA units, a correctness path that no tile size makes spill-free."""
    v = r.variant
    if r.error:
        return [r.error] if v.choosable else []
    found = []
    if v.choosable and v.dtype != "fp32" and (r.spill_stores or r.spill_loads or r.registers < 0):
        found.append(f"spills {r.spill_stores}/{r.spill_loads} B")
    if r.shared > _SHARED_LIMIT:
        found.append(f"{r.shared} B of shared memory")
    if v.dtype != "fp32" and v.kernel in ("fwd", "dkdv", "dq") and not r.wgmma:
        found.append("no wgmma")
    if v.path.startswith("tma") and not r.tma:
        found.append("no TMA")
    return found


def print_header() -> None:
    print(f"{'kernel':<11}{'dtype':<6}{'D':>4}{'G':>3}  {'path':<11}{'tile':<17}{'regs':>5}{'spill st/ld':>13}"
          f"{'smem KiB':>10}  wgmma  tma  choosable  problems")  # fmt: skip


def print_row(r: Report) -> None:
    v = r.variant
    spill = f"{r.spill_stores}/{r.spill_loads}"
    print(
        f"{v.kernel:<11}{v.dtype:<6}{v.head_dim:>4}{v.group:>3}  {v.path:<11}{v.tile:<17}{r.registers:>5}"
        f"{spill:>13}{r.shared / 1024:>10.1f}  {'yes' if r.wgmma else 'no':<7}{'yes' if r.tma else 'no':<5}"
        f"{'yes' if v.choosable else 'no':<11}{'; '.join(problems(r))}",
        flush=True,
    )


def summary_markdown(reports: list[Report]) -> str:
    """One markdown row per (kernel, dtype, head dim, group, path): how many configs the autotuner may choose, their
    most registers and spill bytes (stores), the most spill bytes of any listed config, shared memory, wgmma, TMA."""
    groups: dict[tuple, list[Report]] = {}
    for r in reports:
        v = r.variant
        groups.setdefault((v.kernel, v.dtype, v.head_dim, v.group, v.path), []).append(r)
    lines = [
        "| kernel | dtype | D | G | path | choosable / listed | registers | spill B (choosable) | spill B (any) "
        "| smem KiB | wgmma | TMA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, dtype, d, g, path), rs in groups.items():
        chosen = [r for r in rs if r.variant.choosable and not r.error]
        regs = "-" if not chosen else f"{min(r.registers for r in chosen)}-{max(r.registers for r in chosen)}"
        spill = max((r.spill_stores for r in chosen), default=0)
        lines.append(
            f"| {kernel} | {dtype} | {d} | {g} | {path} | {len(chosen)} / {len(rs)} | {regs} | {spill} "
            f"| {max(r.spill_stores for r in rs)} | {max(r.shared for r in rs) / 1024:.0f} "
            f"| {'yes' if all(r.wgmma for r in rs) else 'no'} | {'yes' if all(r.tma for r in rs) else 'no'} |"
        )
    return "\n".join(lines)


def quick_variants() -> list[Variant]:
    """tests/test_sass.py's set (about 30 compilations): what the autotuner may choose on the TMA paths, which
    training takes, at the head dim with the most registers (128), plus the GQA dK/dV kernel at 64."""
    variants = _tile_variants(["bf16"], [64, 128], True)
    variants = [
        v for v in variants if v.path.startswith("tma") and (v.head_dim == 128 or (v.kernel == "dkdv" and v.group > 1))
    ]
    return variants + _other_variants(["bf16"], [128])


def run(variants: list[Variant], jobs: int) -> list[Report]:
    """Compile the variants in `jobs` processes, printing each row as it comes."""
    print_header()
    reports = []
    # spawn, not fork: a forked child of a process that already ran triton can deadlock
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for report in pool.map(compile_variant, variants):
            print_row(report)
            reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16"], help="16-bit dtypes")
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128], choices=attention.SUPPORTED_HEAD_DIMS)
    parser.add_argument("--choosable", action="store_true", help="only the configs the autotuner may choose")
    parser.add_argument("--quick", action="store_true", help="only tests/test_sass.py's set (ignores the above)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compilations (default: all cores)")
    parser.add_argument("--json", type=Path, help="also write every row to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print the per-path summary as markdown")
    args = parser.parse_args(argv)
    if args.quick:
        variants = quick_variants()
    else:
        variants = _tile_variants(args.dtypes, args.head_dims, args.choosable)
        variants += _tile_variants(["fp32"], args.head_dims, False) + _other_variants(args.dtypes, args.head_dims)
    try:
        reports = run(variants, args.jobs)
    finally:
        shutil.rmtree(os.environ["NANOGPT2_SASS_CACHE"], ignore_errors=True)
    bad = [r for r in reports if problems(r)]
    if args.markdown:
        print(summary_markdown(reports))
    if args.json:
        rows = [{**r.variant._asdict(), **r._asdict(), "variant": None, "problems": problems(r)} for r in reports]
        common.write_json(args.json, rows)
    chosen = [r for r in reports if r.variant.choosable and r.variant.dtype != "fp32"]
    print(f"{len(reports)} compilations, {len(bad)} with problems; most spill bytes of a choosable fp16/bf16 config: "
          f"{max((r.spill_stores for r in chosen), default=0)} (fp32's are reported, not checked)")  # fmt: skip
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
