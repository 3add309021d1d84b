"""The ingest agent: validates events that any Kafka client wrote to the public events topic.

A message on the events topic is one event (a JSON object) or a batch ``{"events": [...]}``,
keyed by anything. Valid events are published to the routed topic, grouped by visitor; each
invalid one goes to the dead-letter topic with the reason. An event without an ``event_id``
gets one derived from its position in the topic, so a redelivered message is recognised.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import orjson

from personify.engine.app import app, current_config, note_lag, publisher, topic
from personify.engine.errors import ValidationError
from personify.engine.logging import get_logger
from personify.engine.metrics import EVENTS_ACCEPTED, EVENTS_REJECTED, rejection_reason
from personify.engine.models import Event, validate_event
from personify.engine.publisher import Publisher
from personify.engine.retry import until_done

__all__ = ["dead_letter", "ingest_agent", "parse_message", "send_dead_letter"]

_log = get_logger(__name__)
_cfg = current_config()
_events = topic(_cfg.topics.events)
_dead_letter = topic(_cfg.topics.dead_letter)


def dead_letter(
    error: str, field: str, source: dict[str, Any], original: Any, *, what: str = "event"
) -> bytes:
    """A dead-letter record: reason, field, source, and the input under ``what``."""
    return orjson.dumps(
        {
            "error": error,
            "field": field,
            "source": source,
            what: original,
            "rejected_at": int(time.time() * 1000),
        }
    )


def parse_message(
    value: bytes, source: dict[str, Any], id_prefix: str, now_ms: int
) -> tuple[list[Event], list[tuple[str, bytes]]]:
    """Validate one message; return (valid events, [(reason, dead-letter record)])."""
    valid: list[Event] = []
    dead: list[tuple[str, bytes]] = []
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raw = value.decode("utf-8", "replace")[:10000]
        dead.append(("malformed", dead_letter(f"malformed JSON: {exc}", "", source, raw)))
        return valid, dead
    batch = obj.get("events") if isinstance(obj, dict) and "type" not in obj else None
    items = batch if isinstance(batch, list) else [obj]
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("event_id") is None:
            item = {**item, "event_id": f"{id_prefix}-{i}"}
        try:
            valid.append(validate_event(item, _cfg.events, now_ms))
        except ValidationError as exc:
            where = {**source, "index": i}
            dead.append(
                (rejection_reason(exc.field), dead_letter(exc.reason, exc.field, where, item))
            )
    return valid, dead


async def send_dead_letter(record: bytes) -> None:
    """Send a record to the dead-letter topic; return once the broker has it."""
    await (await _dead_letter.send(value=record, force=True))


@app.agent(_events, name="ingest")  # type: ignore[untyped-decorator] # Faust is untyped
async def ingest_agent(stream: Any) -> None:
    """Validate raw events and route them; invalid ones go to the dead-letter topic."""
    pub = publisher()
    epoch = app.personify_broker_epoch
    async for batch in stream.take_events(_cfg.worker.ingest_batch, within=0.005):
        await _route_round(batch, pub, epoch)
        del batch  # a backfill's last round (up to 1,000 messages) is not kept until the next


async def _route_round(batch: list[Any], pub: Publisher, epoch: str) -> None:
    """Validate one round of raw messages and route the events; send the invalid ones on."""
    await pub.ready.wait()
    now_ms = int(time.time() * 1000)
    valid: list[Event] = []
    dead: list[tuple[str, bytes]] = []
    for event in batch:
        m = event.message
        source = {"topic": m.topic, "partition": m.partition, "offset": m.offset}
        ok, bad = parse_message(
            event.value or b"", source, f"{epoch}-{m.partition}-{m.offset}", now_ms
        )
        valid.extend(ok)
        dead.extend(bad)
    await until_done("routed publish", functools.partial(pub.publish, valid))
    EVENTS_ACCEPTED.labels("topic").inc(len(valid))
    for reason, record in dead:
        EVENTS_REJECTED.labels("topic", reason).inc()
        await until_done("dead-letter send", functools.partial(send_dead_letter, record))
    note_lag("ingest", (event.message for event in batch))
