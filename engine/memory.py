"""Giving memory the allocator holds free back to the system (glibc's ``malloc_trim``).

A backfill, a training or a burst of traffic allocates and frees hundreds of MiB. glibc keeps
what was freed inside its heaps for later reuse, and gives back only the free pages at a
heap's top: after 2M events of a backfill the engine's heap held 175-450 MiB free.
``malloc_trim(0)`` returns every whole free page, wherever it lies; it took 1-18 ms there and
runs on a thread (ctypes releases the interpreter lock around it).
Elsewhere than glibc it is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

__all__ = ["QuietSpell", "resident_bytes", "trim", "trimmer"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def trimmer() -> Callable[[int], int] | None:
    """Glibc's ``malloc_trim``, or None where there is none (not Linux, or not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    return fn


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is not there)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE
    return 0


def trim(fn: Callable[[int], int] | None) -> int:
    """Give the allocator's free pages back with ``fn`` (see `trimmer`); return the bytes.

    The figure is the fall of the resident size around the call, so memory that other
    threads allocate meanwhile counts against it (never below 0).
    """
    if fn is None:
        return 0
    before = resident_bytes()
    fn(0)
    return max(0, before - resident_bytes())


class QuietSpell:
    """Says when to trim: once per quiet spell, given a count of events applied at each tick.

    A tick whose count is the previous tick's (nothing applied in between) is quiet; the
    first quiet tick of a spell is due, the others are not. The first tick is never quiet;
    what the start freed goes back at the second, if nothing was applied meanwhile.
    """

    def __init__(self) -> None:
        self._seen: float | None = None
        self._trimmed_at: float | None = None

    def due(self, applied: float) -> bool:
        """Whether to trim now, ``applied`` being the count of events applied so far."""
        quiet = applied == self._seen and applied != self._trimmed_at
        self._seen = applied
        if quiet:
            self._trimmed_at = applied
        return quiet
