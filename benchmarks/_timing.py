"""Wall-clock timing and peak-memory measurement of one call, on CPU or CUDA.

Peak memory of a call is measured as growth over the memory live just before it:

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` after resetting
  the peak statistics (torch's caching allocator counts every tensor).
* CPU (Linux): the process's resident-set high-water mark ``VmHWM`` minus ``VmRSS`` just before
  the call. Before the call, freed heap memory is handed back to the kernel (``malloc_trim``) so
  that RSS is the live memory only, and the high-water mark is reset to it by writing ``5`` to
  ``/proc/self/clear_refs``. Every allocation torch touches (it allocates from the C heap or
  ``mmap``) therefore counts, and nothing from earlier calls does.

Where neither is available (not Linux) the peak is reported as ``None``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only; AttributeError elsewhere
    except (OSError, AttributeError, TypeError):
        return None
    return libc


_LIBC = _libc()


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {field} in {_STATUS}")
    return int(match.group(1))


@functools.cache
def _cpu_peak_supported() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
    except OSError:
        return False
    return _LIBC is not None


def memory_method(device: torch.device) -> str:
    """One line saying how :func:`measure` measures peak memory on ``device``."""
    if device.type == "cuda":
        return (
            "peak memory: growth of `torch.cuda.max_memory_allocated()` over the memory "
            "allocated just before the call (peak statistics reset before each call)"
        )
    if _cpu_peak_supported():
        return (
            "peak memory: growth of the process's peak resident set (`VmHWM`) over its resident "
            "set just before the call; before each call freed heap memory is returned to the "
            "kernel (`malloc_trim(0)`) and the peak is reset (`echo 5 > /proc/self/clear_refs`), "
            "so every allocation of the call counts and nothing from earlier calls does"
        )
    return "peak memory: not measured (needs CUDA or Linux /proc/self/clear_refs and glibc)"


@dataclass(frozen=True)
class Measurement:
    """One call: wall-clock seconds and peak memory growth in bytes (``None``: not measured)."""

    seconds: float
    peak_bytes: int | None
    result: Any


def measure(fn: Callable[[], Any], device: torch.device) -> Measurement:
    """Call ``fn()`` once; return its time, peak memory growth and result."""
    gc.collect(1)  # cycles of the previous call (a full collection is slow after torch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return Measurement(seconds, torch.cuda.max_memory_allocated(device) - before, result)
    cpu_peak = _cpu_peak_supported()
    if cpu_peak:
        _LIBC.malloc_trim(0)
        _CLEAR_REFS.write_text("5")
        before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) * 1024 if cpu_peak else None
    return Measurement(seconds, peak, result)


def side_by_side(
    calls: dict[str, Callable[[], Any]], repeats: int, device: torch.device | None = None
) -> dict[str, tuple[float, Any]]:
    """Each of ``calls`` once untimed (the first call of an engine on a model pays its checks),
    then ``repeats`` rounds over them in one process, in reverse order every other round (so
    that none always follows the same neighbour), each call timed to the end of its work on
    ``device`` (a CUDA device is synchronised): by name, the median seconds and the result of
    the untimed call."""
    results = {name: call() for name, call in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    cuda = device is not None and device.type == "cuda"
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            calls[name]()
            if cuda:
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in calls}
