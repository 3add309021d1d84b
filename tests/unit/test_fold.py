"""The profile agent's fold and flush, apart from Faust: over a RocksDB database of its own."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from rocksdict import Options, Rdict

from personify.agents.fold import FLUSH_SHARE, FLUSH_SLICE, Folded, Folder, FoldSettings
from personify.engine.config import Config
from personify.engine.metrics import REGISTRY
from personify.engine.models import internal_event
from personify.tables import attribution, history, profiles, segments, signals
from personify.tables.segments import Registry
from personify.tables.store import write_batch

T0 = 1_700_000_000_000


class DbStore:
    """One RocksDB database per partition, read as the engine's table store reads."""

    def __init__(self, root: Path, partitions: int = 2) -> None:
        options = Options(raw_mode=True)
        self.dbs = {p: Rdict(str(root / f"p{p}"), options) for p in range(partitions)}

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        db = self.dbs[partition]
        return [db.get(key) for key in keys]

    def db(self, partition: int) -> Any:
        return self.dbs[partition]

    def write(self, partition: int, rows: list[tuple[bytes, bytes | None]]) -> None:
        self.dbs[partition].write(write_batch(rows))

    def apply(self, partition: int, out: Folded) -> None:
        """Write what a round produced, as the profile agent does."""
        self.write(partition, [*out.writes, *out.history, *out.attributions, *out.size_rows])

    def close(self) -> None:
        for db in self.dbs.values():
            db.close()


@pytest.fixture
def store(tmp_path: Path) -> Any:
    found = DbStore(tmp_path)
    yield found
    found.close()


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "segments.json")


def _folder(registry: Registry, *, keep_history: bool = True) -> Folder:
    cfg = Config()
    return Folder(
        FoldSettings(cfg, registry, category_of=lambda _item: None, keep_history=keep_history)
    )


def _event(eid: str, user: str, etype: str, ts: int, item: str | None = None, **props: Any) -> Any:
    return {
        "event_id": eid,
        "type": etype,
        "user_id": user,
        "anonymous_id": None,
        "item_id": item,
        "ts_ms": ts,
        "properties": props,
    }


def _profile(store: DbStore, partition: int, user: str) -> dict[str, Any]:
    raw = store.get_many(partition, [user.encode()])[0]
    assert raw is not None
    return profiles.decode(raw)


def test_each_visitor_is_read_and_written_once_and_a_replay_adds_nothing(
    store: DbStore, registry: Registry
) -> None:
    """Five events of two visitors: two profile writes, five history rows; again: nothing."""
    folder = _folder(registry)
    events = [
        _event("e1", "u1", "product_view", T0, "a"),
        _event("e2", "u2", "product_view", T0 + 1, "a"),
        _event("e3", "u1", "product_view", T0 + 2, "b"),
        _event("e4", "u2", "add_to_cart", T0 + 3, "b", quantity=1, price=5.0),
        _event("e5", "u1", "product_view", T0 + 4, "c"),
    ]
    out = folder.fold_batch(store, 0, events)
    assert (out.applied, out.skipped, out.failed) == (5, 0, [])
    assert sorted(key for key, _value in out.writes) == [b"u1", b"u2"]
    assert len(out.history) == out.interactions == 5
    # Visitor by visitor (in the order they first came), each visitor's events in order.
    assert [e["event_id"] for e in out.events] == ["e1", "e3", "e5", "e2", "e4"]
    store.apply(0, out)
    assert _profile(store, 0, "u1")["counts"]["product_view"] == 3
    assert _profile(store, 0, "u2")["counts"]["add_to_cart"] == 1
    again = folder.fold_batch(store, 0, events)
    assert (again.applied, again.skipped) == (0, 5)
    assert again.writes == [] and again.history == [] and again.interactions == 0
    assert _profile(store, 0, "u1")["counts"]["product_view"] == 3


def test_without_the_model_no_history_is_kept(store: DbStore, registry: Registry) -> None:
    """``keep_history`` off ([model] enabled = false): profiles change, no history row."""
    out = _folder(registry, keep_history=False).fold_batch(
        store, 0, [_event("e1", "u1", "product_view", T0, "a")]
    )
    assert out.applied == 1 and out.history == [] and out.interactions == 0


def test_an_event_that_cannot_be_applied_fails_alone(store: DbStore, registry: Registry) -> None:
    """A purchase whose lines are not objects fails; the visitor's other events count."""
    folder = _folder(registry)
    events = [
        _event("e1", "u1", "product_view", T0, "a"),
        _event("e2", "u1", "purchase", T0 + 1, items=[None], revenue=5.0, currency="USD"),
        _event("e3", "u1", "product_view", T0 + 2, "b"),
    ]
    out = folder.fold_batch(store, 0, events)
    assert [e["event_id"] for e, _why in out.failed] == ["e2"]
    assert "cannot apply event" in out.failed[0][1]
    assert out.applied == 2
    store.apply(0, out)
    assert _profile(store, 0, "u1")["counts"] == {"product_view": 2}


def test_a_segment_is_entered_and_left_on_the_events_and_its_size_follows(
    store: DbStore, registry: Registry
) -> None:
    """``views >= 2``: entered on the second view, left on the erasure; the size row follows."""
    registry.put("fans", {"rule": "views >= 2"}, T0)
    folder = _folder(registry)
    first = folder.fold_batch(store, 1, [_event("e1", "u1", "product_view", T0, "a")])
    assert first.memberships == [] and first.size_rows == []
    store.apply(1, first)
    second = folder.fold_batch(store, 1, [_event("e2", "u1", "product_view", T0 + 1, "b")])
    [change] = second.memberships
    assert (change.visitor, change.segments, change.added, change.removed) == (
        "u1",
        ["fans"],
        ["fans"],
        [],
    )
    assert second.size_rows == [(segments.size_key("fans"), b"1")]
    assert second.segment_moves == {"fans": [1, 0]}
    store.apply(1, second)
    assert _profile(store, 1, "u1")["segments"] == ["fans"]
    erase = internal_event(
        profiles.ERASE,
        "$erase:u1",
        user_id="u1",
        anonymous_id=None,
        ts_ms=T0 + 2,
        properties={"request_id": "r1"},
    )
    erased = folder.fold_batch(store, 1, [erase])
    assert erased.erased == [("u1", "r1")]
    [change] = erased.memberships
    assert (change.segments, change.removed) == ([], ["fans"])
    assert erased.size_rows == [(segments.size_key("fans"), None)]
    assert (b"u1", None) in erased.writes
    # The visitor's interaction history goes with them.
    rows = history.user_keys(store.db(1), "u1")
    assert len(rows) == 2 and {key for key, _v in erased.history} == set(rows)
    store.apply(1, erased)
    assert store.get_many(1, [b"u1"]) == [None]
    assert history.user_keys(store.db(1), "u1") == []


def test_a_sweeps_request_evaluates_every_rule_again(store: DbStore, registry: Registry) -> None:
    """A rule added after the visitor's events is applied on the sweep's `RESEGMENT` event."""
    folder = _folder(registry)
    store.apply(0, folder.fold_batch(store, 0, [_event("e1", "u1", "product_view", T0, "a")]))
    registry.put("viewers", {"rule": "views >= 1"}, T0)
    request = internal_event(
        segments.RESEGMENT, "$segments:1", user_id="u1", ts_ms=T0 + 1, properties={}
    )
    out = folder.fold_batch(store, 0, [request])
    assert [m.added for m in out.memberships] == [["viewers"]]
    assert out.applied == 0 and [key for key, _v in out.writes] == [b"u1"]


def test_the_flush_writes_each_changed_row_once_then_nothing(
    store: DbStore, registry: Registry
) -> None:
    """Rows changed by a round are written by the next flush, slice by slice, and heard of."""
    folder = _folder(registry)
    out = folder.fold_batch(
        store,
        0,
        [
            _event("e1", "u1", "product_view", T0, "a"),
            _event("e2", "u1", "product_view", T0 + 60_000, "b"),
        ],
    )
    changed = set(out.signals.updates)
    assert signals.row_key("covisit", "a") in changed
    written: dict[int, dict[bytes, bytes | None]] = {}
    heard: list[bytes] = []

    async def write(partition: int, rows: list[tuple[bytes, bytes | None]]) -> None:
        written.setdefault(partition, {}).update(rows)
        store.write(partition, rows)

    asyncio.run(folder.flush(write, heard.extend))
    assert set(written) == {0} and set(written[0]) == changed == set(heard)
    # The gauge of the neighbours held counts every held row's (sliced over the loop's turns).
    held = REGISTRY.get_sample_value("personify_signal_rows_cached", {"what": "neighbours"})
    assert held == folder.live[0].neighbours() > len(changed)
    row = signals.decode_row(store.get_many(0, [signals.row_key("covisit", "a")])[0])
    assert set(row["s"]) == {"b"} and row["s"]["b"] > 0
    # Nothing changed since: the next flush writes nothing.
    written.clear()
    heard.clear()
    asyncio.run(folder.flush(write, heard.extend))
    assert written == {} and heard == []
    # A later round adds to the stored rows (read back into memory), it does not replace them.
    more = _folder(registry)
    more.fold_batch(
        store,
        0,
        [
            _event("e3", "u2", "product_view", T0 + 120_000, "a"),
            _event("e4", "u2", "product_view", T0 + 180_000, "b"),
        ],
    )
    asyncio.run(more.flush(write, heard.extend, drop=True))
    again = signals.decode_row(store.get_many(0, [signals.row_key("covisit", "a")])[0])
    assert again["n"] > row["n"]
    assert 0 not in more.live  # dropped: the partition moved away


def test_a_flush_that_falls_behind_catches_up_in_larger_steps(
    store: DbStore, registry: Registry
) -> None:
    """Past twice its spread a flush writes several slices at a time, each partition at once."""
    rounds: dict[str, list[tuple[int, int]]] = {}
    for spread_s in (0.0, 1e-9):  # at once (stopping); already late (a flood)
        folder = _folder(registry)
        for partition in (0, 1):
            events = [
                _event(f"e{partition}-{n}", f"u{n}", "product_view", T0 + n, f"i{n}")
                for n in range(FLUSH_SLICE * 6)
            ]
            folder.fold_batch(store, partition, events)
        writes: list[tuple[int, int]] = []
        heard: list[bytes] = []

        async def write(partition: int, rows: list[tuple[bytes, bytes | None]]) -> None:
            await asyncio.sleep(0)
            writes.append((partition, len(rows)))  # noqa: B023 - called before the loop goes on
            store.write(partition, rows)

        asyncio.run(folder.flush(write, heard.extend, spread_s=spread_s))
        assert len(heard) == len(set(heard)) > FLUSH_SLICE * 6  # every row heard of once
        rounds[str(spread_s)] = writes
    at_once, late = rounds["0.0"], rounds["1e-09"]
    assert max(n for _p, n in at_once) <= FLUSH_SLICE
    assert max(n for _p, n in late) > FLUSH_SLICE  # slices written together
    assert len(late) < len(at_once)
    assert {p for p, _n in late} == {0, 1}


def test_a_spread_flush_is_due_again_once_its_work_is_a_small_share_of_the_time(
    store: DbStore, registry: Registry
) -> None:
    """The next periodic flush waits for the interval, and for its work to be `FLUSH_SHARE`."""
    folder = _folder(registry)
    assert folder.flush_due(5.0)  # none yet
    events = [
        _event(f"e{n}", f"u{n % 7}", "product_view", T0 + n, f"i{n}")
        for n in range(FLUSH_SLICE * 3)
    ]
    folder.fold_batch(store, 0, events)
    slices: list[int] = []

    async def write(partition: int, rows: list[tuple[bytes, bytes | None]]) -> None:
        await asyncio.sleep(0.01)  # each slice's write takes at least this
        slices.append(len(rows))
        store.write(partition, rows)

    asyncio.run(folder.flush(write, lambda _keys: None, spread_s=1e-6))
    began, work = folder.flush_began, folder.flush_work_s
    assert slices and work >= 0.01 * len(slices)
    wait = work / FLUSH_SHARE
    assert not folder.flush_due(0.0, now=began + wait * 0.99)
    assert folder.flush_due(0.0, now=began + wait)
    assert not folder.flush_due(wait * 2, now=began + wait)  # the interval holds too
    # A flush at once (stopping, partitions moving) leaves the schedule as it was.
    folder.fold_batch(store, 0, [_event("x", "u1", "product_view", T0 + 10**6, "j")])
    asyncio.run(folder.flush(write, lambda _keys: None))
    assert (folder.flush_began, folder.flush_work_s) == (began, work)


def test_kpi_rows_are_written_with_the_profiles(store: DbStore, registry: Registry) -> None:
    """An outcome with a recommendation id counts in the day's KPI row, in the same round."""
    folder = _folder(registry)
    exposure = _event(
        "x1",
        "u1",
        "$exposure",
        T0,
        recommendation_id="r1",
        items=["a", "b"],
        variant="default",
        sources=["covisit", "trending"],
    )
    click = _event("c1", "u1", "click", T0 + 1000, "a", recommendation_id="r1")
    out = folder.fold_batch(store, 0, [exposure, click])
    assert out.failed == []
    assert out.tally
    kpis = {key: value for key, value in out.attributions if key.startswith(attribution.KPI_PREFIX)}
    assert len(kpis) == 1
    [row] = kpis.values()
    assert row is not None and orjson.loads(row)
    assert attribution.row_key("u1") in {key for key, _value in out.attributions}
