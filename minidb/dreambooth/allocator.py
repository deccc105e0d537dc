"""The allocator policy of the `minidb` command (glibc's malloc), for the command and the benchmarks
that measure what it runs. `import minidb` changes nothing: only the command calls this.
"""
import ctypes
import os
import platform

# On Linux, glibc's malloc hands big freed blocks back to the kernel (mmap'd ones from 128 KiB up, and the
# heap it trims) and maps fresh ones for the next allocation, which the kernel zero-fills page by page again:
# every training step re-faulted its gradients and activations, and the kernel's zero-filling was a large
# part of the UNet's backward. The command keeps freed memory in the process instead, so no page is faulted
# after the first steps, and peak memory stays as it was.
# The low-memory training modes (train.low_memory, train.fused_backward) get a bounded version: their many
# short-lived blocks of changing sizes fragment a heap that is never trimmed, which raised their peak, so
# there at most 1 GiB of free heap is kept, and only blocks under 256 MiB come from the heap (every gradient
# and activation of an SD v1 step at 256x256: the largest, the token embedding's gradient, is 152 MB). With
# a 32 MiB threshold the larger gradients were still mapped afresh every step.
# The step times, page faults and peaks behind each choice: benchmarks/RESULTS.md ("Page faults", and "The
# bounded allocator setting keeps blocks under 256 MiB").
# Memory freed is not returned to the system until the process exits (bounded: beyond 1 GiB it is), except
# where `minidb train` hands it back between stages (minidb.pipeline.give_back_freed_memory: after the load,
# the class images and the latent cache, before each validation grid and the export), never between steps.
# `import minidb` changes nothing. Opt out: MINIDB_KEEP_FREED_MEMORY=0.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt(3) parameters


def keep_freed_memory(bounded: bool = False) -> bool:
    """glibc: big blocks from the heap instead of fresh mappings, and the heap never trimmed, so the
    next step reuses the pages the last one freed; bounded: blocks under 256 MiB only, and at most
    1 GiB of free heap kept. True if that is now in force."""
    if os.environ.get("MINIDB_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if bounded:  # mallopt(3): mmap from 256 MiB up (32 MiB where a glibc caps it there); trim beyond 1 GiB free
        mmap = libc.mallopt(M_MMAP_THRESHOLD, 256 << 20) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        return bool(mmap) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    # M_MMAP_MAX 0: no mmap for large requests; M_TRIM_THRESHOLD -1: never trim
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
