"""Collaborative signals: forward-decayed rows, pruning, and what each event contributes."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from personify.engine.config import Config
from personify.tables import profiles, signals
from personify.tables.reader import ranked, ranked_stored

CFG = Config()
DAY_MS = 86_400_000
#: A partition's row with nothing in it yet (merging with it decays the other to now).
EMPTY = signals.decode_row(None)


def _row(updates: list[tuple[str, float, int]], half_life_s: float = 86400.0) -> signals.Row:
    return signals.apply_updates(signals.decode_row(None), updates, half_life_s, cap=1000)


def test_scores_halve_every_half_life() -> None:
    """A contribution read one half-life later counts half; two later, a quarter."""
    assert signals.merge_rows([_row([("a", 4.0, 0)])], 86400.0, DAY_MS)["s"]["a"] == 4.0
    row = _row([("a", 4.0, 0)])
    assert math.isclose(signals.merge_rows([row, EMPTY], 86400.0, DAY_MS)["s"]["a"], 2.0)
    assert math.isclose(signals.merge_rows([row, EMPTY], 86400.0, 2 * DAY_MS)["s"]["a"], 1.0)


def test_far_apart_contributions_stay_exact() -> None:
    """Contributions hundreds of half-lives apart are still decayed exactly (no overflow)."""
    start = 1_700_000_000_000
    row = _row([("old", 1.0, start), ("new", 1.0, start + 500 * DAY_MS)])
    now = start + 500 * DAY_MS
    merged = signals.merge_rows([row, EMPTY], 86400.0, now)["s"]
    assert math.isclose(merged["new"], 1.0)
    assert merged["old"] < 1e-100
    assert all(math.isfinite(v) for v in row["s"].values())


def test_prune_keeps_the_strongest() -> None:
    """A row over its cap keeps the entries with the highest scores."""
    row = signals.decode_row(None)
    signals.apply_updates(row, [(f"i{n}", float(n), 0) for n in range(100)], 86400.0, cap=10)
    assert set(row["s"]) == {f"i{n}" for n in range(90, 100)}


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.floats(0.1, 10), st.integers(0, 30 * DAY_MS)),
        min_size=1,
        max_size=40,
    ),
    st.integers(1, 4),
)
def test_rows_split_over_partitions_sum_to_the_whole(
    updates: list[tuple[str, float, int]], parts: int
) -> None:
    """Updates spread over partition rows, in any order, merge to the same decayed totals."""
    parts = max(parts, 2)
    whole = signals.merge_rows([_row(updates), EMPTY], 86400.0, 31 * DAY_MS)["s"]
    pieces = [_row(list(reversed(updates[i::parts]))) for i in range(parts)]
    split = signals.merge_rows(pieces, 86400.0, 31 * DAY_MS)["s"]
    assert whole.keys() == split.keys()
    for key, value in whole.items():
        assert math.isclose(value, split[key], rel_tol=1e-9, abs_tol=1e-300)


def _view(item: str, ts: int, category: str | None = None) -> dict[str, object]:
    props = {"category": category} if category else {}
    return {
        "type": "product_view",
        "event_id": f"{item}-{ts}",
        "item_id": item,
        "ts_ms": ts,
        "properties": props,
    }


def _fold(events: list[dict[str, object]]) -> signals.SignalBatch:
    batch = signals.SignalBatch(CFG.recommend, CFG.profiles, lambda item: f"cat/{item}")
    p = profiles.new_profile("u")
    profiles.apply_events(p, events, CFG.profiles, observe=batch.observe)
    return batch


def _pairs(batch: signals.SignalBatch, kind: signals.SignalKind, item: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for other, weight, _ts in batch.updates.get(signals.row_key(kind, item), []):
        if other != signals.SELF:
            out[other] = out.get(other, 0.0) + weight
    return out


GAP_S = CFG.recommend.covisit_gap_half_life_s


def test_items_viewed_one_after_the_other_are_covisited_both_ways() -> None:
    """An item viewed after another adds each to the other's row, decayed by the time between."""
    batch = _fold([_view("a", 0), _view("b", 60_000)])
    weight = 0.5 ** (60 / GAP_S)
    assert _pairs(batch, "covisit", "a") == {"b": weight}
    assert _pairs(batch, "covisit", "b") == {"a": weight}


def test_views_far_apart_in_time_weigh_less() -> None:
    """Ten gap half-lives between two views leave the pair 1/1024 of its weight."""
    batch = _fold([_view("a", 0), _view("b", int(10 * GAP_S * 1000))])
    assert math.isclose(_pairs(batch, "covisit", "a")["b"], 2.0**-10)


def test_closer_items_weigh_more() -> None:
    """The item viewed just before counts fully, the one before it d ** -power."""
    batch = _fold([_view("a", 0), _view("b", 0), _view("c", 0)])
    power = CFG.recommend.covisit_distance_power
    assert _pairs(batch, "covisit", "c") == {"b": 1.0, "a": 2.0**-power}


def test_own_counts_and_normalised_pairs() -> None:
    """Rows count their own item; a pair is scored c / sqrt(n_a * n_b) (alpha 0.5)."""
    batch = _fold([_view("a", 0), _view("b", 0), _view("a", 1), _view("c", 2)])
    rows = {k: signals.decode_row(v) for k, v in batch.fold_into({}) if k[1:2] == b"c"}
    row_a = signals.merge_rows([rows[signals.row_key("covisit", "a")], EMPTY], 1e9, 2)
    assert math.isclose(row_a["n"], 2.0, rel_tol=1e-6)
    scores = signals.normalised(row_a, 0.5)
    # a-b: 1 (b after a) + 1 (a after b); n_a = 2, n_b = 1
    assert math.isclose(scores["b"], 2.0 / math.sqrt(2.0 * 1.0), rel_tol=1e-6)
    assert scores["b"] > scores["c"]
    # Read 30 years on with a one-hour half-life, every count has decayed to nothing.
    faded = signals.merge_rows([rows[signals.row_key("covisit", "a")], EMPTY], 3600.0, 10**12)
    assert faded["n"] == 0.0 and set(faded["s"].values()) == {0.0}
    assert signals.normalised(faded, 0.5) == {}


def test_trending_counts_the_category_and_its_parents() -> None:
    """A view counts for the whole shop and each level of its category path."""
    batch = _fold([_view("a", 0, "outdoor/hiking/jackets")])
    for name in ("", "outdoor", "outdoor/hiking", "outdoor/hiking/jackets"):
        assert batch.updates[signals.row_key("trending", name)] == [("a", 1.0, 0)]


def test_catalog_category_is_used_when_the_event_has_none() -> None:
    """Without a category on the event, the catalog's is used."""
    batch = _fold([_view("a", 0)])
    assert signals.row_key("trending", "cat/a") in batch.updates


def test_items_of_one_order_are_bought_together() -> None:
    """A purchase of x and y pairs them in the co-purchase rows."""
    purchase = {
        "type": "purchase",
        "event_id": "o1",
        "item_id": None,
        "ts_ms": 5,
        "properties": {
            "items": [{"item_id": "x", "quantity": 1}, {"item_id": "y", "quantity": 1}],
            "revenue": 1.0,
            "currency": "USD",
        },
    }
    batch = _fold([purchase])
    assert _pairs(batch, "copurchase", "x") == {"y": 1.0}
    assert _pairs(batch, "copurchase", "y") == {"x": 1.0}


def test_duplicate_events_add_nothing() -> None:
    """An event id already applied to the profile contributes no signal again."""
    batch = signals.SignalBatch(CFG.recommend, CFG.profiles)
    p = profiles.new_profile("u")
    events = [_view("a", 0), _view("b", 1000)]
    profiles.apply_events(p, events, CFG.profiles, observe=batch.observe)
    before = {k: list(v) for k, v in batch.updates.items()}
    profiles.apply_events(p, events, CFG.profiles, observe=batch.observe)
    assert batch.updates == before


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 10_000)), max_size=6),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 3),
    st.booleans(),
)
def test_live_rows_flushed_equal_rows_written_every_round(
    rounds: list[list[tuple[str, int]]], flush_every: int, interleave: bool
) -> None:
    """Rows folded in memory and flushed now and then end up as if written every round.

    With ``interleave``, a flush takes the changed rows in one round and encodes them in the
    next, after that round's events changed some of them again (the agent folds while a flush
    writes).
    """
    direct: dict[bytes, bytes] = {}
    flushed: dict[bytes, bytes] = {}
    live = signals.LiveRows(
        CFG.recommend, capacity=2
    )  # small: clean rows are forgotten along the way
    p1, p2 = profiles.new_profile("u"), profiles.new_profile("u")
    pending: list[bytes] | None = None
    for n, views in enumerate(rounds):
        events = [_view(item, ts + n * 10_000) for item, ts in views]
        batch = signals.SignalBatch(CFG.recommend, CFG.profiles)
        profiles.apply_events(p1, events, CFG.profiles, observe=batch.observe)
        direct.update(batch.fold_into({k: direct.get(k) for k in batch.updates}))
        batch = signals.SignalBatch(CFG.recommend, CFG.profiles)
        profiles.apply_events(p2, events, CFG.profiles, observe=batch.observe)
        for key in live.missing(batch.updates):
            live.load(key, flushed.get(key))
        live.apply(batch)
        if pending is not None:
            flushed.update(live.encode(pending))
            live.trim()
            assert set(live.dirty) <= set(live.rows)  # a changed row is never forgotten
            pending = None
        if n % flush_every == 0:
            if interleave:
                pending = live.take_dirty_keys()
            else:
                flushed.update(live.take_dirty())
    if pending is not None:
        flushed.update(live.encode(pending))
    flushed.update(live.take_dirty())
    want = {k: signals.decode_row(v) for k, v in direct.items()}
    got = {k: signals.decode_row(v) for k, v in flushed.items()}
    assert want.keys() == got.keys()
    for key, row in want.items():
        # Held rows add a round's contributions together before adding them to the row.
        assert got[key]["r"] == row["r"] and got[key]["n"] == row["n"]
        for part in ("s", "m"):
            assert got[key][part].keys() == row[part].keys(), (key, part)
            for item, value in row[part].items():
                assert math.isclose(got[key][part][item], value, rel_tol=1e-12), (key, item)


def test_held_rows_merge_prune_and_decode_like_decoded_rows() -> None:
    """A held row folds, prunes to its cap and decodes as `apply_updates` does (ties aside)."""
    numbers = signals.ItemNumbers()
    updates = [(f"i{k % 37}", 1.0 + (k * 7919) % 101, 1_000 * (k // 10)) for k in range(400)]
    want = signals.decode_row(None)
    held = signals.Held()
    for start in range(0, 400, 50):  # in eight rounds, each pruned to the cap at its end
        signals.apply_updates(want, updates[start : start + 50], 3600.0, cap=10)
        held.fold(updates[start : start + 50], 3600.0 * 1000.0)
        held.merge(numbers, 10)
    got = held.row(numbers)
    assert got["r"] == want["r"] and got["s"].keys() == want["s"].keys()
    assert 10 <= len(got["s"]) <= 20
    for item, score in want["s"].items():
        assert math.isclose(got["s"][item], score, rel_tol=1e-9)
    again = signals.Held.stored(signals.encode_row(got), numbers).row(numbers)
    assert again == got
    assert signals.decode_row(held.encode(numbers)) == got


def test_rows_stored_in_binary_read_back_exactly_and_old_json_rows_still_read() -> None:
    """A row survives the table as it was; a row written as JSON by an earlier version reads."""
    numbers = signals.ItemNumbers()
    row = {
        "r": 1_700_000_000_123,
        "n": 12.5,
        "s": {"sku-1": 3.25, "thé vert": 1e-300, "a\x00b": 7.0, "sku-9": 0.1},
        "m": {"sku-1": 4.0, "a\x00b": 9.5},  # sku-9's own count not known
    }
    raw = signals.encode_row(row)
    assert raw[:1] != b"{"
    assert signals.decode_row(raw) == row
    held = signals.Held.stored(raw, numbers)
    assert held.row(numbers) == signals.Held.of(row, numbers).row(numbers)
    assert signals.decode_row(held.encode(numbers)) == held.row(numbers)
    legacy = orjson.dumps(row)
    assert signals.decode_row(legacy) == row
    assert signals.Held.stored(legacy, numbers).row(numbers) == held.row(numbers)
    empty = signals.decode_row(None)
    assert signals.decode_row(signals.encode_row(empty)) == empty
    assert len(signals.Held.stored(None, numbers)) == 0
    with pytest.raises(ValueError, match="format 7"):
        signals.decode_row(b"\x07" + raw[1:])


def test_held_rows_cost_far_less_than_decoded_rows() -> None:
    """A full catalog's rows fit in memory: 20 bytes a neighbour in arrays, not dicts."""
    live = signals.LiveRows(CFG.recommend)
    neighbours = {f"sku-{k}": float(k) for k in range(200)}
    for k in range(50):
        live.load(
            signals.row_key("covisit", f"sku-{k}"),
            orjson.dumps({"r": 0, "n": 1.0, "s": neighbours, "m": neighbours}),
        )
    held = live.rows[signals.row_key("covisit", "sku-0")]
    assert held.ids.nbytes + held.s.nbytes + held.m.nbytes == 200 * 20
    assert live.neighbours() == 50 * 201
    assert live.row(signals.row_key("covisit", "sku-3"))["s"] == neighbours
    assert len(live.numbers.names) == 200  # one number (and one string) per item


_ROW_ENTRIES = st.dictionaries(
    st.sampled_from([f"i{k}" for k in range(12)]),
    st.tuples(
        st.floats(0.0, 50.0) | st.just(1.0),
        st.none() | st.floats(0.0, 50.0),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.tuples(st.integers(0, 10 * DAY_MS), st.floats(0.0, 40.0), _ROW_ENTRIES),
        min_size=1,
        max_size=4,
    ),
    alpha=st.none() | st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    n=st.integers(1, 15),
    legacy=st.booleans(),
)
# Counts decayed to almost nothing (an own count of 1e-240, eleven days old at a one-hour
# half-life) beside a recent pair: dividing by what is left would overflow.
@example(
    parts=[(0, 1e-240, {"i0": (1.0, None)}), (10 * DAY_MS, 0.0, {"i1": (50.0, None)})],
    alpha=1.0,
    n=5,
    legacy=False,
)
def test_stored_rows_rank_as_decoded_rows_merged_and_ranked(
    parts: list[tuple[int, float, dict[str, tuple[float, float | None]]]],
    alpha: float | None,
    n: int,
    legacy: bool,
) -> None:
    """Ranking the stored bytes of a row's partitions gives what decoding them gives."""
    rows = [
        {
            "r": ref,
            "n": own,
            "s": {item: score for item, (score, _count) in entries.items()},
            "m": {item: count for item, (_s, count) in entries.items() if count is not None},
        }
        for ref, own, entries in parts
    ]
    raws = [orjson.dumps(row) if legacy else signals.encode_row(row) for row in rows]
    now = 11 * DAY_MS
    want = ranked(signals.merge_rows(rows, 3600.0, now), alpha, n)
    got = ranked_stored(raws, 3600.0, now, alpha, n)
    assert [item for item, _s in got] == [item for item, _s in want]
    for (_i, score), (_j, expected) in zip(got, want, strict=True):
        assert math.isclose(score, expected, rel_tol=1e-12, abs_tol=1e-300)
