"""JSON bytes that stay in memory for long (stored lists, profiles about to be ranked).

orjson returns bytes whose allocation is rounded up well past their length, and never
shrinks it: a stored list of 1.3 KB took 4 KB, a text of 20 KB 256 KB (orjson 3.13). Bytes
kept for minutes or hours, by the thousand, are copied to their exact length first.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["dumps_kept", "trimmed"]


def trimmed(data: bytes) -> bytes:
    """A copy of ``data`` allocated to its length (for bytes from `orjson.dumps` kept long)."""
    return bytes(memoryview(data))


def dumps_kept(value: Any) -> bytes:
    """``orjson.dumps(value)``, allocated to its length: for JSON kept in memory for long."""
    return trimmed(orjson.dumps(value))
