"""The engine caps glibc's malloc arenas, so that threads share freed memory."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from personify.engine.memory import QuietSpell

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc arenas are glibc's",
)

#: Eight threads allocate at once, then the process counts its arena heaps: the anonymous
#: 64 MiB mappings glibc aligns on 64 MiB for each arena besides the main one. All eight threads
#: together hold about 32 MiB, so that an arena shared by all of them still fits in one heap
#: (a heap holds at most 64 MiB; an arena that outgrows it maps a second one).
_SCRIPT = """
import sys, threading
from personify.engine.cli import _limit_malloc_arenas
_limit_malloc_arenas(int(sys.argv[1]))
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    keep = [bytearray(1000) for _ in range(4000)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
# A heap: an anonymous mapping at a 64 MiB boundary, read-write where it is in use and
# inaccessible (---p) up to the next boundary. Other mappings may start at a boundary too.
maps = []
for line in open("/proc/self/maps"):
    fields = line.split()
    start, end = (int(x, 16) for x in fields[0].split("-"))
    maps.append((start, end, fields[1], len(fields) == 5))
heaps = 0
for i, (start, end, perms, anonymous) in enumerate(maps):
    if start % (64 << 20) or not anonymous or not perms.startswith("rw"):
        continue
    reserved = end
    if i + 1 < len(maps) and maps[i + 1][0] == end and maps[i + 1][2].startswith("---"):
        reserved = maps[i + 1][1]
    if reserved - start == 64 << 20:
        heaps += 1
print(heaps)
"""


def _arena_heaps(limit: int) -> int:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_ARENA_MAX from the caller
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(limit)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    return int(done.stdout.strip())


def test_two_arenas_are_shared_by_eight_threads() -> None:
    """With the default [worker] malloc_arenas = 2, one arena besides the main one."""
    assert _arena_heaps(2) <= 1


def test_zero_leaves_glibc_its_own_arenas() -> None:
    """0 changes nothing: eight threads allocating at once get several arenas."""
    assert _arena_heaps(0) > 1


#: 200 MiB of 1,000-byte buffers, one in a hundred kept: the heap is left mostly free, in
#: runs of about 100 KB between the buffers kept, which glibc keeps resident (only its top is
#: given back by itself). Then `memory.trim` runs, and the resident sizes are printed.
_TRIM_SCRIPT = """
from personify.engine import memory
buffers = [bytearray(1000) for _ in range(200_000)]
kept = buffers[::100]
del buffers
before = memory.resident_bytes()
returned = memory.trim(memory.trimmer())
print(before, memory.resident_bytes(), returned)
"""


def test_trim_gives_freed_heap_back() -> None:
    """What was freed inside the heap stays resident until trimmed, then goes back."""
    done = subprocess.run(
        [sys.executable, "-c", _TRIM_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    before, after, returned = (int(x) for x in done.stdout.split())
    assert before > 150 << 20  # the freed buffers were still resident
    assert returned > 100 << 20
    assert after < before - (100 << 20)


def test_trims_once_per_quiet_spell() -> None:
    """Due at the first tick with nothing applied since the last, then not until traffic."""
    spell = QuietSpell()
    ticks = [0, 0, 0, 5, 9, 9, 9, 12, 12]
    due = [spell.due(n) for n in ticks]
    assert due == [False, True, False, False, False, True, False, False, True]
