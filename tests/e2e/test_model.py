"""The learned model end to end: trained from the history, used in lists, kept across restarts."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

PERSONIFY = str(Path(sys.executable).with_name("personify"))

pytestmark = pytest.mark.e2e

CONFIG = """
[model]
min_interactions = 480
retrain_interactions = 1000000
retrain_interval_s = 86400.0
check_interval_s = 0.5
factors = 4
regularization = 0.5
iterations = 15

[tune]
trials = 4
max_users = 100
"""

#: Two tastes with nothing in the titles to tell them apart (the content source is no help).
ITEMS = [
    {"item_id": f"{group}-{j}", "title": f"Product {group.upper()}{j}"}
    for group in ("a", "b")
    for j in range(12)
]


def _history() -> list[dict[str, Any]]:
    """30 visitors per taste, each viewing 8 of its 12 items, one a day in turn."""
    rng = random.Random(4)
    start = int(time.time() * 1000) - 500 * 86_400_000  # within [model] history_days of now
    events = []
    for n in range(60):
        group = "a" if n < 30 else "b"
        for step, j in enumerate(rng.sample(range(12), 8)):
            events.append(
                {
                    "event_id": f"h-{n}-{step}",
                    "type": "product_view",
                    "user_id": f"shopper-{n}",
                    "item_id": f"{group}-{j}",
                    "ts": start + (step * 60 + n) * 86_400_000,
                }
            )
    return events


def _quality(eng: Any) -> dict[str, Any]:
    status, body = eng.request("GET", "/v1/quality")
    assert status == 200, body
    return dict(body)


def _list(eng: Any, user: str, k: int = 20) -> list[dict[str, Any]]:
    status, body = eng.request("GET", f"/v1/users/{user}/recommendations?k={k}")
    assert status == 200, body
    return list(body["items"])


def test_a_model_is_trained_used_restored_and_never_brings_back_a_deleted_item(
    engine_factory: Any,
) -> None:
    """The model trains by itself, explains its items, survives a restart, respects deletes."""
    eng = engine_factory(config=CONFIG).start()
    before = _quality(eng)["model"]
    assert before["trained_at"] is None
    eng.add_items(ITEMS)
    events = _history()
    for i in range(0, len(events), 200):
        status, body = eng.post_events(events[i : i + 200])
        assert status == 202, body
    model = eng.wait_for(
        lambda: _quality(eng)["model"]["trained_at"] and _quality(eng)["model"],
        what="a trained model",
    )
    assert model["interactions"] == len(events)
    assert model["description"]["items"] == 24
    assert model["description"]["users"] == 60
    # Churn scores learned with it (views only: no purchase score), measured on a hold-out.
    propensity = _quality(eng)["propensity"]
    assert propensity["trained_to"] is not None and set(propensity["targets"]) == {"churn_30d"}
    churn = propensity["targets"]["churn_30d"]
    assert churn["visitors"] == 60 and len(churn["calibration"]) == 10
    assert churn["roc_auc"] > 0.8
    status, shopper = eng.profile("shopper-0")
    assert status == 200 and shopper["scores"]["purchase_propensity"] is None
    assert 0.0 < shopper["scores"]["churn_propensity"] < 1.0

    # The engine tuned itself on its history, once it stopped growing, and scored the result
    # on a hold-out.
    quality = eng.wait_for(
        lambda: _quality(eng)["tuning"]["tuned_at"] and _quality(eng), what="a tuning run"
    )
    tuning = quality["tuning"]
    assert len(tuning["runs"]) == 1
    run = tuning["runs"][0]
    assert run["trials"] == 4 and run["interactions"] == len(events)
    assert set(tuning["validation"]) == {"best", "current"}
    expected = run["setting"] if run["improved"] else run["current"]
    assert tuning["setting"] == pytest.approx(expected, rel=1e-3)
    # A ranker was learned and judged against the blend on validation; in use where it won.
    assert run["ranker"]["choice"] in {"learned", "blend"}
    assert {"current", "choice"} <= set(run["selection"])
    assert set(run["search"]) == {"best", "current"}
    assert (tuning["ranker"] is not None) == (run["ranker"]["choice"] == "learned")
    # Eight views each: too few to hold out ten ("last"); the global cut scores them.
    assert set(quality["evaluation"]) == {"at", "interactions", "global"}
    methods = quality["evaluation"]["global"]
    assert {"current", "tuned", "buy-again", "popularity (repeats)"} <= set(methods)
    tuned_ndcg = methods["tuned"]["ndcg10"]
    assert tuned_ndcg > methods["popularity (repeats)"]["ndcg10"]
    assert eng.metric('personify_quality_ndcg10{method="tuned",protocol="global"}') == (
        pytest.approx(tuned_ndcg)
    )

    # A new visitor of taste A: the model's items come with their reason.
    status, _ = eng.post_events(
        [{"type": "product_view", "user_id": "fan-a", "item_id": f"a-{j}"} for j in range(4)]
    )
    assert status == 202
    eng.wait_profile("fan-a", lambda p: len(p["recent_items"]) == 4)
    items = _list(eng, "fan-a")
    taste = [r for r in items if any(why["kind"] == "taste" for why in r["reasons"])]
    assert taste, items
    assert {why["item_id"] for r in taste for why in r["reasons"] if why["kind"] == "taste"} <= {
        f"a-{j}" for j in range(4)
    }
    top = [r["item_id"] for r in items[:8]]
    assert sorted(top) == sorted(f"a-{j}" for j in range(4, 12)), items

    # A restart serves the saved model at once (not trained again).
    assert eng.stop() == 0
    eng.start()
    after = _quality(eng)["model"]
    assert after["trained_at"] == model["trained_at"]
    assert after["description"] == model["description"]
    assert _quality(eng)["tuning"]["runs"] == quality["tuning"]["runs"]
    assert _quality(eng)["tuning"]["setting"] == quality["tuning"]["setting"]
    assert _quality(eng)["tuning"]["ranker"] == quality["tuning"]["ranker"]
    restored = _list(eng, "fan-a")
    assert any(why["kind"] == "taste" for r in restored for why in r["reasons"])

    # `personify evaluate` has it train, tune and score itself again, and shows the figures.
    done = subprocess.run(
        [PERSONIFY, "evaluate", "--url", eng.url, "--timeout", "240"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=eng.data_dir.parent,
    )
    assert done.returncode == 0, done.stderr
    assert "hold-out: global" in done.stdout and "tuned" in done.stdout, done.stdout
    assert len(_quality(eng)["tuning"]["runs"]) == 2
    shown = subprocess.run(
        [PERSONIFY, "evaluate", "--url", eng.url, "--show"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=eng.data_dir.parent,
    )
    assert shown.returncode == 0 and "hold-out: global" in shown.stdout
    assert "propensity, temporal hold-out" in shown.stdout and "churn_30d" in shown.stdout
    assert len(_quality(eng)["tuning"]["runs"]) == 2

    # A deleted item never comes back through the model.
    gone = top[0]
    status, _ = eng.request("DELETE", f"/v1/items/{gone}")
    assert status in (200, 202)
    eng.wait_for(lambda: eng.request("GET", f"/v1/items/{gone}")[0] == 404, what="the delete")
    for k in (10, 20):
        assert gone not in [r["item_id"] for r in _list(eng, "fan-a", k)]


def test_too_little_history_trains_no_model(engine_factory: Any) -> None:
    """Below [model] min_interactions the engine says so and lists still work without it."""
    eng = engine_factory(config=CONFIG).start()
    eng.add_items(ITEMS)
    status, _ = eng.post_events(_history()[:50])
    assert status == 202
    model = eng.wait_for(
        lambda: _quality(eng)["model"]["pending"] == 50 and _quality(eng)["model"],
        what="the new interactions counted",
    )
    assert model["trained_at"] is None
    assert model["last_run"]["outcome"] == "too little history"
    assert "description" not in model
    assert _list(eng, "shopper-0")


def test_a_backfill_of_old_history_ranks_as_it_did_then(engine_factory: Any) -> None:
    """Events years old, at their real time, still make what trends.

    Decays count from the shop's newest event, not from today.
    """
    eng = engine_factory().start()
    eng.add_items(ITEMS[:6])
    old = 1_433_160_000_000  # 2015-06-01
    views = [("a-2", 6), ("a-4", 3), ("a-0", 1)]
    events = [
        {
            "type": "product_view",
            "user_id": f"old-{item}-{n}",
            "item_id": item,
            "ts": old + n * 60_000,
        }
        for item, count in views
        for n in range(count)
    ]
    status, body = eng.post_events(events)
    assert status == 202, body
    eng.wait_profile("old-a-0-0", lambda p: p["counts"].get("product_view") == 1)
    # Signal rows are written every few seconds: wait until all three trend.
    listed = eng.wait_for(
        lambda: (
            (items := _list(eng, "someone-new", 3))
            and all(r["reasons"][0]["kind"] == "trending" for r in items)
            and items
        ),
        what="trending items from 2015",
    )
    assert [r["item_id"] for r in listed] == ["a-2", "a-4", "a-0"]


RANKER_CONFIG = (
    CONFIG
    + """
pinned = ["weights.covisit", "weights.copurchase", "weights.content", "weights.category",
          "weights.trending", "weights.collab", "weights.repeat", "weights.popular",
          "seed_half_life"]

[recommend.weights]
repeat = 0.01
"""
)


def _groceries() -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """60 shoppers, each re-buying their 4 staples weekly for 8 weeks, plus one other product."""
    rng = random.Random(7)
    week = 7 * 86_400_000
    start = int(time.time() * 1000) - 9 * week
    events, staples = [], {}
    for s in range(60):
        mine = rng.sample(range(40), 4)
        staples[f"shopper-{s}"] = [f"p{j}" for j in mine]
        for w in range(8):
            lines = [*mine[: 3 + w % 2], rng.randrange(40)]
            events.append(
                {
                    "event_id": f"g-{s}-{w}",
                    "type": "purchase",
                    "user_id": f"shopper-{s}",
                    "ts": start + w * week + s * 1000,
                    "properties": {
                        "items": [
                            {"item_id": f"p{j}", "quantity": 1, "price": 2.0}
                            for j in dict.fromkeys(lines)
                        ]
                    },
                }
            )
    return events, staples


def test_a_learned_ranker_orders_live_lists_and_survives_a_restart(engine_factory: Any) -> None:
    """With buy-again all but off in a pinned blend, the ranker learns re-buying by itself.

    The tuning keeps it (it beats the blend on validation visitors it never learned on); lists
    bring each shopper's staples back first; a restart ranks with the saved ranker.
    """
    eng = engine_factory(config=RANKER_CONFIG).start()
    eng.add_items([{"item_id": f"p{j}", "title": f"Grocery staple number {j}"} for j in range(40)])
    events, staples = _groceries()
    status, body = eng.post_events(events)
    assert status == 202, body
    quality = eng.wait_for(
        lambda: _quality(eng)["tuning"]["tuned_at"] and _quality(eng), what="a tuning run"
    )
    run = quality["tuning"]["runs"][-1]
    assert not run["improved"]  # every weight is pinned
    assert run["ranker"]["choice"] == "learned", run
    selection = run["selection"]
    assert selection["current, new ranker"]["mean"] > selection["current"]["mean"]
    ranker = quality["tuning"]["ranker"]
    assert ranker is not None and ranker["trees"] > 0
    assert ranker["importance"]["repeat"] + ranker["importance"]["repeat_raw"] > 0.2
    # Lists ranked before the ranker came are ranked again behind the answers.
    eng.wait_for(lambda: eng.metric("personify_lists_refresh_pending") == 0, what="the refresh")

    def staples_first() -> int:
        """Of the first 4 items of 10 shoppers' lists, how many are the shopper's staples."""
        return sum(
            len({r["item_id"] for r in _list(eng, user, 10)[:4]} & set(mine))
            for user, mine in list(staples.items())[:10]
        )

    assert staples_first() >= 30  # of 40
    assert eng.stop() == 0
    eng.start()
    assert _quality(eng)["tuning"]["ranker"] == ranker
    assert staples_first() >= 30
