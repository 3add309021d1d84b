"""Behavioural clusters: the number of clusters chosen by silhouette, described, assigned live."""

from __future__ import annotations

import numpy as np

from personify.engine.config import ProfilesConfig
from personify.tables.clusters import Clusters, fit
from personify.tables.profiles import new_profile
from personify.tables.propensity import FEATURES
from personify.tables.segments import Facts, Rules

DAY = 86_400_000
NOW = 1_765_022_400_000


def visitor(views: int, orders: int, days_ago: float) -> dict[str, object]:
    return new_profile("v") | {
        "counts": {"product_view": views, "purchase": orders},
        "orders": orders,
        "last_seen": NOW - int(days_ago * DAY),
        "first_seen": NOW - int((days_ago + 30) * DAY),
        "last_order": None if not orders else NOW - int(days_ago * DAY),
    }


def test_three_kinds_of_visitors_make_three_described_clusters() -> None:
    rng = np.random.default_rng(0)
    raw = np.vstack(
        [rng.normal(centre, 0.2, size=(200, len(FEATURES))) for centre in (0.5, 2.5, 4.5)]
    )
    raw[:200, FEATURES.index("orders")] = 0.0  # the first kind never orders
    found = fit(np.maximum(raw, 0.0), NOW)
    assert found is not None
    assert max(found.silhouette, key=lambda k: found.silhouette[k]) == "3"
    assert len(found.centroids) == 3 and sorted(c["size"] for c in found.described) == [200] * 3
    for described in found.described:
        assert len(described["distinctive"]) == 3
        assert {d["feature"] for d in described["distinctive"]} <= set(FEATURES)
    assert Clusters.from_json(found.as_json()) == found
    assert fit(raw[:10], NOW) is None  # too few visitors


def test_a_visitor_is_assigned_the_nearest_cluster_and_rules_can_name_it() -> None:
    rng = np.random.default_rng(1)
    quiet = [visitor(int(rng.integers(1, 3)), 0, float(rng.uniform(60, 90))) for _ in range(60)]
    keen = [visitor(int(rng.integers(40, 60)), 8, float(rng.uniform(0, 2))) for _ in range(60)]
    from personify.tables.propensity import profile_features

    raw = np.vstack([profile_features(p, NOW) for p in quiet + keen])
    found = fit(raw, NOW, max_k=4)
    assert found is not None
    cfg = ProfilesConfig()
    keen_cluster = found.of(keen[0], NOW)
    assert {found.of(p, NOW) for p in keen} == {keen_cluster}
    assert found.of(quiet[0], NOW) != keen_cluster
    rules = Rules({"keen": f"cluster == {keen_cluster}"})
    assert rules.members(Facts(keen[1], cfg, NOW, clusters=found)) == ["keen"]
    assert rules.members(Facts(quiet[1], cfg, NOW, clusters=found)) == []
    assert Facts(keen[1], cfg, NOW)["cluster"] == -1  # not fitted yet
