"""Offline evaluation: histories, temporal splits, metrics, baselines and the engine replayed."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest

from personify.agents.evaluation import (
    AlsMethod,
    BprMethod,
    BuyAgain,
    EngineMethod,
    History,
    ItemKNN,
    Popularity,
    evaluate,
    global_split,
    last_split,
    unit_metrics,
)
from personify.embeddings.collab import AlsSettings
from personify.engine.config import Config
from personify.tables.history import repeat_stats

DAY = 86_400_000


def tastes(users: int = 60, seed: int = 2) -> History:
    """Viewers of two tastes, each viewing 8 of their taste's 12 items once, in time order."""
    rng = random.Random(seed)
    rows = []
    for u in range(users):
        group = "a" if u % 2 else "b"
        for step, j in enumerate(rng.sample(range(12), 8)):
            rows.append((f"u{u}", f"{group}{j}", "product_view", (u + step * users) * 60_000))
    return History.of(rows)


def test_a_history_is_numbered_and_kept_in_time_order() -> None:
    """Rows become arrays in time order; the catalog given comes first; bad types are refused."""
    h = History.of(
        [("u", "x", "product_view", 30), ("v", "y", "purchase", 10), ("u", "y", "click", 20)],
        ["catalog-only", "y"],
    )
    assert h.items == ["catalog-only", "y", "x"]
    assert h.ts_ms.tolist() == [10, 20, 30]
    assert [h.users[u] for u in h.user.tolist()] == ["v", "u", "u"]
    assert h.describe()["purchases"] == 1
    with pytest.raises(ValueError, match="unknown event type"):
        History.of([("u", "x", "search", 1)])


def test_the_global_split_cuts_at_a_time_and_scores_visitors_seen_before() -> None:
    """Train is everything before the cut; only visitors with earlier history are scored."""
    h = History.of(
        [("u", "a", "product_view", t) for t in range(1, 9)]
        + [("u", "z", "product_view", 9), ("u", "y", "product_view", 10)]
        + [("new", "a", "product_view", 10)]
    )
    split = global_split(h, 0.2)
    assert split.train.ts_ms.max() < 9
    u = h.users.index("u")
    assert split.targets == {u: {h.items.index("z"), h.items.index("y")}}
    assert split.now_ms[u] == 9
    with pytest.raises(ValueError):
        global_split(h, 1.0)


def test_the_last_split_holds_out_the_last_order_or_the_last_interactions() -> None:
    """A buyer's last order (all its lines) is held out; a viewer's last n; lone visits stay."""
    h = History.of(
        [
            ("buyer", "a", "purchase", 1),
            ("buyer", "b", "purchase", 5),
            ("buyer", "c", "purchase", 5),
            ("viewer", "a", "product_view", 1),
            ("viewer", "b", "product_view", 2),
            ("viewer", "c", "product_view", 3),
            ("once", "a", "product_view", 4),
        ]
    )
    split = last_split(h, n=2)
    number = {name: h.users.index(name) for name in ("buyer", "viewer", "once")}
    item = {name: h.items.index(name) for name in "abc"}
    assert split.targets == {
        number["buyer"]: {item["b"], item["c"]},
        number["viewer"]: {item["b"], item["c"]},
    }
    assert split.now_ms == {number["buyer"]: 5, number["viewer"]: 2}
    assert len(split.train) == 3  # buyer's a, viewer's a, the lone visit


def test_metrics_of_known_lists() -> None:
    """NDCG, recall, AP and HR of hand-checked lists."""
    assert unit_metrics([1, 2, 3], {1}) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    ndcg, recall, ap, hr = unit_metrics([9, 1, 8, 2], {1, 2})
    ideal = 1 + 1 / np.log2(3)
    assert ndcg == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / ideal)
    assert recall == 1.0 and hr == 1.0
    assert ap == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert unit_metrics([5, 6], {1}) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        unit_metrics([1], set())


def test_buy_again_wins_where_shoppers_rebuy_and_lifts_the_engine(
    grocery_factory: Callable[..., History],
) -> None:
    """On weekly staples, buy-again beats popularity and lifts the engine's own lists.

    The engine's buy-again source, its strength learned from the history, more than doubles
    the engine's NDCG against the engine without it.
    """
    h = grocery_factory()
    assert repeat_stats(h.user, h.item, h.kind, h.ts_ms).share > 0.5
    split = last_split(h)
    without = Config().replace(recommend={"weights": {"repeat": 0.0}})
    results = {
        r.method: r.metrics
        for r in evaluate(
            split,
            [
                Popularity(True),
                BuyAgain(),
                EngineMethod(Config()),
                EngineMethod(without, name="engine without buy-again"),
            ],
        )
    }
    assert results["buy-again"].ndcg10 > 2 * results["popularity (repeats)"].ndcg10
    assert results["engine"].ndcg10 > 2 * results["engine without buy-again"].ndcg10
    assert results["engine"].users == len(split.targets) == 60


def test_collaborative_methods_find_the_visitors_taste() -> None:
    """Item-kNN, ALS, BPR and the engine rank the visitor's taste; popularity can't."""
    split = last_split(tastes(), n=2)
    methods = [
        Popularity(),
        ItemKNN(50),
        AlsMethod(AlsSettings(factors=4, regularization=0.5)),
        BprMethod(factors=4, learning_rate=0.05, iterations=200),
        EngineMethod(Config().replace(model={"factors": 4, "regularization": 0.5})),
    ]
    results = {r.method: r.metrics for r in evaluate(split, methods)}
    pop = results["popularity"].hr10
    for name, metrics in results.items():
        assert 0.0 <= metrics.ndcg10 <= 1.0 and 0.0 < metrics.coverage10 <= 1.0
        if name != "popularity":
            assert metrics.ndcg10 > results["popularity"].ndcg10, name
            assert metrics.hr10 >= pop, name


def test_repeat_stats_measure_rebuying() -> None:
    """The share of purchase lines that re-buy, and the median gap between two purchases."""
    h = History.of(
        [
            ("u", "a", "purchase", 0),
            ("u", "a", "purchase", 2 * DAY),
            ("u", "a", "purchase", 6 * DAY),
            ("u", "b", "purchase", 0),
            ("v", "a", "purchase", 0),
            ("v", "a", "product_view", DAY),
        ]
    )
    stats = repeat_stats(h.user, h.item, h.kind, h.ts_ms)
    assert stats.purchases == 5
    assert stats.share == pytest.approx(2 / 5)
    assert stats.gap_s == pytest.approx(3 * 86400.0)
    assert stats.strength == 1.0
    none = repeat_stats(h.user[:0], h.item[:0], h.kind[:0], h.ts_ms[:0])
    assert none.purchases == 0 and none.strength == 0.0


def test_a_retuned_engine_ranks_as_one_fitted_with_that_setting(
    grocery_factory: Callable[..., History],
) -> None:
    """Settings tried one after another on one fold give the lists a fresh fit gives.

    The candidates kept between settings (sources the weights do not change) never leak a
    setting's choice into the next.
    """
    h = grocery_factory(shoppers=30)
    split = last_split(h)
    first = Config().replace(recommend={"weights": {"repeat": 0.5, "collab": 3.0}})
    second = Config().replace(
        recommend={"weights": {"repeat": 0.0, "popular": 5.0}, "seed_half_life": 7.0}
    )
    engine = EngineMethod(first)
    engine.fit(split.train)
    users = sorted(split.targets)
    lists = [engine.recommend(u, 10, split.now_ms[u]) for u in users]
    retuned = engine.retuned(second.recommend)
    fresh = EngineMethod(second)
    fresh.fit(split.train)
    for _ in range(2):  # again: from what the first round kept
        again = [retuned.recommend(u, 10, split.now_ms[u]) for u in users]
        assert again == [fresh.recommend(u, 10, split.now_ms[u]) for u in users]
    assert again != lists
    back = [retuned.retuned(first.recommend).recommend(u, 10, split.now_ms[u]) for u in users]
    assert back == lists
