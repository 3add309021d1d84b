"""The rule language of segments, RFM cut points, and members listed from the profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rocksdict import Rdict

from personify.engine.config import ProfilesConfig
from personify.engine.errors import ValidationError
from personify.tables.profiles import apply_events, encode, new_profile
from personify.tables.segments import (
    Facts,
    Registry,
    Rules,
    check_rule,
    members,
    rfm_cuts,
    rfm_values,
    size_key,
    sizes,
)

DAY = 86_400_000
NOW = 1_765_022_400_000  # 2025-12-06 12:00 UTC
CFG = ProfilesConfig()


def event(etype: str, ts: int, item: str | None = None, **props: Any) -> dict[str, Any]:
    return {
        "event_id": f"{etype}-{ts}-{item}",
        "type": etype,
        "user_id": "u",
        "anonymous_id": None,
        "item_id": item,
        "ts_ms": ts,
        "properties": props,
    }


def shopper() -> dict[str, Any]:
    """Two orders (40 days and 10 days ago), hiking views, a cart of 30."""
    p = new_profile("u")
    line = {"item_id": "boots", "price": 50.0, "quantity": 1}
    apply_events(
        p,
        [
            event("product_view", NOW - 41 * DAY, "jacket", category="outdoor/hiking"),
            event("purchase", NOW - 40 * DAY, items=[line], revenue=50.0, currency="USD"),
            event("product_view", NOW - 11 * DAY, "poles", category="outdoor/hiking"),
            event("purchase", NOW - 10 * DAY, items=[line], revenue=70.0, currency="USD"),
            event("add_to_cart", NOW - DAY, "pan", quantity=2, price=15.0),
        ],
        CFG,
    )
    return p


def holds(rule: str, p: dict[str, Any] | None = None) -> bool:
    return Rules({"s": rule}).members(Facts(p or shopper(), CFG, NOW)) == ["s"]


@pytest.mark.parametrize(
    "rule",
    [
        "orders >= 2 and spend > 100",
        "days_since_order > 5 and days_since_order < 11",
        "not days_since_seen > 2",
        "cart_value == 30 and cart_items == 2",
        'affinity("outdoor") > 0 and affinity("outdoor/hiking") > 0',
        'count("product_view") == 2 and views == 2',
        "events_in(2) == 1 and events_in(7) == 1",
        'consent("marketing")',
        "aov == 60",
        "0 < spend / orders < 100 or orders == 0",
        "-orders < 0",
    ],
)
def test_rules_that_hold_for_the_shopper(rule: str) -> None:
    assert holds(rule)


@pytest.mark.parametrize(
    "rule",
    [
        "orders == 0",
        "days_since_order > 30",
        'affinity("home") > 0',
        "sessions_in(2) > 1",
        "cart_value > 30",
    ],
)
def test_rules_that_do_not(rule: str) -> None:
    assert not holds(rule)


def test_a_visitor_with_nothing_never_ordered() -> None:
    p = new_profile("x")
    assert holds("days_since_order > 10000 and days_since_seen > 10000", p)
    assert not holds("spend / orders > 1", p)  # a division by zero holds for no one
    both = Rules({"a": "spend / orders > 1", "b": "orders == 0"})
    assert both.members(Facts(p, CFG, NOW)) == ["b"]


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ("__import__('os')", "unknown function"),
        ("orders.real", "attribute"),
        ("orders[0] > 1", "subscript"),
        ("lambda: 1", "lambda"),
        ("[orders]", "list"),
        ("orders if spend else views", "ifexp"),
        ("lifetime > 1", "unknown field 'lifetime'"),
        ("orders in (1, 2)", "compare with"),
        ("orders ** 2 > 1", "only + - * /"),
        ('affinity(category="x")', "one argument"),
        ("affinity(1) > 0", "takes a string"),
        ('events_in("7") > 0', "whole number of days"),
        ('consent("ads")', "consent() takes one of"),
        ("orders >", "not an expression"),
        ("", "expected an expression"),
        ("x" * 2001, "at most 2000"),
    ],
)
def test_anything_outside_the_language_is_refused(rule: str, reason: str) -> None:
    with pytest.raises(ValidationError) as caught:
        check_rule(rule)
    assert caught.value.field == "rule" and reason in caught.value.reason


def test_rfm_scores_follow_the_quintiles_of_the_buyers() -> None:
    values: list[float] = []
    for n in range(10):  # the n-th buyer: ordered n days ago, n + 1 times, spent 10 (n + 1)
        values += [float(n), float(n + 1), 10.0 * (n + 1)]
    cuts = rfm_cuts(values, NOW)
    assert len(cuts.monetary) == 4

    def scores(days: int, orders: int, spend: float) -> tuple[int, int, int]:
        p = new_profile("b") | {"orders": orders, "spend": spend, "last_order": NOW - days * DAY}
        facts = Facts(p, CFG, NOW, cuts)
        return facts["recency"], facts["frequency"], facts["monetary"]

    assert scores(0, 10, 100.0) == (5, 5, 5)
    assert scores(9, 1, 10.0) == (1, 1, 1)
    assert scores(4, 5, 50.0) == (3, 3, 3)
    later = Facts(new_profile("b") | {"orders": 1, "spend": 1.0, "last_order": NOW}, CFG, NOW)
    assert later["recency"] == 0  # no cut points yet: no score
    p = shopper()
    assert rfm_values(p, NOW) == pytest.approx((10.0, 2.0, 120.0))
    assert rfm_values(new_profile("n"), NOW) is None


def test_members_page_in_id_order_over_partitions(tmp_path: Path) -> None:
    dbs = [Rdict(str(tmp_path / f"p{n}")) for n in range(3)]
    try:
        for n in range(7):
            dbs[n % 3][f"v{n}".encode()] = encode(new_profile(f"v{n}") | {"segments": ["vip"]})
            # a segment whose id extends it, and no segment
            dbs[n % 3][f"w{n}".encode()] = encode(new_profile(f"w{n}") | {"segments": ["vipx"]})
            dbs[n % 3][f"x{n}".encode()] = encode(new_profile(f"x{n}"))
        dbs[1][b"\x00h-v9"] = b'{"segments":["vip"]}'  # the engine's own rows are not visitors
        dbs[2][b"__faust.offset"] = b"12"
        dbs[0][size_key("vip")] = b"3"
        dbs[1][size_key("vip")] = b"4"

        def pages(budget: int) -> list[list[str]]:
            out: list[list[str]] = []
            after: str | None = ""
            while after is not None:
                page, after = members(dbs, "vip", after, 3, budget)
                out.append(page)
                assert len(out) < 50, "the cursor moves on"
            return out

        assert pages(50_000) == [["v0", "v1", "v2"], ["v3", "v4", "v5"], ["v6"]]
        # Reading one profile per partition and page: short pages, the same members in order.
        short = pages(1)
        assert max(len(page) for page in short) <= 3 and len(short) > 3
        assert [v for page in short for v in page] == [f"v{n}" for n in range(7)]
        assert members(dbs, "none", "", 3) == ([], None)
        assert sizes(dbs, ["vip", "none"]) == {"vip": 7, "none": 0}
    finally:
        for partition_db in dbs:
            partition_db.close()


def test_the_registry_keeps_segments_and_cut_points(tmp_path: Path) -> None:
    path = tmp_path / "segments.json"
    registry = Registry(path, max_segments=2)
    segment, created = registry.put("vip", {"rule": "spend > 100", "description": "big"}, NOW)
    assert created and segment.created == segment.updated
    _, created = registry.put("vip", {"rule": "spend > 100", "description": "bigger"}, NOW + 1)
    assert not created
    registry.put("new", {"rule": "orders == 0"}, NOW)
    with pytest.raises(ValidationError, match="at most 2"):
        registry.put("third", {"rule": "orders == 1"}, NOW)
    with pytest.raises(ValidationError) as caught:
        registry.put("x", {"rule": "spend > 1", "colour": "red"}, NOW)
    assert caught.value.field == "colour"
    registry.set_cuts(rfm_cuts([1.0, 1.0, 10.0] * 5, NOW))
    again = Registry(path)
    assert [s.as_json() for s in again.all()] == [s.as_json() for s in registry.all()]
    assert again.cuts == registry.cuts and again.get("vip") is not None
    assert again.members(shopper(), CFG, NOW) == ["vip"]
    assert again.members(shopper() | {"alias_of": "user"}, CFG, NOW) == []
    rfm = frozenset({"recency", "frequency", "monetary"})
    assert not again.uses(rfm)
    assert again.delete("new") and not again.delete("new")
    again.put("best", {"rule": "monetary >= 4"}, NOW)
    assert again.uses(rfm) and [s.id for s in again.all()] == ["best", "vip"]


def test_after_events_only_the_rules_they_may_change_are_evaluated(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "segments.json")
    registry.put("viewer", {"rule": "views >= 2"}, NOW)
    registry.put("buyer", {"rule": "orders >= 1"}, NOW)
    registry.put("recent", {"rule": "days_since_seen < 1"}, NOW)
    p = shopper()  # two views, two orders, last seen a day ago
    assert registry.members(p, CFG, NOW) == ["buyer", "viewer"]
    # As stored after an evaluation that missed "viewer" (the rule was defined since, say).
    p |= {"segments": ["buyer"], "segments_of": registry.digest}
    bought = registry.members(p, CFG, NOW, types=frozenset({"purchase"}))
    assert bought == ["buyer"]  # a purchase cannot change "views >= 2": it stands
    viewed = registry.members(p, CFG, NOW, types=frozenset({"product_view"}))
    assert viewed == ["buyer", "viewer"]
    # Rules that name the time (days_since_seen) are evaluated after any event.
    p["last_seen"] = NOW
    assert "recent" in registry.members(p, CFG, NOW, types=frozenset({"purchase"}))
    # Time alone (the days since an order) is the sweep's to find: a view leaves it standing.
    registry.put("lapsed", {"rule": "days_since_order > 0.5"}, NOW)
    p |= {"segments": ["buyer", "recent", "viewer"], "segments_of": registry.digest}
    assert "lapsed" not in registry.members(p, CFG, NOW, types=frozenset({"product_view"}))
    assert "lapsed" in registry.members(p, CFG, NOW, types=frozenset({"purchase"}))
    assert "lapsed" in registry.members(p, CFG, NOW)  # what the sweep evaluates
    registry.delete("lapsed")
    # Evaluated with other rules: every rule again.
    registry.put("cart", {"rule": "cart_value > 1"}, NOW)
    assert registry.members(p, CFG, NOW, types=frozenset({"search"})) == [
        "buyer",
        "cart",
        "recent",
        "viewer",
    ]


def test_a_segment_may_rank_its_own_way(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "segments.json")
    assert not registry.ranks()
    registry.put("new", {"rule": "orders == 0", "ranking": {"weights.trending": 2}}, NOW)
    registry.put("any", {"rule": "views >= 0"}, NOW)
    registry.put("b-buyers", {"rule": "orders > 0", "ranking": {"weights.repeat": 0}}, NOW)
    assert registry.ranks()
    found = registry.ranking_of(["new", "any", "b-buyers"])
    assert found is not None and found.id == "b-buyers" and found.ranking == {"weights.repeat": 0}
    assert registry.ranking_of(["any"]) is None
    for bad, field in [
        ({"weights.nope": 1}, "ranking.weights.nope"),
        ({"weights.collab": -1}, "ranking.weights.collab"),
        ({"weights.collab": "x"}, "ranking.weights.collab"),
        ([1], "ranking"),
    ]:
        with pytest.raises(ValidationError) as caught:
            registry.put("x", {"rule": "views > 1", "ranking": bad}, NOW)
        assert caught.value.field == field
    assert Registry(tmp_path / "segments.json").get("new").ranking == {"weights.trending": 2.0}  # type: ignore[union-attr]
