"""Ask glibc's malloc to keep the memory it frees, so that no training step pays page faults.

Without this, glibc hands large freed blocks (a 2048x2048 float32 gradient is 16 MiB) back to the
kernel and maps fresh ones later: 4096 page faults per block, at steps and in variants
that depend on the allocator's state (its mmap threshold moves with what was freed last, and each
thread has its own arena). In ``bench_mask_overhead.py`` that noise was larger than the effect
measured, and it is not the mask's: it landed on the dense variant as often as on the others.
One arena, no trimming and the mmap threshold at its 32 MiB maximum keep every freed block for
reuse, as jemalloc or tcmalloc would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_SETTINGS = {_M_ARENA_MAX: 1, _M_TRIM_THRESHOLD: 1 << 30, _M_MMAP_THRESHOLD: 32 << 20}


def keep_freed_memory() -> str:
    """Apply the settings to this process (for good: call it once, before the threads start) and
    say what was done, for the results' header; a no-op, said so, where malloc is not glibc's."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "malloc unchanged (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not all(libc.mallopt(key, value) == 1 for key, value in _SETTINGS.items()):
        return "malloc unchanged (mallopt refused)"
    return "glibc malloc keeps freed memory (one arena, no trimming, mmap above 32 MiB)"
