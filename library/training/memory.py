"""Give back memory that training does not use (Linux): idle frozen models, freed heap, freed tensors.

Weights loaded in the dtype they are stored in are views of the model file's memory map
(library/models/*/loading.py): they cost no copy, but every page read once (for example
while caching latents or text-encoder outputs) stays counted in the process's resident
memory. When a frozen model is idle for the whole training run (its outputs cached), its
pages can be handed back to the kernel with madvise(MADV_DONTNEED): the tensors stay
valid, and touching them again (sample images, saving the checkpoint) reads the same
bytes back from the file. Only tensors that lie inside a file-backed mapping are touched;
converted (anonymous) tensors are left alone, and never-written frozen weights are the
only ones this is used for, so nothing can be lost.
"""

from __future__ import annotations

import bisect
import logging
import sys

logger = logging.getLogger(__name__)

MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of the process's mappings backed by a regular file, sorted."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].startswith("/") or fields[4] == "0":
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end))
    except OSError:
        return []
    return sorted(out)


def page_out_frozen(modules) -> int:
    """Release the resident pages of the modules' memory-mapped tensors; returns bytes released.

    Only for frozen, never-written weights (they are read back from the file on next use).
    """
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes
    import mmap

    maps = _file_mappings()
    if not maps:
        return 0
    starts = [m[0] for m in maps]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    released, seen = 0, set()
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            if t.device.type != "cpu" or t.requires_grad or t.numel() == 0:
                continue
            begin = t.data_ptr()
            end = begin + t.numel() * t.element_size()
            if begin in seen:
                continue
            seen.add(begin)
            i = bisect.bisect_right(starts, begin) - 1
            if i < 0 or not (maps[i][0] <= begin and end <= maps[i][1]):
                continue  # not inside one file mapping (a converted copy): leave it
            a = -(-begin // page) * page
            b = end // page * page
            if b > a and libc.madvise(ctypes.c_void_p(a), b - a, MADV_DONTNEED) == 0:
                released += b - a
    return released


def trim_heap() -> int:
    """Return the C heap's free memory to the kernel (glibc malloc_trim); returns bytes given back.

    Caching phases (VAE and text-encoder activations, conversions) leave freed blocks in
    malloc's arenas, still counted as resident; training never reuses most of them.
    """
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return 0
    before = _rss_bytes()
    libc.malloc_trim(0)
    return max(0, before - _rss_bytes())


M_MMAP_THRESHOLD = -3


def release_freed_tensors_at_once(threshold: int = 128 * 1024) -> bool:
    """Make glibc hand every freed block above `threshold` bytes straight back to the kernel.

    glibc raises its mmap threshold each time a large mapped block is freed, up to 32 MiB;
    after that, gradients, activations and optimizer temporaries come from the heap, and
    what training frees stays resident (the next phase's peak sits on top of it). A fixed
    threshold (what MALLOC_MMAP_THRESHOLD_=131072 in the environment does) keeps large
    tensors in their own mappings, returned on free. Measured on the SDXL fine-tuning
    benchmark: the fused backward pass's step peak 177 MiB lower, no slower step.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import mmap

            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return 0


__all__ = ["page_out_frozen", "release_freed_tensors_at_once", "trim_heap"]
