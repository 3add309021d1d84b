"""Fail points: the process kills itself at a named point in its work, for crash tests.

``PERSONIFY_FAILPOINTS="fold:3,erase:1"`` kills the process with SIGKILL the 3rd time it
reaches the point ``fold`` (or the 1st time it reaches ``erase``): nothing is flushed and
nothing runs after, as when the power goes. With ``PERSONIFY_FAILPOINTS_GROUP=1`` its child
processes (the embedded broker) go first, as with a kill of the whole process group.
Unset, every point costs one look at an empty dictionary.

Points: ``journal_append`` (a record written, not yet synced or acknowledged),
``fold`` (a round folded, nothing sent or written), ``applied`` (a round written, the journal
not told), ``erase`` (an erasure folded and audited, not written), ``signal_flush`` (part of
the signal rows written), ``topic_switch`` (routed events switched to the other topic, the
old one not emptied), ``catalog_write`` (catalog rows written, not indexed),
``journal_compact`` (one old journal segment deleted).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

__all__ = ["POINTS", "failpoint"]

POINTS = frozenset(
    {
        "journal_append",
        "fold",
        "applied",
        "erase",
        "signal_flush",
        "topic_switch",
        "catalog_write",
        "journal_compact",
    }
)


def _armed(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition(":")
        if name not in POINTS:
            raise ValueError(
                f"PERSONIFY_FAILPOINTS: unknown point {name!r}; known: {sorted(POINTS)}"
            )
        out[name] = int(count or 1)
    return out


_ARMED = _armed(os.environ.get("PERSONIFY_FAILPOINTS", ""))
_GROUP = os.environ.get("PERSONIFY_FAILPOINTS_GROUP") == "1"


def failpoint(name: str) -> None:
    """Kill the process here if ``name`` is armed and this is its time."""
    if not _ARMED or name not in _ARMED:
        return
    _ARMED[name] -= 1
    if _ARMED[name] > 0:
        return
    sys.stderr.write(f"failpoint {name}: killing the {'group' if _GROUP else 'process'}\n")
    sys.stderr.flush()
    if _GROUP:
        for child in _children(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out
