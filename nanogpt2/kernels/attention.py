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
Packed q/k/v (`flash_attention_packed`, the model's path): the backward writes the gradient of the (B, T, H + 2 Hkv,
D) projection output as one tensor, and with RoPE rotates dK (in the dK/dV kernel's store) and dQ (when it is
converted from fp32, or in the deterministic dQ kernel's store) back by the opposite angle: no RoPE backward launch
and no `cat` of dq, dk, dv.
Host side: eager calls go through a plain autograd.Function and launcher.py (a config and compiled kernel kept per
problem: one launch forward, three backward); torch.compile sees triton_ops whose kernels Inductor launches itself.
Tile configs and code-path defaults: tuning.py.
Differences from the Triton tutorial: GQA and windows in the tile bounds, any T, strided inputs, the row max taken on
raw scores, the atomic/deterministic dQ choice, RoPE's inverse in the backward, bf16 upcast and rounding switches for
the interpreter.
"""

import math

import torch
import triton
import triton.language as tl

from nanogpt2.kernels import _utils, launcher, tuning
from nanogpt2.kernels._utils import maybe_upcast, store_cast
from nanogpt2.kernels.rope import check_rope_inputs, rotate

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = math.log2(math.e)


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
def _unrotate(x, COS, SIN, start, T, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    # The gradient of rows [start, start + BLOCK) before RoPE from x (BLOCK, HEAD_DIM) fp32, the gradient after it:
    # the rotation by the opposite angle, (x1 cos + x2 sin, x2 cos - x1 sin) with x1, x2 the halves of each row and
    # COS, SIN (T, HEAD_DIM / 2) fp32, contiguous.
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = start + tl.arange(0, BLOCK)
    offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    cos = tl.load(COS + offs, mask=(rows < T)[:, None], other=0.0)
    sin = tl.load(SIN + offs, mask=(rows < T)[:, None], other=0.0)
    x1, x2 = tl.split(tl.permute(tl.reshape(x, (BLOCK, 2, HALF)), (0, 2, 1)))  # (BLOCK, HALF) each
    y = tl.join(x1 * cos + x2 * sin, x2 * cos - x1 * sin)  # (BLOCK, HALF, 2)
    return tl.reshape(tl.permute(y, (0, 2, 1)), (BLOCK, HEAD_DIM))


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


@triton.jit
def _attn_fwd(
    Q, K, V, OUT, LSE, T, H, G, WINDOW, qk_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    ROUND_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Q, OUT: (B, T, H, D); K, V: (B, T, H / G, D); unit last strides; LSE: (B, H, T) fp32, base-2 log-sum-exp of the
    # scaled scores.
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


# G stays a runtime value even when it is 1: specialized to 1, the loop over the group's heads folds away and ptxas
# serializes the wgmma instructions (warning C7515) of most MHA configs, every deterministic TMA one under triton 3.6
# (`python -m benches.sass`).
@triton.jit(do_not_specialize=["G"])
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, COS, SIN, T, H, G, WINDOW, qk_scale, sm_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    ROPE: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Q, DO: (B, T, H, D); K, V, DK, DV: (B, T, Hkv, D); unit last strides; LSE, DELTA: (B, H, T) fp32; DQ_ACC:
    # (B, H, T, D) fp32, contiguous, zeroed (used only with ATOMIC_DQ). With ROPE, Q and K are rotated by the angles
    # whose COS, SIN are (T, D/2) fp32 (contiguous), and DK is the gradient of the unrotated keys.
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
    dk = dk * sm_scale
    if ROPE:
        dk = _unrotate(dk, COS, SIN, start_n, T, BLOCK_N, HEAD_DIM)
    _store_rows(dk_dst, start_n, T, stride_dkt, store_cast(dk, DK, ROUND_BF16), BLOCK_N, HEAD_DIM, USE_TMA)
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


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, COS, SIN, T, H, G, WINDOW, qk_scale, sm_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, ROPE: tl.constexpr,
    UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Q, DO, DQ: (B, T, H, D); K, V: (B, T, H / G, D); unit last strides; LSE, DELTA: (B, H, T) fp32.
    # The deterministic path's dQ (of the unrotated queries with ROPE, as in the dK/dV kernel). Program (query tile,
    # b * H + h), the same key-tile bounds as the forward.
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
    dq = dq * sm_scale
    if ROPE:
        dq = _unrotate(dq, COS, SIN, start_m, T, BLOCK_M, HEAD_DIM)
    _store_rows(dq_dst, start_m, T, stride_dqt, store_cast(dq, DQ, ROUND_BF16), BLOCK_M, HEAD_DIM, USE_TMA)


@triton.jit
def _attn_bwd_dq_convert(
    DQ_ACC, DQ, COS, SIN, T, H, sm_scale, stride_dqb, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # DQ = sm_scale * DQ_ACC in DQ's dtype (rotated back by -angle with ROPE): DQ_ACC (B, H, T, D) fp32 contiguous,
    # DQ (B, T, H, D) with unit last stride, COS/SIN as in the dK/dV kernel. Program (query tile, b * H + h).
    off_bh = tl.program_id(1).to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M
    dq = _load_rows(DQ_ACC + off_bh * T * HEAD_DIM, start_m, T, HEAD_DIM, BLOCK_M, HEAD_DIM, True, False, False)
    dq = dq * sm_scale
    if ROPE:
        dq = _unrotate(dq, COS, SIN, start_m, T, BLOCK_M, HEAD_DIM)
    dq_dst = DQ + (off_bh // H) * stride_dqb + (off_bh % H) * stride_dqh
    _store_rows(dq_dst, start_m, T, stride_dqt, store_cast(dq, DQ, ROUND_BF16), BLOCK_M, HEAD_DIM, False)


# The kernels' dtype switches: bf16 upcast and rounding in the interpreter, IEEE fp32 dots (not tf32) for fp32.
_DTYPE_FLAGS = {
    dtype: {
        "UPCAST": _utils.INTERPRET,
        "ROUND_BF16": _utils.INTERPRET and dtype == torch.bfloat16,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }
    for dtype in _utils.DTYPES
}
_ROWS = launcher.Fixed(BLOCK_M=64 if _utils.INTERPRET else 128, num_warps=4)  # preprocess and dQ conversion


def _strides(*tensors: torch.Tensor) -> list[int]:
    """(b, t, h) strides of (B, T, heads, D) tensors with a unit last stride, flattened in order."""
    return [s for t in tensors for s in t.stride()[:3]]


def _small_window(causal: bool, window: int, T: int) -> int | None:
    """The window that shapes the tiles (see tuning.candidate_tiles), None when every causal row sees all keys."""
    return window if causal and window < T else None


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int, scale: float, tma: bool,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """o (B, T, H, D) and the base-2 log-sum-exp lse (B, H, T) fp32 of checked inputs; `window` in 1..T."""
    B, T, H, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    starts = launcher.aligned((q, k, v), traced)
    use_tma = tma and _utils.tma_compatible((q, k, v, o), starts)
    if use_tma:
        _utils.set_tma_allocator()
    key = ("fwd", q.device, q.dtype, q.shape, k.shape, q.stride(), k.stride(), v.stride(), causal, window, scale,
           use_tma, starts)  # fmt: skip

    def setup() -> launcher.Launch:
        G = H // k.shape[2]
        return launcher.Launch(
            lambda tile: (_utils.cdiv(T, tile.block_m), B * H, 1),
            (T, H, G, window, scale * _LOG2E, *_strides(q, k, v, o)),
            {"HEAD_DIM": D, "IS_CAUSAL": causal, "USE_TMA": use_tma, **_DTYPE_FLAGS[q.dtype]},
            tuning.candidate_tiles("fwd", D, G, q.dtype, use_tma, False, _small_window(causal, window, T)),
        )

    launcher.launch(_attn_fwd, key, (q, k, v, o, lse), setup, traced=traced)
    return o, lse


def _backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    causal: bool, window: int, scale: float, tma: bool, deterministic: bool, traced: bool = False,
) -> None:  # fmt: skip
    """Write the gradients of q, k, v into dq, dk, dv (fresh tensors, or views of one packed buffer: both are
    TMA-addressable). With `rope` = (cos, sin), q and k are rotated and dq, dk come out for the unrotated ones."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    if dq.numel() == 0:
        return
    if do.stride(-1) != 1:
        do = do.contiguous()
    atomic = not deterministic
    starts = launcher.aligned((q, k, v, do), traced)
    use_tma = tma and _utils.tma_compatible((q, k, v, do), starts)
    if not _utils.INTERPRET and q.dtype != torch.float32:  # 16-bit on a GPU: only the listed configs
        checked = use_tma  # addressable, when TMA was asked for and possible
        use_tma, atomic = tuning.resolve_path(D, G, use_tma, atomic)
        if use_tma and not checked and not _utils.tma_compatible((q, k, v, do), starts):  # its only path is TMA
            q, k, v, do = (t.clone(memory_format=torch.contiguous_format) for t in (q, k, v, do))
            starts = (True,) * 4
    if use_tma:
        _utils.set_tma_allocator()
    cos, sin = rope if rope is not None else (lse, lse)  # unread without ROPE
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    # The atomic path's fp32 dQ, zeroed by the preprocess kernel (a dummy pointer on the deterministic path).
    dq_acc = torch.empty((B, H, T, D) if atomic else (1,), dtype=torch.float32, device=q.device)
    key = (q.device, q.dtype, q.shape, k.shape, q.stride(), k.stride(), v.stride(), do.stride(), o.stride(),
           dq.stride(), dk.stride(), causal, window, scale, use_tma, atomic, rope is not None, starts)  # fmt: skip
    rope_flag = rope is not None
    flags = {"HEAD_DIM": D, "IS_CAUSAL": causal, "USE_TMA": use_tma, "ROPE": rope_flag, **_DTYPE_FLAGS[q.dtype]}
    small_window = _small_window(causal, window, T)
    rows_grid = lambda meta: (_utils.cdiv(T, meta["BLOCK_M"]), B * H, 1)  # noqa: E731
    tile_grid = lambda tile: (_utils.cdiv(T, tile.block_m), B * H, 1)  # noqa: E731
    attention_scalars = (T, H, G, window, scale * _LOG2E, scale)

    launcher.launch(
        _attn_bwd_preprocess, ("pre", key), (o, do, delta, dq_acc),
        lambda: launcher.Launch(rows_grid, (T, H, *_strides(o, do)), {"HEAD_DIM": D, "ZERO_DQ": atomic}, [_ROWS]),
        traced=traced,
    )  # fmt: skip
    launcher.launch(
        _attn_bwd_dkdv, ("dkdv", key), (q, k, v, do, lse, delta, dk, dv, dq_acc, cos, sin),
        lambda: launcher.Launch(
            lambda tile: (_utils.cdiv(T, tile.block_n), B * Hkv, 1),
            (*attention_scalars, *_strides(q, k, v, do, dk, dv)), flags | {"ATOMIC_DQ": atomic},
            tuning.candidate_tiles("dkdv", D, G, q.dtype, use_tma, atomic, small_window),
        ),
        reset=dq_acc if atomic else None, traced=traced,
    )  # fmt: skip
    if atomic:
        convert_flags = {"HEAD_DIM": D, "ROPE": rope_flag, "ROUND_BF16": flags["ROUND_BF16"]}
        launcher.launch(
            _attn_bwd_dq_convert, ("convert", key), (dq_acc, dq, cos, sin),
            lambda: launcher.Launch(rows_grid, (T, H, scale, *_strides(dq)), convert_flags, [_ROWS]), traced=traced,
        )  # fmt: skip
    else:
        launcher.launch(
            _attn_bwd_dq, ("dq", key), (q, k, v, do, lse, delta, dq, cos, sin),
            lambda: launcher.Launch(
                tile_grid, (*attention_scalars, *_strides(q, k, v, do, dq)), flags,
                tuning.candidate_tiles("dq", D, G, q.dtype, use_tma, False, small_window),
            ),
            traced=traced,
        )  # fmt: skip


def _split(qkv: torch.Tensor, n_kv_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q (B, T, H, D), k, v (B, T, Hkv, D) of a packed (B, T, H + 2 Hkv, D) tensor."""
    H = qkv.shape[2] - 2 * n_kv_head
    return qkv[:, :, :H], qkv[:, :, H : H + n_kv_head], qkv[:, :, H + n_kv_head :]


def _empty_like(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]


class _Attention(torch.autograd.Function):
    """Eager attention of separate q, k, v: one launch forward, three backward (lse is saved, not returned)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, tma, deterministic):
        o, lse = _forward(q, k, v, causal, window, scale, tma)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.options = causal, window, scale, tma, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _empty_like(q, k, v)
        _backward(do, q, k, v, o, lse, None, dq, dk, dv, *ctx.options)
        return dq, dk, dv, None, None, None, None, None


class _PackedAttention(torch.autograd.Function):
    """Eager attention of a packed qkv, RoPE optional: the backward writes d(qkv) in place of a `cat`, and rotates
    dq, dk back inside the attention kernels."""

    @staticmethod
    def forward(ctx, qkv, n_kv_head, cos, sin, causal, window, scale, tma, deterministic):
        q, k, v = _split(qkv, n_kv_head)
        if cos is not None:
            q, k = rotate(q, k, cos, sin, False)
        o, lse = _forward(q, k, v, causal, window, scale, tma)
        ctx.save_for_backward(q, k, v, o, lse, cos, sin)
        ctx.options = causal, window, scale, tma, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cos, sin = ctx.saved_tensors
        dqkv = torch.empty((*q.shape[:2], q.shape[2] + 2 * k.shape[2], q.shape[3]), dtype=q.dtype, device=q.device)
        rope = None if cos is None else (cos, sin)
        _backward(do, q, k, v, o, lse, rope, *_split(dqkv, k.shape[2]), *ctx.options)
        return dqkv, None, None, None, None, None, None, None, None


def _attention_fake(q, k, v, causal, window, scale, tma, deterministic):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)


@launcher.traceable_op("nanogpt2::flash_attention", fake=_attention_fake)
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int, scale: float, tma: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return _forward(q, k, v, causal, window, scale, tma, traced=True)


def _packed_fake(qkv, cos, sin, n_kv_head, causal, window, scale, tma, deterministic):
    q, k, _ = _split(qkv, n_kv_head)
    B, T, H, _ = q.shape
    rotated = (q.new_empty(q.shape), k.new_empty(k.shape)) if cos is not None else (q.new_empty(0), k.new_empty(0))
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32), *rotated


@launcher.traceable_op("nanogpt2::flash_attention_packed", fake=_packed_fake)
def _packed_op(
    qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, n_kv_head: int, causal: bool, window: int,
    scale: float, tma: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    # o, lse, and the rotated q, k the backward needs (empty without RoPE: it reads q, k from qkv).
    q, k, v = _split(qkv, n_kv_head)
    if cos is None:
        return *_forward(q, k, v, causal, window, scale, tma, traced=True), q.new_empty(0), k.new_empty(0)
    q, k = rotate(q, k, cos, sin, False, traced=True)
    return *_forward(q, k, v, causal, window, scale, tma, traced=True), q, k


def _backward_fake(do, q, k, v, o, lse, cos, sin, packed, causal, window, scale, tma, deterministic):
    if packed:
        return [q.new_empty((*q.shape[:2], q.shape[2] + 2 * k.shape[2], q.shape[3]))]
    return _empty_like(q, k, v)


@launcher.traceable_op("nanogpt2::flash_attention_bwd", fake=_backward_fake)
def _backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, packed: bool, causal: bool, window: int, scale: float,
    tma: bool, deterministic: bool,
) -> list[torch.Tensor]:  # fmt: skip
    # [dq, dk, dv], or [d(qkv)] when `packed`.
    rope = None if cos is None else (cos, sin)
    options = causal, window, scale, tma, deterministic
    if not packed:
        dq, dk, dv = _empty_like(q, k, v)
        _backward(do, q, k, v, o, lse, rope, dq, dk, dv, *options, traced=True)
        return [dq, dk, dv]
    dqkv = q.new_empty((*q.shape[:2], q.shape[2] + 2 * k.shape[2], q.shape[3]))
    _backward(do, q, k, v, o, lse, rope, *_split(dqkv, k.shape[2]), *options, traced=True)
    return [dqkv]


def _attention_setup(ctx, inputs, output):
    q, k, v, *ctx.options = inputs  # causal, window, scale, tma, deterministic
    ctx.save_for_backward(q, k, v, *output)
    ctx.set_materialize_grads(False)  # lse's gradient: none, rather than zeros


def _attention_op_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return *_backward_op(do, q, k, v, o, lse, None, None, False, *ctx.options), None, None, None, None, None


def _packed_setup(ctx, inputs, output):
    qkv, cos, sin, ctx.n_kv_head, *ctx.options = inputs
    ctx.save_for_backward(qkv, cos, sin, *output)
    ctx.set_materialize_grads(False)


def _packed_op_backward(ctx, do, *_unused):
    qkv, cos, sin, o, lse, q_rot, k_rot = ctx.saved_tensors
    q, k, v = _split(qkv, ctx.n_kv_head)
    if cos is not None:
        q, k = q_rot, k_rot
    (dqkv,) = _backward_op(do, q, k, v, o, lse, cos, sin, True, *ctx.options)
    return dqkv, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_attention_op_backward, setup_context=_attention_setup)
_packed_op.register_autograd(_packed_op_backward, setup_context=_packed_setup)


def _check_options(causal: bool, window: int | None, scale: float | None) -> None:
    if window is not None and not causal:
        raise ValueError(f"a sliding window needs causal=True, got causal={causal} with window={window}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")


def _check_heads(H: int, Hkv: int, D: int) -> None:
    if Hkv <= 0 or H <= 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads ({H}) must be a positive multiple of the KV heads ({Hkv})")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS}, got {D}")


def _resolve_options(T: int, window: int | None, scale: float | None, D: int, deterministic, tma) -> tuple:
    """(window in 1..T, scale, tma, deterministic) as the kernels take them: a window of T or more keys is plain
    causal attention; None picks the defaults (tuning's, or torch.use_deterministic_algorithms)."""
    window = T if window is None else min(window, T)
    if deterministic is None:
        deterministic = tuning.DETERMINISTIC or torch.are_deterministic_algorithms_enabled()
    return (
        max(window, 1),
        D**-0.5 if scale is None else float(scale),
        tuning.USE_TMA if tma is None else tma,
        deterministic,
    )


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
    5 matmuls instead of 7); None takes tuning.DETERMINISTIC, or True under torch.use_deterministic_algorithms.
    `tma`: load tiles through TMA descriptors where the strides allow (None: tuning.USE_TMA).
    A model whose q, k, v come from one projection saves a backward pass with `flash_attention_packed`.
    """
    _check_options(causal, window, scale)
    _utils.check_inputs(q=q, k=k, v=v)
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k and v must both be (B={B}, T={T}, Hkv, D={D}), got {tuple(k.shape)}, {tuple(v.shape)}")
    _check_heads(H, k.shape[2], D)
    _utils.check_device(q, k, v)
    rows = max(1, _utils.MAX_GRID_Y // H)  # sequences whose (batch, head) programs fit one launch's grid
    if B > rows:
        slices = [(q[i : i + rows], k[i : i + rows], v[i : i + rows]) for i in range(0, B, rows)]
        options = dict(causal=causal, window=window, scale=scale, deterministic=deterministic, tma=tma)
        return torch.cat([flash_attention(*qkv, **options) for qkv in slices])
    options = _resolve_options(T, window, scale, D, deterministic, tma)
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, causal, *options)[0]
    return _Attention.apply(q, k, v, causal, *options)


def flash_attention_packed(
    qkv: torch.Tensor,
    n_kv_head: int,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    *,
    deterministic: bool | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """`flash_attention` of the q, k, v packed in one tensor, as a fused projection makes them, with RoPE optional.

    qkv: (B, T, H + 2 * n_kv_head, D): query heads first, then the KV heads of k, then those of v (a view of a
    (B, T, (H + 2 Hkv) * D) projection). `rope` = (cos, sin), each (T, D/2) float32: q and k are rotated first, as
    `apply_rope` does. Returns o (B, T, H, D). The backward writes the gradient of qkv as one tensor (no `cat`) and
    applies RoPE's inverse inside the attention kernels (no second RoPE launch). Other arguments: `flash_attention`.
    """
    _check_options(causal, window, scale)
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be (B, T, H + 2 * n_kv_head, D), got {tuple(qkv.shape)}")
    q, k, v = _split(qkv, n_kv_head)
    B, T, H, D = q.shape
    _check_heads(H, n_kv_head, D)
    _utils.check_inputs(q=q, k=k, v=v)
    if rope is not None:
        check_rope_inputs(q, k, *rope)
    _utils.check_device(qkv, *(rope or ()))
    rows = max(1, _utils.MAX_GRID_Y // H)
    if B > rows:
        options = dict(rope=rope, causal=causal, window=window, scale=scale, deterministic=deterministic, tma=tma)
        return torch.cat([flash_attention_packed(qkv[i : i + rows], n_kv_head, **options) for i in range(0, B, rows)])
    options = _resolve_options(T, window, scale, D, deterministic, tma)
    cos, sin = rope if rope is not None else (None, None)
    if torch.compiler.is_compiling():
        return _packed_op(qkv, cos, sin, n_kv_head, causal, *options)[0]
    return _PackedAttention.apply(qkv, n_kv_head, cos, sin, causal, *options)
