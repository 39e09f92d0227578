"""Flash attention in Triton: causal or full, grouped-query heads, sliding window; forward and backward.

Algorithm (FA2): the forward streams K/V tiles past a tile of queries with an online softmax and keeps the base-2
log-sum-exp per row; the backward precomputes delta = rowsum(dO * O), then one kernel accumulates dK/dV per key tile
(looping over the query heads of its KV group: deterministic, no atomics) and another accumulates dQ per query tile.
Layout: q, o (B, T, H, D); k, v (B, T, Hkv, D); any strides (views of a fused qkv projection need no copy). Query
head h reads KV head h // (H // Hkv); K/V are never expanded. Only tiles inside the causal band (i - W < j <= i) are
loaded; tiles fully inside it skip the mask, so cost grows with T * W. Limits: D in {16, 32, 64, 128}; fp32, fp16,
bf16 with fp32 accumulation (fp32 dots in IEEE precision, not tf32); equal query and key lengths.
Differences from the Triton tutorial: GQA and windows in the tile bounds, any T (masks), strided inputs, separate
dK/dV and dQ kernels, bf16 upcast and rounding switches for the interpreter.
"""

import math
import os

import torch
import triton
import triton.language as tl

from kernels import rope
from kernels.rope import check_device, interpreting, store_cast

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = math.log2(math.e)


def _tuning(gpu: list[tuple[int, int, int, int]], small: tuple[int, int]) -> dict:
    """triton.autotune arguments: the GPU configs (BLOCK_M, BLOCK_N, num_warps, num_stages) for fp16/bf16, and one
    small (BLOCK_M, BLOCK_N) config for fp32 and the interpreter.

    fp32 runs its dots in IEEE precision: large tiles then overflow shared memory and take minutes to compile. The
    interpreter takes one config (BLOCK_M != BLOCK_N, so the tile bounds are also tested off the diagonal).
    NANOGPT2_AUTOTUNE=0 keeps only the first GPU config: tests on a GPU then compile each variant once.
    """
    small_config = triton.Config({"BLOCK_M": small[0], "BLOCK_N": small[1]}, num_warps=4, num_stages=2)
    key = ["T", "WINDOW", "G", "HEAD_DIM", "IS_CAUSAL"]
    if interpreting():
        return dict(configs=[small_config], key=key)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]

    def prune(_configs: list, named_args: dict, **kwargs) -> list[triton.Config]:
        if named_args["Q"].dtype == torch.float32:
            return [small_config]
        return configs[:1] if os.environ.get("NANOGPT2_AUTOTUNE", "1") == "0" else configs

    return dict(configs=[*configs, small_config], key=key, prune_configs_by={"early_config_prune": prune})


@triton.jit
def _maybe_upcast(x, UPCAST: tl.constexpr):
    # The interpreter cannot compute in bf16; a GPU keeps the input dtype for tensor-core dots.
    if UPCAST:
        x = x.to(tl.float32)
    return x


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
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    lo,
    hi,
    offs_m,
    offs_n,
    T,
    WINDOW,
    qk_scale,
    stride_kt,
    stride_vt,
    MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Online softmax over the key tiles starting in [lo, hi); k_ptrs/v_ptrs are (BLOCK_N, HEAD_DIM) at key 0.
    for start_n in range(lo, hi, BLOCK_N):
        if MASK:
            in_t = (start_n + offs_n < T)[:, None]
            k = tl.load(k_ptrs + start_n * stride_kt, mask=in_t, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=in_t, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
            v = tl.load(v_ptrs + start_n * stride_vt)
        k = _maybe_upcast(k, UPCAST)
        v = _maybe_upcast(v, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            qk = tl.where(
                _visible(offs_m[:, None], (start_n + offs_n)[None, :], T, WINDOW, IS_CAUSAL), qk, float("-inf")
            )
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASK:
            # A row may have seen no key yet (window edge): subtract 0 instead of -inf so p and alpha are 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(**_tuning([(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)], (64, 32)))
@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    OUT,
    LSE,
    T,
    H,
    G,
    WINDOW,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Q, OUT: (B, T, H, D); K, V: (B, T, H / G, D); LSE: (B, H, T) fp32, base-2 log-sum-exp of the scaled scores.
    # Program (query tile, b * H + h); the last query tiles (the longest causal rows) are launched first.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = off_bh % H
    off_hk = off_h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = _maybe_upcast(tl.load(q_ptrs, mask=(offs_m < T)[:, None], other=0.0), UPCAST)
    k_ptrs = K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_lo, u_lo, u_hi, n_hi = _kv_tile_range(start_m, T, WINDOW, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, n_lo, u_lo, offs_m, offs_n, T, WINDOW, qk_scale, stride_kt, stride_vt,
        True, IS_CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, u_lo, u_hi, offs_m, offs_n, T, WINDOW, qk_scale, stride_kt, stride_vt,
        False, IS_CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, u_hi, n_hi, offs_m, offs_n, T, WINDOW, qk_scale, stride_kt, stride_vt,
        True, IS_CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip

    # Only padding rows past T (under a window) can have seen no key: keep them finite, they are not stored.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    in_t = offs_m < T
    tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=in_t)
    o_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, store_cast(acc / l_i[:, None], OUT, ROUND_BF16), mask=in_t[:, None])


@triton.jit
def _attn_bwd_preprocess(
    OUT,
    DO,
    DELTA,
    T,
    H,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_od,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dod,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # OUT, DO: (B, T, H, D); DELTA: (B, H, T) fp32 = rowsum(DO * OUT). Program (query tile, b * H + h).
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = off_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_t = offs_m < T
    o = tl.load(OUT + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=in_t[:, None], other=0.0)  # fmt: skip
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=in_t[:, None], other=0.0,
    )  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * T + offs_m, delta, mask=in_t)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    lse_ptr,
    delta_ptr,
    lo,
    hi,
    offs_n,
    offs_m,
    T,
    WINDOW,
    qk_scale,
    stride_qt,
    stride_dot,
    MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Accumulate dK (unscaled) and dV of one key tile over the query tiles starting in [lo, hi) of one query head;
    # q_ptrs/do_ptrs are (BLOCK_M, HEAD_DIM) at query 0, lse_ptr/delta_ptr the (T,) rows of that head.
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if MASK:
            in_t = rows < T
            q = tl.load(q_ptrs + start_m * stride_qt, mask=in_t[:, None], other=0.0)
            do = tl.load(do_ptrs + start_m * stride_dot, mask=in_t[:, None], other=0.0)
            lse = tl.load(lse_ptr + rows, mask=in_t, other=0.0)
            delta = tl.load(delta_ptr + rows, mask=in_t, other=0.0)
        else:
            q = tl.load(q_ptrs + start_m * stride_qt)
            do = tl.load(do_ptrs + start_m * stride_dot)
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        q = _maybe_upcast(q, UPCAST)
        do = _maybe_upcast(do, UPCAST)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(qk_t - lse[None, :])
        if MASK:
            p_t = tl.where(_visible(rows[None, :], offs_n[:, None], T, WINDOW, IS_CAUSAL), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(**_tuning([(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3)], (32, 64)))
@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    T,
    H,
    G,
    WINDOW,
    qk_scale,
    sm_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    stride_dvb,
    stride_dvt,
    stride_dvh,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Q, DO: (B, T, H, D); K, V, DK, DV: (B, T, Hkv, D), DK/DV contiguous; LSE, DELTA: (B, H, T) fp32.
    # Program (key tile, b * Hkv + kv head): loops over the G query heads of the group, so dK/dV sum in registers.
    Hkv = H // G
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1)
    off_b = (off_bhk // Hkv).to(tl.int64)
    off_hk = off_bhk % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_t = (offs_n < T)[:, None]
    k_ptrs = K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    k = _maybe_upcast(tl.load(k_ptrs, mask=in_t, other=0.0), UPCAST)
    v = _maybe_upcast(tl.load(v_ptrs, mask=in_t, other=0.0), UPCAST)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    m_lo, u_lo, u_hi, m_hi = _q_tile_range(start_n, T, WINDOW, IS_CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(G):
        off_h = off_hk * G + g
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
        do_ptrs = (
            DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
        )
        lse_ptr = LSE + (off_b * H + off_h) * T
        delta_ptr = DELTA + (off_b * H + off_h) * T
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, m_lo, u_lo, offs_n, offs_m, T, WINDOW, qk_scale,
            stride_qt, stride_dot, True, IS_CAUSAL, UPCAST, DOT_PRECISION, BLOCK_M,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, u_lo, u_hi, offs_n, offs_m, T, WINDOW, qk_scale,
            stride_qt, stride_dot, False, IS_CAUSAL, UPCAST, DOT_PRECISION, BLOCK_M,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, u_hi, m_hi, offs_n, offs_m, T, WINDOW, qk_scale,
            stride_qt, stride_dot, True, IS_CAUSAL, UPCAST, DOT_PRECISION, BLOCK_M,
        )  # fmt: skip

    dk_ptrs = DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dk_ptrs, store_cast(dk * sm_scale, DK, ROUND_BF16), mask=in_t)
    tl.store(dv_ptrs, store_cast(dv, DV, ROUND_BF16), mask=in_t)


@triton.jit
def _attn_bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_ptrs,
    v_ptrs,
    lo,
    hi,
    offs_m,
    offs_n,
    T,
    WINDOW,
    qk_scale,
    stride_kt,
    stride_vt,
    MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Accumulate dQ (unscaled) of one query tile over the key tiles starting in [lo, hi).
    for start_n in range(lo, hi, BLOCK_N):
        if MASK:
            in_t = (start_n + offs_n < T)[:, None]
            k = tl.load(k_ptrs + start_n * stride_kt, mask=in_t, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=in_t, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
            v = tl.load(v_ptrs + start_n * stride_vt)
        k = _maybe_upcast(k, UPCAST)
        v = _maybe_upcast(v, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])
        if MASK:
            p = tl.where(_visible(offs_m[:, None], (start_n + offs_n)[None, :], T, WINDOW, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(**_tuning([(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)], (64, 32)))
@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    T,
    H,
    G,
    WINDOW,
    qk_scale,
    sm_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Q, DO, DQ: (B, T, H, D), DQ contiguous; K, V: (B, T, H / G, D); LSE, DELTA: (B, H, T) fp32.
    # Program (query tile, b * H + h), the same key-tile bounds as the forward.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = off_bh % H
    off_hk = off_h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_t = offs_m < T
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
    q = _maybe_upcast(tl.load(q_ptrs, mask=in_t[:, None], other=0.0), UPCAST)
    do = _maybe_upcast(tl.load(do_ptrs, mask=in_t[:, None], other=0.0), UPCAST)
    lse = tl.load(LSE + off_bh.to(tl.int64) * T + offs_m, mask=in_t, other=0.0)
    delta = tl.load(DELTA + off_bh.to(tl.int64) * T + offs_m, mask=in_t, other=0.0)
    k_ptrs = K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_lo, u_lo, u_hi, n_hi = _kv_tile_range(start_m, T, WINDOW, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, n_lo, u_lo, offs_m, offs_n, T, WINDOW, qk_scale, stride_kt, stride_vt,
        True, IS_CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, u_lo, u_hi, offs_m, offs_n, T, WINDOW, qk_scale, stride_kt, stride_vt,
        False, IS_CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, u_hi, n_hi, offs_m, offs_n, T, WINDOW, qk_scale, stride_kt, stride_vt,
        True, IS_CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip

    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, store_cast(dq * sm_scale, DQ, ROUND_BF16), mask=in_t[:, None])


def _kernel_flags(dtype: torch.dtype) -> dict:
    """Constexprs that depend on the dtype and on whether the interpreter runs the kernels."""
    return {
        "UPCAST": interpreting(),
        "ROUND_BF16": interpreting() and dtype == torch.bfloat16,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, o, lse, T, H, H // k.shape[2], window, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        HEAD_DIM=D, IS_CAUSAL=causal, **_kernel_flags(q.dtype),
    )  # fmt: skip
    return o, lse


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    block_m = 64 if interpreting() else 128
    _attn_bwd_preprocess[(triton.cdiv(T, block_m), B * H)](
        o, do, delta, T, H, *o.stride(), *do.stride(), HEAD_DIM=D, BLOCK_M=block_m
    )
    flags = _kernel_flags(q.dtype)
    G = H // Hkv
    dkdv_grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
    _attn_bwd_dkdv[dkdv_grid](
        q, k, v, do, lse, delta, dk, dv, T, H, G, window, scale * _LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride()[:3], *dv.stride()[:3],
        HEAD_DIM=D, IS_CAUSAL=causal, **flags,
    )  # fmt: skip
    dq_grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq[dq_grid](
        q, k, v, do, lse, delta, dq, T, H, G, window, scale * _LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride()[:3],
        HEAD_DIM=D, IS_CAUSAL=causal, **flags,
    )  # fmt: skip
    return dq, dk, dv


@torch.library.custom_op("nanogpt2::flash_attention", mutates_args=())
def _flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, window, scale)


@_flash_attention_op.register_fake
def _(q, k, v, causal, window, scale):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("nanogpt2::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, causal, window, scale)


@_flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, window, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.window, ctx.scale = causal, window, scale


def _autograd_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


_flash_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Flash attention with grouped-query heads and an optional sliding window, exactly `flash_attention_ref`.

    q: (B, T, H, D); k, v: (B, T, Hkv, D) with H % Hkv == 0 (query head h reads KV head h // (H // Hkv)); one dtype
    among fp32, fp16, bf16; D in {16, 32, 64, 128}; unit last stride, other strides free. `window=W` (needs causal)
    lets query i see keys i - W < j <= i; causal=False without a window is full attention. `scale` defaults to
    D ** -0.5. Returns o (B, T, H, D), contiguous, differentiable with respect to q, k and v.
    """
    if window is not None and not causal:
        raise ValueError(f"a sliding window needs causal=True, got causal={causal} with window={window}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, T, heads, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k and v must both be (B={B}, T={T}, Hkv, D={D}), got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] == 0 or H % k.shape[2] != 0:
        raise ValueError(f"the number of query heads ({H}) must be a positive multiple of the KV heads ({k.shape[2]})")
    if D not in _HEAD_DIMS:
        raise ValueError(f"head dim must be one of {_HEAD_DIMS}, got {D}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride, got strides {t.stride()}")
    check_device(q, k, v)
    rows = max(1, rope.MAX_GRID_Y // H)  # sequences whose (batch, head) programs fit one launch's grid
    if B > rows:
        slices = [(q[i : i + rows], k[i : i + rows], v[i : i + rows]) for i in range(0, B, rows)]
        return torch.cat([flash_attention(*qkv, causal=causal, window=window, scale=scale) for qkv in slices])
    scale = D**-0.5 if scale is None else float(scale)
    # A window of T or more keys is plain causal attention; the kernels take T for "no window".
    window = T if window is None else min(window, T)
    return _flash_attention_op(q, k, v, causal, max(window, 1), scale)[0]
