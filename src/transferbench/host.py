"""The machine a run runs on: which device, the host allocator, peak memory, library versions."""
from __future__ import annotations

import ctypes
import platform
import resource
from pathlib import Path

import timm
import torch
import torchvision

from . import distributed
from .errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def tune_host_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel.

    Activations of a CPU training step are tens to hundreds of MB each; by default glibc mmaps every such
    block and unmaps it on free, so each step page-faults (and zeroes) its whole working set again. With
    EfficientNet-Lite0, batch 256 at 160 px, that was half the step's time spent in the kernel; this halves
    the step time at the cost of a higher resident peak (bench/allocator.py measures both). Process-wide, so
    the CLI calls it, not the library. No-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))  # -1: never trim


def reset_peak_memory(device: torch.device) -> None:
    """So that each run of a study reports its own peak, not the process's largest so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set size
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # never reset; KiB on Linux


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
