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
import re
import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import mode
import orjson

from personify.agents.catalog import embeddings
from personify.agents.exposures import recorder
from personify.agents.ingest import send_dead_letter
from personify.agents.lists import profiles_changed, signals_changed
from personify.agents.model import current_propensity, note_interactions, shop_clock
from personify.agents.push import deliver, hub
from personify.agents.segments import RESEGMENT
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
from personify.engine.compaction import compaction
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
    SIGNAL_ROWS_CACHED,
)
from personify.engine.models import Event, event_key, format_ts, internal_event
from personify.engine.publisher import SEQ_HEADER, Publisher
from personify.engine.retry import until_done
from personify.plugins.manager import plugins
from personify.tables import attribution, history, profiles, segments, signals, store
from personify.tables.catalog import catalog
from personify.tables.positions import POSITION_KEY, Position

__all__ = ["Folded", "fold_batch", "profile_agent"]

_log = get_logger(__name__)
_cfg = current_config()
_store = store.TableStore(profiles.table(), changelog=_cfg.changelog_enabled)
_routed = topic(*routed_names(_cfg))
_audit_topic = topic(_cfg.topics.audit)
#: Whether item interactions are kept for the learned model ([model] enabled).
_keep_history = _cfg.model.enabled
#: Whether lists served are joined to what visitors do next ([attribution] enabled).
_attributing = _cfg.attribution.enabled
#: A visitor's attribution row is read for a round with one of these events.
_ATTRIBUTED = attribution.OUTCOMES | {
    attribution.EXPOSURE,
    profiles.MERGE,
    profiles.LINK,
    profiles.ERASE,
    "consent",
}
#: Per partition, the newest day whose KPI row it wrote (older rows expire as days start).
_kpi_day: dict[int, str] = {}
#: The segments defined on this worker (`personify.agents.segments`).
_segments = segment_registry()
#: Per partition, this agent's signal rows (held compactly), and which changed since the
#: last flush.
_numbers = signals.ItemNumbers()
_live: defaultdict[int, signals.LiveRows] = defaultdict(
    lambda: signals.LiveRows(_cfg.recommend, numbers=_numbers)
)
_flush_lock = asyncio.Lock()
#: Set while a flush that must not wait (partitions moving, stopping) waits for the lock.
_hurry = asyncio.Event()
#: Signal rows encoded and written per turn of the event loop in a flush, and the longest pause
#: between two slices of a flush spread over time.
_FLUSH_SLICE = 100
_MAX_FLUSH_PAUSE_S = 0.25
#: A periodic flush is spread over half the flush interval.
_FLUSH_SPREAD_S = _cfg.recommend.signal_flush_interval_s / 2


def _seq_of(headers: Any) -> int | None:
    for name, value in headers or ():
        if name == SEQ_HEADER:
            return int(value)
    return None


class Membership(NamedTuple):
    """A visitor's change of segments."""

    visitor: str
    #: The segments they are in now.
    segments: list[str]
    added: list[str]
    removed: list[str]
    #: Whether they consent to marketing.
    marketing: bool


@dataclass(slots=True)
class Folded:
    """What folding one routed message produced."""

    applied: int = 0
    skipped: int = 0
    vetoed: int = 0
    #: (visitor, erasure request id) erased in this round.
    erased: list[tuple[str, str]] = field(default_factory=list)
    onward: list[Event] = field(default_factory=list)
    writes: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    #: The events applied (new), in order.
    events: list[Event] = field(default_factory=list)
    #: The new profile of each visitor written (not of those erased).
    states: dict[str, profiles.Profile] = field(default_factory=dict)
    failed: list[tuple[Event, str]] = field(default_factory=list)
    #: History rows written (and deleted) with the profiles, for the learned model.
    history: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    #: Item interactions applied (rows added to the history).
    interactions: int = 0
    #: Attribution rows and KPI rows written with the profiles (no list depends on them).
    attributions: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    #: The KPI counts this round adds.
    tally: attribution.Tally = field(default_factory=attribution.Tally)
    #: Each visitor whose membership changed.
    memberships: list[Membership] = field(default_factory=list)
    #: The segments' sizes, written with the profiles.
    size_rows: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    #: Per segment: visitors who entered it and who left it in this round.
    segment_moves: dict[str, list[int]] = field(default_factory=dict)
    signals: signals.SignalBatch = field(
        default_factory=lambda: signals.SignalBatch(
            _cfg.recommend, _cfg.profiles, catalog().category_of
        )
    )


def _attributor(attr: attribution.Attribution) -> Any:
    """What `profiles.apply_events` calls to join ``attr``'s visitor's events to exposures."""

    def attribute(p: profiles.Profile, e: Event) -> None:
        if not profiles.consents(p, "analytics", _cfg.profiles):
            attr.clear()  # without analytics consent nothing is kept and nothing counts
        elif e["type"] == profiles.MERGE:
            attr.merged(e["properties"].get("attribution") or {})
        else:
            attr.segments = p.get("segments", [])
            attr.observe(e)

    return attribute


#: What an exposure's fold reads of a stored profile.
_EXPOSURE_READS = re.compile(rb'"(?:consent|alias_of)"')


def _only_exposures(evs: list[Event]) -> bool:
    return all(e["type"] == attribution.EXPOSURE for e in evs)


def _fold_user(
    key: str,
    raw: bytes | None,
    evs: list[Event],
    out: Folded,
    attr_raw: bytes | None = None,
    *,
    attributed: bool = False,
) -> bool:
    """Fold one visitor's events; append to ``out``. Raises if an event cannot be applied.

    With ``attributed``, their attribution row (stored as ``attr_raw``) is kept too.
    """
    if raw is None or (attributed and _only_exposures(evs) and not _EXPOSURE_READS.search(raw)):
        # Exposures read nothing of the profile but the consent and the link to a user, and
        # neither is recorded here: it folds like a new profile (decoding a large profile costs
        # more than the rest of an exposure's fold). Nothing of the profile is written. Its
        # segments count its KPIs: they are read alone.
        state = profiles.new_profile(key)
        held = None if raw is None else segments.SEGMENTS_RAW.search(raw)
        if held is not None:
            state["segments"] = orjson.loads(held.group(1))
    else:
        state = profiles.decode(raw)
    member_of: list[str] = state.get("segments", [])
    reevaluate = False
    tally = attribution.Tally()
    attr = (
        attribution.Attribution(attr_raw, _cfg.attribution, tally, _cfg.events.default_currency)
        if attributed
        else None
    )
    changed = False
    todo: list[Event] = []
    onward: list[Event] = []
    for e in evs:
        etype = e["type"]
        if etype == RESEGMENT:  # a sweep found the membership out of date
            reevaluate = True
            continue
        if etype == profiles.ERASE:
            # Everything held goes; linked anonymous ids are erased too (on their partitions).
            for anon in state.get("anonymous_ids", []):
                onward.append(
                    internal_event(
                        profiles.ERASE,
                        f"$erase:{anon}",
                        user_id=None,
                        anonymous_id=anon,
                        ts_ms=e["ts_ms"],
                        properties={},
                    )
                )
            out.erased.append((key, e["properties"].get("request_id", "")))
            state = profiles.new_profile(key)
            if attr is not None:
                attr.clear()
            todo = []
            changed = True
            continue
        if etype == profiles.LINK:
            target = e["properties"]["target"]
            if state.get("alias_of") is None:
                state["alias_of"] = target
                changed = True
            merge: dict[str, Any] = {"profile": profiles.snapshot(state)}
            if attr is not None and (attr.exposures or attr.assigned):
                merge["attribution"] = attr.snapshot()
            onward.append(
                internal_event(
                    profiles.MERGE,
                    f"$merge:{key}",
                    user_id=state["alias_of"],
                    anonymous_id=key,
                    ts_ms=e["ts_ms"],
                    properties=merge,
                )
            )
            continue
        alias = state.get("alias_of")
        if alias and not e.get("user_id"):
            onward.append(
                {**profiles.wire(e), "user_id": alias}
            )  # a linked anonymous visitor's event
            continue
        todo.append(e)
        if etype in ("identify", "alias") and e["anonymous_id"] != key:
            link = {"target": key}
            onward.append(
                internal_event(
                    profiles.LINK,
                    f"$link:{e['event_id']}",
                    user_id=None,
                    anonymous_id=e["anonymous_id"],
                    ts_ms=e["ts_ms"],
                    properties=link,
                )
            )
    vetoed: list[Event] = []
    start = len(out.events)
    n = profiles.apply_events(
        state,
        todo,
        _cfg.profiles,
        observe=out.signals.observe,
        chat_half_life_s=_cfg.recommend.chat_half_life_s,
        vetoed=vetoed,
        applied=out.events,
        attribute=None if attr is None else _attributor(attr),
    )
    tombstone = bool(out.erased and out.erased[-1][0] == key and not n)
    if (member_of or _segments.compiled.ids) and (tombstone or n or changed or reevaluate):
        wall = int(time.time() * 1000)
        # Only the rules the events applied may change are evaluated again; a sweep's
        # request, a merge or the engine's own events evaluate every rule.
        types: frozenset[str] | None = frozenset(e["type"] for e in out.events[start:])
        if reevaluate or changed or any(t.startswith("$") for t in types or ()):
            types = None
        now = (
            []
            if tombstone
            else _segments.members(
                state, _cfg.profiles, wall, current_propensity(), shop_clock(wall), types
            )
        )
        if not tombstone:
            state["segments_of"] = _segments.digest
        if now != member_of:
            was, now_in = set(member_of), set(now)
            out.memberships.append(
                Membership(
                    key,
                    now,
                    [s for s in now if s not in was],
                    [s for s in member_of if s not in now_in],
                    profiles.consents(state, "marketing", _cfg.profiles),
                )
            )
            if now:
                state["segments"] = now
            else:
                state.pop("segments", None)
            changed = True
    if tombstone:
        out.writes.append((key.encode(), None))  # erased, nothing since: a tombstone
    elif n or changed:
        out.writes.append((key.encode(), profiles.encode(state)))
        out.states[key] = state
    if n and _keep_history:
        rows = history.rows_of(key, out.events[start:])
        out.history.extend(rows)
        out.interactions += len(rows)
    if attr is not None:
        if attr.changed:
            out.attributions.append((attribution.row_key(key), attr.encode()))
        out.tally.merge(tally)
    out.applied += n
    out.vetoed += len(vetoed)
    out.skipped += len(todo) - n - len(vetoed)
    out.onward.extend(onward)
    return True


def fold_batch(table_store: store.TableStore, partition: int, events: list[Event]) -> Folded:
    """Apply ``events`` (all of one partition) to their profiles, in memory.

    Each profile is read once and its new value is returned in ``writes``, to be written once.
    ``onward`` holds events to publish next: they stitch sessions across partitions
    (``identify``/``alias`` sends a link to the anonymous profile, which sends its content
    back as a merge and forwards its later events); they are sent again on redelivery and
    their event ids make that harmless. An event that cannot be applied lands in ``failed``
    and the visitor's other events still count.
    """
    by_user: dict[str, list[Event]] = {}
    for e in events:
        by_user.setdefault(event_key(e), []).append(e)
    out = Folded()
    stored = table_store.get_many(partition, [key.encode() for key in by_user])
    attributed = (
        {key for key, evs in by_user.items() if any(e["type"] in _ATTRIBUTED for e in evs)}
        if _attributing
        else set()
    )
    attr_rows = dict(
        zip(
            attributed,
            table_store.get_many(partition, [attribution.row_key(key) for key in attributed]),
            strict=True,
        )
    )
    for (key, evs), raw in zip(by_user.items(), stored, strict=True):
        attr_raw, attr_on = attr_rows.get(key), key in attributed
        try:
            _fold_user(key, raw, evs, out, attr_raw, attributed=attr_on)
        except Exception:
            # Find the culprits one by one; the state is rebuilt from the stored value.
            good: list[Event] = []
            for e in evs:
                try:
                    _fold_user(key, raw, [*good, e], Folded(), attr_raw, attributed=attr_on)
                except Exception as exc:
                    _log.warning(
                        "event cannot be applied",
                        user_id=key,
                        event_id=e["event_id"],
                        error=repr(exc),
                    )
                    out.failed.append((profiles.wire(e), f"cannot apply event: {exc!r}"))
                else:
                    good.append(e)
            _fold_user(key, raw, good, out, attr_raw, attributed=attr_on)
    # An erased visitor's interaction history goes with the profile (events applied after
    # the erasure in this round are not stored yet, and stay).
    for user, _request in out.erased:
        out.history[:0] = [
            (row, None) for row in history.user_keys(table_store.db(partition), user)
        ]
    if out.tally:
        out.attributions.extend(_kpi_rows(table_store, partition, out.tally))
    if out.memberships:
        out.size_rows = _size_rows(table_store, partition, out.memberships, out.segment_moves)
    if out.signals.updates:
        live = _live[partition]
        missing = live.missing(out.signals.updates)
        for row_key, row_raw in zip(missing, table_store.get_many(partition, missing), strict=True):
            live.load(row_key, row_raw)
        live.apply(out.signals)
    return out


def _size_rows(
    table_store: store.TableStore,
    partition: int,
    changes: list[Membership],
    moves: dict[str, list[int]],
) -> list[tuple[bytes, bytes | None]]:
    """The rows of the segments' new sizes after ``changes``.

    ``moves`` receives, per segment, the visitors who entered it and who left it.
    """
    rows: list[tuple[bytes, bytes | None]] = []
    for change in changes:
        for segment in change.added:
            moves.setdefault(segment, [0, 0])[0] += 1
        for segment in change.removed:
            moves.setdefault(segment, [0, 0])[1] += 1
    names = sorted(moves)
    keys = [segments.size_key(name) for name in names]
    for name, key, raw in zip(names, keys, table_store.get_many(partition, keys), strict=True):
        entered, left = moves[name]
        size = max((0 if raw is None else int(raw)) + entered - left, 0)
        rows.append((key, str(size).encode() if size else None))
    return rows


def _kpi_rows(
    table_store: store.TableStore, partition: int, tally: attribution.Tally
) -> list[tuple[bytes, bytes | None]]:
    """The partition's KPI rows with ``tally`` added; as a new day starts, expired ones deleted."""
    days = sorted(tally.days)
    keys = [attribution.kpi_key(day) for day in days]
    rows: list[tuple[bytes, bytes | None]] = [
        (key, tally.added_to(day, raw))
        for day, key, raw in zip(days, keys, table_store.get_many(partition, keys), strict=True)
    ]
    tested = list(tally.experiments)
    keys = [attribution.experiment_key(experiment) for experiment in tested]
    rows.extend(
        (key, tally.experiment_added_to(experiment, raw))
        for experiment, key, raw in zip(
            tested, keys, table_store.get_many(partition, keys), strict=True
        )
    )
    if days and days[-1] > _kpi_day.get(partition, ""):
        _kpi_day[partition] = days[-1]
        held = (k for k, _v in store.prefixed(table_store.db(partition), attribution.KPI_PREFIX))
        rows.extend(
            (key, None)
            for key in attribution.expired_kpi_keys(held, days[-1], _cfg.attribution.kpi_days)
        )
    return rows


async def flush_signals(
    partitions: Collection[int] | None = None, *, drop: bool = False, spread_s: float = 0.0
) -> None:
    """Write the changed signal rows (of ``partitions``, default all) to the table.

    Args:
        partitions: which partitions; None for every one held.
        drop: forget the rows afterwards (the partitions moved to another worker).
        spread_s: spread the writes over about this long, in slices of `_FLUSH_SLICE` rows:
            thousands of rows change between two flushes, and writing them at once would hold
            up every event behind them for a moment. A flush without it (partitions moving,
            the worker stopping) makes a spread one run on without pauses.
    """
    if spread_s <= 0:
        _hurry.set()
    try:
        await _flush(partitions, drop, spread_s)
    finally:
        if spread_s <= 0:
            _hurry.clear()


async def _flush(partitions: Collection[int] | None, drop: bool, spread_s: float) -> None:
    async with _flush_lock:  # one flush at a time: an older row never overwrites a newer one
        held = list(_live if partitions is None else partitions)
        dirty = {p: dict.fromkeys(_live[p].take_dirty_keys()) for p in held if p in _live}
        # Slices go by row key, each key with its rows of every partition: readers then hear
        # of a row once per flush (and rank it again once), right after all of it is written.
        slices: list[list[bytes]] = [[]]
        rows_in_slice = 0
        for key in dict.fromkeys(key for rows in dirty.values() for key in rows):
            if rows_in_slice >= _FLUSH_SLICE:
                slices.append([])
                rows_in_slice = 0
            slices[-1].append(key)
            rows_in_slice += sum(1 for rows in dirty.values() if key in rows)
        count = len(slices) if slices[0] else 0
        pause_s = min(spread_s / count, _MAX_FLUSH_PAUSE_S) if count and spread_s > 0 else 0.0
        for keys in slices[:count]:
            for partition, rows in dirty.items():
                mine = [key for key in keys if key in rows]
                if not mine:
                    continue
                writes: list[tuple[bytes, bytes | None]] = list(_live[partition].encode(mine))
                await until_done(
                    "signal flush", functools.partial(_store.put_many, partition, writes)
                )
            signals_changed(keys)
            failpoint("signal_flush")
            if pause_s > 0 and not _hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_hurry.wait(), pause_s)
            else:
                await asyncio.sleep(0)
        for partition in dirty:
            _live[partition].trim()
            if drop:
                _live.pop(partition, None)
        SIGNAL_ROWS_CACHED.labels("rows").set(sum(len(live.rows) for live in _live.values()))
        SIGNAL_ROWS_CACHED.labels("neighbours").set(
            sum(live.neighbours() for live in _live.values())
        )


_flushing: set[asyncio.Task[None]] = set()


def _flush_behind() -> None:
    """Start a flush of the signal rows unless one runs: the agent goes on folding meanwhile."""
    if _flushing:
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
    flushed = time.monotonic()
    async for batch in stream.take_events(_cfg.worker.ingest_batch, within=0.002):
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
                dead.append(
                    _dead_letter_record(f"cannot read routed message: {exc!r}", source, raw)
                )
                continue
            by_partition[message.partition].extend(events)
        vetoed = await _consent_gates(by_partition)
        received = [e for evs in by_partition.values() for e in evs]
        attach_categories(received)
        await attach_chat_vectors(received)
        folds = {p: fold_batch(_store, p, evs) for p, evs in by_partition.items()}
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
        if time.monotonic() - flushed >= _cfg.recommend.signal_flush_interval_s:
            _flush_behind()
            flushed = time.monotonic()
        for partition, end in note_lag("profile", (e.message for e in batch)).items():
            _note_end_offset(partition, end)


_announcing: set[asyncio.Future[None]] = set()


def _announce(changes: list[Membership], moves: dict[str, list[int]]) -> None:
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
    """Write changed signal rows also when no events arrive."""
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
        await flush_signals()
