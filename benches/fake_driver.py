"""A fake sm_90 Triton driver: the real Python path of a Triton-kernel library runs on a CPU and every compiled
kernel is a no-op launch, so host time (the Python between a call and the GPU) can be measured without a GPU.

Import this module before anything defines a @triton.jit function (it clears TRITON_INTERPRET): CPU tensors then
stand in for CUDA ones. Triton's front end still runs (JITFunction binding, specialization, caches); compilation is
skipped: a "compiled" kernel launches like triton's CompiledKernel (stream query, launch metadata, the launcher
reading every tensor argument's data_ptr) and records its name in LAUNCHES. The real C launcher's own cost
(argument parsing, cuLaunchKernelEx, ~5 us) is not counted. Timing configs "takes" 1 ms each.
"""

import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver, jit  # noqa: E402

LAUNCHES: list[str] = []  # the kernel name of every launch, in order


class FakeDriver:
    """The parts of triton's CUDA driver that the launch path asks for, answering for one sm_90 device."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return lambda fn, *args, **kwargs: 1.0


class FakeCompiledKernel:
    """Stands in for triton.compiler.CompiledKernel: launches through `run`, which touches each tensor's address."""

    function = None
    packed_metadata = None

    def __init__(self, name: str):
        self.name = name
        self.n_regs, self.n_spills, self.n_max_threads = 128, 0, 1024

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, metadata, launch_metadata, enter, exit_, *args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                arg.data_ptr()
        LAUNCHES.append(self.name)

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            if stream is None:
                stream = driver.active.get_current_stream(driver.active.get_current_device())
            metadata = self.launch_metadata(grid, stream, *args)
            self.run(
                grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, metadata, None, None, *args
            )

        return runner


def _compile(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = FakeCompiledKernel(self.fn.__name__)
    self.device_caches[device][0][key] = kernel
    return kernel


driver.set_active(FakeDriver())
jit.JITFunction._do_compile = _compile
triton.testing.do_bench = lambda fn, *args, **kwargs: 1.0


def accept_cpu_tensors() -> None:
    """Let nanogpt2's kernels take CPU tensors as if they were on the fake GPU: the device check does the same work
    (one device for all inputs) without requiring CUDA."""
    from nanogpt2.kernels import _utils

    def check_device(*tensors: torch.Tensor) -> None:
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")

    _utils.check_device = check_device
