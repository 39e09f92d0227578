"""Launching the kernels with a few microseconds of host time.

`JITFunction.run` binds ~45 arguments, builds a cache key and checks globals on every call (~18 us), and
`triton.autotune` adds ~20 us more. Here a kernel's config is chosen once per problem key (shapes, strides,
dtypes, alignment, code path: everything Triton specializes on), timed among the candidates on a GPU when there are
several, and the compiled kernel it returns is kept: later calls with the same key launch it directly.

Inside the ops that torch.compile sees (`traced=True`: a `torch.library.triton_op`'s body), the launch goes
through `wrap_triton(kernel)[grid](...)` instead, which puts the kernel itself in the traced graph: the compiled
graph (and a CUDA graph of it) launches it with no Python in between. In Triton's interpreter (TRITON_INTERPRET=1)
there is nothing to compile or keep: every call runs the kernel's Python.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import triton

from nanogpt2.kernels import _utils, tuning
from nanogpt2.kernels.tuning import Tile

Grid = Callable[[Tile], tuple[int, int, int]]  # a config (anything with Tile's `meta()`) -> the launch grid


class Launch(NamedTuple):
    """What a launch needs besides its tensors, all fixed by the problem key: the grid for a config, the scalar
    arguments that follow the tensors, the constexprs the config does not set, the configs to choose among."""

    grid: Grid
    scalars: tuple
    constexprs: dict
    candidates: list[Tile]


class _Plan(NamedTuple):
    """A compiled kernel bound to its grid, and the arguments after the tensors: scalars, then constexpr values."""

    runner: Callable
    static: tuple


_PLANS: dict[tuple, _Plan] = {}


def launch(
    kernel: triton.JITFunction,
    key: tuple,
    tensors: tuple,
    setup: Callable[[], Launch],
    reset: torch.Tensor | None = None,
    traced: bool = False,
) -> None:
    """Launch `kernel` on `tensors` (its leading arguments) with what `setup()` says, asked only when `key` is new:
    `key` must hold everything the rest depends on (shapes, strides, dtypes, devices, alignment, options).

    A new key chooses its config (timing the candidates on a GPU when there are several), launches, and keeps the
    compiled kernel; a known key launches it directly. `reset`: a tensor the kernel accumulates into, zeroed before
    each timed run while configs are compared and before the real one. Forced configs (tuning.forced_configs) and
    traced launches take the first candidate and keep nothing.
    """
    plan = _PLANS.get(key)
    if plan is not None and not traced and not tuning.FORCED:
        plan.runner(*tensors, *plan.static)
        return
    grid, scalars, constexprs, candidates = setup()
    args = (*tensors, *scalars)
    if traced or tuning.FORCED:
        tile = candidates[0]
        torch.library.wrap_triton(kernel)[grid(tile)](*args, **constexprs, **tile.meta())
        return
    tile = _choose(kernel, grid, args, constexprs, candidates, reset)
    if reset is not None and len(candidates) > 1:
        reset.zero_()
    compiled = kernel[grid(tile)](*args, **constexprs, **tile.meta())
    if not _utils.INTERPRET:  # the interpreter compiles nothing: every call runs the kernel's Python
        values = constexprs | tile.meta()
        tail = [values[name] for name in kernel.arg_names[len(args) :]]
        _PLANS[key] = _Plan(compiled[grid(tile)], (*scalars, *tail))


def _choose(kernel, grid: Grid, args: tuple, constexprs: dict, candidates: list[Tile], reset) -> Tile:
    """The fastest of `candidates` by `triton.testing.do_bench` on these arguments (the only one when alone)."""
    if len(candidates) == 1:
        return candidates[0]

    def run(tile: Tile) -> None:
        if reset is not None:
            reset.zero_()
        kernel[grid(tile)](*args, **constexprs, **tile.meta())

    times = [triton.testing.do_bench(lambda tile=tile: run(tile)) for tile in candidates]
    return candidates[times.index(min(times))]


def aligned(tensors: Sequence[torch.Tensor], traced: bool = False) -> tuple[bool, ...]:
    """Whether each tensor starts on a 16-byte boundary, as Triton specializes pointers (when traced, from the
    storage offset: fake tensors have no address, and torch's storages start aligned)."""
    if traced:
        return tuple(t.storage_offset() * t.element_size() % 16 == 0 for t in tensors)
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)


def clear() -> None:
    """Forget every kept kernel and config (the benches call it between forced configs)."""
    _PLANS.clear()


def traceable_op(name: str, fake: Callable):
    """Decorator: a custom op for torch.compile whose body launches kernels with `traced=True`. On a GPU it is a
    `torch.library.triton_op`, whose kernels Inductor sees and launches itself (it traces the body for shapes); in
    Triton's interpreter, whose functions cannot be traced, a plain `torch.library.custom_op` (its Python body runs
    at each call) with `fake` for shapes."""

    def define(fn):
        if not _utils.INTERPRET:
            return torch.library.triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return define


class Fixed(dict):
    """A config that is not tuned: its launch keywords (constexprs, num_warps, num_stages)."""

    def meta(self) -> dict:
        return self
