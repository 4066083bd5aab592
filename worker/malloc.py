"""glibc malloc settings of a rank that trains on the CPU: freed memory stays for the next step.

Every training step allocates and frees the same large temporaries (DeepSpeed's ZeRO-2 flattens
each parameter group's gradients into a new tensor, its reductions copy buckets, autograd frees
the activations). glibc serves a request above its mmap threshold (128 KiB, adapting up to 32 MiB)
with a fresh `mmap` and unmaps it on `free`, and returns a freed heap top over 128 KiB to the
kernel: the next step faults those pages in again and the kernel zeroes each one, a cost in the
rank's own CPU time. Measured on one thread: a 34 MB flatten takes 19 ms that way and 3 ms when
the memory is reused; the MoE step of bench/train_step.py (stock-top1-ep2) went from ~312 to
~270 ms of CPU, the dense step did not change (its tensors are smaller).

`keep_freed_memory` sets, for the whole process, `M_MMAP_MAX` 0 (the main arena never maps a
request on its own: every block comes from the heap and goes back to it) and `M_TRIM_THRESHOLD`
1 GiB (the heap top is not returned). Other threads' arenas still map what they cannot hold.
# NOTE: the cost is that the rank's resident memory stays at its peak (plus fragmentation) instead
# of shrinking between steps; a training loop comes back to that peak every step anyway. GPU ranks
# keep glibc's defaults: their large tensors live on the device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Keep freed memory in this process for reuse (see the module docstring). Returns whether
    glibc took the settings (False elsewhere: another libc, another OS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False  # musl has a mallopt that does nothing
    # NOTE: the trim threshold first: set after M_MMAP_MAX, the flatten above still faulted in 3,100
    # pages per call instead of 780 (glibc 2.36; the same as MALLOC_TRIM_THRESHOLD_ and
    # MALLOC_MMAP_MAX_ in the environment at process start).
    ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_MAX, 0))
    logger.debug("malloc: M_MMAP_MAX 0, M_TRIM_THRESHOLD %d: %s", TRIM_THRESHOLD, "set" if ok else "refused")
    return ok
