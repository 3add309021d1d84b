"""The profile agent: folds routed events into the profiles table.

Each routed message holds the events of one partition; the agent groups them by visitor,
reads each profile once, applies the events in order (skipping ids already applied) and
writes each profile once, so a batch of N events for M visitors costs M table writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections import defaultdict
from collections.abc import Collection
from typing import Any

import mode
import orjson

from personify.agents import fold
from personify.agents.catalog import embeddings
from personify.agents.exposures import recorder
from personify.agents.ingest import send_dead_letter
from personify.agents.lists import profiles_changed, signals_changed
from personify.agents.model import current_propensity, note_interactions, shop_clock
from personify.agents.push import deliver, hub
from personify.agents.segments import registry as segment_registry
from personify.agents.triggers import note_timers, queue_events
from personify.engine.app import (
    app,
    current_config,
    note_lag,
    publisher,
    routed_names,
    topic,
)
from personify.engine.compaction import RoutedCompaction, compaction
from personify.engine.failpoints import failpoint
from personify.engine.logging import get_logger
from personify.engine.metrics import (
    EVENTS_APPLIED,
    EVENTS_DUPLICATE,
    EVENTS_VETOED,
    KPI_SEGMENT,
    KPI_SOURCE,
    KPI_VARIANT,
    PUSH_STAGE,
    ROUTED_END_OFFSET,
    SEGMENT_CHANGES,
    SEGMENT_SIZE,
)
from personify.engine.models import Event, format_ts
from personify.engine.publisher import SEQ_HEADER, Publisher
from personify.engine.retry import until_done
from personify.plugins.manager import plugins
from personify.tables import attribution, profiles, store
from personify.tables.catalog import catalog
from personify.tables.positions import POSITION_KEY, Position

__all__ = ["flush_signals", "profile_agent"]

_log = get_logger(__name__)
_cfg = current_config()
_store = store.TableStore(profiles.table(), changelog=_cfg.changelog_enabled)
_routed = topic(*routed_names(_cfg))
_audit_topic = topic(_cfg.topics.audit)
#: The fold and the signal rows held until flushed (`personify.agents.fold`).
_folder = fold.Folder(
    fold.FoldSettings.of(
        _cfg, segment_registry(), catalog().category_of, current_propensity, shop_clock
    )
)
#: A periodic flush is spread over half the flush interval.
_FLUSH_SPREAD_S = _cfg.recommend.signal_flush_interval_s / 2


def _seq_of(headers: Any) -> int | None:
    for name, value in headers or ():
        if name == SEQ_HEADER:
            return int(value)
    return None


async def flush_signals(
    partitions: Collection[int] | None = None, *, drop: bool = False, spread_s: float = 0.0
) -> None:
    """Write the changed signal rows (of ``partitions``, default all) to the table.

    Readers hear of each slice of rows once it is written (`signals_changed`). See
    `personify.agents.fold.Folder.flush` for ``drop`` and ``spread_s``.
    """

    async def write(partition: int, rows: list[tuple[bytes, bytes | None]]) -> None:
        await until_done("signal flush", functools.partial(_store.put_many, partition, rows))

    await _folder.flush(write, signals_changed, partitions, drop=drop, spread_s=spread_s)


_flushing: set[asyncio.Task[None]] = set()
#: Set as the worker stops, before its last flush: no periodic flush starts after it (the
#: tables close next, and a flush writing to a closed table would retry until killed).
_stopping = asyncio.Event()


def _flush_behind() -> None:
    """Start a flush of the signal rows unless one runs: the agent goes on folding meanwhile."""
    if _flushing or _stopping.is_set():
        return
    task = asyncio.ensure_future(flush_signals(spread_s=_FLUSH_SPREAD_S))
    _flushing.add(task)
    task.add_done_callback(_flushed)


def _flushed(task: asyncio.Task[None]) -> None:
    _flushing.discard(task)
    if not task.cancelled() and task.exception() is not None:
        _log.error("signal flush failed; retried at the next", exc_info=task.exception())


def attach_categories(events: list[Event]) -> None:
    """Give item events without a category the catalog's (category affinity, trending)."""
    view = catalog()
    if not len(view):
        return
    for e in events:
        props = e["properties"]
        if e["type"] == "purchase":
            lines = props.get("items", ())
            known = {
                line["item_id"]: view.category_of(line["item_id"])
                for line in lines
                if not line.get("category")
            }
            if any(known.values()):
                e["properties"] = {
                    **props,
                    "items": [
                        {**line, "category": known[line["item_id"]]}
                        if known.get(line["item_id"])
                        else line
                        for line in lines
                    ],
                }
        elif e.get("item_id") and not props.get("category"):
            category = view.category_of(e["item_id"])
            if category:
                e["properties"] = {**props, "category": category}


async def attach_chat_vectors(events: list[Event]) -> None:
    """Embed the text of each chat message (batched, off the loop) into the event."""
    chats = [e for e in events if e["type"] == "chat_message"]
    if not chats:
        return
    try:
        model = await embeddings().wait_model()
        vectors = await model.encode_async([e["properties"]["text"] for e in chats])
    except Exception:
        _log.exception("chat messages not embedded", count=len(chats))
        return
    for e, vector in zip(chats, vectors, strict=True):
        e[profiles.VECTOR_KEY] = vector


def _dead_letter_record(error: str, source: dict[str, Any], original: Any) -> bytes:
    return orjson.dumps({"error": error, "field": "", "source": source, "event": original})


@app.agent(_routed, name="profile")  # type: ignore[untyped-decorator] # Faust is untyped
async def profile_agent(stream: Any) -> None:
    """Consume routed events and keep the profiles table current.

    Each round takes what has arrived (up to ``[worker] ingest_batch`` messages), folds it per
    partition and visitor, and writes every touched profile once per round.
    """
    pub = publisher()
    routed = compaction()
    async for batch in stream.take_events(_cfg.worker.ingest_batch, within=0.002):
        await _apply_round(batch, pub, routed)
        # Nothing of a round outlives it: the last round of a backfill (a thousand messages,
        # each of hundreds of events) would otherwise stay in memory until the next one.
        del batch


async def _apply_round(batch: list[Any], pub: Publisher, routed: RoutedCompaction) -> None:
    """Fold one round of routed messages, write its state and send on what it made."""
    taken = time.time()
    by_partition: dict[int, list[Event]] = {}
    dead: list[bytes] = []
    fresh: list[Any] = []  # the messages not applied before
    for event in batch:
        message = event.message
        if _applied_before(message):
            _skip_applied(event.value)
            continue
        fresh.append(message)
        if message.timestamp:
            PUSH_STAGE.labels("broker").observe(max(0.0, taken - message.timestamp))
        by_partition.setdefault(message.partition, [])
        try:
            events: list[Event] = orjson.loads(event.value)
            if not isinstance(events, list):
                raise TypeError(f"expected a JSON array of events, got {type(events).__name__}")
        except Exception as exc:  # not a routed message at all: keep it, with the reason
            source = {
                "topic": message.topic,
                "partition": message.partition,
                "offset": message.offset,
            }
            _log.exception("routed message rejected", **source)
            raw = (event.value or b"").decode("utf-8", "replace")[:10000]
            dead.append(_dead_letter_record(f"cannot read routed message: {exc!r}", source, raw))
            continue
        by_partition[message.partition].extend(events)
    vetoed = await _consent_gates(by_partition)
    received = [e for evs in by_partition.values() for e in evs]
    attach_categories(received)
    await attach_chat_vectors(received)
    folds = {p: _folder.fold_batch(_store, p, evs) for p, evs in by_partition.items()}
    failpoint("fold")
    # What the round sends on goes first: if the process dies before the state below is
    # written, the round is applied again and sends it again (harmless: event ids); sent
    # after, it would be lost with a position that says the round was applied.
    onward = [e for f in folds.values() for e in f.onward]
    if onward:
        await until_done("onward publish", functools.partial(pub.publish, onward))
    for p, f in folds.items():
        source = {"topic": _cfg.topics.routed, "partition": p}
        dead.extend(_dead_letter_record(error, source, e) for e, error in f.failed)
    for record in dead:
        await until_done("dead-letter send", functools.partial(send_dead_letter, record))
    for f in folds.values():
        for user, request_id in f.erased:
            await until_done("audit record", functools.partial(_audit, user, request_id))
            failpoint("erase")
    changed = [key.decode() for f in folds.values() for key, _value in f.writes]
    profiles_changed(changed, done=False)
    positions = _advance(fresh, pub)
    await asyncio.gather(
        *(
            until_done(
                "profile write",
                functools.partial(
                    _store.put_many,
                    p,
                    [
                        *f.writes,
                        *f.history,
                        *f.attributions,
                        *f.size_rows,
                        (POSITION_KEY, positions[p].encode()),
                    ],
                ),
            )
            for p, f in folds.items()
        )
    )
    failpoint("applied")
    latest = {k: v for f in folds.values() for k, v in f.states.items()}
    profiles_changed(changed, states=latest)
    if fresh:
        PUSH_STAGE.labels("fold").observe(time.time() - taken)
    for f in folds.values():
        _count_kpis(f.tally)
        if f.memberships:
            _announce(f.memberships, f.segment_moves)
    for f in folds.values():
        for user, _request_id in f.erased:
            hub().forget(user)
            recorder().forget(user)
    applied = [e for f in folds.values() for e in f.events]
    note_interactions(
        sum(f.interactions for f in folds.values()),
        max((e["ts_ms"] for e in applied), default=None),
    )
    note_timers(applied)
    queue_events(latest, applied)
    for f in folds.values():
        # The engine's own events (merges, timers, offers sent) are not visitors' events.
        EVENTS_APPLIED.inc(sum(1 for e in f.events if not e["type"].startswith("$")))
        if vetoed:
            EVENTS_VETOED.inc(vetoed)
            vetoed = 0
        if f.vetoed:
            EVENTS_VETOED.inc(f.vetoed)
        if f.skipped:
            EVENTS_DUPLICATE.inc(f.skipped)
    for event in batch:
        seq = _seq_of(event.message.headers)
        if pub.journal is not None and seq is not None:
            pub.journal.mark_applied(seq)
        routed.note_applied(event.message.tp, event.message.offset)
    if _folder.flush_due(_cfg.recommend.signal_flush_interval_s):
        _flush_behind()
    for partition, end in note_lag("profile", (e.message for e in batch)).items():
        _note_end_offset(partition, end)


_announcing: set[asyncio.Future[None]] = set()


def _announce(changes: list[fold.Membership], moves: dict[str, list[int]]) -> None:
    """Push each membership change (a ``segments`` message) to the visitor's sockets.

    The action hooks (and so the webhook) hear of it only for a visitor who consents to
    marketing. In the background: the agent goes on with the next batch meanwhile. A change
    nobody listens to (no socket follows the visitor, no hook) only counts in the metrics
    (``moves``: per segment, visitors who entered and who left).
    """
    for segment, (entered, left) in moves.items():
        if entered:
            SEGMENT_SIZE.labels(segment).inc(entered)
            SEGMENT_CHANGES.labels(segment, "entered").inc(entered)
        if left:
            SEGMENT_SIZE.labels(segment).dec(left)
            SEGMENT_CHANGES.labels(segment, "left").inc(left)
    hooked = plugins().has("personify_action")
    pushes = hub()
    actions: list[tuple[str, dict[str, Any], bool]] = []
    for change in changes:
        hooks = hooked and change.marketing
        if not (hooks or pushes.followed(change.visitor)):
            continue
        action = {
            "type": "segments",
            "segments": change.segments,
            "added": change.added,
            "removed": change.removed,
        }
        actions.append((change.visitor, action, hooks))
    if not actions:
        return

    async def send() -> None:
        for visitor, action, hooks in actions:
            try:
                await deliver(visitor, "segments", action, hooks=hooks)
            except Exception:  # one visitor's hook failing never holds back the others
                _log.exception("segment change not delivered", user_id=visitor)

    task = asyncio.ensure_future(send())
    _announcing.add(task)
    task.add_done_callback(_announcing.discard)


_KPI_METRICS = {"variant": KPI_VARIANT, "source": KPI_SOURCE, "segment": KPI_SEGMENT}


def _count_kpis(tally: attribution.Tally) -> None:
    for by, name, kpi, amount in tally.totals():
        _KPI_METRICS[by].labels(name, kpi).inc(amount)


#: Per partition held, its applied position as stored (read at the partition's first message).
_positions: dict[int, Position] = {}
#: Whether positions are journal sequence numbers (the embedded broker, whose topics start
#: empty on every start) or else offsets of the routed topic (a Kafka cluster).
_by_journal = _cfg.broker.embedded


def _position(partition: int) -> Position:
    position = _positions.get(partition)
    if position is None:
        [raw] = _store.get_many(partition, [POSITION_KEY])
        position = _positions[partition] = Position.decode(raw)
    return position


def _applied_before(message: Any) -> bool:
    """Whether the state already holds ``message`` (a replay or a redelivery)."""
    position = _position(message.partition)
    if _by_journal:
        seq = _seq_of(message.headers)
        return seq is not None and position.holds_record(seq)
    return position.holds_offset(str(message.topic), int(message.offset))


def _skip_applied(value: bytes | None) -> None:
    with contextlib.suppress(Exception):  # unreadable: it went to the dead letters before
        EVENTS_DUPLICATE.inc(len(orjson.loads(value or b"[]")))


def _advance(messages: list[Any], pub: Publisher) -> dict[int, Position]:
    """Each partition's position once ``messages`` are applied (before the journal hears)."""
    floor = pub.journal.checkpoint if pub.journal is not None else 0
    seqs: dict[int, list[int]] = defaultdict(list)
    offsets: dict[int, dict[str, int]] = defaultdict(dict)
    for message in messages:
        seq = _seq_of(message.headers)
        if _by_journal and seq is not None:
            seqs[message.partition].append(seq)
        elif not _by_journal:
            last = offsets[message.partition]
            last[message.topic] = max(last.get(message.topic, -1), message.offset)
    out = {}
    for partition in {m.partition for m in messages}:
        position = _position(partition)
        if _by_journal:
            position.advance(seqs[partition], floor)
        else:
            position.advance(offsets=offsets[partition])
        out[partition] = position
    return out


#: Partition -> the end offset that warns next (embedded broker).
_warn_at: dict[int, int] = {}


def _note_end_offset(partition: int, end: int) -> None:
    """Publish a routed partition's end offset; with the embedded broker, warn as it grows.

    The embedded broker keeps every message it was sent, and its work per fetch grows with
    what a partition holds (measured by ``bench/broker.py``): under sustained load latency
    rises until a restart releases them.
    """
    ROUTED_END_OFFSET.labels(str(partition)).set(end)
    threshold = _cfg.broker.embedded_warn_messages
    if not (_cfg.broker.embedded and threshold):
        return
    warn_at = _warn_at.get(partition, threshold)
    if end < warn_at:
        return
    while warn_at <= end:
        warn_at *= 2
    _warn_at[partition] = warn_at
    _log.warning(
        "the embedded broker holds many messages",
        topic=_cfg.topics.routed,
        partition=partition,
        messages=end,
        effect="its work per fetch grows with them: latency rises under sustained load",
        remedy="restart Personify to release them (the journal keeps every event), or use "
        'Kafka ([broker] url = "kafka://host:port") for sustained traffic',
    )


async def _consent_gates(by_partition: dict[int, list[Event]]) -> int:
    """Drop the events a consent-gate plugin vetoes; return how many.

    Anything but True from a gate (False, an error, a time-out) vetoes the event: fail closed.
    """
    gates = plugins()
    if not gates.has("personify_consent"):
        return 0
    dropped = 0
    for partition, evs in by_partition.items():
        kept: list[Event] = []
        for e in evs:
            if e["type"].startswith("$") or e["type"] == "consent":
                kept.append(e)  # internal events and consent choices always pass
                continue
            answers = await gates.call("personify_consent", event=profiles.wire(e), profile=None)
            if all(answer is True for _name, answer in answers):
                kept.append(e)
            else:
                dropped += 1
        by_partition[partition] = kept
    return dropped


async def _audit(user_id: str, request_id: str) -> None:
    """Record an erasure: when, which request, and a digest of the id (not the id itself)."""
    record = {
        "action": "erase",
        "request_id": request_id,
        "user_digest": hashlib.sha256(user_id.encode()).hexdigest(),
        "at": format_ts(int(time.time() * 1000)),
    }
    await (await _audit_topic.send(value=orjson.dumps(record), force=True))


@app.timer(_cfg.recommend.signal_flush_interval_s)  # type: ignore[untyped-decorator]
async def _flush_when_idle() -> None:
    """Write changed signal rows also when no events arrive (when one is due)."""
    due = _folder.flush_due(_cfg.recommend.signal_flush_interval_s)
    if due and not _flushing and not _stopping.is_set():
        await flush_signals(spread_s=_FLUSH_SPREAD_S)


async def _on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
    """Write and forget the signal rows (and positions) of partitions this worker gives up.

    Another worker may apply their events meanwhile: a position is read again from the store
    (restored from the changelog) when the partition comes back.
    """
    parts = {tp.partition for tp in revoked if tp.topic in _routed.topics}
    for partition in parts:
        _positions.pop(partition, None)
    if parts:
        await flush_signals(parts, drop=True)


app.on_partitions_revoked.connect(_on_revoked)


@app.service
class _SignalFlusher(mode.Service):  # type: ignore[misc] # mode is untyped
    """Writes the changed signal rows on stop."""

    async def on_stop(self) -> None:
        _stopping.set()
        await flush_signals()  # after any flush under way (it hurries), the last one
