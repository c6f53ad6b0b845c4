"""Keeping peak memory near one copy of the weights while loading and rewriting a model.

Two effects make a naive load of a large checkpoint hold about twice its size:
- safetensors memory-maps the file, transformers copies the per-expert tensors into
  stacked ones, and the mapping (with every page it touched) outlives the load;
- glibc serves freed blocks of up to 32 MB from its heap and keeps them there, so the
  per-expert temporaries of a conversion stay resident after they are freed.
`read_weights_without_mmap` reads tensors with pread instead, and
`return_large_frees_to_os` makes large blocks come from (and go back to) the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from pathlib import Path

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_configured = False


def return_large_frees_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations above `threshold_bytes` with mmap so freeing them returns memory at once.

    glibc only (a no-op elsewhere); returns whether the setting took effect.
    """
    global _configured
    if _configured or not sys.platform.startswith("linux"):
        return _configured
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        _configured = bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes) == 1)
    except (OSError, AttributeError):  # not glibc (musl, ...): keep the allocator's defaults
        _configured = False
    return _configured


def release_freed_memory() -> bool:
    """Collect garbage, then hand the allocator's free pages back to the OS (glibc's malloc_trim(0): the
    freed small blocks a large rewrite leaves scattered in the heap). Returns whether malloc_trim ran
    (glibc only; elsewhere only the collection)."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is None or not hasattr(libc, "malloc_trim"):
            return False
        libc.malloc_trim(0)
        return True
    except OSError:
        return False


def read_weights_without_mmap(model_dir: str | Path) -> dict:
    """Lazy views of every tensor in the directory's *.safetensors, read with pread rather than mmap.

    Values are safetensors slices; transformers materialises each one as it loads it.
    """
    from safetensors import safe_open

    slices = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
        except TypeError:  # safetensors without the pread backend
            handle = safe_open(str(path), framework="pt", device="cpu")
        slices.update({key: handle.get_slice(key) for key in handle.keys()})
    return slices


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: a spawned child's ru_maxrss starts
    from its parent's size at fork (exec keeps the old memory's high-water mark), VmHWM
    belongs to the new program's memory alone.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
