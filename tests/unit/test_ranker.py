"""The learned ranker: its features, re-ordering the blend, saving, and when tuning keeps it."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable

import lightgbm
import numpy as np
import pytest

from personify.agents.evaluation import EngineMethod, History, evaluate, last_split
from personify.agents.ranker import (
    DEPTH,
    FEATURES,
    Matrix,
    Ranker,
    Recorder,
    Visitor,
    _merged,
    candidate_features,
    fit_bagged,
    fit_ranker,
)
from personify.agents.recommend import Pool, blend
from personify.agents.tuning import apply_setting, tune
from personify.engine.config import Config
from personify.tables.reader import ItemIds


def _pool(ids: ItemIds, scores: dict[str, float], why: str) -> Pool:
    return Pool(
        ids,
        ids.of(list(scores)),
        np.asarray(list(scores.values()), dtype=np.float64),
        lambda item: {"kind": why, "item_id": item},
    )


def _trending_ranker(seed: int = 0) -> Ranker:
    """A ranker taught that relevance follows the trending score and nothing else."""
    rng = np.random.default_rng(seed)
    column = FEATURES.index("trending")
    groups: list[tuple[Matrix, np.ndarray]] = []
    for _ in range(300):
        x = rng.random((20, len(FEATURES))).astype(np.float32)
        y = np.floor(x[:, column] * 4).astype(np.float32)  # graded: 0-3
        groups.append((x, y))
    ranker = fit_bagged(groups, folds=5, seed=seed)
    assert ranker is not None
    return ranker


def test_features_scale_each_source_by_its_best_and_count_the_sources() -> None:
    ids = ItemIds()
    pools = {
        "covisit": _pool(ids, {"a": 4.0, "b": 2.0}, "similar_to"),
        "repeat": _pool(ids, {"b": 3.0}, "buy_again"),
        "popular": _pool(ids, {"a": 10.0, "c": 100.0}, "popular"),
    }
    numbers = ids.of(["a", "b", "c"])
    totals = np.asarray([1.0, 2.0, 0.5])
    x = candidate_features(pools, {"repeat": 0.5}, numbers, totals, Visitor(9, 23))
    col = {name: FEATURES.index(name) for name in FEATURES}
    assert x[:, col["covisit"]].tolist() == [1.0, 0.5, 0.0]
    assert x[:, col["repeat"]].tolist() == [0.0, 0.5, 0.0]  # times the source's strength
    assert x[:, col["repeat_raw"]] == pytest.approx([0.0, np.log1p(3.0), 0.0])
    assert x[:, col["popular"]] == pytest.approx([0.1, 0.0, 1.0])
    assert x[:, col["sources"]].tolist() == [2.0, 2.0, 1.0]
    assert x[:, col["blend"]].tolist() == [0.5, 1.0, 0.25]
    assert x[:, col["history"]] == pytest.approx([np.log(10.0)] * 3)
    assert x[:, col["idle"]] == pytest.approx([np.log(24.0)] * 3)


def test_a_ranker_reorders_the_blends_best_candidates_and_keeps_their_reasons() -> None:
    """Weights favour co-visitation; the ranker learned that trending is what counts."""
    ids = ItemIds()
    sources = {
        "covisit": _pool(ids, {"a": 1.0, "b": 0.9, "c": 0.8}, "similar_to"),
        "trending": _pool(ids, {"c": 1.0, "b": 0.5, "a": 0.1}, "trending"),
    }
    weights = {"covisit": 1.0, "trending": 0.1}
    plain = blend(sources, weights, 3, lambda i: True, lambda i: None)
    assert [r.item_id for r in plain] == ["a", "b", "c"]
    ranked = blend(sources, weights, 3, lambda i: True, lambda i: None, ranker=_trending_ranker())
    assert [r.item_id for r in ranked] == ["c", "b", "a"]
    assert ranked[0].score >= ranked[1].score >= ranked[2].score
    # Its reasons are the blend's: the sources that make most of its blend score.
    assert ranked[0].reasons == plain[2].reasons == [{"kind": "similar_to", "item_id": "c"}]
    # Items the caller does not allow never come back through the ranker.
    allowed = blend(
        sources, weights, 3, lambda i: i != "c", lambda i: None, ranker=_trending_ranker()
    )
    assert [r.item_id for r in allowed] == ["b", "a"]


def test_past_the_rankers_depth_the_list_goes_on_in_blend_order() -> None:
    """Where diversity leaves the ranked best short, the list goes on in blend order."""
    ids = ItemIds()
    items = [f"i{n:03d}" for n in range(DEPTH + 20)]
    sources = {
        "covisit": _pool(ids, {item: 1000.0 - n for n, item in enumerate(items)}, "similar_to"),
        "trending": _pool(ids, {item: float(n) for n, item in enumerate(items)}, "trending"),
    }
    # The blend's best DEPTH (i003 left out) are of two categories; the rest of one each.
    banned = {items[3], items[DEPTH + 3]}
    category = {item: f"c{n % 2}" if n <= DEPTH else f"u{n}" for n, item in enumerate(items)}
    out = blend(
        sources,
        {"covisit": 1.0, "trending": 0.01},
        5,
        lambda i: i not in banned,
        category.get,
        max_per_category=1,
        ranker=_trending_ranker(),
    )
    got = [r.item_id for r in out]
    assert {category[i] for i in got[:2]} == {"c0", "c1"}
    assert got[2:] == [items[DEPTH + 1], items[DEPTH + 2], items[DEPTH + 4]]
    assert all(a.score >= b.score for a, b in itertools.pairwise(out))


def test_features_of_one_list_do_not_leak_into_the_next() -> None:
    """The same candidates give the same features, whatever was ranked before them."""
    ids = ItemIds()
    pools = {"covisit": _pool(ids, {"a": 4.0, "b": 2.0, "c": 1.0}, "similar_to")}
    first = candidate_features(pools, {}, ids.of(["a", "b"]), np.ones(2), Visitor())
    candidate_features(pools, {}, ids.of(["c", "b", "a"]), np.ones(3), Visitor())
    again = candidate_features(pools, {}, ids.of(["a", "b"]), np.ones(2), Visitor())
    assert np.array_equal(first, again)
    only_c = candidate_features(pools, {}, ids.of(["c"]), np.ones(1), Visitor())
    assert only_c[0, FEATURES.index("covisit")] == 0.25
    assert only_c[0, FEATURES.index("sources")] == 1.0


def test_the_recorder_keeps_the_blends_order_and_records_its_features() -> None:
    ids = ItemIds()
    sources = {"covisit": _pool(ids, {f"i{j}": 200.0 - j for j in range(150)}, "similar_to")}
    recorder = Recorder()
    out = blend(sources, {"covisit": 1.0}, DEPTH, lambda i: True, lambda i: None, ranker=recorder)
    assert [r.item_id for r in out] == [f"i{j}" for j in range(DEPTH)]
    assert recorder.matrix.shape == (DEPTH, len(FEATURES))
    assert recorder.matrix[0, FEATURES.index("covisit")] == 1.0


def test_a_saved_ranker_ranks_the_same_and_a_foreign_one_is_refused() -> None:
    ranker = _trending_ranker()
    x = np.random.default_rng(1).random((50, len(FEATURES))).astype(np.float32)
    again = Ranker.from_text(ranker.to_text())
    assert again.predict(x).tolist() == ranker.predict(x).tolist()
    assert again.trees == ranker.trees > 0
    assert len(again.boosters) == 5  # one model per fold, each stopped on its own fold
    each = [Ranker((b,)).predict(x) for b in ranker.boosters]
    assert ranker.predict(x) == pytest.approx(np.mean(each, axis=0))
    assert np.corrcoef(ranker.predict(x), x[:, FEATURES.index("trending")])[0, 1] > 0.9
    assert sum(ranker.importance().values()) == pytest.approx(1.0, abs=1e-3)
    foreign = ranker.to_text().replace("feature_names=covisit", "feature_names=other")
    with pytest.raises(ValueError, match="features"):
        Ranker.from_text(foreign)


def test_a_ranker_scores_as_lightgbm_does_and_leaves_no_garbage_cycle() -> None:
    # Serving ranks hundreds of lists a second: a prediction that left objects in reference
    # cycles made the collector hold the engine for tens of milliseconds every few seconds.
    ranker = _trending_ranker()
    rng = np.random.default_rng(2)
    x = rng.random((100, len(FEATURES))).astype(np.float32)
    x[x < 0.3] = 0.0  # absent sources score 0
    x[0, 0] = np.nan
    expected = np.mean([b.predict(x, num_threads=1) for b in ranker.boosters], axis=0)
    assert ranker.predict(x).tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    assert ranker.predict(x.astype(np.float64)) == pytest.approx(expected, abs=1e-12)
    assert ranker.predict(x[:1]) == pytest.approx(expected[:1], abs=1e-12)
    # Scored as one model of every tree (one call into LightGBM, not one per model).
    merged = lightgbm.Booster(model_str=_merged([b.model_to_string() for b in ranker.boosters]))
    assert merged.num_trees() == ranker.trees > len(ranker.boosters)
    assert merged.predict(x, num_threads=1) == pytest.approx(expected, abs=1e-12)
    gc.collect()
    frozen = gc.isenabled()
    gc.disable()
    try:
        for _ in range(50):
            ranker.predict(x)
        assert gc.collect() == 0
    finally:
        if frozen:
            gc.enable()


def test_tuning_learns_a_ranker_that_finds_what_a_poor_blend_misses(
    grocery_factory: Callable[..., History],
) -> None:
    """With buy-again all but off in the blend, the ranker learns re-buying from the history.

    It wins on the selection visitors (never learned on), and on a hold-out the tuning never
    saw.
    """
    history = grocery_factory(shoppers=80)
    test = last_split(history)
    start = Config().replace(recommend={"weights": {"repeat": 0.01}})
    tuned = tune(test.train, start, trials=1, ranker=True)
    assert not tuned.improved  # one trial: the blend setting stays
    report = tuned.ranker_report
    assert report is not None and report["choice"] == "learned" and tuned.ranker is not None
    selection = tuned.selection
    assert selection["choice"] == "current, new ranker"
    assert selection["current, new ranker"]["mean"] > selection["current"]["mean"]
    assert report["importance"]["repeat"] + report["importance"]["repeat_raw"] > 0.2
    plain = EngineMethod(start, name="blend")
    ranked = EngineMethod(start, name="ranked", ranker=tuned.ranker)
    scores = {r.method: r.metrics.ndcg10 for r in evaluate(test, [plain, ranked])}
    assert scores["ranked"] > scores["blend"]


def test_a_ranker_that_loses_to_the_blend_is_not_kept(
    grocery_factory: Callable[..., History],
) -> None:
    """The ranker in use, taught the opposite of re-buying, gives way to the blend or a new one."""
    history = grocery_factory(shoppers=60)
    config = Config()
    engine = EngineMethod(config)
    split = last_split(history)
    engine.fit(split.train)
    groups = []
    for user in sorted(split.targets):
        x, y = engine.candidates(user, split.now_ms[user], split.targets[user])
        groups.append((x, 1.0 - y))  # the items not bought next
    wrong = fit_ranker(groups, rounds=50)
    assert wrong is not None
    tuned = tune(history, config, trials=1, ranker=True, current_ranker=wrong)
    report = tuned.ranker_report
    assert report is not None and report["choice"] != "current"
    selection = tuned.selection
    assert selection["current, ranker in use"]["mean"] < selection["current"]["mean"]
    assert tuned.ranker is not wrong
    assert apply_setting(config.recommend, tuned.setting) == config.recommend


def test_a_scoring_error_comes_back_as_a_runtime_error_naming_it() -> None:
    """LightGBM's own message, read through the library the ranker calls."""
    ranker = _trending_ranker()
    with pytest.raises(RuntimeError, match="number of features"):
        ranker.predict(np.zeros((3, len(FEATURES) + 3), dtype=np.float32))
