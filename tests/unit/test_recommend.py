"""Ranking: blending, filters, diversity and reasons, on in-memory data and a real FAISS index."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from rocksdict import Rdict

from personify.agents.recommend import Recommender, Request, blend
from personify.embeddings import FaissIndex
from personify.embeddings.collab import AlsSettings, train_als
from personify.engine.config import Config
from personify.tables import profiles, signals
from personify.tables.catalog import Catalog
from personify.tables.history import RepeatStats
from personify.tables.reader import MemoryData, TableData

CFG = Config()
NOW = 1_800_000_000_000
DAY = 86_400_000


class Memory(MemoryData):
    """A `DataSource` over dicts that folds events as the profile agent does."""

    def __init__(self) -> None:
        super().__init__(CFG.recommend)

    def fold(self, user: str, events: list[dict[str, object]]) -> None:
        p = self.profiles.setdefault(user, profiles.new_profile(user))
        batch = signals.SignalBatch(CFG.recommend, CFG.profiles)
        profiles.apply_events(p, events, CFG.profiles, observe=batch.observe)
        for key, updates in batch.updates.items():
            row = self.rows_by_key.setdefault(key, signals.decode_row(None))
            signals.apply_updates(row, updates, signals.half_life_of(key, CFG.recommend), 100)


def view(item: str, ts: int) -> dict[str, object]:
    return {
        "type": "product_view",
        "event_id": f"{item}{ts}",
        "item_id": item,
        "ts_ms": ts,
        "properties": {},
    }


def shop() -> tuple[Memory, Catalog, FaissIndex]:
    """Items in two categories whose vectors cluster by category."""
    rng = np.random.default_rng(7)
    cat = Catalog()
    centers = {"outdoor": rng.normal(size=16), "kitchen": rng.normal(size=16)}
    ids, vecs = [], []
    for c, center in centers.items():
        for n in range(6):
            item = f"{c[0]}{n}"
            cat.put({"item_id": item, "title": item, "category": c, "in_stock": True})
            ids.append(item)
            vecs.append(center + 0.3 * rng.normal(size=16))
    index = FaissIndex(16)
    index.upsert(ids, np.array(vecs, dtype=np.float32))
    return Memory(), cat, index


def recommender(mem: Memory, cat: Catalog, index: FaissIndex | None) -> Recommender:
    return Recommender(CFG.recommend, mem, cat, index)


def test_blend_scales_each_source_and_keeps_the_strongest_reason_first() -> None:
    """Each source is scaled to its best candidate; reasons follow their contribution."""
    sources = {
        "covisit": {"a": (10.0, {"kind": "similar_to", "item_id": "x"}), "b": (5.0, {"kind": "s"})},
        "trending": {"b": (100.0, {"kind": "trending", "category": None})},
    }
    out = blend(sources, {"covisit": 1.0, "trending": 0.2}, 2, lambda i: True, lambda i: None)
    assert [(r.item_id, round(r.score, 3)) for r in out] == [("a", 1.0), ("b", 0.7)]
    assert out[1].reasons[0] == {"kind": "s"}


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdefghij"), st.sampled_from([1.0, 2.0, 3.0, 0.5])))
def test_blend_orders_by_score_then_by_item_id(scores: dict[str, float]) -> None:
    """Equal scores (runs of them anywhere in the list) come in item id order."""
    sources = {"covisit": {i: (s, {"kind": "similar_to"}) for i, s in scores.items()}}
    out = blend(sources, {"covisit": 1.0}, 10, lambda i: True, lambda i: None)
    assert [r.item_id for r in out] == sorted(scores, key=lambda i: (-scores[i], i))


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(st.sampled_from("abcdefghij"), st.floats(0.01, 100), min_size=1),
    st.integers(1, 10),
    st.integers(0, 3),
)
def test_blend_respects_k_filters_and_diversity(
    scores: dict[str, float], k: int, per_category: int
) -> None:
    """Never more than k, never a filtered item, never more than N of one category."""
    sources = {"covisit": {i: (s, {"kind": "similar_to"}) for i, s in scores.items()}}
    banned = {"a", "b"}
    out = blend(
        sources,
        {"covisit": 1.0},
        k,
        lambda i: i not in banned,
        lambda i: (i in "aeiou" and "v") or "c",
        per_category,
    )
    got = [r.item_id for r in out]
    assert len(got) <= k and len(got) == len(set(got))
    assert not banned & set(got)
    if per_category:
        cats = [("v" if i in "aeiou" else "c") for i in got]
        assert all(cats.count(c) <= per_category for c in set(cats))
    assert [r.score for r in out] == sorted((r.score for r in out), reverse=True)


def test_new_visitor_gets_trending() -> None:
    """With no profile, the most interacted-with items come first, as trending."""
    mem, cat, index = shop()
    for n, item in enumerate(["o1", "o1", "o1", "k2", "k2", "o4"]):
        mem.fold(f"v{n}", [view(item, NOW - 1000)])
    _rid, items = recommender(mem, cat, index).recommend("new", Request(k=3), NOW)
    assert [r.item_id for r in items] == ["o1", "k2", "o4"]
    assert items[0].reasons == [{"kind": "trending", "category": None}]


def test_covisited_and_similar_items_for_a_viewer() -> None:
    """A viewer of o1 gets what others viewed after o1, then o-items close in content."""
    mem, cat, index = shop()
    for n in range(3):
        mem.fold(f"v{n}", [view("o1", NOW - 5000), view("o2", NOW - 4000)])
    mem.fold("me", [view("o1", NOW - 1000)])
    _rid, items = recommender(mem, cat, index).recommend("me", Request(k=4), NOW)
    got = [r.item_id for r in items]
    assert got[0] == "o2"
    assert {"kind": "similar_to", "item_id": "o1"} in items[0].reasons
    assert "o1" not in got  # already viewed
    assert all(i.startswith("o") for i in got), got


def test_out_of_stock_deleted_and_excluded_items_are_skipped() -> None:
    """Filters: out of stock, deleted from the catalog, excluded by the caller."""
    mem, cat, index = shop()
    for n, item in enumerate(["o1", "o2", "o3", "o4"]):
        mem.fold(f"v{n}", [view(item, NOW - 1000)])
    cat.put({"item_id": "o1", "title": "o1", "category": "outdoor", "in_stock": False})
    cat.remove("o2")
    _rid, items = recommender(mem, cat, index).recommend("new", Request(k=10, exclude=["o3"]), NOW)
    got = [r.item_id for r in items]
    assert not {"o1", "o2", "o3"} & set(got)
    assert got[0] == "o4"


def test_category_request_and_fill_from_catalog() -> None:
    """category= keeps one category; with no signals the catalog fills the list."""
    mem, cat, _index = shop()
    _rid, items = recommender(mem, cat, None).recommend(
        "new", Request(k=3, category="kitchen"), NOW
    )
    assert [r.item_id for r in items] == ["k0", "k1", "k2"]
    assert items[0].reasons == [{"kind": "popular"}]


def test_similar_items_come_from_content_when_nobody_viewed_them() -> None:
    """similar() of an item nobody viewed yet returns its content neighbours."""
    mem, cat, index = shop()
    items = recommender(mem, cat, index).similar("k0", Request(k=5), NOW)
    assert items and all(r.item_id.startswith("k") for r in items)
    assert "k0" not in [r.item_id for r in items]


def _stored_row(pairs: dict[str, float]) -> bytes:
    row = signals.decode_row(None)
    signals.apply_updates(
        row,
        [(signals.SELF, 1.0, NOW)] + [(item, w, NOW) for item, w in pairs.items()],
        CFG.recommend.signal_half_life_s,
        100,
    )
    return signals.encode_row(row)


def test_table_rows_are_reread_when_written_or_reset(tmp_path: Path) -> None:
    """Ranked rows come from memory until a write of the row is reported (or a reset)."""
    db = Rdict(str(tmp_path / "p0"))
    try:
        data = SimpleNamespace(_dbs={0: db})
        table = SimpleNamespace(_data=data, data=data)  # a Faust table's store, opened
        tracked = TableData(table, CFG.recommend, track_writes=True)
        compared = TableData(table, CFG.recommend)
        key = signals.row_key("covisit", "a")

        def best(data: TableData) -> str:
            top = data.ranked([key], NOW, None, 5)[0]
            return top[0][0]

        db[key] = _stored_row({"b": 2.0, "c": 1.0})
        assert best(tracked) == best(compared) == "b"
        db[key] = _stored_row({"b": 1.0, "c": 3.0})
        assert best(compared) == "c"  # the stored bytes are compared on every read
        assert best(tracked) == "b"  # the write was not reported: served from memory
        tracked.written([key])
        assert best(tracked) == "c"
        db[key] = _stored_row({"d": 5.0})
        tracked.reset()  # e.g. the tables were restored from their changelogs
        assert best(tracked) == "d"
    finally:
        db.close()


def purchase(items: list[str], ts: int) -> dict[str, object]:
    return {
        "type": "purchase",
        "event_id": f"order-{ts}",
        "item_id": None,
        "ts_ms": ts,
        "properties": {
            "items": [{"item_id": i, "quantity": 1, "price": 1.0} for i in items],
            "revenue": float(len(items)),
            "currency": "USD",
        },
    }


def test_bought_products_come_back_where_the_shop_rebuys() -> None:
    """With re-buying in the history, the most bought products lead, with a buy_again reason.

    Without it, bought products stay out.
    """
    mem, cat, index = shop()
    mem.fold("u", [purchase(["o1", "k2"], NOW - 3 * DAY), purchase(["o1"], NOW - DAY)])
    rebuys = RepeatStats(purchases=1000, share=0.4, gap_s=7 * 86400.0)
    rec = Recommender(CFG.recommend, mem, cat, index, repeat=rebuys)
    _rid, items = rec.recommend("u", Request(k=5), NOW)
    assert [r.item_id for r in items[:2]] == ["o1", "k2"]
    assert items[0].reasons[0] == {"kind": "buy_again", "item_id": "o1", "times": 2}
    assert len(items) == 5
    never = RepeatStats(purchases=1000, share=0.0, gap_s=None)
    for stats in (never, None):
        rec = Recommender(CFG.recommend, mem, cat, index, repeat=stats)
        _rid, items = rec.recommend("u", Request(k=5), NOW)
        assert {"o1", "k2"}.isdisjoint(r.item_id for r in items)
    # What the request excludes, or the cart holds, is not brought back.
    rec = Recommender(CFG.recommend, mem, cat, index, repeat=rebuys)
    _rid, items = rec.recommend("u", Request(k=5, exclude=["o1"]), NOW)
    assert "o1" not in [r.item_id for r in items]


def test_only_buy_again_brings_back_a_bought_product() -> None:
    """Trending proposes the bought product; it comes back only while buy-again is on.

    Then buy-again explains it first, and the trending part adds to its score.
    """
    mem, cat, index = shop()
    mem.fold("u", [purchase(["o1"], NOW - DAY)])
    for n in range(3):
        mem.fold(f"v{n}", [view("o1", NOW - 2 * DAY + n), view("o2", NOW - 2 * DAY + 1000 + n)])
    rebuys = RepeatStats(purchases=1000, share=0.4, gap_s=7 * 86400.0)
    off = Config().replace(recommend={"weights": {"repeat": 0.0}}).recommend
    _rid, items = Recommender(off, mem, cat, index, repeat=rebuys).recommend("u", Request(k=8), NOW)
    assert "o1" not in [r.item_id for r in items]
    _rid, fresh = Recommender(off, mem, cat, index, repeat=rebuys).recommend(
        "somebody new", Request(k=8), NOW
    )
    assert next(r for r in fresh if r.item_id == "o1").reasons[0]["kind"] == "trending"
    rec = Recommender(CFG.recommend, mem, cat, index, repeat=rebuys)
    _rid, items = rec.recommend("u", Request(k=8), NOW)
    mine = next(r for r in items if r.item_id == "o1")
    assert mine.reasons[0]["kind"] == "buy_again"
    alone = Config().replace(recommend={"weights": {"trending": 0.0, "category": 0.0}}).recommend
    _rid, items = Recommender(alone, mem, cat, index, repeat=rebuys).recommend(
        "u", Request(k=8), NOW
    )
    assert mine.score > next(r for r in items if r.item_id == "o1").score


def test_the_shops_best_sellers_come_from_the_learned_model() -> None:
    """With a model, a visitor with no signal gets the items most visitors interacted with.

    Best seller first, each with reason ``popular`` and a score (a catalog fill scores 0);
    the visitor's own items stay out.
    """
    mem, cat, index = shop()
    items = ["o0", "o1", "k3", "k4"]
    visitors = {"o0": 1, "o1": 2, "k3": 5, "k4": 3}  # k3 is the best seller
    u: list[int] = []
    i: list[int] = []
    for number, item in enumerate(items):
        for v in range(visitors[item]):
            u.append(v)
            i.append(number)
    model = train_als(u, i, np.ones(len(u), dtype=np.float32), items, AlsSettings(factors=2))
    assert model.popularity.tolist() == [1, 2, 5, 3]
    rec = Recommender(CFG.recommend, mem, cat, index, model=model)
    _rid, top = rec.recommend("new", Request(k=3), NOW)
    assert [r.item_id for r in top] == ["k3", "k4", "o1"]
    assert all(r.reasons == [{"kind": "popular"}] and r.score > 0 for r in top)
    mem.fold("w", [view("k3", NOW - DAY)])
    no_signals = (
        Config()
        .replace(
            recommend={
                "weights": {"covisit": 0.0, "content": 0.0, "trending": 0.0, "category": 0.0}
            }
        )
        .recommend
    )
    rec = Recommender(no_signals, mem, cat, index, model=model)
    _rid, top = rec.recommend("w", Request(k=2), NOW)
    assert [r.item_id for r in top][:1] == ["k4"]


def test_buy_again_for_a_visitor_who_bought_long_ago() -> None:
    """Purchases a thousand half-lives old still come back in order, most bought first."""
    mem, cat, index = shop()
    mem.fold(
        "u",
        [purchase(["o1", "k2"], NOW - 1050 * DAY - 1000), purchase(["o1"], NOW - 1050 * DAY)],
    )
    # Fades over a day (the shortest half-life): 2^-1050 is a denormal number.
    rebuys = RepeatStats(purchases=1000, share=0.4, gap_s=3600.0)
    assert rebuys.half_life_s == 86400.0
    rec = Recommender(CFG.recommend, mem, cat, index, repeat=rebuys)
    _rid, items = rec.recommend("u", Request(k=5), NOW)
    assert [r.item_id for r in items[:2]] == ["o1", "k2"]
    assert all(math.isfinite(r.score) for r in items)
