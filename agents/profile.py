"""The profile agent: folds routed events into the profiles table.

Each routed message holds the events of one partition; the agent groups them by visitor,
reads each profile once, applies the events in order (skipping ids already applied) and
writes each profile once, so a batch of N events for M visitors costs M table writes.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog

from personify.engine.app import app, current_config, publisher, topic
from personify.engine.logging import get_logger
from personify.engine.metrics import AGENT_LAG, EVENTS_APPLIED, EVENTS_DUPLICATE
from personify.engine.models import Event, event_key
from personify.engine.publisher import SEQ_HEADER
from personify.tables import profiles

__all__ = ["fold_batch", "profile_agent"]

_log = get_logger(__name__)
_cfg = current_config()
_table = profiles.table()
_routed = topic(_cfg.topics.routed)
_dead_letter = topic(_cfg.topics.dead_letter)


def _seq_of(headers: Any) -> int | None:
    for name, value in headers or ():
        if name == SEQ_HEADER:
            return int(value)
    return None


def fold_batch(table: Any, events: list[Event]) -> tuple[int, int]:
    """Apply ``events`` to the profiles in ``table``; return (applied, duplicates)."""
    by_user: dict[str, list[Event]] = {}
    for e in events:
        by_user.setdefault(event_key(e), []).append(e)
    applied = 0
    for key, evs in by_user.items():
        bkey = key.encode()
        raw = table.get(bkey)
        state = profiles.decode(raw) if raw is not None else profiles.new_profile(key)
        with structlog.contextvars.bound_contextvars(user_id=key, event_id=evs[-1]["event_id"]):
            n = profiles.apply_events(state, evs, _cfg.profiles)
        if n:
            table[bkey] = profiles.encode(state)
        applied += n
    return applied, len(events) - applied


@app.agent(_routed, name="profile")  # type: ignore[untyped-decorator] # Faust is untyped
async def profile_agent(stream: Any) -> None:
    """Consume routed events and keep the profiles table current."""
    journal = publisher().journal
    async for event in stream.events():
        message = event.message
        try:
            events: list[Event] = orjson.loads(event.value)
            applied, dupes = fold_batch(_table, events)
        except Exception as exc:  # a bad message must not stop the agent
            _log.exception(
                "routed message rejected", partition=message.partition, offset=message.offset
            )
            await _dead_letter.send(
                value=orjson.dumps(
                    {
                        "error": f"cannot apply routed message: {exc}",
                        "field": "",
                        "source": {
                            "topic": message.topic,
                            "partition": message.partition,
                            "offset": message.offset,
                        },
                        "raw": event.value.decode("utf-8", "replace")[:10000],
                    }
                ),
                force=True,
            )
        else:
            EVENTS_APPLIED.inc(applied)
            if dupes:
                EVENTS_DUPLICATE.inc(dupes)
        seq = _seq_of(message.headers)
        if journal is not None and seq is not None:
            journal.mark_applied(seq)
        hw = app.consumer.highwater(message.tp) if app.consumer else None
        if hw is not None:
            AGENT_LAG.labels("profile", str(message.partition)).set(max(hw - message.offset - 1, 0))
