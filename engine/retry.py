"""Retrying broker writes that an agent must not skip."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from personify.engine.logging import get_logger

__all__ = ["until_done"]

_log = get_logger(__name__)


async def until_done(
    what: str, step: Callable[[], Awaitable[object]], max_delay: float = 5.0
) -> None:
    """Run ``step`` until it succeeds, backing off from 0.1 s to ``max_delay`` between tries.

    An agent that skipped a failed write would lose data and one that crashed would stop
    consuming; waiting for the broker to come back is the only safe choice.
    """
    delay = 0.1
    while True:
        try:
            await step()
            return
        except Exception:
            _log.exception("broker write failed; retrying", what=what, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
