"""Self-tuning: settings chosen on validation, kept when nothing beats them, pins respected."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from personify.agents.evaluation import EngineMethod, History, evaluate, last_split
from personify.agents.tuning import SPACE, apply_setting, holdout, setting_of, tune
from personify.engine.config import TUNABLE, Config, ConfigError, load_config


def test_tuning_finds_buy_again_where_shoppers_rebuy(
    grocery_factory: Callable[..., History],
) -> None:
    """On weekly staples the tuner raises a too low buy-again weight and beats that setting.

    The gain holds on a hold-out the tuning never saw; the pinned setting keeps its value.
    """
    history = grocery_factory(shoppers=80)
    test = last_split(history)
    start = Config().replace(recommend={"weights": {"repeat": 0.3}})
    assert start.recommend.weights["collab"] == Config().recommend.weights["collab"]
    tuned = tune(test.train, start, trials=12, pinned=["weights.content"])
    assert tuned.improved
    assert tuned.validation["best"]["mean"] > tuned.validation["current"]["mean"]
    assert tuned.setting["weights.content"] == start.recommend.weights["content"]
    assert tuned.setting["weights.repeat"] > start.recommend.weights["repeat"]
    before = EngineMethod(start, name="defaults")
    after = EngineMethod(
        dataclasses.replace(start, recommend=apply_setting(start.recommend, tuned.setting)),
        name="tuned",
    )
    scores = {r.method: r.metrics.ndcg10 for r in evaluate(test, [before, after])}
    assert scores["tuned"] > scores["defaults"]


def test_a_run_that_finds_nothing_better_keeps_the_current_setting(
    grocery_factory: Callable[..., History],
) -> None:
    """With only the current setting tried, nothing is proposed: the setting is the current."""
    history = grocery_factory(shoppers=30)
    tuned = tune(history, Config(), trials=1)
    assert not tuned.improved
    assert tuned.setting == tuned.current == setting_of(Config().recommend)
    assert tuned.validation["best"] == tuned.validation["current"]


def test_holdout_scores_settings_and_baselines_on_both_protocols(
    grocery_factory: Callable[..., History],
) -> None:
    """The hold-out report has each named setting, each source alone and the baselines.

    Where shoppers re-buy weekly staples, buy-again alone scores as the buy-again baseline
    does, far above co-visitation alone.
    """
    history = grocery_factory(shoppers=30)
    current = setting_of(Config().recommend)
    report = holdout(history, Config(), {"current": current}, sources_of="current")
    assert set(report) == {"global", "last"}
    sources = {f"source {s}" for s in Config().recommend.weights if s != "chat"}
    for methods in report.values():
        assert {"current", "buy-again", "popularity (repeats)"} | sources <= set(methods)
        assert all(0.0 <= m["ndcg10"] <= 1.0 for m in methods.values())
    last = report["last"]
    assert last["source repeat"]["ndcg10"] > 2 * last["source covisit"]["ndcg10"]
    assert last["source repeat"]["ndcg10"] >= 0.9 * last["buy-again"]["ndcg10"]


def test_settings_apply_and_unknown_names_are_refused(
    grocery_factory: Callable[..., History],
) -> None:
    """A setting changes exactly its names; unknown names are refused, also when pinned."""
    cfg = apply_setting(Config().recommend, {"weights.collab": 2.5, "seed_half_life": 4.0})
    assert cfg.weights["collab"] == 2.5 and cfg.seed_half_life == 4.0
    assert cfg.weights["covisit"] == Config().recommend.weights["covisit"]
    assert tuple(SPACE) == TUNABLE
    with pytest.raises(ValueError, match="unknown tuned setting"):
        apply_setting(Config().recommend, {"seeds_halflife": 1.0})
    with pytest.raises(ValueError, match="unknown pinned setting"):
        tune(grocery_factory(shoppers=10), Config(), trials=1, pinned=["weights.nothing"])
    with pytest.raises(ConfigError, match=r"\[tune\] pinned: unknown setting 'weights.x'"):
        load_config(environ={"PERSONIFY_TUNE__PINNED": '["weights.x"]'})


def test_a_due_tuning_waits_while_a_backfill_pours_in() -> None:
    """Tuning waits while the history grows by more than 5% per interval, at most 10 minutes."""
    from personify.agents.tuning import GROWING, TUNE_WAIT_MAX_S, settled

    assert not settled(5_000, 20_000, None)  # a quarter more arrived while training
    assert not settled(int(GROWING * 20_000) + 1, 20_000, TUNE_WAIT_MAX_S - 1)
    assert settled(int(GROWING * 20_000), 20_000, None)  # a live shop's trickle
    assert settled(0, 1_000, 0.0)
    assert settled(5_000, 20_000, TUNE_WAIT_MAX_S)  # a shop that never pauses is tuned too
