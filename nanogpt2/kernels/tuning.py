"""How the attention kernels are tuned: the GPU tile configs per kernel, which of them a launch may choose, the
default code paths, and configs forced from outside (the benches' correctness and timing runs).

The kernels (attention.py) know nothing of this: each launch gets its BLOCK sizes, warps and stages from here,
chosen once per problem (launcher.py keeps the choice).
"""

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

from nanogpt2.kernels import _utils

ALL_PATHS = ("tma", "tma+atomic", "ptr", "ptr+atomic")  # loads through TMA or pointers; dQ by atomics or not
TMA_PATHS = ("tma", "tma+atomic")
PTR_PATHS = ("ptr", "ptr+atomic")
# Windows up to this many keys take tiles of at most 64 x 64 where a path has one (see `candidate_tiles`).
SMALL_WINDOW = 256


class Tile(NamedTuple):
    """One GPU config: tile sizes, warps, pipeline stages, and the code paths on which it compiles for sm_90 without
    spilling registers or serializing wgmma (`python -m benches.sass` checks them all)."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    paths: tuple[str, ...] = ALL_PATHS

    def meta(self) -> dict:
        """The launch keywords of this config: constexpr block sizes, warps, stages."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.warps, "num_stages": self.stages}


# GPU configs for fp16/bf16 per kernel and (head-dim class: 64 for D <= 64, else 128; G > 1), best guess first
# (NANOGPT2_AUTOTUNE=0 keeps the first). Each lists the paths on which it compiles for sm_90 with no spill and no
# serialized wgmma (ptxas C7515) under triton 3.6 and 3.9, RoPE's fused epilogue on and off (`python -m benches.sass`,
# BENCHMARKS.md). Pointer loads need 2 pipeline stages: with 3 or more, ptxas serializes the forward's and dQ's wgmma.
# The dK/dV kernel never specializes G, so MHA and GQA compile the same and share a list; its pointer paths fit only
# at D=64, and at D=128 only its deterministic TMA path fits (the other paths fall back to it, see `resolve_path`).
_FWD = {
    64: [
        Tile(128, 64, 4, 3, TMA_PATHS), Tile(128, 128, 8, 3, TMA_PATHS), Tile(128, 64, 8, 3, TMA_PATHS),
        Tile(64, 64, 4, 3, TMA_PATHS), Tile(128, 128, 8, 2), Tile(128, 64, 8, 2, PTR_PATHS),
        Tile(64, 64, 4, 2, PTR_PATHS),
    ],
    128: [
        Tile(128, 64, 8, 3, TMA_PATHS), Tile(128, 128, 8, 3, TMA_PATHS), Tile(64, 64, 4, 3, TMA_PATHS),
        Tile(128, 128, 8, 2, TMA_PATHS), Tile(128, 64, 8, 2, PTR_PATHS), Tile(64, 64, 4, 2, PTR_PATHS),
    ],
}  # fmt: skip
_DQ = {
    64: [
        Tile(128, 64, 8, 3, TMA_PATHS), Tile(128, 32, 4, 3, TMA_PATHS), Tile(64, 64, 4, 3, TMA_PATHS),
        Tile(64, 64, 4, 5, TMA_PATHS), Tile(128, 64, 8, 2, PTR_PATHS), Tile(64, 64, 4, 2, PTR_PATHS),
    ],
    128: [
        Tile(128, 64, 8, 3, TMA_PATHS), Tile(64, 64, 4, 3, TMA_PATHS), Tile(64, 64, 4, 5, TMA_PATHS),
        Tile(128, 64, 8, 2, PTR_PATHS),
    ],
}  # fmt: skip
_DKDV = {
    64: [
        Tile(64, 128, 8, 3, TMA_PATHS), Tile(32, 128, 8, 3), Tile(64, 64, 4, 3, ("tma",)), Tile(32, 64, 4, 4, ("tma",)),
        Tile(64, 128, 8, 5, ("tma",)), Tile(32, 64, 8, 3, ("tma", "tma+atomic", "ptr")), Tile(16, 64, 4, 3),
    ],
    128: [Tile(32, 64, 8, 3, ("tma",))],
}  # fmt: skip
TILES = {
    kernel: {(d, gqa): tiles for d, tiles in lists.items() for gqa in (False, True)}
    for kernel, lists in (("fwd", _FWD), ("dkdv", _DKDV), ("dq", _DQ))
}
# fp32 (IEEE dots on FMA units: a correctness path, not a fast one; large tiles overflow shared memory) and the
# interpreter: one small config; BLOCK_M != BLOCK_N, so the tile bounds are also tested off the diagonal.
SMALL_TILES = {"fwd": Tile(64, 32, 4, 2), "dkdv": Tile(32, 64, 4, 2), "dq": Tile(64, 32, 4, 2)}
# Kernel name -> Tile for every launch (benches and gpu_check correctness runs); see `forced_configs`.
FORCED: dict[str, Tile] = {}

# Defaults of the code-path switches, picked from measurements in benches/gpu_check.sh (BENCHMARKS.md): pointer
# loads over TMA descriptors and atomic dQ over its own kernel. NANOGPT2_ATTN_TMA=1 / NANOGPT2_ATTN_DETERMINISTIC=1
# override them for a whole run.
USE_TMA = os.environ.get("NANOGPT2_ATTN_TMA", "0") == "1"
DETERMINISTIC = os.environ.get("NANOGPT2_ATTN_DETERMINISTIC", "0") == "1"


def path_name(tma: bool, atomic: bool) -> str:
    return ("tma" if tma else "ptr") + ("+atomic" if atomic else "")


def allowed_tiles(kernel: str, head_dim: int, group: int, tma: bool, atomic: bool) -> list[Tile]:
    """The GPU configs of `kernel` ("fwd", "dkdv", "dq") for fp16/bf16 at this head dim, group and path."""
    tiles = TILES[kernel][(64 if head_dim <= 64 else 128, group > 1)]
    return [t for t in tiles if path_name(tma, atomic and kernel == "dkdv") in t.paths]


def candidate_tiles(
    kernel: str, head_dim: int, group: int, dtype: torch.dtype, tma: bool, atomic: bool, window: int | None = None
) -> list[Tile]:
    """The configs a launch may choose among: the forced one if any; the small config for fp32 and in the
    interpreter; else `allowed_tiles`, only its tiles of at most 64 x 64 under a window of at most SMALL_WINDOW keys
    (where the path has one: 128-wide tiles would visit 1.5x the band's area there, 64-wide ones 1.25x, so the cost
    follows the window), and only the first with NANOGPT2_AUTOTUNE=0."""
    if kernel in FORCED:
        return [FORCED[kernel]]
    if dtype == torch.float32 or _utils.INTERPRET:
        return [SMALL_TILES[kernel]]
    tiles = allowed_tiles(kernel, head_dim, group, tma, atomic)
    if window is not None and window <= SMALL_WINDOW:
        tiles = [t for t in tiles if max(t.block_m, t.block_n) <= 64] or tiles
    return tiles[:1] if os.environ.get("NANOGPT2_AUTOTUNE", "1") == "0" else tiles


@functools.cache
def resolve_path(head_dim: int, group: int, tma: bool, atomic: bool) -> tuple[bool, bool]:
    """The backward's (tma, atomic) path: the one asked for if its dK/dV kernel has a GPU config here, else the same
    dQ path on TMA, else the deterministic TMA path (which always has one)."""
    for t, a in ((tma, atomic), (True, atomic), (True, False)):
        if allowed_tiles("dkdv", head_dim, group, t, a):
            return t, a
    raise AssertionError(f"no dK/dV config for head dim {head_dim}, group {group}")


@contextmanager
def forced_configs(**tiles: Tile) -> Iterator[None]:
    """Run every launch of the named kernels (fwd=, dkdv=, dq=) with the given Tile instead of tuning: for checking
    each config's correctness on a GPU and timing candidates."""
    FORCED.update(tiles)
    try:
        yield
    finally:
        for name in tiles:
            FORCED.pop(name, None)
