"""Keep freed host memory in the process during CPU training.

glibc's malloc maps every block larger than its mmap threshold (32 MB at most, by default) afresh and unmaps it
when it is freed. A CPU training step frees and re-allocates activations that large in every layer (8 images of
256 px through a VAE: 67 MB each), so it pays a page fault for every 4 KB page of them, every step (about 190,000
faults per encode of 8 images through the side-by-side benchmark's VAE at 256 px). Raising the thresholds lets
malloc reuse those blocks instead.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")
LARGEST_THRESHOLD = 2**31 - 1  # mallopt takes an int


def retain_freed_memory() -> bool:
    """Ask glibc to serve large blocks from its heap and keep freed memory for reuse; ``False`` where the
    allocator is not glibc's, or the user chose its settings (an environment variable, a preloaded allocator)."""
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, LARGEST_THRESHOLD))
