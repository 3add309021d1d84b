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
from personify.engine.models import Event, event_key, format_ts
from personify.engine.publisher import SEQ_HEADER
from personify.tables import profiles

__all__ = ["fold_batch", "profile_agent"]

_log = get_logger(__name__)
_cfg = current_config()
_store = profiles.ProfileStore(profiles.table())
_routed = topic(_cfg.topics.routed)
_dead_letter = topic(_cfg.topics.dead_letter)


def _seq_of(headers: Any) -> int | None:
    for name, value in headers or ():
        if name == SEQ_HEADER:
            return int(value)
    return None


def _control(
    etype: str,
    event_id: str,
    user_id: str | None,
    anonymous_id: str,
    ts_ms: int,
    properties: dict[str, Any],
) -> Event:
    return {
        "v": 1,
        "event_id": event_id,
        "type": etype,
        "user_id": user_id,
        "anonymous_id": anonymous_id,
        "item_id": None,
        "ts": format_ts(ts_ms),
        "ts_ms": ts_ms,
        "properties": properties,
    }


async def fold_batch(
    store: profiles.ProfileStore, partition: int, events: list[Event]
) -> tuple[int, int, list[Event]]:
    """Apply ``events`` (all of one partition) to their profiles; write each profile once.

    Returns:
        (events applied, duplicates skipped, events to publish onward). Onward events stitch
        sessions across partitions: ``identify``/``alias`` sends a link to the anonymous
        profile, which sends its content back as a merge and forwards its later events.
        They are sent again on redelivery; their event ids make that harmless.
    """
    by_user: dict[str, list[Event]] = {}
    for e in events:
        by_user.setdefault(event_key(e), []).append(e)
    applied = 0
    skipped = 0
    onward: list[Event] = []
    writes: list[tuple[bytes, bytes]] = []
    for key, evs in by_user.items():
        bkey = key.encode()
        raw = store.get(partition, bkey)
        state = profiles.decode(raw) if raw is not None else profiles.new_profile(key)
        changed = False
        todo: list[Event] = []
        for e in evs:
            etype = e["type"]
            if etype == profiles.LINK:
                target = e["properties"]["target"]
                if state.get("alias_of") is None:
                    state["alias_of"] = target
                    changed = True
                onward.append(
                    _control(
                        profiles.MERGE,
                        f"$merge:{key}",
                        state["alias_of"],
                        key,
                        e["ts_ms"],
                        {"profile": profiles.snapshot(state)},
                    )
                )
                continue
            alias = state.get("alias_of")
            if alias and not e.get("user_id"):
                onward.append({**e, "user_id": alias})  # a linked anonymous visitor's event
                continue
            todo.append(e)
            if etype in ("identify", "alias") and e["anonymous_id"] != key:
                onward.append(
                    _control(
                        profiles.LINK,
                        f"$link:{e['event_id']}",
                        None,
                        e["anonymous_id"],
                        e["ts_ms"],
                        {"target": key},
                    )
                )
        with structlog.contextvars.bound_contextvars(user_id=key, event_id=evs[-1]["event_id"]):
            n = profiles.apply_events(state, todo, _cfg.profiles)
        if n or changed:
            writes.append((bkey, profiles.encode(state)))
        applied += n
        skipped += len(todo) - n
    await store.put_many(partition, writes)
    return applied, skipped, onward


@app.agent(_routed, name="profile")  # type: ignore[untyped-decorator] # Faust is untyped
async def profile_agent(stream: Any) -> None:
    """Consume routed events and keep the profiles table current."""
    journal = publisher().journal
    async for event in stream.events():
        message = event.message
        try:
            events: list[Event] = orjson.loads(event.value)
            applied, dupes, onward = await fold_batch(_store, message.partition, events)
            if onward:
                await publisher().publish(onward)
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
