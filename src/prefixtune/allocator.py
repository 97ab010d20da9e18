"""Keep large freed blocks in the process instead of handing them back to the OS (glibc only).

Why: PyTorch has no caching allocator on the CPU, so every tensor comes from malloc. A beam-search step
makes several full-vocabulary temporaries (logits, log-probs, processed scores: 160 rows x 49,152 x 4
bytes = 31 MB each for 32 sources x 5 beams on SmolLM2). glibc serves blocks that large with mmap and
unmaps them on free, so each step the kernel maps and zeroes fresh pages again, which makes a simple add
or copy of such a tensor slow in a profile of beam decoding. With mmap's threshold at its maximum (32 MiB)
and trimming effectively off, freed blocks stay in the heap and are reused; outputs do not change. The
cost is that the process keeps its peak heap instead of shrinking. What it saves is measured in the
README's main-job table ("before allocator.py" row; bench/results/history/).

Called by the command line (`prefixtune ...`) for its own process; library users may call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 2**31 - 1  # an int: release memory to the OS only above 2 GiB of free heap top

_done = False


def retain_freed_memory() -> bool:
    """Tune glibc's malloc once per process as described above; False where it is not glibc."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    # mallopt returns 1 on success; setting either value also stops glibc's own dynamic adjustment.
    _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done
