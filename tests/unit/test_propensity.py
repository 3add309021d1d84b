"""Purchase and churn scores: the same features from the history and from the live profile."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from personify.engine.config import ProfilesConfig
from personify.tables.history import Interactions
from personify.tables.profiles import apply_events, new_profile
from personify.tables.propensity import (
    FEATURES,
    Propensity,
    features_at,
    fit,
    profile_features,
    roc_auc,
)
from personify.tables.segments import Facts, Rules

DAY = 86_400_000
T0 = 1_700_000_000_000
KIND = {kind: n for n, kind in enumerate(Interactions.KINDS)}


def event(n: int, kind: str, ts: int, item: str = "i") -> dict[str, Any]:
    props: dict[str, Any] = {}
    if kind == "purchase":
        props = {"items": [{"item_id": item, "price": 5.0, "quantity": 1}], "revenue": 5.0}
        props["currency"] = "EUR"
    elif kind == "add_to_cart":
        props = {"quantity": 1, "price": 5.0}
    return {
        "event_id": f"e{n}",
        "type": kind,
        "user_id": "u",
        "anonymous_id": None,
        "item_id": None if kind == "purchase" else item,
        "ts_ms": ts,
        "properties": props,
    }


def test_the_history_and_the_profile_give_the_same_features() -> None:
    steps = [
        ("product_view", T0),
        ("click", T0 + DAY),
        ("add_to_cart", T0 + 2 * DAY),
        ("purchase", T0 + 2 * DAY + 1000),
        ("product_view", T0 + 40 * DAY),
        ("purchase", T0 + 41 * DAY),
        ("product_view", T0 + 50 * DAY),
    ]
    p = new_profile("u")
    apply_events(p, [event(n, k, ts) for n, (k, ts) in enumerate(steps)], ProfilesConfig())
    now = T0 + 55 * DAY
    kinds = np.array([KIND[k] for k, _ts in steps], dtype=np.int8)
    times = np.array([ts for _k, ts in steps], dtype=np.int64)
    users, from_history = features_at(np.zeros(len(steps), dtype=np.int64), kinds, times, now)
    assert users.tolist() == [0]
    assert from_history == pytest.approx(profile_features(p, now))
    named = dict(zip(FEATURES, np.expm1(from_history[0]).tolist(), strict=True))
    assert named["orders"] == pytest.approx(2) and named["days_since_order"] == pytest.approx(14)
    assert named["active_days_30"] == pytest.approx(3)  # days 40, 41 and 50


def shop(seed: int = 0) -> tuple[Any, Any, Any]:
    """Half the shoppers buy about weekly for 20 weeks, the others buy once and stop."""
    rng = random.Random(seed)
    rows: list[tuple[int, int, int]] = []
    for user in range(300):
        loyal = user % 2 == 0
        start = T0 + rng.randint(0, 20) * DAY
        weeks = 20 if loyal else 1
        for week in range(weeks):
            ts = start + week * 7 * DAY + rng.randint(0, 3) * DAY
            rows.append((user, KIND["product_view"], ts - 3_600_000))
            if rng.random() < (0.8 if loyal else 1.0):
                rows.append((user, KIND["purchase"], ts))
    rows.sort(key=lambda r: r[2])
    user, kind, ts = (
        np.array(c, dtype=t)
        for c, t in zip(zip(*rows, strict=True), ("i8", "i1", "i8"), strict=True)
    )
    return user, kind, ts


def test_scores_are_learned_and_measured_on_a_hold_out() -> None:
    user, kind, ts = shop()
    found = fit(user, kind, ts)
    assert found is not None and set(found.models) == {"purchase_7d", "churn_30d"}
    for target, figures in found.evaluation.items():
        assert figures["roc_auc"] > 0.8, (target, figures)
        assert len(figures["calibration"]) == 10
        predicted = [c["predicted"] for c in figures["calibration"]]
        assert predicted == sorted(predicted)
    again = Propensity.from_json(found.as_json())
    assert again == found
    assert fit(user[:5], kind[:5], ts[:5]) is None  # too little history


def test_rules_compare_the_scores_and_none_hold_before_they_are_learned() -> None:
    user, kind, ts = shop()
    found = fit(user, kind, ts)
    p = new_profile("u") | {"orders": 12, "last_order": T0, "last_seen": T0, "first_seen": T0}
    rules = Rules({"buyer": "purchase_propensity > 0.5", "unknown": "churn_propensity <= 1"})
    assert Rules({"x": "churn_propensity >= 0"}).members(Facts(p, ProfilesConfig(), T0)) == []
    held = rules.members(Facts(p, ProfilesConfig(), T0, scores=found, score_ms=T0 + DAY))
    assert held == ["buyer", "unknown"]


def test_roc_auc_needs_both_outcomes() -> None:
    assert roc_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert roc_auc(np.array([0.1, 0.9]), np.array([True, True])) is None
