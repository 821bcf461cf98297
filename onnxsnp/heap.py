"""Handing freed heap memory back to the system.

glibc keeps large freed blocks of numpy and onnxruntime buffers in its heap (once a large block
has been freed, its mmap threshold rises and later blocks of that size come from the heap), so a
process that makes and drops activation-sized arrays again and again only grows. Measured on a
DeiT-S prune with 256 calibration samples: resident memory rose by about 0.3 GB per block of the
block-by-block reconstruction, to a 5 GB peak; trimmed after every pass it stays near 1.4 GB."""
from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None


def release_heap() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
