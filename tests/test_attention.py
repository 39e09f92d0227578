"""Triton flash attention against the float64 reference: outputs, gradients, GQA, windows, strides, torch.compile."""

import contextlib
import functools

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE, assert_matches_ref

import nanogpt2.kernels._utils
from nanogpt2.kernels import apply_rope, flash_attention, flash_attention_packed, tuning
from nanogpt2.kernels import attention as attention_kernels
from nanogpt2.kernels.reference import apply_rope_ref, flash_attention_ref

pytestmark = pytest.mark.usefixtures("nan_outputs")


def make_qkv(B, T, H, Hkv, D, dtype, layout, seed=0):
    """Random q (B, T, H, D), k, v (B, T, Hkv, D) as leaves with gradients, in one of three memory layouts.

    "qkv": split views of one fused (B, T, (H + 2 Hkv) * D) projection; "bhtd": transposes of (B, heads, T, D)
    tensors; "offset": qkv-like views that start one element into their storage (not 16-byte aligned: no TMA);
    "contiguous": three separate tensors.
    """
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shapes = [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D)]
    if layout == "qkv":
        fused = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g, device=DEVICE, dtype=dtype)
        parts = fused.split([H * D, Hkv * D, Hkv * D], dim=-1)
        tensors = [p.view(s) for p, s in zip(parts, shapes, strict=True)]
    elif layout == "offset":
        fused = torch.randn(B * T * (H + 2 * Hkv) * D + 1, generator=g, device=DEVICE, dtype=dtype)[1:]
        parts = fused.view(B, T, -1).split([H * D, Hkv * D, Hkv * D], dim=-1)
        tensors = [p.view(s) for p, s in zip(parts, shapes, strict=True)]
    elif layout == "bhtd":
        tensors = [
            torch.randn(b, h, t, d, generator=g, device=DEVICE, dtype=dtype).transpose(1, 2) for b, t, h, d in shapes
        ]
    else:
        tensors = [torch.randn(s, generator=g, device=DEVICE, dtype=dtype) for s in shapes]
    return [t.detach().requires_grad_() for t in tensors]


def attention_and_grads(fn, q, k, v, dout, causal, window):
    out = fn(q, k, v, causal=causal, window=window)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


CASES = [
    # (B, T, H, Hkv, D, causal, window, dtype, layout): every T/group/window/head-dim/dtype/layout case appears at
    # least once; T mostly not a multiple of the block. "qkv" and "bhtd" views allow the TMA path (16-byte strides),
    # "offset" views (storage offset of one element) only the pointer path.
    (2, 1, 4, 4, 64, True, None, torch.float32, "contiguous"),
    (2, 17, 4, 2, 32, True, None, torch.bfloat16, "qkv"),
    (1, 113, 6, 2, 64, True, None, torch.float16, "offset"),
    (1, 113, 6, 1, 64, True, 7, torch.float32, "qkv"),
    (1, 255, 4, 4, 16, True, 64, torch.bfloat16, "bhtd"),
    (1, 130, 2, 2, 128, True, 1, torch.bfloat16, "offset"),
    (2, 100, 3, 1, 32, True, 100, torch.float32, "qkv"),
    (1, 77, 4, 2, 64, True, 500, torch.float16, "contiguous"),
    (1, 300, 3, 3, 64, True, 150, torch.bfloat16, "qkv"),
    (1, 256, 4, 1, 64, True, None, torch.bfloat16, "offset"),
    (1, 200, 4, 2, 64, False, None, torch.bfloat16, "qkv"),
    (2, 65, 2, 1, 128, False, None, torch.float32, "bhtd"),
    (1, 97, 6, 3, 16, False, None, torch.float16, "offset"),
    (1, 1000, 2, 1, 64, True, 256, torch.bfloat16, "qkv"),
    (1, 4097, 1, 1, 32, True, 130, torch.float32, "contiguous"),
    (3, 1, 4, 1, 128, True, 7, torch.bfloat16, "bhtd"),
]
# Each case also runs one backward path (atomic or deterministic dQ, alternating) and one load path: TMA for two of
# every three cases whose strides allow it (fp16, non-causal and D=128 among them), pointers for the others and for
# the "offset" views (where TMA would fall back to pointers anyway).
PATHS = [dict(deterministic=i % 2 == 0, tma=case[8] != "offset" and i % 3 != 0) for i, case in enumerate(CASES)]


@pytest.mark.parametrize(
    "B, T, H, Hkv, D, causal, window, dtype, layout, path",
    [(*case, path) for case, path in zip(CASES, PATHS, strict=True)],
    ids=[
        f"{i}-{'tma' if p['tma'] else 'ptr'}+{'det' if p['deterministic'] else 'atomic'}" for i, p in enumerate(PATHS)
    ],
)
def test_matches_reference(B, T, H, Hkv, D, causal, window, dtype, layout, path):
    q, k, v = make_qkv(B, T, H, Hkv, D, dtype, layout)
    dout = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype)
    attention = functools.partial(flash_attention, **path)
    got = attention_and_grads(attention, q, k, v, dout, causal, window)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_and_grads(flash_attention_ref, q64, k64, v64, dout.double(), causal, window)
    ref_lowp = attention_and_grads(flash_attention_ref, q, k, v, dout, causal, window)
    for name, g, r, r_lowp in zip(("out", "dq", "dk", "dv"), got, ref, ref_lowp, strict=True):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert_matches_ref(g, r, r_lowp, factor=3.0 if name == "dq" else 2.0, fp32_atol=2e-5, fp32_rtol=1e-5)


def test_custom_scale():
    q, k, v = make_qkv(2, 50, 4, 2, 32, torch.float32, "qkv")
    out = flash_attention(q, k, v, scale=0.3)
    ref = flash_attention_ref(q.double(), k.double(), v.double(), scale=0.3)
    assert_matches_ref(out, ref, ref, fp32_atol=2e-5, fp32_rtol=1e-5)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms(enabled) inside the block, the previous setting restored after it."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.mark.skipif(
    DEVICE != "cuda",
    reason="the interpreter runs a launch's programs one after another, so atomic adds land in one order and both dQ "
    "paths are bitwise repeatable: only a GPU can tell them apart",
)
@pytest.mark.parametrize(
    "switch", ["deterministic=True", "NANOGPT2_ATTN_DETERMINISTIC=1", "torch.use_deterministic_algorithms"]
)
def test_gqa_backward_is_deterministic(switch, monkeypatch):
    """The deterministic dQ path, however it is chosen, is bitwise repeatable; on the same inputs the atomic path
    (fp32 adds from every key tile's program, in whatever order they land) gives another dQ within a few runs, so
    repeatability here is the path's doing, not the problem's. Non-causal: every dK/dV program walks the query tiles
    in the same order at the same time, so the adds into each dQ row race."""
    q, k, v = make_qkv(4, 1024, 6, 2, 64, torch.float32, "qkv")
    dout = torch.randn(q.shape, device=DEVICE)

    def run(**path):  # out, dq, dk, dv
        attention = functools.partial(flash_attention, tma=False, **path)
        return attention_and_grads(attention, q, k, v, dout, False, None)

    # The variable is read once, at import: the module's flag is what NANOGPT2_ATTN_DETERMINISTIC=1 sets.
    monkeypatch.setattr(tuning, "DETERMINISTIC", False)
    first, runs = run(deterministic=False), 1
    while runs < 21:
        out, dq, dk, dv = run(deterministic=False)
        runs += 1
        assert torch.equal(out, first[0]) and torch.equal(dk, first[2]) and torch.equal(dv, first[3])  # no atomics
        if not torch.equal(dq, first[1]):
            break
    else:
        pytest.fail(f"the atomic dQ path gave one dQ bitwise in {runs} runs: repeatability would prove nothing here")

    monkeypatch.setattr(tuning, "DETERMINISTIC", switch == "NANOGPT2_ATTN_DETERMINISTIC=1")
    with deterministic_algorithms(switch == "torch.use_deterministic_algorithms"):
        path = dict(deterministic=True) if switch == "deterministic=True" else {}  # else None: the switch decides
        results = [run(**path) for _ in range(max(runs, 5))]  # at least as many runs as the atomic path needed
    for again in results[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), results[0], again, strict=True):
            assert torch.equal(a, b), f"{name} differs between runs of the deterministic path ({switch})"


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the rows before the checked ones do read the NaN keys
def test_window_never_reads_keys_outside_the_band():
    """Keys before the window of the last rows' tiles are NaN: those rows (and their dq) must still come out right.

    fp32 runs the (BLOCK_M, BLOCK_N) = (64, 32) config of the forward and dq kernels everywhere, so the programs of
    rows 512.. need keys from 449 on, all in the key tiles from 448 on. Every key before 448 is NaN: a program that
    read one tile more than its band would turn out NaN (0 * NaN in p @ v).
    """
    T, W, first_row = 600, 64, 512
    q, k, v = make_qkv(1, T, 2, 1, 32, torch.float32, "contiguous")
    dout = torch.zeros(1, T, 2, 32, device=DEVICE)
    dout[:, first_row:] = torch.randn(1, T - first_row, 2, 32, device=DEVICE)
    ref = attention_and_grads(flash_attention_ref, q, k, v, dout, True, W)
    far = 448
    with torch.no_grad():
        k[:, :far] = float("nan")
        v[:, :far] = float("nan")
    out = flash_attention(q, k, v, causal=True, window=W)
    (dq,) = torch.autograd.grad(out, (q,), dout)
    torch.testing.assert_close(out[:, first_row:], ref[0][:, first_row:], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dq[:, first_row:], ref[1][:, first_row:], atol=2e-5, rtol=1e-5)


def test_compiled_matches_eager():
    B, T, H, Hkv, D = 2, 70, 4, 2, 32
    q, k, v = make_qkv(B, T, H, Hkv, D, torch.float32, "qkv")
    pos = torch.arange(T, device=DEVICE, dtype=torch.float32)[:, None]
    angles = pos / 10000 ** (torch.arange(D // 2, device=DEVICE) / (D // 2))  # (T, D/2)
    cos, sin = angles.cos(), angles.sin()
    dout = torch.randn(B, T, H, D, device=DEVICE)

    def block(q, k, v, rope, attention):
        q, k = rope(q, k, cos, sin)
        return attention(q, k, v, causal=True, window=33) * 2.0

    def run(fn, *ops):
        out = fn(q, k, v, *ops)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    compiled = torch.compile(block, fullgraph=True)
    got = run(compiled, apply_rope, flash_attention)
    eager = run(block, apply_rope, flash_attention)
    ref = run(block, apply_rope_ref, flash_attention_ref)
    for g, e, r in zip(got, eager, ref, strict=True):
        torch.testing.assert_close(g, e)
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-5)


def test_batch_beyond_one_grid_runs_in_slices(monkeypatch):
    """More (batch, head) pairs than a CUDA grid axis holds: the batch runs in slices, with the same results."""
    q, k, v = make_qkv(3, 40, 2, 1, 32, torch.float32, "qkv")
    dout = torch.randn(q.shape, device=DEVICE)
    attention = functools.partial(flash_attention, deterministic=True)  # bitwise comparable: no atomic dQ
    whole = attention_and_grads(attention, q, k, v, dout, True, 7)
    monkeypatch.setattr(nanogpt2.kernels._utils, "MAX_GRID_Y", 5)  # 2 sequences of 2 heads a launch: slices of 2 and 1
    sliced = attention_and_grads(attention, q, k, v, dout, True, 7)
    for a, b in zip(whole, sliced, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, message",  # the arguments that differ from a valid call, from its (q, k, v); what the message names
    [
        pytest.param(lambda q, k, v: dict(causal=False, window=4), "causal=False", id="window without causal"),
        pytest.param(lambda q, k, v: dict(window=0), "got 0", id="window < 1"),
        pytest.param(lambda q, k, v: dict(window=2.5), "got 2.5", id="float window"),
        pytest.param(lambda q, k, v: dict(q=q[:, :, :3]), r"heads \(3\).*KV heads \(2\)", id="H not a multiple of Hkv"),
        pytest.param(lambda q, k, v: dict(k=k[:, :, :0], v=v[:, :, :0]), r"KV heads \(0\)", id="no KV heads"),
        pytest.param(lambda q, k, v: dict(q=q[..., :24], k=k[..., :24], v=v[..., :24]), "got 24", id="head dim 24"),
        pytest.param(lambda q, k, v: dict(v=v[:, :7]), r"\(1, 7, 2, 32\)", id="k/v shape mismatch"),
        pytest.param(lambda q, k, v: dict(q=q[0]), r"\(8, 4, 32\)", id="3-D q"),
        pytest.param(lambda q, k, v: dict(k=k.half()), "torch.float16", id="dtype mismatch"),
        pytest.param(lambda q, k, v: dict(q=q.double(), k=k.double(), v=v.double()), "torch.float64", id="float64"),
        pytest.param(
            lambda q, k, v: dict(q=torch.randn(1, 8, 4, 64, device=DEVICE)[..., ::2]),
            r"strides \(2048, 256, 64, 2\)",
            id="last stride 2",
        ),
        pytest.param(lambda q, k, v: dict(v=v.to("meta")), "meta", id="device mismatch"),
        pytest.param(
            lambda q, k, v: dict(
                k=torch.empty(1, 2, 4, 32, device="meta").as_strided((1, 8, 2, 32), (0, 2**24, 32, 1))
            ),
            "row",
            id="row stride 2^24",
        ),
        pytest.param(lambda q, k, v: dict(scale=0.0), "got 0.0", id="scale 0"),
    ],
)
def test_rejects_bad_inputs(change, message):
    q, k, v = (t.detach() for t in make_qkv(1, 8, 4, 2, 32, torch.float32, "contiguous"))
    with pytest.raises(ValueError, match=message):
        flash_attention(**dict(q=q, k=k, v=v, causal=True, window=None) | change(q, k, v))


def test_rejects_cpu_tensors_without_the_interpreter(monkeypatch):
    q, k, v = (t.detach().cpu() for t in make_qkv(1, 8, 4, 2, 32, torch.float32, "contiguous"))
    monkeypatch.setattr(nanogpt2.kernels._utils, "INTERPRET", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        flash_attention(q, k, v)


@pytest.mark.skipif(DEVICE != "cuda", reason="the autotuner times configs only on a GPU (the interpreter has one)")
def test_autotuned_atomic_dq_matches_reference(monkeypatch):
    """While the autotuner times every config it runs the dK/dV kernel many times: the atomic dQ accumulator must still
    start the real run at zero. T = 333 is used by no other test, so this call is the one that tunes."""
    monkeypatch.setenv("NANOGPT2_AUTOTUNE", "1")
    q, k, v = make_qkv(2, 333, 4, 2, 64, torch.bfloat16, "qkv")
    dout = torch.randn(q.shape, device=DEVICE, dtype=q.dtype)
    got = attention_and_grads(functools.partial(flash_attention, deterministic=False), q, k, v, dout, True, None)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_and_grads(flash_attention_ref, q64, k64, v64, dout.double(), True, None)
    ref_lowp = attention_and_grads(flash_attention_ref, q, k, v, dout, True, None)
    for g, r, r_lowp in zip(got, ref, ref_lowp, strict=True):
        assert_matches_ref(g, r, r_lowp, factor=3.0)


@pytest.mark.parametrize("deterministic", [True, False])
def test_forced_gpu_configs_match_reference(deterministic):
    """`forced_configs` (how benches.configs checks every config on a GPU) runs the first GPU tiles of each kernel:
    128-row tiles, on ragged T with GQA and a window."""
    B, T, H, Hkv, D, W = 1, 150, 4, 2, 64, 70
    q, k, v = make_qkv(B, T, H, Hkv, D, torch.float32, "qkv")
    dout = torch.randn(B, T, H, D, device=DEVICE)
    configs = {kernel: tiles[(64, True)][0] for kernel, tiles in tuning.TILES.items()}
    with tuning.forced_configs(**configs):
        got = attention_and_grads(
            functools.partial(flash_attention, deterministic=deterministic), q, k, v, dout, True, W
        )  # fmt: skip
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_and_grads(flash_attention_ref, q64, k64, v64, dout.double(), True, W)
    for g, r in zip(got, ref, strict=True):
        assert_matches_ref(g, r, r, fp32_atol=2e-5, fp32_rtol=1e-5)


PACKED_CASES = [
    # (B, T, H, Hkv, D, window, rope, dtype, deterministic): RoPE or not, MHA and GQA, window or not, both dQ paths
    (2, 70, 4, 2, 32, 33, True, torch.float32, False),
    (1, 130, 4, 4, 64, None, True, torch.bfloat16, True),
    (1, 100, 6, 2, 16, None, False, torch.float16, False),
    (2, 65, 2, 1, 32, 7, False, torch.float32, True),
    (1, 90, 3, 1, 64, 20, True, torch.bfloat16, False),
]


@pytest.mark.parametrize("B, T, H, Hkv, D, window, rope, dtype, deterministic", PACKED_CASES)
def test_packed_matches_reference(B, T, H, Hkv, D, window, rope, dtype, deterministic):
    """flash_attention_packed: RoPE forward, attention, and one backward that writes d(qkv) whole with RoPE's
    inverse applied inside the kernels, against SDPA-free float64 math (split, rotate, attend)."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g, device=DEVICE, dtype=dtype).requires_grad_()
    angles = torch.arange(T, device=DEVICE)[:, None] * 10000 ** (-torch.arange(D // 2, device=DEVICE) / (D // 2))
    cos_sin = (angles.cos().float(), angles.sin().float()) if rope else None
    dout = torch.randn(B, T, H, D, generator=g, device=DEVICE, dtype=dtype)
    out = flash_attention_packed(qkv, Hkv, cos_sin, window=window, deterministic=deterministic)
    got = (out, *torch.autograd.grad(out, qkv, dout))

    def reference(x, do):
        x = x.detach().requires_grad_()
        q, k, v = x.split([H, Hkv, Hkv], dim=2)
        if rope:
            q, k = apply_rope_ref(q, k, *cos_sin)
        o = flash_attention_ref(q, k, v, causal=True, window=window)
        return (o, *torch.autograd.grad(o, x, do))

    ref = reference(qkv.double(), dout.double())
    ref_lowp = reference(qkv, dout)
    for name, a, r, r_lowp in zip(("out", "dqkv"), got, ref, ref_lowp, strict=True):
        assert a.shape == r.shape and a.dtype == dtype, name
        assert_matches_ref(a, r, r_lowp, factor=3.0, fp32_atol=2e-5, fp32_rtol=1e-5)


@triton.jit
def _visited_tiles(OUT, T, WINDOW, KEY_LOOP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The number of tiles program i's loop visits, through the kernels' own tile bounds: key tiles of query tile i
    # (forward, dQ) or query tiles of key tile i (dK/dV).
    i = tl.program_id(0)
    if KEY_LOOP:
        lo, _, _, hi = attention_kernels._kv_tile_range(i * BLOCK_M, T, WINDOW, True, BLOCK_M, BLOCK_N)
        tl.store(OUT + i, (hi - lo) // BLOCK_N)
    else:
        lo, _, _, hi = attention_kernels._q_tile_range(i * BLOCK_N, T, WINDOW, True, BLOCK_M, BLOCK_N)
        tl.store(OUT + i, (hi - lo) // BLOCK_M)


@pytest.mark.parametrize("path", ["ptr+atomic", "ptr", "tma+atomic", "tma"])
def test_visited_area_follows_the_window(path, monkeypatch):
    """At T=8192 the score area every kernel visits (tiles x tile area, with the GPU configs a launch would choose)
    is within 20% of proportional to the window between W=256 and W=1024 (4x), for the default path and the others.
    (With 128-wide tiles at W=256 as well, the forward's ratio is 2.86: 28% short.)"""
    monkeypatch.setattr(nanogpt2.kernels._utils, "INTERPRET", False)  # the GPU's candidates, not the interpreter's
    T = 8192
    for kernel in ("fwd", "dkdv", "dq"):
        area = {}
        for window in (256, 1024):
            tma, atomic = path.startswith("tma"), path.endswith("atomic")
            tile = tuning.candidate_tiles(kernel, 64, 1, torch.bfloat16, tma, atomic, window)[0]
            programs = T // (tile.block_n if kernel == "dkdv" else tile.block_m)
            visited = torch.zeros(programs, dtype=torch.int32, device=DEVICE)
            _visited_tiles[(programs,)](
                visited, T, window, KEY_LOOP=kernel != "dkdv", BLOCK_M=tile.block_m, BLOCK_N=tile.block_n
            )
            area[window] = int(visited.sum()) * tile.block_m * tile.block_n
        assert 0.8 <= area[1024] / area[256] / 4 <= 1.2, (kernel, path, area)


@pytest.mark.parametrize(
    "n_kv_head, rope_rows, shape, message",
    [
        (2, None, (1, 8, 8, 32), None),  # valid: 4 query heads, 2 KV heads
        (3, None, (1, 8, 8, 32), r"query heads \(2\).*KV heads \(3\)"),
        (0, None, (1, 8, 8, 32), r"KV heads \(0\)"),
        (2, None, (8, 8, 32), r"\(8, 8, 32\)"),
        (2, 7, (1, 8, 8, 32), r"cos must be \(T, D/2\) = \(8, 16\), got \(7, 16\)"),
    ],
)
def test_packed_rejects_bad_inputs(n_kv_head, rope_rows, shape, message):
    qkv = torch.randn(*shape, device=DEVICE)
    rope = None
    if rope_rows is not None:
        rope = (torch.ones(rope_rows, 16, device=DEVICE), torch.zeros(rope_rows, 16, device=DEVICE))
    if message is None:
        assert flash_attention_packed(qkv, n_kv_head, rope).shape == (1, 8, 4, 32)
    else:
        with pytest.raises(ValueError, match=message):
            flash_attention_packed(qkv, n_kv_head, rope)
