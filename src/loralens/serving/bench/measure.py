"""Memory of a served model: bytes of its tensors, and the process's memory over a span.

CPU: resident set size from /proc (peak: ``VmHWM``, reset at the start of the span);
GPU: the CUDA allocator's statistics. The serving benchmark reads both per model.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass

import torch
from torch import nn


def _proc_status(key: str) -> int | None:
    """A memory field of /proc/self/status in bytes (None where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS deltas of a model loaded
    after others were freed are not hidden by the allocator's reuse of their pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def frozen_heap(fn):
    """``fn`` run with the objects alive at its start moved out of the collector's view
    (``gc.freeze``; unfrozen after): the probes' ``gc.collect`` then scans what ``fn``
    allocates, not the whole heap of torch and transformers (~0.4 s per collection, most of
    a tiny model's benchmark). Nothing alive at the start is garbage the probes miss."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        gc.collect()
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()
    return wrapper


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


@dataclass
class MemoryProbe:
    """Memory over a span: CPU RSS from /proc (peak: VmHWM, reset at the start), or the
    CUDA allocator's statistics. ``peak_increase``: peak minus the memory before the
    span; ``resident_increase``: memory at the end minus before."""

    device: torch.device
    before: int = 0
    after: int | None = None
    peak: int | None = None
    peak_reset: bool = True

    def __enter__(self) -> "MemoryProbe":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self.peak_reset = _reset_peak_rss()
            self.before = _proc_status("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.after = torch.cuda.memory_allocated(self.device)
        else:
            self.peak = _proc_status("VmHWM")
            self.after = _proc_status("VmRSS")

    def to_dict(self) -> dict:
        mb = 1 / 2**20
        if self.peak is None or self.after is None:
            return {"peak_increase_mb": None, "resident_increase_mb": None, "peak_mb": None}
        return {"peak_increase_mb": (self.peak - self.before) * mb,
                "resident_increase_mb": (self.after - self.before) * mb,
                "peak_mb": self.peak * mb,
                "measure": ("cuda max_memory_allocated" if self.device.type == "cuda"
                            else "RSS (VmHWM)" + ("" if self.peak_reset else ", not reset"))}
