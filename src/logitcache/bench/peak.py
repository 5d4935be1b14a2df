"""Peak memory of a benchmark step loop: resident memory added on a CPU, allocator peak on CUDA.

In: nothing but the current process (``/proc/self`` on Linux). Out: ``PeakRSS``, the
resident memory added since ``start()``, and ``sync``, which waits for a device's queued work
so that a timer around a step measures the step.
"""

from __future__ import annotations

import gc
import resource
import sys

import torch

__all__ = ["PeakRSS", "VariantPeak", "status_kib", "sync"]


class PeakRSS:
    """Peak resident memory added since ``start()``, in bytes.

    Linux: the high-water mark is reset to the current RSS (``/proc/self/clear_refs``), so
    a transient peak during imports or setup is not mistaken for the variant's. Elsewhere
    ``ru_maxrss`` minus its value at ``start()``: a lower bound when setup peaked higher.
    """

    def start(self) -> None:
        self.reset = _reset_hwm()
        self.base = status_kib("VmRSS") * 1024 if self.reset else _ru_maxrss()

    def added(self) -> int:
        peak = status_kib("VmHWM") * 1024 if self.reset else _ru_maxrss()
        return max(0, peak - self.base)


class VariantPeak:
    """The memory a ``bench train`` variant adds from ``start()``, in bytes: the allocator's
    peak on CUDA, else the resident memory added (``PeakRSS``) when ``measure_rss``."""

    def __init__(self, device: torch.device, measure_rss: bool) -> None:
        self.device, self.measure_rss, self.rss = device, measure_rss, PeakRSS()

    def start(self) -> None:
        gc.collect()
        self.rss.start()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def added(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self.rss.added() if self.measure_rss else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _ru_maxrss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
