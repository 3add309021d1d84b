"""The timers behind ``schedule`` actions: which visitor's timer is due when."""

from __future__ import annotations

import heapq

__all__ = ["Timers"]


class Timers:
    """The timers due on this worker's visitors, soonest first."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str, str]] = []
        #: (visitor, timer) -> the due time that counts (a later schedule replaces it).
        self._current: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._current)

    def add(self, user_id: str, timer: str, due_ms: int) -> None:
        """Set ``user_id``'s ``timer`` to fire at ``due_ms`` (replacing an earlier setting)."""
        self._current[(user_id, timer)] = due_ms
        heapq.heappush(self._heap, (due_ms, user_id, timer))

    def cancel(self, user_id: str, timer: str, due_ms: int) -> None:
        """Forget the timer if it is still set for ``due_ms``."""
        if self._current.get((user_id, timer)) == due_ms:
            del self._current[(user_id, timer)]

    def due(self, now_ms: int) -> list[tuple[str, str, int]]:
        """Take the timers due at ``now_ms``: (visitor, timer, due time)."""
        out = []
        while self._heap and self._heap[0][0] <= now_ms:
            due_ms, user_id, timer = heapq.heappop(self._heap)
            if self._current.get((user_id, timer)) == due_ms:
                del self._current[(user_id, timer)]
                out.append((user_id, timer, due_ms))
        return out

    def clear(self) -> None:
        """Forget every timer (the partitions moved)."""
        self._heap.clear()
        self._current.clear()
