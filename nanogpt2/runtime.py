"""What a process runs on and how long it lives: the device and compute dtype, its peak FLOP/s, the CPU allocator,
waiting for the device, and dying with torchrun's launcher. Parallelism itself is parallel.py's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import sys

import torch

PR_SET_PDEATHSIG = 1  # prctl(2)
# mallopt(3) parameters, and what keep_freed_memory sets them to (C ints): the heap trimmed only past 2 GiB free at
# its top, no mmap'd blocks, and each growth of the heap by 256 MB more than asked for.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
MALLOC_SETTINGS = {M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 2**28, M_MMAP_MAX: 0}
# Dense (no sparsity) bf16 tensor-core peaks, for MFU, matched against torch.cuda.get_device_name in this order (the
# first match wins, so variants come before their family). Sources: NVIDIA's datasheets, whose bf16 figures are quoted
# "with sparsity": halved here.
PEAK_BF16_FLOPS = (
    (r"H100.*PCIe", 756e12),  # H100 PCIe datasheet: 1,513 TFLOPS with sparsity
    (r"H[12]00 NVL", 835e12),  # H100 NVL / H200 NVL datasheets: 1,671 TFLOPS with sparsity
    (r"H100|H200", 989e12),  # H100 SXM and H200 SXM datasheets (GH200 included): 1,979 TFLOPS with sparsity
    (r"A100", 312e12),  # A100 datasheet (SXM and PCIe): 624 TFLOPS with sparsity
    (r"L40S", 362e12),  # L40S datasheet: 733 TFLOPS with sparsity
    (r"\bA10\b", 125e12),  # A10 datasheet: 250 TFLOPS with sparsity (the A10G has no published figure)
    (r"\bL4\b", 121e12),  # L4 datasheet: 242 TFLOPS with sparsity
)


def parse_device(name: str) -> torch.device:
    """The device called `name` ("auto": CUDA when present, else CPU); ValueError for one this machine cannot use."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device")
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of --dtype `name`; auto: bfloat16 on CUDA (float16 where bf16 is unsupported), fp32 on CPU."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, for MFU; None on CPU and for a card not in PEAK_BF16_FLOPS (no MFU shown
    rather than a wrong one)."""
    if device.type != "cuda":
        return None
    return card_peak_flops(torch.cuda.get_device_name(device))


def card_peak_flops(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the card torch.cuda.get_device_name calls `name`, or None when unknown."""
    return next((flops for pattern, flops in PEAK_BF16_FLOPS if re.search(pattern, name)), None)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU has nothing queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def die_with_parent() -> int:
    """Have the kernel kill this process when its parent (torchrun's launcher) dies, so no rank outlives it; returns
    the parent's pid, for `launcher_gone`, the check where PR_SET_PDEATHSIG is not available (it is Linux's)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return parent


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory in the heap for the next allocation instead of returning it to the
    kernel; returns whether it could (Linux with glibc only).

    A CPU training step allocates and frees tensors of tens to hundreds of MB (the loss's (chunk, vocab) buffers,
    vocab-sized gradients). glibc serves blocks that large with mmap and unmaps them on free, so each step the kernel
    maps and zero-fills them afresh, page by page (BENCHMARKS.md measures the cost). From the heap they stay mapped;
    the process keeps its peak memory, which it needed anyway.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())


def launcher_gone(launcher: int | None) -> bool:
    """Whether the launcher whose pid `die_with_parent` returned has died since (this process was re-parented)."""
    return launcher is not None and os.getppid() != launcher
