"""The interaction history: rows from applied events, idempotent keys, scans, expiry, erasure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rocksdict import Options, Rdict, WriteBatch

from personify.agents.evaluation import pair_weights
from personify.tables import history


def _event(eid: str, etype: str, ts: int, item: str | None = None, **props: Any) -> Any:
    return {
        "event_id": eid,
        "type": etype,
        "user_id": "u",
        "item_id": item,
        "ts_ms": ts,
        "properties": props,
    }


@pytest.fixture
def db(tmp_path: Path) -> Any:
    store = Rdict(str(tmp_path / "db"), Options(raw_mode=True))
    yield store
    store.close()


def _write(db: Any, rows: list[tuple[bytes, bytes]]) -> None:
    batch = WriteBatch(raw_mode=True)
    for key, value in rows:
        batch.put(key, value)
    db.write(batch)


def test_item_events_become_rows_and_others_do_not() -> None:
    """Views, clicks, cart adds and each purchase line are kept; searches and pages are not."""
    events = [
        _event("e1", "product_view", 1000, "sku-1"),
        _event("e2", "search", 1001, query="boots"),
        _event("e3", "add_to_cart", 1002, "sku-2", quantity=1),
        _event("e4", "purchase", 1003, items=[{"item_id": "sku-2"}, {"item_id": "sku-3"}]),
        _event("e5", "page_view", 1004),
        _event("e6", "click", 1005, "sku-4"),
    ]
    rows = history.rows_of("u", events)
    assert [value for _key, value in rows] == [
        b"vsku-1",
        b"csku-2",
        b"psku-2",
        b"psku-3",
        b"ksku-4",
    ]
    assert all(key.startswith(history.user_prefix("u")) for key, _value in rows)
    assert len({key for key, _value in rows}) == 5


def test_the_same_event_gives_the_same_keys() -> None:
    """Applying an event again (replay, redelivery) writes the same rows, not new ones."""
    e = _event("e1", "purchase", 5000, items=[{"item_id": "a"}, {"item_id": "b"}])
    assert history.rows_of("u", [e]) == history.rows_of("u", [dict(e)])
    other = _event("e2", "purchase", 5000, items=[{"item_id": "a"}])
    assert history.rows_of("u", [other])[0][0] != history.rows_of("u", [e])[0][0]


def test_a_scan_reads_every_partition_and_numbers_visitors_and_items(
    db: Any, tmp_path: Path
) -> None:
    """Rows of two partitions come back as arrays; those past the window behind the newest apart."""
    other = Rdict(str(tmp_path / "db2"), Options(raw_mode=True))
    try:
        _write(db, history.rows_of("alice", [_event("e1", "product_view", 10_000, "x")]))
        _write(
            db, history.rows_of("bob", [_event("e2", "purchase", 20_000, items=[{"item_id": "y"}])])
        )
        old = history.rows_of("bob", [_event("e0", "click", -5, "z")])
        _write(db, old)
        _write(other, history.rows_of("carol", [_event("e3", "add_to_cart", 30_000, "x")]))
        db.put(b"\x00ccovisit-row", b"not history")
        db.put(b"alice", b"a profile")
        rows, expired = history.scan({0: db, 1: other}, keep_ms=30_000)
        assert len(rows) == 3
        assert sorted(rows.users) == ["alice", "bob", "carol"]
        assert sorted(rows.items) == ["x", "y"]  # z only in the expired row
        got = sorted(
            (rows.users[u], rows.items[i], rows.KINDS[k], int(t))
            for u, i, k, t in zip(rows.user, rows.item, rows.kind, rows.ts_ms, strict=True)
        )
        assert got == [
            ("alice", "x", "product_view", 10_000),
            ("bob", "y", "purchase", 20_000),
            ("carol", "x", "add_to_cart", 30_000),
        ]
        assert expired == {0: [old[0][0]]}
        everything, none = history.scan({0: db, 1: other})
        assert len(everything) == 4 and none == {}
        sliced = history.Scan({0: db, 1: other}, keep_ms=30_000)
        steps = 1
        while not sliced.step(1):  # a row at a time, as the trainer reads between its turns
            steps += 1
        assert steps == 5 and len(sliced) == 4  # the last step finds nothing more
        again, expired_again = sliced.result()
        assert (again.users, again.items) == (rows.users, rows.items)
        for column in ("user", "item", "kind", "ts_ms"):
            assert getattr(again, column).tolist() == getattr(rows, column).tolist()
        assert expired_again == expired
    finally:
        other.close()


def test_expired_keys_are_every_stored_key_before_the_window(tmp_path: Path) -> None:
    """The keys given for deletion are exactly the stored rows past the window, per partition.

    Visitor ids of every length and alphabet, times before 1970, and purchases of several lines
    at one time (keys that differ in their digest only).
    """
    rng = np.random.default_rng(7)
    dbs = {p: Rdict(str(tmp_path / f"p{p}"), Options(raw_mode=True)) for p in (0, 3, 9)}
    try:
        stored: dict[int, list[bytes]] = {p: [] for p in dbs}
        ts_of: dict[bytes, int] = {}
        for n in range(400):
            user = f"v{n}-" + "ü" * int(rng.integers(0, 3)) + "x" * int(rng.integers(0, 300))
            events = [
                _event(
                    f"e{n}-{j}",
                    "purchase",
                    int(rng.integers(-50_000, 100_000)),
                    items=[{"item_id": f"i{int(rng.integers(0, 50))}"} for _ in range(3)],
                )
                for j in range(int(rng.integers(1, 4)))
            ]
            part = list(dbs)[n % 3]
            for e in events:
                rows = history.rows_of(user, [e])
                _write(dbs[part], rows)
                stored[part].extend(key for key, _value in rows)
                ts_of.update((key, e["ts_ms"]) for key, _value in rows)
        kept, expired = history.scan(dbs, keep_ms=60_000)
        cutoff = max(ts_of.values()) - 60_000
        want = {
            p: sorted({key for key in keys if ts_of[key] < cutoff}) for p, keys in stored.items()
        }
        assert expired == {p: keys for p, keys in want.items() if keys}
        assert len(kept) == sum(1 for ts in ts_of.values() if ts >= cutoff)
        assert 0 < sum(len(keys) for keys in expired.values()) < len(ts_of)
    finally:
        for store in dbs.values():
            store.close()


def test_a_visitors_rows_are_found_by_their_prefix(db: Any) -> None:
    """Erasure finds exactly the visitor's rows, not those of a visitor whose id extends theirs."""
    mine = history.rows_of(
        "ann", [_event("e1", "product_view", 1, "x"), _event("e2", "click", 2, "y")]
    )
    theirs = history.rows_of("anna", [_event("e3", "product_view", 1, "x")])
    _write(db, mine + theirs)
    assert sorted(history.user_keys(db, "ann")) == sorted(key for key, _v in mine)
    assert history.user_keys(db, "nobody") == []


def test_pairs_keep_the_strongest_interaction() -> None:
    """A (visitor, item) pair weighs what its strongest interaction weighs; zeros drop out."""
    users = np.array([0, 0, 0, 1, 1], dtype=np.int32)
    items = np.array([2, 2, 1, 2, 0], dtype=np.int32)
    weights = np.array([1.0, 5.0, 1.0, 0.0, 3.0], dtype=np.float32)
    u, i, w = pair_weights(users, items, weights, n_items=3)
    assert sorted(zip(u.tolist(), i.tolist(), w.tolist(), strict=True)) == [
        (0, 1, 1.0),
        (0, 2, 5.0),
        (1, 0, 3.0),
    ]
    empty = pair_weights(users[:0], items[:0], weights[:0], n_items=3)
    assert all(len(a) == 0 for a in empty)
