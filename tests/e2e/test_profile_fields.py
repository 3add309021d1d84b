"""Every profile field family, computed from events sent over HTTP to a running engine."""

from __future__ import annotations

import time
from typing import Any

DAY_MS = 86_400_000
MIN_MS = 60_000


def _now_ms() -> int:
    return int(time.time() * 1000)


def _post_ok(engine: Any, events: list[dict[str, Any]]) -> None:
    status, body = engine.post_events(events)
    assert status == 202, body
    assert body["accepted"] == len(events), body


def _total(profile: dict[str, Any]) -> int:
    return sum(profile["counts"].values())


def test_counts_by_type(engine: Any, uid: str) -> None:
    """Counts are kept per event type."""
    _post_ok(
        engine,
        [
            {"type": "page_view", "user_id": uid},
            {"type": "page_view", "user_id": uid},
            {"type": "product_view", "user_id": uid, "item_id": "sku-1"},
            {"type": "wishlist_add", "user_id": uid, "item_id": "sku-1"},
        ],
    )
    p = engine.wait_profile(uid, lambda p: _total(p) == 4)
    assert p["counts"] == {"page_view": 2, "product_view": 1, "wishlist_add": 1}


def test_sessions_split_by_inactivity_and_seen_times(engine: Any, uid: str) -> None:
    """A gap over 30 minutes starts a new session; first/last seen bound all events."""
    t0 = _now_ms() - 3 * 3_600_000
    times = [t0, t0 + 10 * MIN_MS, t0 + 25 * MIN_MS, t0 + 70 * MIN_MS, t0 + 80 * MIN_MS]
    _post_ok(engine, [{"type": "page_view", "user_id": uid, "ts": t} for t in reversed(times[3:])])
    _post_ok(engine, [{"type": "page_view", "user_id": uid, "ts": t} for t in times[:3]])
    p = engine.wait_profile(uid, lambda p: _total(p) == 5)
    assert p["first_seen"] is not None and p["last_seen"] is not None
    assert p["first_seen"].startswith(time.strftime("%Y-%m-%dT%H:%M", time.gmtime(t0 / 1000)))
    assert p["last_seen"].startswith(time.strftime("%Y-%m-%dT%H:%M", time.gmtime(times[-1] / 1000)))
    assert p["sessions"]["count"] >= 2


def test_sessions_in_order(engine: Any, uid: str) -> None:
    """Events in time order: 3 sessions for two gaps of more than 30 minutes."""
    t0 = _now_ms() - 5 * 3_600_000
    offsets = [0, 5, 20, 60, 65, 200]  # minutes: gaps after 20 (40 min) and 65 (135 min)
    _post_ok(
        engine, [{"type": "page_view", "user_id": uid, "ts": t0 + m * MIN_MS} for m in offsets]
    )
    p = engine.wait_profile(uid, lambda p: _total(p) == 6)
    assert p["sessions"]["count"] == 3
    assert p["sessions"]["current"]["events"] == 1
    assert p["sessions"]["current"]["active"] is False


def test_frequency_is_a_sliding_seven_day_window(engine: Any, uid: str) -> None:
    """Events and sessions older than 7 days are not counted in frequency."""
    now = _now_ms()
    _post_ok(
        engine,
        [
            {"type": "page_view", "user_id": uid, "ts": now - 10 * DAY_MS},
            {"type": "page_view", "user_id": uid, "ts": now - 8 * DAY_MS},
            {"type": "page_view", "user_id": uid, "ts": now - 2 * DAY_MS},
            {"type": "page_view", "user_id": uid, "ts": now - 1 * DAY_MS},
            {"type": "page_view", "user_id": uid, "ts": now - 1 * DAY_MS + MIN_MS},
        ],
    )
    p = engine.wait_profile(uid, lambda p: _total(p) == 5)
    assert p["frequency"]["events"] == 3
    assert p["frequency"]["sessions"] == 2
    assert p["sessions"]["count"] == 4


def test_monetary(engine: Any, uid: str) -> None:
    """Lifetime spend, order count and average order value follow purchases."""
    _post_ok(
        engine,
        [
            {
                "type": "purchase",
                "user_id": uid,
                "properties": {
                    "items": [
                        {"item_id": "a", "quantity": 2, "price": 30.0},
                        {"item_id": "b", "price": 40},
                    ]
                },
            },
            {
                "type": "purchase",
                "user_id": uid,
                "properties": {"items": [{"item_id": "c"}], "revenue": 20.5, "currency": "eur"},
            },
        ],
    )
    p = engine.wait_profile(uid, lambda p: p["order_count"] == 2)
    assert p["lifetime_spend"] == 120.5
    assert p["average_order_value"] == 60.25
    assert p["spend_by_currency"] == {"USD": 100.0, "EUR": 20.5}


def test_recent_items_bounded_newest_first(engine: Any, uid: str) -> None:
    """Recent items keep the 500 newest distinct items, newest first."""
    t0 = _now_ms() - 3_600_000
    events = [
        {"type": "product_view", "user_id": uid, "item_id": f"sku-{i}", "ts": t0 + i * 1000}
        for i in range(510)
    ]
    events.append({"type": "product_view", "user_id": uid, "item_id": "sku-30", "ts": t0 + 600_000})
    _post_ok(engine, events)
    p = engine.wait_profile(uid, lambda p: _total(p) == 511)
    ids = [r["item_id"] for r in p["recent_items"]]
    assert len(ids) == 500
    assert ids[0] == "sku-30"
    assert ids[1:4] == ["sku-509", "sku-508", "sku-507"]
    assert len(set(ids)) == 500
    assert "sku-9" not in ids and "sku-10" in ids


def test_cart_adds_removes_and_purchase(engine: Any, uid: str) -> None:
    """The cart follows add/remove; a purchase removes the purchased items."""
    _post_ok(
        engine,
        [
            {
                "type": "add_to_cart",
                "user_id": uid,
                "item_id": "a",
                "properties": {"quantity": 2, "price": 10},
            },
            {"type": "add_to_cart", "user_id": uid, "item_id": "a", "properties": {"quantity": 1}},
            {"type": "add_to_cart", "user_id": uid, "item_id": "b", "properties": {"price": 5.5}},
            {"type": "add_to_cart", "user_id": uid, "item_id": "c", "properties": {"price": 1}},
            {
                "type": "remove_from_cart",
                "user_id": uid,
                "item_id": "a",
                "properties": {"quantity": 1},
            },
            {"type": "remove_from_cart", "user_id": uid, "item_id": "c"},
        ],
    )
    p = engine.wait_profile(uid, lambda p: _total(p) == 6)
    cart = {line["item_id"]: line for line in p["cart"]["items"]}
    assert set(cart) == {"a", "b"}
    assert cart["a"]["quantity"] == 2 and cart["a"]["price"] == 10.0
    assert p["cart"]["count"] == 3 and p["cart"]["total"] == 25.5
    _post_ok(
        engine,
        [
            {
                "type": "purchase",
                "user_id": uid,
                "item_id": "a",
                "properties": {"quantity": 2, "price": 10},
            }
        ],
    )
    p = engine.wait_profile(uid, lambda p: p["order_count"] == 1)
    assert [line["item_id"] for line in p["cart"]["items"]] == ["b"]


def test_recent_searches(engine: Any, uid: str) -> None:
    """Searches are kept newest first with their filters, at most 20."""
    t0 = _now_ms() - 3_600_000
    events = [
        {
            "type": "search",
            "user_id": uid,
            "ts": t0 + i,
            "properties": {"query": f"q{i}", "filters": {"size": "M"}},
        }
        for i in range(25)
    ]
    _post_ok(engine, events)
    p = engine.wait_profile(uid, lambda p: _total(p) == 25)
    queries = [s["query"] for s in p["recent_searches"]]
    assert queries == [f"q{i}" for i in range(24, 4, -1)]
    assert p["recent_searches"][0]["filters"] == {"size": "M"}


def test_category_affinity_decays_and_credits_parents(engine: Any, uid: str) -> None:
    """Affinity credits the category and its parents and halves every 7 days."""
    now = _now_ms()
    _post_ok(
        engine,
        [
            {
                "type": "product_view",
                "user_id": uid,
                "item_id": "j1",
                "ts": now - 7 * DAY_MS,
                "properties": {"category": "outdoor/jackets"},
            },
            {
                "type": "add_to_cart",
                "user_id": uid,
                "item_id": "t1",
                "ts": now,
                "properties": {"category": "outdoor/tents"},
            },
        ],
    )
    p = engine.wait_profile(uid, lambda p: _total(p) == 2)
    aff = p["category_affinity"]
    assert abs(aff["outdoor/jackets"] - 0.5) < 0.01
    assert abs(aff["outdoor/tents"] - 3.0) < 0.01
    assert abs(aff["outdoor"] - 3.5) < 0.01
    assert next(iter(aff)) == "outdoor"


def test_engagement_score_uses_weights(engine: Any, uid: str) -> None:
    """Engagement is the weighted sum: view 1, add_to_cart 3, purchase 5, custom 1."""
    _post_ok(
        engine,
        [
            {"type": "product_view", "user_id": uid, "item_id": "x"},
            {"type": "add_to_cart", "user_id": uid, "item_id": "x"},
            {"type": "purchase", "user_id": uid, "item_id": "x", "properties": {"price": 3}},
            {"type": "wishlist_add", "user_id": uid},
            {"type": "page_view", "user_id": uid},
        ],
    )
    p = engine.wait_profile(uid, lambda p: _total(p) == 5)
    assert p["engagement_score"] == 10.5


def test_identify_stitches_anonymous_session(engine: Any, uid: str) -> None:
    """Identify merges the anonymous visitor's history into the user and forwards later events."""
    anon = f"anon-{uid}"
    _post_ok(
        engine,
        [
            {
                "type": "product_view",
                "anonymous_id": anon,
                "item_id": "sku-a",
                "properties": {"category": "shoes"},
            },
            {
                "type": "add_to_cart",
                "anonymous_id": anon,
                "item_id": "sku-a",
                "properties": {"price": 50},
            },
        ],
    )
    engine.wait_profile(anon, lambda p: _total(p) == 2)
    _post_ok(
        engine,
        [
            {"type": "page_view", "user_id": uid},
            {"type": "identify", "user_id": uid, "anonymous_id": anon},
        ],
    )
    p = engine.wait_profile(uid, lambda p: p["counts"].get("add_to_cart") == 1)
    assert p["counts"] == {"page_view": 1, "identify": 1, "product_view": 1, "add_to_cart": 1}
    assert anon in p["anonymous_ids"]
    assert [line["item_id"] for line in p["cart"]["items"]] == ["sku-a"]
    _post_ok(engine, [{"type": "search", "anonymous_id": anon, "properties": {"query": "boots"}}])
    p = engine.wait_profile(uid, lambda p: p["counts"].get("search") == 1)
    assert p["recent_searches"][0]["query"] == "boots"
    status, via_anon = engine.profile(anon)
    assert status == 200 and via_anon["user_id"] == uid
