"""Flash attention in Triton: causal or full, grouped-query heads, sliding window; forward and backward.

Algorithm (FA2): the forward streams K/V tiles past a tile of queries with an online softmax and keeps the base-2
log-sum-exp per row; the backward precomputes delta = rowsum(dO * O), then one kernel accumulates dK/dV per key tile,
looping over the query heads of its KV group, and dQ comes either from that kernel as fp32 atomic adds (5 matmuls per
score tile, FA2's design) or, with `deterministic=True`, from a second kernel per query tile (7 matmuls, bitwise
repeatable).
Layout: q, o (B, T, H, D); k, v (B, T, Hkv, D); unit last stride, other strides free (views of a fused qkv projection
need no copy). Query head h reads KV head h // (H // Hkv); K/V are never expanded. Tiles move through TMA tensor
descriptors when every stride is a multiple of 16 bytes and the data 16-byte aligned, else through masked pointers.
Only tiles inside the causal band (i - W < j <= i) are loaded; tiles fully inside it skip the mask, so cost grows
with T * W. Offsets are 64-bit wherever B * T * H * D can pass 2^31.
Limits: D in SUPPORTED_HEAD_DIMS; fp32, fp16, bf16 with fp32 accumulation (fp32 dots in IEEE precision, not tf32);
equal query and key lengths; scale > 0.
Differences from the Triton tutorial: GQA and windows in the tile bounds, any T, strided inputs, the row max taken on
raw scores, the atomic/deterministic dQ choice, bf16 upcast and rounding switches for the interpreter.
"""

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanogpt2.kernels import _utils
from nanogpt2.kernels._utils import maybe_upcast, store_cast

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = math.log2(math.e)


ALL_PATHS = ("tma", "tma+atomic", "ptr", "ptr+atomic")  # loads through TMA or pointers; dQ by atomics or not
TMA_PATHS = ("tma", "tma+atomic")


class Tile(NamedTuple):
    """One GPU autotune config: tile sizes, warps, pipeline stages, and the code paths on which it spills no
    register (`python -m benches.sass` compiles them all for sm_90; tests/test_sass.py checks the TMA ones)."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    paths: tuple[str, ...] = ALL_PATHS

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, self.warps, self.stages)


# GPU configs for fp16/bf16 per kernel and (head-dim class: 64 for D <= 64, else 128; G > 1), best guess first
# (NANOGPT2_AUTOTUNE=0 keeps the first). Every (tile, path) listed compiles without spills for sm_90 (benches.sass
# checks it); the dK/dV kernel's loop over a GQA group costs registers, so GQA has its own list, and at D=128 only its
# deterministic TMA path fits (the other paths fall back to it, see `_resolve_path`).
_FWD = {
    64: [Tile(128, 64, 4, 3), Tile(128, 128, 8, 3), Tile(128, 64, 8, 3), Tile(64, 64, 4, 3), Tile(128, 128, 8, 2)],
    128: [Tile(128, 64, 8, 3), Tile(128, 128, 8, 3, TMA_PATHS), Tile(64, 64, 4, 3), Tile(128, 128, 8, 2, TMA_PATHS)],
}
_DQ = {
    64: [Tile(128, 64, 8, 3), Tile(128, 32, 4, 3), Tile(64, 64, 4, 3), Tile(64, 64, 4, 5)],
    128: [Tile(128, 64, 8, 3), Tile(64, 64, 4, 3), Tile(64, 64, 4, 5)],
}
TILES = {
    "fwd": {(d, gqa): tiles for d, tiles in _FWD.items() for gqa in (False, True)},
    "dq": {(d, gqa): tiles for d, tiles in _DQ.items() for gqa in (False, True)},
    "dkdv": {
        (64, False): [
            Tile(64, 128, 8, 3), Tile(32, 128, 8, 3), Tile(64, 64, 4, 3, ("tma", "tma+atomic", "ptr")),
            Tile(32, 64, 4, 4), Tile(64, 128, 8, 5),
        ],
        (64, True): [
            Tile(64, 128, 8, 3, TMA_PATHS), Tile(32, 64, 8, 3), Tile(32, 128, 8, 3), Tile(16, 64, 4, 3),
            Tile(64, 128, 8, 5, TMA_PATHS),
        ],
        (128, False): [
            Tile(32, 64, 8, 3), Tile(32, 128, 8, 3), Tile(16, 64, 4, 3),
            Tile(32, 64, 4, 4, ("tma", "tma+atomic", "ptr")), Tile(64, 64, 8, 3, ("tma", "ptr")),
        ],
        (128, True): [Tile(32, 64, 8, 3, ("tma",)), Tile(16, 64, 4, 3, ("tma",))],
    },
}  # fmt: skip
# fp32 (IEEE dots on FMA units: a correctness path, not a fast one; large tiles overflow shared memory) and the
# interpreter: one small config; BLOCK_M != BLOCK_N, so the tile bounds are also tested off the diagonal.
SMALL_TILES = {"fwd": Tile(64, 32, 4, 2), "dkdv": Tile(32, 64, 4, 2), "dq": Tile(64, 32, 4, 2)}
# Kernel name -> config for every launch (benches and gpu_check correctness runs); see `forced_configs`.
_FORCED: dict[str, triton.Config] = {}


def path_name(tma: bool, atomic: bool) -> str:
    return ("tma" if tma else "ptr") + ("+atomic" if atomic else "")


def allowed_tiles(kernel: str, head_dim: int, group: int, tma: bool, atomic: bool) -> list[Tile]:
    """The spill-free GPU configs of `kernel` ("fwd", "dkdv", "dq") for fp16/bf16 at this head dim, group and path."""
    tiles = TILES[kernel][(64 if head_dim <= 64 else 128, group > 1)]
    return [t for t in tiles if path_name(tma, atomic and kernel == "dkdv") in t.paths]


def candidate_tiles(kernel: str, head_dim: int, group: int, dtype: torch.dtype, tma: bool, atomic: bool) -> list[Tile]:
    """The configs the autotuner may choose: `allowed_tiles`, only the first with NANOGPT2_AUTOTUNE=0, the small
    config for fp32 and in the interpreter."""
    if dtype == torch.float32 or _utils.INTERPRET:
        return [SMALL_TILES[kernel]]
    tiles = allowed_tiles(kernel, head_dim, group, tma, atomic)
    return tiles[:1] if os.environ.get("NANOGPT2_AUTOTUNE", "1") == "0" else tiles


def _resolve_path(head_dim: int, group: int, tma: bool, atomic: bool) -> tuple[bool, bool]:
    """The backward's (tma, atomic) path: the one asked for if its dK/dV kernel has a spill-free config here, else
    the same dQ path on TMA, else the deterministic TMA path (which always has one)."""
    for t, a in ((tma, atomic), (True, atomic), (True, False)):
        if allowed_tiles("dkdv", head_dim, group, t, a):
            return t, a
    raise AssertionError(f"no dK/dV config for head dim {head_dim}, group {group}")


def _autotune(kernel: str):
    """triton.autotune over every Tile of `kernel`, pruned per launch by `candidate_tiles`; keyed on the problem
    (T, window, group, head dim, causality, a power-of-2 bucket of B * H) and the code path (TMA, atomic dQ)."""
    all_tiles = [*{t: None for tiles in TILES[kernel].values() for t in tiles}, SMALL_TILES[kernel]]
    by_tile = {t: t.config() for t in all_tiles}

    def prune(_configs: list, named_args: dict, **kwargs) -> list[triton.Config]:
        tiles = candidate_tiles(
            kernel, kwargs["HEAD_DIM"], named_args["G"], named_args["Q"].dtype, kwargs["USE_TMA"], kwargs["ATOMIC_DQ"]
        )
        return [by_tile[t] for t in tiles]

    key = ["T", "WINDOW", "G", "HEAD_DIM", "IS_CAUSAL", "BH_BUCKET", "USE_TMA", "ATOMIC_DQ"]
    configs = list(by_tile.values())
    if _utils.INTERPRET:  # the interpreter cannot autotune between configs
        configs = [by_tile[SMALL_TILES[kernel]]]
    # Timing configs runs the kernel many times: the dK/dV kernel's fp32 atomic dQ accumulator must start each of
    # those runs, and the real one after them, from zero (its preprocess kernel zeroes it only once).
    reset = ["DQ_ACC"] if kernel == "dkdv" else None
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, reset_to_zero=reset
    )


@contextmanager
def forced_configs(**configs: triton.Config) -> Iterator[None]:
    """Run every launch of the named kernels (fwd=, dkdv=, dq=) with the given config instead of autotuning: for
    checking each config's correctness on a GPU and timing candidates."""
    _FORCED.update(configs)
    try:
        yield
    finally:
        for name in configs:
            _FORCED.pop(name, None)


def _launch(name: str, kernel, grid, *args, **kwargs) -> None:
    forced = _FORCED.get(name)
    if forced is None:
        kernel[grid](*args, **kwargs)
    else:
        kernel.fn[grid](*args, **kwargs, **forced.all_kwargs())


@triton.jit
def _rows(base, T, stride_t, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    # A (T, HEAD_DIM) slab with row stride stride_t and unit column stride at `base`: a TMA descriptor of
    # (BLOCK, HEAD_DIM) tiles (rows past T load as zeros, stores clip), or the pointer itself.
    if USE_TMA:
        return tl.make_tensor_descriptor(
            base, shape=[T, HEAD_DIM], strides=[stride_t, 1], block_shape=[BLOCK, HEAD_DIM]
        )
    else:
        return base


@triton.jit
def _load_rows(
    src, start, T, stride_t, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, USE_TMA: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    # Rows [start, start + BLOCK) of a `_rows` slab as a (BLOCK, HEAD_DIM) tile; rows past T are zeros (the pointer
    # path checks them only when MASK).
    if USE_TMA:
        x = src.load([start, 0])
    else:
        rows = tl.arange(0, BLOCK)
        ptrs = src + tl.cast(start, tl.int64) * stride_t + rows[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :]
        if MASK:
            x = tl.load(ptrs, mask=(start + rows < T)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return maybe_upcast(x, UPCAST)


@triton.jit
def _store_rows(dst, start, T, stride_t, x, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    # Store the (BLOCK, HEAD_DIM) tile x (already in the output dtype) at rows [start, start + BLOCK) below T.
    if USE_TMA:
        dst.store([start, 0], x)
    else:
        rows = tl.arange(0, BLOCK)
        ptrs = dst + tl.cast(start, tl.int64) * stride_t + rows[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :]
        tl.store(ptrs, x, mask=(start + rows < T)[:, None])


@triton.jit
def _visible(i, j, T, WINDOW, IS_CAUSAL: tl.constexpr):
    # Mask of the pairs (query i, key j) that attend, for broadcastable 2-D positions i and j (a query column and a
    # key row, or the transpose): both inside T and, when causal, i - WINDOW < j <= i.
    visible = (i < T) & (j < T)
    if IS_CAUSAL:
        visible = visible & (j <= i) & (j > i - WINDOW)
    return visible


@triton.jit
def _kv_tile_range(start_m, T, WINDOW, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Key tiles (indices n_lo <= u_lo <= u_hi <= n_hi) seen by query rows [start_m, start_m + BLOCK_M): tiles in
    # [u_lo, u_hi) are visible to every row (no mask); [n_lo, u_lo) and [u_hi, n_hi) cut the band's edges or T.
    if IS_CAUSAL:
        n_lo = tl.maximum(start_m - WINDOW + 1, 0) // BLOCK_N
        n_hi = tl.cdiv(tl.minimum(start_m + BLOCK_M, T), BLOCK_N)
        u_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - WINDOW, 0), BLOCK_N)
        u_hi = (start_m + 1) // BLOCK_N
    else:
        n_lo = start_m * 0
        n_hi = tl.cdiv(T, BLOCK_N)
        u_lo = n_lo
        u_hi = T // BLOCK_N
    u_lo = tl.minimum(u_lo, n_hi)
    u_hi = tl.minimum(tl.maximum(u_hi, u_lo), n_hi)
    return n_lo * BLOCK_N, u_lo * BLOCK_N, u_hi * BLOCK_N, n_hi * BLOCK_N


@triton.jit
def _q_tile_range(start_n, T, WINDOW, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Query tiles seen by key rows [start_n, start_n + BLOCK_N), as start offsets m_lo <= u_lo <= u_hi <= m_hi: key j
    # is seen by queries j <= i < j + WINDOW; tiles in [u_lo, u_hi) see every key of the tile and lie inside T.
    if IS_CAUSAL:
        m_lo = start_n // BLOCK_M
        m_hi = tl.cdiv(tl.minimum(start_n + BLOCK_N - 1 + WINDOW, T), BLOCK_M)
        u_lo = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M)
        u_hi = tl.minimum((start_n + WINDOW) // BLOCK_M, T // BLOCK_M)
    else:
        m_lo = start_n * 0
        m_hi = tl.cdiv(T, BLOCK_M)
        u_lo = m_lo
        u_hi = T // BLOCK_M
    u_lo = tl.minimum(u_lo, m_hi)
    u_hi = tl.minimum(tl.maximum(u_hi, u_lo), m_hi)
    return m_lo * BLOCK_M, u_lo * BLOCK_M, u_hi * BLOCK_M, m_hi * BLOCK_M


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_src, v_src, lo, hi, offs_m, T, WINDOW, qk_scale, stride_kt, stride_vt,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Online softmax over the key tiles starting in [lo, hi). m_i is in scaled log2 units; the raw scores are scaled
    # once, inside the exponent (one FMA per score), which is right because qk_scale > 0.
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_rows(k_src, start_n, T, stride_kt, BLOCK_N, HEAD_DIM, MASK, USE_TMA, UPCAST)
        v = _load_rows(v_src, start_n, T, stride_vt, BLOCK_N, HEAD_DIM, MASK, USE_TMA, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASK:
            qk = tl.where(
                _visible(offs_m[:, None], (start_n + offs_n)[None, :], T, WINDOW, IS_CAUSAL), qk, float("-inf")
            )
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if MASK:
            # A row may have seen no key yet (window edge): subtract 0 instead of -inf so p and alpha are 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotune("fwd")
@triton.jit(do_not_specialize=["BH_BUCKET"])
def _attn_fwd(
    Q, K, V, OUT, LSE, T, H, G, WINDOW, qk_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, BH_BUCKET,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Q, OUT: (B, T, H, D); K, V: (B, T, H / G, D); unit last strides; LSE: (B, H, T) fp32, base-2 log-sum-exp of the
    # scaled scores. BH_BUCKET only keys the autotuner; ATOMIC_DQ is unused here (one key for all kernels).
    # Program (query tile, b * H + h); the last query tiles (the longest causal rows) are launched first.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_src = _rows(Q + off_b * stride_qb + off_h * stride_qh, T, stride_qt, BLOCK_M, HEAD_DIM, USE_TMA)
    k_src = _rows(K + off_b * stride_kb + off_hk * stride_kh, T, stride_kt, BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _rows(V + off_b * stride_vb + off_hk * stride_vh, T, stride_vt, BLOCK_N, HEAD_DIM, USE_TMA)
    q = _load_rows(q_src, start_m, T, stride_qt, BLOCK_M, HEAD_DIM, True, USE_TMA, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_lo, u_lo, u_hi, n_hi = _kv_tile_range(start_m, T, WINDOW, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_src, v_src, n_lo, u_lo, offs_m, T, WINDOW, qk_scale, stride_kt, stride_vt,
        True, IS_CAUSAL, USE_TMA, UPCAST, DOT_PRECISION, HEAD_DIM, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_src, v_src, u_lo, u_hi, offs_m, T, WINDOW, qk_scale, stride_kt, stride_vt,
        False, IS_CAUSAL, USE_TMA, UPCAST, DOT_PRECISION, HEAD_DIM, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_src, v_src, u_hi, n_hi, offs_m, T, WINDOW, qk_scale, stride_kt, stride_vt,
        True, IS_CAUSAL, USE_TMA, UPCAST, DOT_PRECISION, HEAD_DIM, BLOCK_N,
    )  # fmt: skip

    # Only padding rows past T (under a window) can have seen no key: keep them finite, they are not stored.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(LSE + off_bh * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)
    o_dst = _rows(OUT + off_b * stride_ob + off_h * stride_oh, T, stride_ot, BLOCK_M, HEAD_DIM, USE_TMA)
    o = store_cast(acc / l_i[:, None], OUT, ROUND_BF16)
    _store_rows(o_dst, start_m, T, stride_ot, o, BLOCK_M, HEAD_DIM, USE_TMA)


@triton.jit
def _attn_bwd_preprocess(
    OUT, DO, DELTA, DQ_ACC, T, H, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    HEAD_DIM: tl.constexpr, ZERO_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # OUT, DO: (B, T, H, D), unit last strides; DELTA: (B, H, T) fp32 = rowsum(DO * OUT). With ZERO_DQ, also zero
    # the rows of the fp32 dQ accumulator DQ_ACC (B, H, T, D), contiguous. Program (query tile, b * H + h).
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    start_m = tl.program_id(0) * BLOCK_M
    o = _load_rows(OUT + off_b * stride_ob + off_h * stride_oh, start_m, T, stride_ot, BLOCK_M, HEAD_DIM, True, False,
                   True)  # fmt: skip
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, start_m, T, stride_dot, BLOCK_M, HEAD_DIM, True,
                    False, True)  # fmt: skip
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + off_bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)
    if ZERO_DQ:
        zeros = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        _store_rows(DQ_ACC + off_bh * T * HEAD_DIM, start_m, T, HEAD_DIM, zeros, BLOCK_M, HEAD_DIM, False)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, dq_ptr, lo, hi, offs_n, T, WINDOW, qk_scale,
    stride_qt, stride_dot, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    # Accumulate dK (unscaled) and dV of one key tile over the query tiles starting in [lo, hi) of one query head;
    # lse_ptr/delta_ptr are the (T,) rows of that head; with ATOMIC_DQ also add ds^T k into its fp32 dQ rows at
    # dq_ptr ((T, HEAD_DIM), contiguous).
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(q_src, start_m, T, stride_qt, BLOCK_M, HEAD_DIM, MASK, USE_TMA, UPCAST)
        do = _load_rows(do_src, start_m, T, stride_dot, BLOCK_M, HEAD_DIM, MASK, USE_TMA, UPCAST)
        if MASK:
            lse = tl.load(lse_ptr + rows, mask=rows < T, other=0.0)
            delta = tl.load(delta_ptr + rows, mask=rows < T, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M), unscaled
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if MASK:
            p_t = tl.where(_visible(rows[None, :], offs_n[:, None], T, WINDOW, IS_CAUSAL), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)  # (BLOCK_M, HEAD_DIM), unscaled
            dq_ptrs = dq_ptr + tl.cast(start_m, tl.int64) * HEAD_DIM + offs_m[:, None] * HEAD_DIM
            dq_ptrs += tl.arange(0, HEAD_DIM)[None, :]
            if MASK:
                tl.atomic_add(dq_ptrs, dq, mask=(rows < T)[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@_autotune("dkdv")
@triton.jit(do_not_specialize=["BH_BUCKET"])
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, T, H, G, WINDOW, qk_scale, sm_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    BH_BUCKET,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Q, DO: (B, T, H, D); K, V, DK, DV: (B, T, Hkv, D); unit last strides; LSE, DELTA: (B, H, T) fp32; DQ_ACC:
    # (B, H, T, D) fp32, contiguous, zeroed (used only with ATOMIC_DQ).
    # Program (key tile, b * Hkv + kv head): loops over the G query heads of the group, so dK/dV sum in registers.
    Hkv = H // G
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1).to(tl.int64)
    off_b = off_bhk // Hkv
    off_hk = off_bhk % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_src = _rows(K + off_b * stride_kb + off_hk * stride_kh, T, stride_kt, BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _rows(V + off_b * stride_vb + off_hk * stride_vh, T, stride_vt, BLOCK_N, HEAD_DIM, USE_TMA)
    k = _load_rows(k_src, start_n, T, stride_kt, BLOCK_N, HEAD_DIM, True, USE_TMA, UPCAST)
    v = _load_rows(v_src, start_n, T, stride_vt, BLOCK_N, HEAD_DIM, True, USE_TMA, UPCAST)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    m_lo, u_lo, u_hi, m_hi = _q_tile_range(start_n, T, WINDOW, IS_CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(G):
        off_h = off_hk * G + g
        q_src = _rows(Q + off_b * stride_qb + off_h * stride_qh, T, stride_qt, BLOCK_M, HEAD_DIM, USE_TMA)
        do_src = _rows(DO + off_b * stride_dob + off_h * stride_doh, T, stride_dot, BLOCK_M, HEAD_DIM, USE_TMA)
        lse_ptr = LSE + (off_b * H + off_h) * T
        delta_ptr = DELTA + (off_b * H + off_h) * T
        dq_ptr = DQ_ACC + (off_b * H + off_h) * T * HEAD_DIM
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, dq_ptr, m_lo, u_lo, offs_n, T, WINDOW, qk_scale,
            stride_qt, stride_dot, True, IS_CAUSAL, USE_TMA, ATOMIC_DQ, UPCAST, DOT_PRECISION, HEAD_DIM, BLOCK_M,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, dq_ptr, u_lo, u_hi, offs_n, T, WINDOW, qk_scale,
            stride_qt, stride_dot, False, IS_CAUSAL, USE_TMA, ATOMIC_DQ, UPCAST, DOT_PRECISION, HEAD_DIM, BLOCK_M,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, dq_ptr, u_hi, m_hi, offs_n, T, WINDOW, qk_scale,
            stride_qt, stride_dot, True, IS_CAUSAL, USE_TMA, ATOMIC_DQ, UPCAST, DOT_PRECISION, HEAD_DIM, BLOCK_M,
        )  # fmt: skip

    dk_dst = _rows(DK + off_b * stride_dkb + off_hk * stride_dkh, T, stride_dkt, BLOCK_N, HEAD_DIM, USE_TMA)
    dv_dst = _rows(DV + off_b * stride_dvb + off_hk * stride_dvh, T, stride_dvt, BLOCK_N, HEAD_DIM, USE_TMA)
    _store_rows(dk_dst, start_n, T, stride_dkt, store_cast(dk * sm_scale, DK, ROUND_BF16), BLOCK_N, HEAD_DIM, USE_TMA)
    _store_rows(dv_dst, start_n, T, stride_dvt, store_cast(dv, DV, ROUND_BF16), BLOCK_N, HEAD_DIM, USE_TMA)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, k_src, v_src, lo, hi, offs_m, T, WINDOW, qk_scale, stride_kt, stride_vt,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Accumulate dQ (unscaled) of one query tile over the key tiles starting in [lo, hi).
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_rows(k_src, start_n, T, stride_kt, BLOCK_N, HEAD_DIM, MASK, USE_TMA, UPCAST)
        v = _load_rows(v_src, start_n, T, stride_vt, BLOCK_N, HEAD_DIM, MASK, USE_TMA, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            p = tl.where(_visible(offs_m[:, None], (start_n + offs_n)[None, :], T, WINDOW, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@_autotune("dq")
@triton.jit(do_not_specialize=["BH_BUCKET"])
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, T, H, G, WINDOW, qk_scale, sm_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh, BH_BUCKET,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Q, DO, DQ: (B, T, H, D); K, V: (B, T, H / G, D); unit last strides; LSE, DELTA: (B, H, T) fp32.
    # The deterministic path's dQ. Program (query tile, b * H + h), the same key-tile bounds as the forward.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_src = _rows(Q + off_b * stride_qb + off_h * stride_qh, T, stride_qt, BLOCK_M, HEAD_DIM, USE_TMA)
    do_src = _rows(DO + off_b * stride_dob + off_h * stride_doh, T, stride_dot, BLOCK_M, HEAD_DIM, USE_TMA)
    k_src = _rows(K + off_b * stride_kb + off_hk * stride_kh, T, stride_kt, BLOCK_N, HEAD_DIM, USE_TMA)
    v_src = _rows(V + off_b * stride_vb + off_hk * stride_vh, T, stride_vt, BLOCK_N, HEAD_DIM, USE_TMA)
    q = _load_rows(q_src, start_m, T, stride_qt, BLOCK_M, HEAD_DIM, True, USE_TMA, UPCAST)
    do = _load_rows(do_src, start_m, T, stride_dot, BLOCK_M, HEAD_DIM, True, USE_TMA, UPCAST)
    lse = tl.load(LSE + off_bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + off_bh * T + offs_m, mask=offs_m < T, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_lo, u_lo, u_hi, n_hi = _kv_tile_range(start_m, T, WINDOW, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_src, v_src, n_lo, u_lo, offs_m, T, WINDOW, qk_scale, stride_kt, stride_vt,
        True, IS_CAUSAL, USE_TMA, UPCAST, DOT_PRECISION, HEAD_DIM, BLOCK_N,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_src, v_src, u_lo, u_hi, offs_m, T, WINDOW, qk_scale, stride_kt, stride_vt,
        False, IS_CAUSAL, USE_TMA, UPCAST, DOT_PRECISION, HEAD_DIM, BLOCK_N,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_src, v_src, u_hi, n_hi, offs_m, T, WINDOW, qk_scale, stride_kt, stride_vt,
        True, IS_CAUSAL, USE_TMA, UPCAST, DOT_PRECISION, HEAD_DIM, BLOCK_N,
    )  # fmt: skip

    dq_dst = _rows(DQ + off_b * stride_dqb + off_h * stride_dqh, T, stride_dqt, BLOCK_M, HEAD_DIM, USE_TMA)
    _store_rows(dq_dst, start_m, T, stride_dqt, store_cast(dq * sm_scale, DQ, ROUND_BF16), BLOCK_M, HEAD_DIM, USE_TMA)


@triton.jit
def _attn_bwd_dq_convert(
    DQ_ACC, DQ, T, H, sm_scale, stride_dqb, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # DQ = sm_scale * DQ_ACC in DQ's dtype: DQ_ACC (B, H, T, D) fp32 contiguous, DQ (B, T, H, D) with unit last
    # stride. Program (query tile, b * H + h).
    off_bh = tl.program_id(1).to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M
    dq = _load_rows(DQ_ACC + off_bh * T * HEAD_DIM, start_m, T, HEAD_DIM, BLOCK_M, HEAD_DIM, True, False, False)
    dq_dst = DQ + (off_bh // H) * stride_dqb + (off_bh % H) * stride_dqh
    _store_rows(dq_dst, start_m, T, stride_dqt, store_cast(dq * sm_scale, DQ, ROUND_BF16), BLOCK_M, HEAD_DIM, False)


def _flags(q: torch.Tensor, B: int, H: int, use_tma: bool, atomic_dq: bool) -> dict:
    """Keyword arguments every autotuned kernel takes: the autotune bucket, the code path and the dtype switches."""
    if use_tma:
        _utils.set_tma_allocator()
    return {
        "BH_BUCKET": triton.next_power_of_2(B * H),
        "HEAD_DIM": q.shape[-1],
        "USE_TMA": use_tma,
        "ATOMIC_DQ": atomic_dq,
        "UPCAST": _utils.INTERPRET,
        "ROUND_BF16": _utils.INTERPRET and q.dtype == torch.bfloat16,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _strides(*tensors: torch.Tensor) -> list[int]:
    """(b, t, h) strides of (B, T, heads, D) tensors with a unit last stride, flattened in order."""
    return [s for t in tensors for s in t.stride()[:3]]


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int, scale: float, tma: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch(
        "fwd", _attn_fwd, grid, q, k, v, o, lse, T, H, H // k.shape[2], window,
        scale * _LOG2E, *_strides(q, k, v, o), IS_CAUSAL=causal,
        **_flags(q, B, H, tma and _utils.tma_compatible(q, k, v, o), False),
    )  # fmt: skip
    return o, lse


def _backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, window: int, scale: float, tma: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    if do.stride(-1) != 1:
        do = do.contiguous()
    atomic = not deterministic
    G = H // Hkv
    addressable = _utils.tma_compatible(q, k, v, do, dq, dk, dv)
    use_tma = tma and addressable
    if not _utils.INTERPRET and q.dtype != torch.float32:  # 16-bit on a GPU: only spill-free configs
        use_tma, atomic = _resolve_path(D, G, use_tma, atomic)
        if use_tma and not addressable:  # the only spill-free path here loads through TMA: give it aligned copies
            q, k, v, do = (t.clone(memory_format=torch.contiguous_format) for t in (q, k, v, do))
    flags = _flags(q, B, H, use_tma, atomic)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    # The atomic path's fp32 dQ, zeroed by the preprocess kernel (a dummy pointer on the deterministic path).
    dq_acc = torch.empty((B, H, T, D) if atomic else (1,), dtype=torch.float32, device=q.device)
    block_m = 64 if _utils.INTERPRET else 128
    rows_grid = (triton.cdiv(T, block_m), B * H)
    _attn_bwd_preprocess[rows_grid](
        o, do, delta, dq_acc, T, H, *_strides(o, do), HEAD_DIM=D, ZERO_DQ=atomic, BLOCK_M=block_m
    )
    dkdv_grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
    _launch(
        "dkdv", _attn_bwd_dkdv, dkdv_grid, q, k, v, do, lse, delta, dk, dv, dq_acc, T, H, G, window,
        scale * _LOG2E, scale, *_strides(q, k, v, do, dk, dv), IS_CAUSAL=causal, **flags,
    )  # fmt: skip
    if atomic:
        _attn_bwd_dq_convert[rows_grid](
            dq_acc, dq, T, H, scale, *_strides(dq), HEAD_DIM=D, ROUND_BF16=flags["ROUND_BF16"], BLOCK_M=block_m
        )
    else:
        dq_grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        _launch(
            "dq", _attn_bwd_dq, dq_grid, q, k, v, do, lse, delta, dq, T, H, G, window, scale * _LOG2E, scale,
            *_strides(q, k, v, do, dq), IS_CAUSAL=causal, **flags,
        )  # fmt: skip
    return dq, dk, dv


@torch.library.custom_op("nanogpt2::flash_attention", mutates_args=())
def _flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int, scale: float, tma: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return _forward(q, k, v, causal, window, scale, tma)


@_flash_attention_op.register_fake
def _(q, k, v, causal, window, scale, tma, deterministic):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("nanogpt2::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, window: int, scale: float, tma: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return _backward(do, q, k, v, o, lse, causal, window, scale, tma, deterministic)


@_flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, window, scale, tma, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *ctx.options = inputs  # causal, window, scale, tma, deterministic
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd_op(do, q, k, v, o, lse, *ctx.options)
    return dq, dk, dv, None, None, None, None, None


_flash_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)

# Defaults of the code-path switches: the faster ones in benches/gpu_check.sh's measurements (BENCHMARKS.md), pointer
# loads over TMA descriptors and atomic dQ over its own kernel. NANOGPT2_ATTN_TMA=1 / NANOGPT2_ATTN_DETERMINISTIC=1
# override them for a whole run.
USE_TMA = os.environ.get("NANOGPT2_ATTN_TMA", "0") == "1"
DETERMINISTIC = os.environ.get("NANOGPT2_ATTN_DETERMINISTIC", "0") == "1"


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    *,
    deterministic: bool | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """Flash attention with grouped-query heads and an optional sliding window, exactly `flash_attention_ref`.

    q: (B, T, H, D); k, v: (B, T, Hkv, D) with H % Hkv == 0 (query head h reads KV head h // (H // Hkv)); one dtype
    among fp32, fp16, bf16; D in SUPPORTED_HEAD_DIMS; each tensor's last stride must be 1, the others are free (views
    of a fused qkv projection need no copy; strides that are multiples of 16 bytes also allow TMA). `window=W` (needs
    causal) lets query i see keys i - W < j <= i; causal=False without a window is full attention. `scale` (> 0)
    defaults to D ** -0.5. Returns o (B, T, H, D), contiguous, differentiable with respect to q, k and v.
    `deterministic`: dQ from its own kernel, bitwise repeatable (True), or fp32 atomics in the dK/dV kernel (False,
    5 matmuls instead of 7); None takes DETERMINISTIC, or True under torch.use_deterministic_algorithms.
    `tma`: load tiles through TMA descriptors where the strides allow (None: USE_TMA).
    """
    if window is not None and not causal:
        raise ValueError(f"a sliding window needs causal=True, got causal={causal} with window={window}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
    _utils.check_inputs(q=q, k=k, v=v)
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k and v must both be (B={B}, T={T}, Hkv, D={D}), got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] == 0 or H % k.shape[2] != 0:
        raise ValueError(f"the number of query heads ({H}) must be a positive multiple of the KV heads ({k.shape[2]})")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS}, got {D}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    _utils.check_device(q, k, v)
    rows = max(1, _utils.MAX_GRID_Y // H)  # sequences whose (batch, head) programs fit one launch's grid
    if B > rows:
        slices = [(q[i : i + rows], k[i : i + rows], v[i : i + rows]) for i in range(0, B, rows)]
        options = dict(causal=causal, window=window, scale=scale, deterministic=deterministic, tma=tma)
        return torch.cat([flash_attention(*qkv, **options) for qkv in slices])
    scale = D**-0.5 if scale is None else float(scale)
    # A window of T or more keys is plain causal attention; the kernels take T for "no window".
    window = T if window is None else min(window, T)
    if deterministic is None:
        deterministic = DETERMINISTIC or torch.are_deterministic_algorithms_enabled()
    tma = USE_TMA if tma is None else tma
    return _flash_attention_op(q, k, v, causal, max(window, 1), scale, tma, deterministic)[0]
