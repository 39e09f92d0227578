"""Static sm_90 report of the kernels, on any machine (no GPU needed): compile every config of every kernel for an
H100/H200 with the ptxas bundled with the installed Triton and print registers, spill bytes, shared memory, whether
ptxas serializes the wgmma instructions (its warning C7515: each tensor-core op then waits for the previous one),
and whether the PTX uses Hopper's tensor-core (wgmma) and TMA (cp.async.bulk.tensor) instructions.

    python -m benches.sass                        # bf16 (and fp32's config), D=64 and 128, every path, RoPE off/on
    python -m benches.sass --head-dims 16 32 64 128 --dtypes bf16 fp16 --json sass.json
    python -m benches.sass --choosable            # only what a launch may choose
    python -m benches.sass --quick                # tests/test_sass.py's set
    python -m benches.sass --compare a.json b.json  # two runs' JSON (e.g. two triton versions) side by side

Exit status 1 when a config a launch may choose fails to compile, spills registers or serializes wgmma (fp16/bf16),
or a 16-bit attention kernel lacks wgmma. Kernels with a ROPE switch compile with it off and on (the fused inverse
rotation must not cost spills either). Compiled as a launch at GPT-2's shape specializes: unit last strides, 16-byte
aligned pointers and strides, T and the window multiples of 16 (T = 1024), G == 1 (MHA: a constant, except in the
dK/dV kernel, which never specializes it) or not (GQA).
Works with triton 3.6 to 3.9 (the same compiler API: ASTSource with attrs, GPUTarget, TRITON_DUMP_PTXAS_LOG).
Results are kept in a cache file per triton version, keyed by the kernels' source (and line numbers, as Triton's
own cache), so a rerun compiles only what changed. Run it without TRITON_INTERPRET.
"""

import argparse
import contextlib
import hashlib
import io
import json
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
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (else it warns per compile)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benches import common  # noqa: E402
from nanogpt2.files import user_cache_home  # noqa: E402
from nanogpt2.kernels import attention, rope, tuning  # noqa: E402

_INT_ARGS = ("T", "H", "G", "HKV", "WINDOW")
_DIVISIBLE_INTS = ("T", "WINDOW")  # multiples of 16 at GPT-2's shape (T = 1024, W = 1024 or 256), as a launch sees
_FP32_POINTERS = ("LSE", "DELTA", "DQ_ACC", "COS", "SIN", "cos_ptr", "sin_ptr")
_SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on sm_90
_SERIALIZED = re.compile(r"wgmma\.mma_async instructions are serialized due to (.*?)(?: in the function|\.\s*$)", re.M)
# GPT-2's shape: what the fixed-tile kernels (RoPE's blocks depend on the heads) are compiled for.
_T, _H = 1024, 12


class Variant(NamedTuple):
    """One compilation: a kernel, its constexprs (config included), warps, stages, and whether a launch may choose
    it (a spill or a serialized wgmma there fails the check)."""

    kernel: str
    dtype: str
    head_dim: int
    group: int
    path: str  # tuning's path name: "tma" / "ptr", "+atomic" for the dK/dV kernel's atomic dQ
    rope: bool
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
    serialized: str = ""  # why ptxas serialized the wgmma instructions (C7515), "" when they run async
    error: str = ""


def _with_rope(v: Variant) -> list[Variant]:
    """The variant with ROPE off and on when its kernel has the switch, else itself."""
    fn = _KERNELS[v.kernel]
    if "ROPE" not in fn.arg_names:
        return [v]
    return [v._replace(rope=r, constexprs=v.constexprs | {"ROPE": r}) for r in (False, True)]


def _tile_variants(dtypes: list[str], head_dims: list[int], choosable_only: bool) -> list[Variant]:
    """The tuned kernels over every Tile (and fp32's small one), paths, head dims, dtypes, MHA/GQA and RoPE."""
    out = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for kernel, group, tma, atomic in (
                *[("fwd", 1, tma, False) for tma in (True, False)],  # G only divides a head index here
                *[("dkdv", g, tma, at) for g in (1, 3) for tma in (True, False) for at in (True, False)],
                *[("dq", 1, tma, False) for tma in (True, False)],
            ):
                if dtype == "fp32":
                    tiles = allowed = [tuning.SMALL_TILES[kernel]]
                else:
                    tiles = tuning.TILES[kernel][(64 if head_dim <= 64 else 128, group > 1)]
                    allowed = tuning.allowed_tiles(kernel, head_dim, group, tma, atomic)
                path = tuning.path_name(tma, atomic and kernel == "dkdv")
                for tile in tiles:
                    if choosable_only and tile not in allowed:
                        continue
                    constexprs = dict(
                        HEAD_DIM=head_dim, IS_CAUSAL=True, USE_TMA=tma, ATOMIC_DQ=atomic, UPCAST=False,
                        ROUND_BF16=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **_blocks(tile),
                    )  # fmt: skip
                    if group == 1 and _specializes(kernel, "G"):
                        constexprs["G"] = 1  # as a launch specializes an integer argument equal to 1
                    constexprs = {k: val for k, val in constexprs.items() if k in _KERNELS[kernel].arg_names}
                    name = f"{tile.block_m}x{tile.block_n} w{tile.warps} s{tile.stages}"
                    variant = Variant(kernel, dtype, head_dim, group, path, False, name, constexprs, tile.warps,
                                      tile.stages, tile in allowed)  # fmt: skip
                    out += _with_rope(variant)
    return out


def _specializes(kernel: str, arg: str) -> bool:
    """Whether a launch of `kernel` makes `arg` a constant when it is 1 (unless @triton.jit's do_not_specialize)."""
    fn = _KERNELS[kernel]
    return not fn.params[fn.arg_names.index(arg)].do_not_specialize


def _blocks(tile) -> dict:
    return {k: v for k, v in tile.meta().items() if k.startswith("BLOCK_")}


def _other_variants(dtypes: list[str], head_dims: list[int]) -> list[Variant]:
    """The kernels launched with fixed tiles: the backward's preprocess and dQ convert, RoPE (at GPT-2's heads)."""
    out = []
    for dtype in dtypes:
        for head_dim in head_dims:
            rows = attention._ROWS
            blocks = rope._blocks(_T, _H, _H, head_dim)
            for kernel, constexprs, warps in (
                ("preprocess", dict(HEAD_DIM=head_dim, ZERO_DQ=True, BLOCK_M=rows["BLOCK_M"]), rows["num_warps"]),
                ("dq_convert", dict(HEAD_DIM=head_dim, ROUND_BF16=False, BLOCK_M=rows["BLOCK_M"]), rows["num_warps"]),
                (
                    "rope",
                    dict(HALF=head_dim // 2, INVERSE=False, ROUND_BF16=False, **_blocks(blocks)),
                    blocks.meta()["num_warps"],
                ),
            ):
                out += _with_rope(
                    Variant(kernel, dtype, head_dim, 1, "ptr", False, "fixed", constexprs, warps, 1, True)
                )
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
        if sig[a].startswith("*") or a.startswith("stride_") or a in _DIVISIBLE_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_variant(v: Variant) -> Report:
    """Compile one variant for sm_90 and read ptxas's report and the PTX."""
    fn = _KERNELS[v.kernel]
    sig, attrs = _signature(fn, v.dtype, v.constexprs)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, sig, constexprs=v.constexprs, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": v.warps, "num_stages": v.stages},
            )
    except Exception as e:  # a config that does not compile is a finding, not a crash of the report
        return Report(v, 0, 0, 0, 0, False, False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    text = log.getvalue()
    used = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    serialized = _SERIALIZED.search(text)
    ptx = compiled.asm["ptx"]
    return Report(
        v,
        int(used.group(1)) if used else -1,
        int(spills.group(1)) if spills else -1,
        int(spills.group(2)) if spills else -1,
        compiled.metadata.shared,
        "wgmma" in ptx,
        "cp.async.bulk.tensor" in ptx,
        serialized.group(1).strip() if serialized else "",
    )


def problems(r: Report) -> list[str]:
    """What is wrong with a compiled variant: a choosable config that fails, spills, serializes wgmma or overflows
    shared memory, or a 16-bit attention kernel with dots but no wgmma (the TMA paths must also use TMA). fp32's
    spills are reported, not failed: its IEEE dots run on FMA units, a correctness path that no tile size makes
    spill-free."""
    v = r.variant
    if r.error:
        return [r.error] if v.choosable else []
    found = []
    if v.choosable and v.dtype != "fp32" and (r.spill_stores or r.spill_loads or r.registers < 0):
        found.append(f"spills {r.spill_stores}/{r.spill_loads} B")
    if v.choosable and v.dtype != "fp32" and r.serialized:
        found.append(f"C7515 wgmma serialized due to {r.serialized}")
    if r.shared > _SHARED_LIMIT:
        found.append(f"{r.shared} B of shared memory")
    if v.dtype != "fp32" and v.kernel in ("fwd", "dkdv", "dq") and not r.wgmma:
        found.append("no wgmma")
    if v.path.startswith("tma") and not r.tma:
        found.append("no TMA")
    return found


def print_header() -> None:
    print(f"{'kernel':<11}{'dtype':<6}{'D':>4}{'G':>3}  {'path':<11}{'rope':<5}{'tile':<17}{'regs':>5}"
          f"{'spill st/ld':>13}{'smem KiB':>10}  C7515  wgmma  tma  choosable  problems")  # fmt: skip


def print_row(r: Report) -> None:
    v = r.variant
    spill = f"{r.spill_stores}/{r.spill_loads}"
    print(
        f"{v.kernel:<11}{v.dtype:<6}{v.head_dim:>4}{v.group:>3}  {v.path:<11}{'yes' if v.rope else 'no':<5}"
        f"{v.tile:<17}{r.registers:>5}{spill:>13}{r.shared / 1024:>10.1f}  {'yes' if r.serialized else 'no':<7}"
        f"{'yes' if r.wgmma else 'no':<7}{'yes' if r.tma else 'no':<5}{'yes' if v.choosable else 'no':<11}"
        f"{'; '.join(problems(r))}",
        flush=True,
    )


def summary_markdown(reports: list[Report]) -> str:
    """One markdown row per (kernel, dtype, head dim, group, path, rope): how many configs a launch may choose, their
    registers and most spill bytes (stores), the most spill bytes of any listed config, how many draw C7515
    (choosable / listed), shared memory, wgmma, TMA."""
    groups: dict[tuple, list[Report]] = {}
    for r in reports:
        v = r.variant
        groups.setdefault((v.kernel, v.dtype, v.head_dim, v.group, v.path, v.rope), []).append(r)
    lines = [
        "| kernel | dtype | D | G | path | RoPE | choosable / listed | registers | spill B (choosable) | spill B (any) "
        "| C7515 (choosable / listed) | smem KiB | wgmma | TMA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, dtype, d, g, path, with_rope), rs in groups.items():
        chosen = [r for r in rs if r.variant.choosable and not r.error]
        regs = "-" if not chosen else f"{min(r.registers for r in chosen)}-{max(r.registers for r in chosen)}"
        lines.append(
            f"| {kernel} | {dtype} | {d} | {g} | {path} | {'yes' if with_rope else 'no'} | {len(chosen)} / {len(rs)} "
            f"| {regs} | {max((r.spill_stores for r in chosen), default=0)} | {max(r.spill_stores for r in rs)} "
            f"| {sum(bool(r.serialized) for r in chosen)} / {sum(bool(r.serialized) for r in rs)} "
            f"| {max(r.shared for r in rs) / 1024:.0f} | {'yes' if all(r.wgmma for r in rs) else 'no'} "
            f"| {'yes' if all(r.tma for r in rs) else 'no'} |"
        )
    return "\n".join(lines)


def quick_variants() -> list[Variant]:
    """tests/test_sass.py's set (31 compilations, its time budget): in bf16 with RoPE where the kernel has it (its
    epilogue is the larger), every config a launch may choose at GPT-2's head dim (64), for MHA (the dK/dV kernel
    compiles the same for any group: G is never specialized), and the dK/dV kernel's at 128, the kernel with the least
    register headroom. The full check, head dim 128's forward and dQ and the fixed-tile kernels included:
    `python -m benches.sass --choosable`."""
    return [
        v
        for v in _tile_variants(["bf16"], [64, 128], True)
        if v.group == 1
        and (v.rope or "ROPE" not in _KERNELS[v.kernel].arg_names)
        and (v.head_dim == 64 or v.kernel == "dkdv")
    ]


def _cache_key(v: Variant) -> str:
    """What a compilation depends on: the triton version (its ptxas included), the kernel's source and the source of
    every function it calls (JITFunction.cache_key), and the variant's arguments; and what a report holds."""
    fields = (triton.__version__, _KERNELS[v.kernel].cache_key, v.dtype, sorted(v.constexprs.items()), v.warps,
              v.stages, Report._fields)  # fmt: skip
    return hashlib.sha256(repr(fields).encode()).hexdigest()


def run(variants: list[Variant], jobs: int, cache: Path | None) -> list[Report]:
    """Compile the variants in `jobs` processes, each distinct compilation once (two variants can be the same kernel:
    a second one would hit Triton's cache and log no ptxas report) and none that the `cache` file holds; print each
    row."""
    print_header()
    saved = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    keys = [_cache_key(v) for v in variants]
    todo = {key: v for v, key in zip(variants, keys, strict=True) if key not in saved}  # first variant of each key
    reports = []
    # spawn, not fork: a forked child of a process that already ran triton can deadlock
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        compiled = iter(pool.map(compile_variant, todo.values()))
        results = dict(saved)
        for v, key in zip(variants, keys, strict=True):
            if key not in results:
                fresh = next(compiled)
                results[key] = {k: val for k, val in fresh._asdict().items() if k != "variant"}
                if cache is not None and not fresh.error and fresh.registers >= 0:  # a finding, not a failed compile
                    saved[key] = results[key]
                    common.write_json(cache, saved)
            report = Report(v, **results[key])
            print_row(report)
            reports.append(report)
    return reports


def compare_markdown(runs: list[tuple[str, list[dict]]]) -> str:
    """One markdown row per compiled config (RoPE off and on together: the worse of the two), one column group per
    run (a `--json` file): registers, spill bytes (stores / loads), C7515 (serialized wgmma); `*` marks a config a
    launch may choose (in the first run)."""
    fields = ("kernel", "dtype", "head_dim", "group", "path", "tile")
    tables = []
    for _, rows in runs:
        table: dict[tuple, list[dict]] = {}
        for row in rows:
            table.setdefault(tuple(row[f] for f in fields), []).append(row)
        tables.append(table)
    names = " | ".join(f"{name} regs | spills | C7515" for name, _ in runs)
    lines = [f"| kernel | dtype | D | G | path | tile | {names} |", "|---" * (len(fields) + 3 * len(runs)) + "|"]
    for key, first in tables[0].items():
        cells = []
        for table in tables:
            rows = table.get(key, [])
            if not rows or any(r["error"] for r in rows):
                cells += ["error" if rows else "-", "", ""]
                continue
            spills = max((r["spill_stores"], r["spill_loads"]) for r in rows)
            cells += [str(max(r["registers"] for r in rows)), "{}/{}".format(*spills),
                      "**yes**" if any(r["serialized"] for r in rows) else "no"]  # fmt: skip
        kernel, dtype, d, g, path, tile = key
        chosen = " *" if first[0]["choosable"] else ""
        lines.append(f"| {kernel} | {dtype} | {d} | {g} | {path} | {tile}{chosen} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"],
        help="dtypes (fp32's small config is reported, not checked; its spilling compiles are the slowest)",
    )  # fmt: skip
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128], choices=attention.SUPPORTED_HEAD_DIMS)
    parser.add_argument("--choosable", action="store_true", help="only the configs a launch may choose")
    parser.add_argument("--quick", action="store_true", help="only tests/test_sass.py's set (ignores the above)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compilations (default: all cores)")
    parser.add_argument("--json", type=Path, help="also write every row to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print the per-path summary as markdown")
    parser.add_argument(
        "--cache",
        type=Path,
        default=user_cache_home() / "nanogpt2" / f"sass-triton-{triton.__version__}.json",
        help="the file of results kept between runs (default: %(default)s)",
    )
    parser.add_argument("--no-cache", action="store_true", help="compile everything, keep nothing")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="JSON", help="print runs' --json files side by side")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare_markdown([(p.stem, json.loads(p.read_text())) for p in args.compare]))
        return
    if args.quick:
        variants = quick_variants()
    else:
        half = [d for d in args.dtypes if d != "fp32"]
        variants = _tile_variants(half, args.head_dims, args.choosable) + _other_variants(half, args.head_dims)
        if "fp32" in args.dtypes:
            variants += _tile_variants(["fp32"], args.head_dims, False)
    try:
        reports = run(variants, args.jobs, None if args.no_cache else args.cache)
    finally:
        shutil.rmtree(os.environ["NANOGPT2_SASS_CACHE"], ignore_errors=True)
    bad = [r for r in reports if problems(r)]
    if args.markdown:
        print(summary_markdown(reports))
    if args.json:
        rows = [{**r.variant._asdict(), **r._asdict(), "variant": None, "problems": problems(r)} for r in reports]
        common.write_json(args.json, rows)
    chosen = [r for r in reports if r.variant.choosable and r.variant.dtype != "fp32"]
    print(f"triton {triton.__version__}: {len(reports)} compilations, {len(bad)} with problems; choosable fp16/bf16 "
          f"configs: most spill bytes {max((r.spill_stores for r in chosen), default=0)}, "
          f"{sum(bool(r.serialized) for r in chosen)} with C7515 (fp32's are reported, not checked)")  # fmt: skip
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
