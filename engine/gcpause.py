"""Holding the cyclic garbage collector off for a stretch of work that makes no cycles.

Folding a round of events decodes every visitor's stored profile into thousands of small
objects, all alive until the round is written: each collection the allocations trigger meanwhile
scans them, finds them alive and moves them to an older generation, where later collections
scan them again. A profile decoded from JSON holds no cycles, so the collector has nothing to
find in them; `collection_paused` holds it off for such work, and the objects still alive
afterwards are counted for the next collection as usual.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["collection_paused"]


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Hold the cyclic collector off inside the block (re-entrant; it is on again after).

    Only for synchronous work: another task or thread running meanwhile is held off too.
    """
    if not gc.isenabled():  # paused already (or switched off by the operator): left as it is
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
