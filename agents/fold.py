"""Folding one partition's events into profiles, in memory, and flushing the signal rows.

The profile agent's own work, apart from Faust and the configuration: a `Folder` is made from
the settings it needs (`FoldSettings`) and reads through any `Store` (the engine's
`personify.tables.store.TableStore`, or a RocksDB database of one's own), so the fold and the
flush run in a unit test as they run in the engine. `personify.agents.profile` owns one
`Folder` per process and writes what it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol

import orjson

from personify.engine.config import Config
from personify.engine.failpoints import failpoint
from personify.engine.gcpause import collection_paused
from personify.engine.logging import get_logger
from personify.engine.metrics import SIGNAL_ROWS_CACHED
from personify.engine.models import Event, event_key, internal_event
from personify.tables import attribution, history, profiles, segments, signals, store
from personify.tables.propensity import Propensity

__all__ = ["FoldSettings", "Folded", "Folder", "Membership", "Store"]

_log = get_logger(__name__)

#: Signal rows encoded and written per turn of the event loop in a flush, and the longest pause
#: between two slices of a flush spread over time.
FLUSH_SLICE: Final = 100
MAX_FLUSH_PAUSE_S: Final = 0.25
#: A spread flush that has run twice its spread (a flood of events: each write waited for a
#: round of the fold) writes this many slices at a time, every partition's at once, without
#: pauses, to catch up.
BEHIND_SLICES: Final = 4
#: Signal rows whose neighbours are counted per turn of the event loop (for the gauge).
NEIGHBOURS_SLICE: Final = 2_000
#: A spread flush's own work (encoding and writing its rows, not its pauses) is held to about
#: this share of the time: the next one is due once the last one's work is at most this share
#: of the time since it began (`Folder.flush_due`), and the flush interval has passed. In a
#: flood of events nearly every row changes between two flushes, and the rows fill toward
#: their cap: written every interval, they took a third to half of ingestion's time, more as
#: they filled.
FLUSH_SHARE: Final = 0.1

#: A visitor's attribution row is read for a round with one of these events.
_ATTRIBUTED = attribution.OUTCOMES | {
    attribution.EXPOSURE,
    profiles.MERGE,
    profiles.LINK,
    profiles.ERASE,
    "consent",
}
#: What an exposure's fold reads of a stored profile.
_EXPOSURE_READS = re.compile(rb'"(?:consent|alias_of)"')


class Store(Protocol):
    """What the fold reads: rows of a partition by key, and the partition's database."""

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        """The values of ``keys`` in ``partition`` (None where there is none)."""

    def db(self, partition: int) -> Any:
        """The partition's RocksDB database (for scans by prefix)."""


@dataclass(frozen=True, slots=True)
class FoldSettings:
    """What folding reads besides the events and the stored rows.

    Attributes:
        cfg: the engine's settings ([profiles], [recommend], [attribution], [events]).
        registry: the rule segments, evaluated as profiles change.
        category_of: the catalog's category of an item id (events without one get it).
        propensity: the learned propensity scores in use (None before the first training).
        shop_clock: the shop's time (ms) at a wall-clock time (ms): a backfill's clock.
        keep_history: whether item interactions are kept for the learned model.
        attributing: whether lists served are joined to what visitors do next.
    """

    cfg: Config
    registry: segments.Registry
    category_of: Callable[[str], str | None]
    propensity: Callable[[], Propensity | None] = lambda: None
    shop_clock: Callable[[int], int] = lambda wall_ms: wall_ms
    keep_history: bool = True
    attributing: bool = True

    @classmethod
    def of(
        cls,
        cfg: Config,
        registry: segments.Registry,
        category_of: Callable[[str], str | None],
        propensity: Callable[[], Propensity | None],
        shop_clock: Callable[[int], int],
    ) -> FoldSettings:
        """The settings ``cfg`` names ([model] enabled, [attribution] enabled)."""
        return cls(
            cfg,
            registry,
            category_of,
            propensity,
            shop_clock,
            keep_history=cfg.model.enabled,
            attributing=cfg.attribution.enabled,
        )


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

    #: The signal contributions of the events applied.
    signals: signals.SignalBatch
    applied: int = 0
    skipped: int = 0
    vetoed: int = 0
    #: (visitor, erasure request id) erased in this round.
    erased: list[tuple[str, str]] = field(default_factory=list)
    onward: list[Event] = field(default_factory=list)
    writes: list[tuple[bytes, bytes | None]] = field(default_factory=list)
    #: The events applied (new), in order.
    events: list[Event] = field(default_factory=list)
    #: The new profile of each visitor written (not of those erased), as stored: handed on as
    #: bytes, a round's profiles make no garbage-collected objects that outlive the round.
    states: dict[str, bytes] = field(default_factory=dict)
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


def _only_exposures(evs: list[Event]) -> bool:
    return all(e["type"] == attribution.EXPOSURE for e in evs)


class Folder:
    """Folds a worker's events into profiles, and holds its signal rows until they are flushed.

    Args:
        settings: what folding reads besides the events (`FoldSettings`).
    """

    def __init__(self, settings: FoldSettings) -> None:
        self.settings = settings
        cfg = settings.cfg
        self._numbers = signals.ItemNumbers()
        #: Per partition, the signal rows (held compactly), and which changed since the flush.
        self.live: defaultdict[int, signals.LiveRows] = defaultdict(
            lambda: signals.LiveRows(cfg.recommend, numbers=self._numbers)
        )
        #: Per partition, the newest day whose KPI row it wrote (older ones expire as days start).
        self._kpi_day: dict[int, str] = {}
        self._flush_lock = asyncio.Lock()
        #: Set while a flush that must not wait (partitions moving, stopping) waits for the lock.
        self._hurry = asyncio.Event()
        #: When the last spread flush began (`time.monotonic`), and how long its own work took.
        self.flush_began = -math.inf
        self.flush_work_s = 0.0

    def flush_due(self, interval_s: float, now: float | None = None) -> bool:
        """Whether a spread flush is due (see `FLUSH_SHARE`).

        It is once ``interval_s`` passed since the last one began, and long enough for that
        one's work to be at most `FLUSH_SHARE` of the time since.
        """
        now = time.monotonic() if now is None else now
        return now - self.flush_began >= max(interval_s, self.flush_work_s / FLUSH_SHARE)

    def _folded(self) -> Folded:
        cfg = self.settings.cfg
        return Folded(signals.SignalBatch(cfg.recommend, cfg.profiles, self.settings.category_of))

    def fold_batch(self, table_store: Store, partition: int, events: list[Event]) -> Folded:
        """Apply ``events`` (all of one partition) to their profiles, in memory.

        Each profile is read once and its new value is returned in ``writes``, to be written
        once. ``onward`` holds events to publish next: they stitch sessions across partitions
        (``identify``/``alias`` sends a link to the anonymous profile, which sends its content
        back as a merge and forwards its later events); they are sent again on redelivery and
        their event ids make that harmless. An event that cannot be applied lands in
        ``failed`` and the visitor's other events still count.
        """
        with collection_paused():  # the decoded profiles make no cycles: nothing to collect
            return self._fold_batch(table_store, partition, events)

    def _fold_batch(self, table_store: Store, partition: int, events: list[Event]) -> Folded:
        by_user: dict[str, list[Event]] = {}
        for e in events:
            by_user.setdefault(event_key(e), []).append(e)
        out = self._folded()
        stored = table_store.get_many(partition, [key.encode() for key in by_user])
        attributed = (
            {key for key, evs in by_user.items() if any(e["type"] in _ATTRIBUTED for e in evs)}
            if self.settings.attributing
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
                self._fold_user(key, raw, evs, out, attr_raw, attributed=attr_on)
            except Exception:
                # Find the culprits one by one; the state is rebuilt from the stored value.
                good: list[Event] = []
                for e in evs:
                    try:
                        self._fold_user(
                            key, raw, [*good, e], self._folded(), attr_raw, attributed=attr_on
                        )
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
                self._fold_user(key, raw, good, out, attr_raw, attributed=attr_on)
        # An erased visitor's interaction history goes with the profile (events applied after
        # the erasure in this round are not stored yet, and stay).
        for user, _request in out.erased:
            out.history[:0] = [
                (row, None) for row in history.user_keys(table_store.db(partition), user)
            ]
        if out.tally:
            out.attributions.extend(self._kpi_rows(table_store, partition, out.tally))
        if out.memberships:
            out.size_rows = _size_rows(table_store, partition, out.memberships, out.segment_moves)
        if out.signals.updates:
            live = self.live[partition]
            missing = live.missing(out.signals.updates)
            found = table_store.get_many(partition, missing)
            for row_key, row_raw in zip(missing, found, strict=True):
                live.load(row_key, row_raw)
            live.apply(out.signals)
        return out

    def _attributor(self, attr: attribution.Attribution) -> Any:
        """What `profiles.apply_events` calls to join ``attr``'s visitor's events to exposures."""
        cfg = self.settings.cfg.profiles

        def attribute(p: profiles.Profile, e: Event) -> None:
            if not profiles.consents(p, "analytics", cfg):
                attr.clear()  # without analytics consent nothing is kept and nothing counts
            elif e["type"] == profiles.MERGE:
                attr.merged(e["properties"].get("attribution") or {})
            else:
                attr.segments = p.get("segments", [])
                attr.observe(e)

        return attribute

    def _fold_user(
        self,
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
        settings = self.settings
        cfg = settings.cfg
        rules = settings.registry
        if raw is None or (attributed and _only_exposures(evs) and not _EXPOSURE_READS.search(raw)):
            # Exposures read nothing of the profile but the consent and the link to a user, and
            # neither is recorded here: it folds like a new profile (decoding a large profile
            # costs more than the rest of an exposure's fold). Nothing of the profile is
            # written. Its segments count its KPIs: they are read alone.
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
            attribution.Attribution(attr_raw, cfg.attribution, tally, cfg.events.default_currency)
            if attributed
            else None
        )
        changed = False
        todo: list[Event] = []
        onward: list[Event] = []
        for e in evs:
            etype = e["type"]
            if etype == segments.RESEGMENT:  # a sweep found the membership out of date
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
            cfg.profiles,
            observe=out.signals.observe,
            chat_half_life_s=cfg.recommend.chat_half_life_s,
            vetoed=vetoed,
            applied=out.events,
            attribute=None if attr is None else self._attributor(attr),
        )
        tombstone = bool(out.erased and out.erased[-1][0] == key and not n)
        if (member_of or rules.compiled.ids) and (tombstone or n or changed or reevaluate):
            wall = int(time.time() * 1000)
            # Only the rules the events applied may change are evaluated again; a sweep's
            # request, a merge or the engine's own events evaluate every rule.
            types: frozenset[str] | None = frozenset(e["type"] for e in out.events[start:])
            if reevaluate or changed or any(t.startswith("$") for t in types or ()):
                types = None
            now = (
                []
                if tombstone
                else rules.members(
                    state,
                    cfg.profiles,
                    wall,
                    settings.propensity(),
                    settings.shop_clock(wall),
                    types,
                )
            )
            if not tombstone:
                state["segments_of"] = rules.digest
            if now != member_of:
                was, now_in = set(member_of), set(now)
                out.memberships.append(
                    Membership(
                        key,
                        now,
                        [s for s in now if s not in was],
                        [s for s in member_of if s not in now_in],
                        profiles.consents(state, "marketing", cfg.profiles),
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
            stored = profiles.encode(state)
            out.writes.append((key.encode(), stored))
            out.states[key] = stored
        if n and settings.keep_history:
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

    def _kpi_rows(
        self, table_store: Store, partition: int, tally: attribution.Tally
    ) -> list[tuple[bytes, bytes | None]]:
        """The partition's KPI rows with ``tally`` added; as a day starts, expired ones deleted."""
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
        if days and days[-1] > self._kpi_day.get(partition, ""):
            self._kpi_day[partition] = days[-1]
            db = table_store.db(partition)
            held = (k for k, _v in store.prefixed(db, attribution.KPI_PREFIX))
            kpi_days = self.settings.cfg.attribution.kpi_days
            rows.extend(
                (key, None) for key in attribution.expired_kpi_keys(held, days[-1], kpi_days)
            )
        return rows

    async def flush(
        self,
        write: Callable[[int, list[tuple[bytes, bytes | None]]], Awaitable[None]],
        written: Callable[[list[bytes]], None],
        partitions: Collection[int] | None = None,
        *,
        drop: bool = False,
        spread_s: float = 0.0,
    ) -> None:
        """Write the changed signal rows (of ``partitions``, default all) with ``write``.

        Args:
            write: writes one partition's rows (and retries until they are written).
            written: hears of each slice's row keys once they are written in every partition.
            partitions: which partitions; None for every one held.
            drop: forget the rows afterwards (the partitions moved to another worker).
            spread_s: spread the writes over about this long, in slices of `FLUSH_SLICE` rows:
                thousands of rows change between two flushes, and writing them at once would
                hold up every event behind them for a moment. A flush without it (partitions
                moving, the worker stopping) makes a spread one run on without pauses; one that
                has run twice as long goes on `BEHIND_SLICES` slices at a time, each with every
                partition's rows written at once.
        """
        if spread_s <= 0:
            self._hurry.set()
        try:
            await self._flush(write, written, partitions, drop, spread_s)
        finally:
            if spread_s <= 0:
                self._hurry.clear()

    async def _flush(
        self,
        write: Callable[[int, list[tuple[bytes, bytes | None]]], Awaitable[None]],
        written: Callable[[list[bytes]], None],
        partitions: Collection[int] | None,
        drop: bool,
        spread_s: float,
    ) -> None:
        live = self.live
        async with self._flush_lock:  # one at a time: an older row never overwrites a newer one
            held = list(live if partitions is None else partitions)
            dirty = {p: dict.fromkeys(live[p].take_dirty_keys()) for p in held if p in live}
            # Slices go by row key, each key with its rows of every partition: readers then
            # hear of a row once per flush (and rank it again once), right after all of it is
            # written.
            slices = _slices(dirty.values())
            count = len(slices) if slices[0] else 0
            pause_s = min(spread_s / count, MAX_FLUSH_PAUSE_S) if count and spread_s > 0 else 0.0
            began = time.monotonic()
            late = began + 2 * spread_s
            work_s = 0.0
            at = 0
            while at < count:
                started = time.perf_counter()
                behind = spread_s > 0 and time.monotonic() > late
                keys = list(itertools.chain(*slices[at : at + (BEHIND_SLICES if behind else 1)]))
                at += BEHIND_SLICES if behind else 1
                writes = [
                    (partition, mine)
                    for partition, rows in dirty.items()
                    if (mine := [key for key in keys if key in rows])
                ]
                if behind:  # every partition's rows at once: one wait, not one per partition
                    await asyncio.gather(
                        *(write(p, list(live[p].encode(mine))) for p, mine in writes)
                    )
                else:
                    for partition, mine in writes:
                        await write(partition, list(live[partition].encode(mine)))
                written(keys)
                work_s += time.perf_counter() - started
                failpoint("signal_flush")
                if pause_s > 0 and not behind and not self._hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), pause_s)
                else:
                    await asyncio.sleep(0)
            if spread_s > 0:
                self.flush_began, self.flush_work_s = began, work_s
            for partition in dirty:
                live[partition].trim()
                if drop:
                    live.pop(partition, None)
            if count or drop:  # rows were written (merged, pruned) or dropped
                SIGNAL_ROWS_CACHED.labels("rows").set(sum(len(rows.rows) for rows in live.values()))
                SIGNAL_ROWS_CACHED.labels("neighbours").set(await _neighbours(live.values()))


async def _neighbours(live: Iterable[signals.LiveRows]) -> int:
    """`signals.LiveRows.neighbours` over ``live``, a slice of rows at a time.

    Counted at once, 100,000 rows held the event loop for some 100 ms at every flush.
    """
    held = list(itertools.chain.from_iterable(rows.rows.values() for rows in live))
    total = len(held)
    for start in range(0, len(held), NEIGHBOURS_SLICE):
        total += sum(map(len, held[start : start + NEIGHBOURS_SLICE]))
        await asyncio.sleep(0)
    return total


def _slices(dirty: Iterable[dict[bytes, None]]) -> list[list[bytes]]:
    """The changed rows' keys in slices of about `FLUSH_SLICE` rows (all partitions counted)."""
    per_partition = list(dirty)
    slices: list[list[bytes]] = [[]]
    rows_in_slice = 0
    for key in dict.fromkeys(key for rows in per_partition for key in rows):
        if rows_in_slice >= FLUSH_SLICE:
            slices.append([])
            rows_in_slice = 0
        slices[-1].append(key)
        rows_in_slice += sum(1 for rows in per_partition if key in rows)
    return slices


def _size_rows(
    table_store: Store,
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
