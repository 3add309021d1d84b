"""Unit tests of the pure profile functions in `personify.tables.profiles` (no Faust table)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from itertools import count
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personify.engine.config import DEFAULT_WEIGHTS, EventsConfig, ProfilesConfig
from personify.engine.errors import ValidationError
from personify.engine.models import validate_event
from personify.tables.profiles import (
    apply_events,
    decode,
    encode,
    id_digest,
    merge,
    new_profile,
    seen_ids,
    view,
)

T0 = 1_795_341_600_000  # 2026-11-22T10:00:00Z
MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
EVENTS_CFG = EventsConfig(custom_types=("wishlist_add",))
CFG = ProfilesConfig()
EventFactory = Callable[..., dict[str, Any]]


@pytest.fixture
def event_factory() -> EventFactory:
    """Make real normalised events (through validate_event) for user u-1 with unique ids."""
    ids = count()

    def make(etype: str, ts: int = T0, **fields: Any) -> dict[str, Any]:
        wire = {"type": etype, "user_id": "u-1", "ts": ts, "event_id": f"e-{next(ids)}", **fields}
        return validate_event(wire, EVENTS_CFG, now_ms=ts)

    return make


def fold(events: list[dict[str, Any]], cfg: ProfilesConfig = CFG) -> dict[str, Any]:
    p = new_profile("u-1")
    apply_events(p, events, cfg)
    return p


def test_new_profile_view_is_empty() -> None:
    """A new profile's view has no counts, sessions, spend, cart or affinity."""
    v = view(new_profile("u-9"), CFG, T0)
    assert v["user_id"] == "u-9"
    assert v["counts"] == {}
    assert v["sessions"] == {
        "count": 0,
        "current": {"started": None, "last_event": None, "events": 0, "active": False},
    }
    assert (v["first_seen"], v["last_seen"]) == (None, None)
    assert v["frequency"] == {"window_days": 7.0, "events": 0, "sessions": 0}
    assert (v["lifetime_spend"], v["order_count"], v["average_order_value"]) == (0.0, 0, 0.0)
    assert v["cart"] == {"items": [], "count": 0, "total": 0.0}
    assert v["recent_items"] == []
    assert v["recent_searches"] == []
    assert v["category_affinity"] == {}
    assert v["engagement_score"] == 0.0


def test_counts_by_type(event_factory: EventFactory) -> None:
    """The counts hold how many events of each type were applied."""
    p = new_profile("u-1")
    n = apply_events(
        p,
        [
            event_factory("page_view"),
            event_factory("page_view"),
            event_factory("product_view", item_id="a"),
            event_factory("wishlist_add"),
        ],
        CFG,
    )
    assert n == 4
    assert view(p, CFG, T0)["counts"] == {"page_view": 2, "product_view": 1, "wishlist_add": 1}


def test_sessions_split_on_gap(event_factory: EventFactory) -> None:
    """A gap longer than session_gap_s (30 min by default) starts a new session."""
    p = fold(
        [
            event_factory("page_view", T0),
            event_factory("page_view", T0 + 30 * MIN),  # exactly the gap: same session
            event_factory("page_view", T0 + 61 * MIN),  # 31 min later: new session
            event_factory("page_view", T0 + 62 * MIN),
        ]
    )
    v = view(p, CFG, T0 + 63 * MIN)
    assert v["sessions"]["count"] == 2
    assert v["sessions"]["current"] == {
        "started": "2026-11-22T11:01:00.000Z",
        "last_event": "2026-11-22T11:02:00.000Z",
        "events": 2,
        "active": True,
    }
    assert view(p, CFG, T0 + 62 * MIN + 31 * MIN)["sessions"]["current"]["active"] is False


def test_session_gap_is_configurable(event_factory: EventFactory) -> None:
    """ProfilesConfig(session_gap_s=...) sets the inactivity that ends a session."""
    events = [event_factory("page_view", T0 + i * 2 * MIN) for i in range(4)]  # every 2 min

    def sessions(cfg: ProfilesConfig) -> int:
        count: int = view(fold(events, cfg), cfg, T0)["sessions"]["count"]
        return count

    assert sessions(ProfilesConfig(session_gap_s=60.0)) == 4
    assert sessions(ProfilesConfig(session_gap_s=119.999)) == 4
    assert sessions(ProfilesConfig(session_gap_s=120.0)) == 1
    assert sessions(CFG) == 1


def test_late_event_joins_its_session(event_factory: EventFactory) -> None:
    """A late event lands in the session it belongs to; one bridging two sessions joins them."""
    p = fold(
        [
            event_factory("page_view", T0),
            event_factory("page_view", T0 + 50 * MIN),  # a second session
        ]
    )
    assert view(p, CFG, T0 + 50 * MIN)["sessions"]["count"] == 2
    apply_events(p, [event_factory("page_view", T0 + 25 * MIN)], CFG)  # late, bridges both
    v = view(p, CFG, T0 + 50 * MIN)
    assert v["sessions"]["count"] == 1
    assert v["sessions"]["current"]["started"] == "2026-11-22T10:00:00.000Z"
    assert v["sessions"]["current"]["events"] == 3
    apply_events(p, [event_factory("page_view", T0 - DAY)], CFG)  # late, a session of its own
    v = view(p, CFG, T0 + 50 * MIN)
    assert v["sessions"]["count"] == 2
    assert v["sessions"]["current"]["started"] == "2026-11-22T10:00:00.000Z"


def test_first_and_last_seen(event_factory: EventFactory) -> None:
    """first_seen and last_seen are the earliest and latest event times, whatever the order."""
    p = fold(
        [
            event_factory("page_view", T0 + 5 * MIN),
            event_factory("page_view", T0),
            event_factory("page_view", T0 + 10 * MIN),
            event_factory("page_view", T0 + 1 * MIN),
        ]
    )
    v = view(p, CFG, T0 + HOUR)
    assert v["first_seen"] == "2026-11-22T10:00:00.000Z"
    assert v["last_seen"] == "2026-11-22T10:10:00.000Z"


def test_frequency_is_a_sliding_window(event_factory: EventFactory) -> None:
    """The frequency counts events and sessions of the last 7 days; older ones drop out later."""
    p = fold(
        [
            event_factory("page_view", T0),
            event_factory("page_view", T0 + MIN),
            event_factory("page_view", T0 + 3 * DAY),  # a second session
        ]
    )
    assert view(p, CFG, T0 + 3 * DAY)["frequency"] == {
        "window_days": 7.0,
        "events": 3,
        "sessions": 2,
    }
    later = view(p, CFG, T0 + 7 * DAY + 2 * HOUR)  # the first session left the window
    assert later["frequency"]["events"] == 1
    assert later["frequency"]["sessions"] == 1
    assert view(p, CFG, T0 + 10 * DAY + 2 * HOUR)["frequency"]["events"] == 0
    # counts are lifetime figures and do not slide
    assert later["counts"] == {"page_view": 3}


def test_frequency_window_is_configurable(event_factory: EventFactory) -> None:
    """ProfilesConfig(frequency_window_s=...) sets the window length."""
    cfg = ProfilesConfig(frequency_window_s=86400.0)
    p = fold([event_factory("page_view", T0), event_factory("page_view", T0 + 2 * DAY)], cfg)
    v = view(p, cfg, T0 + 2 * DAY)
    assert v["frequency"] == {"window_days": 1.0, "events": 1, "sessions": 1}


def test_monetary(event_factory: EventFactory) -> None:
    """Purchases add to lifetime_spend, order_count, average_order_value and spend_by_currency."""
    p = fold(
        [
            event_factory("purchase", properties={"items": [{"item_id": "a", "price": 10.0}]}),
            event_factory(
                "purchase",
                properties={"items": [{"item_id": "b", "quantity": 2, "price": 15.0}]},
            ),
            event_factory(
                "purchase",
                properties={"items": [{"item_id": "c"}], "revenue": 5.55, "currency": "eur"},
            ),
        ]
    )
    v = view(p, CFG, T0)
    assert v["order_count"] == 3
    assert v["lifetime_spend"] == 45.55
    assert v["average_order_value"] == 15.18
    assert v["spend_by_currency"] == {"USD": 40.0, "EUR": 5.55}


def test_recent_items_bounded_newest_first_dedup(event_factory: EventFactory) -> None:
    """recent_items keeps the newest item events first, one entry per item, bounded."""
    cfg = ProfilesConfig(recent_items=3)
    p = fold(
        [
            event_factory("product_view", T0, item_id="a"),
            event_factory("product_view", T0 + 1, item_id="b"),
            event_factory("page_view", T0 + 2, item_id="ignored"),  # not an item event
            event_factory("add_to_cart", T0 + 3, item_id="a"),
            event_factory("click", T0 + 4, item_id="c"),
            event_factory("product_view", T0 + 5, item_id="d"),
        ],
        cfg,
    )
    recent = view(p, cfg, T0)["recent_items"]
    assert [(r["item_id"], r["type"]) for r in recent] == [
        ("d", "product_view"),
        ("c", "click"),
        ("a", "add_to_cart"),
    ]
    assert recent[0]["ts"] == "2026-11-22T10:00:00.005Z"


def test_purchase_lines_enter_recent_items(event_factory: EventFactory) -> None:
    """Each purchased item becomes a recent item of type purchase."""
    p = fold(
        [
            event_factory("product_view", T0, item_id="a"),
            event_factory("purchase", T0 + 1, properties={"items": [{"item_id": "a"}]}),
        ]
    )
    recent = view(p, CFG, T0)["recent_items"]
    assert [(r["item_id"], r["type"]) for r in recent] == [("a", "purchase")]


def test_cart(event_factory: EventFactory) -> None:
    """Cart lines add up, shrink on partial removes, vanish on full removes and on purchase."""
    p = new_profile("u-1")
    apply_events(
        p,
        [
            event_factory("add_to_cart", item_id="a", properties={"quantity": 2, "price": 10}),
            event_factory("add_to_cart", item_id="a", properties={"quantity": 1, "price": 12}),
            event_factory("add_to_cart", item_id="b", properties={"quantity": 4}),
            event_factory("add_to_cart", item_id="c", properties={"price": 1.5}),
        ],
        CFG,
    )
    cart = view(p, CFG, T0)["cart"]
    assert cart["count"] == 8
    assert cart["total"] == 37.5  # a: 3 x 12 (latest price), b: no price, c: 1.5
    assert {i["item_id"]: (i["quantity"], i["price"]) for i in cart["items"]} == {
        "a": (3, 12.0),
        "b": (4, None),
        "c": (1, 1.5),
    }
    assert cart["items"][0]["added_at"] == "2026-11-22T10:00:00.000Z"

    apply_events(
        p,
        [
            event_factory("remove_from_cart", item_id="a"),  # partial: 3 -> 2
            event_factory("remove_from_cart", item_id="b", properties={"quantity": 9}),  # all
            event_factory("remove_from_cart", item_id="zzz"),  # not in the cart: no effect
        ],
        CFG,
    )
    cart = view(p, CFG, T0)["cart"]
    assert {i["item_id"]: i["quantity"] for i in cart["items"]} == {"a": 2, "c": 1}
    assert cart["total"] == 25.5

    apply_events(p, [event_factory("purchase", properties={"items": [{"item_id": "a"}]})], CFG)
    cart = view(p, CFG, T0)["cart"]
    assert [i["item_id"] for i in cart["items"]] == ["c"]
    assert (cart["count"], cart["total"]) == (1, 1.5)


def test_recent_searches_bounded(event_factory: EventFactory) -> None:
    """recent_searches keeps the newest searches first, with filters, bounded."""
    cfg = ProfilesConfig(recent_searches=2)
    p = fold(
        [
            event_factory("search", T0, properties={"query": "one"}),
            event_factory("search", T0 + 1, properties={"query": "two", "filters": {"c": "x"}}),
            event_factory("search", T0 + 2, properties={"query": "three", "filters": {}}),
        ],
        cfg,
    )
    assert view(p, cfg, T0)["recent_searches"] == [
        {"query": "three", "ts": "2026-11-22T10:00:00.002Z"},
        {"query": "two", "filters": {"c": "x"}, "ts": "2026-11-22T10:00:00.001Z"},
    ]


def test_category_affinity_credits_parents(event_factory: EventFactory) -> None:
    """A visit to a/b/c credits a, a/b and a/b/c with the event's weight."""
    p = fold(
        [
            event_factory("product_view", item_id="x", properties={"category": "/a/b/c/"}),
            event_factory("add_to_cart", item_id="y", properties={"category": "a/d"}),
        ]
    )
    affinity = view(p, CFG, T0)["category_affinity"]
    assert affinity == {"a": 4.0, "a/d": 3.0, "a/b": 1.0, "a/b/c": 1.0}
    assert list(affinity)[:2] == ["a", "a/d"]  # strongest first


def test_category_affinity_keeps_the_strongest_categories(event_factory: EventFactory) -> None:
    """Past [profiles] affinity_categories the weakest (decayed) categories go, merges too."""
    cfg = ProfilesConfig(affinity_categories=5, affinity_half_life_s=3600.0)
    events = [  # "fav" often and early, then many categories once each, an hour apart
        event_factory("product_view", T0 + n, item_id="x", properties={"category": "fav"})
        for n in range(4)
    ] + [
        event_factory("product_view", T0 + n * HOUR, item_id="x", properties={"category": f"c{n}"})
        for n in range(1, 9)
    ]
    p = fold(events, cfg)
    # fav: 4 decayed by 8 hours = 1/64; c4..c8: 1/16, 1/8, 1/4, 1/2, 1 at the last event.
    assert sorted(p["affinity"]) == ["c4", "c5", "c6", "c7", "c8"]
    # A merged visitor's categories count with the rest, and the cap holds.
    other = fold(
        [event_factory("product_view", T0 + 8 * HOUR, item_id="y", properties={"category": "z"})],
        cfg,
    )
    merge(p, other, cfg)
    assert sorted(p["affinity"]) == ["c5", "c6", "c7", "c8", "z"]


def test_category_affinity_halves_after_half_life(event_factory: EventFactory) -> None:
    """After one half-life without activity the affinity halves; after two it quarters."""
    cfg = ProfilesConfig(affinity_half_life_s=3600.0)
    p = fold([event_factory("product_view", item_id="x", properties={"category": "a"})], cfg)
    assert view(p, cfg, T0)["category_affinity"] == {"a": 1.0}
    assert view(p, cfg, T0 + HOUR)["category_affinity"] == {"a": 0.5}
    assert view(p, cfg, T0 + 2 * HOUR)["category_affinity"] == {"a": 0.25}
    # a new event one half-life later adds to the decayed score
    apply_events(
        p,
        [event_factory("product_view", T0 + HOUR, item_id="x", properties={"category": "a"})],
        cfg,
    )
    assert view(p, cfg, T0 + HOUR)["category_affinity"] == {"a": 1.5}


def test_category_affinity_from_purchase_lines(event_factory: EventFactory) -> None:
    """A purchase credits each line's category (or the event's) with the purchase weight."""
    p = fold(
        [
            event_factory(
                "purchase",
                properties={
                    "category": "shoes",
                    "items": [{"item_id": "a", "category": "bags"}, {"item_id": "b"}],
                },
            )
        ]
    )
    assert view(p, CFG, T0)["category_affinity"] == {"bags": 5.0, "shoes": 5.0}


def test_zero_weight_events_give_no_affinity(event_factory: EventFactory) -> None:
    """Events whose weight is 0 (impressions) add no category affinity."""
    p = fold([event_factory("impression", properties={"category": "a"})])
    assert view(p, CFG, T0)["category_affinity"] == {}


def test_engagement_score_uses_weights(event_factory: EventFactory) -> None:
    """engagement_score sums the configured weight of each event; custom types use "custom"."""
    events = [
        event_factory("page_view"),
        event_factory("product_view", item_id="a"),
        event_factory("add_to_cart", item_id="a"),
        event_factory("purchase", item_id="a"),
        event_factory("impression"),
        event_factory("wishlist_add"),
    ]
    assert view(fold(events), CFG, T0)["engagement_score"] == 0.5 + 1 + 3 + 5 + 0 + 1
    cfg = ProfilesConfig(engagement_weights={**DEFAULT_WEIGHTS, "custom": 10.0, "page_view": 2.0})
    assert view(fold(events, cfg), cfg, T0)["engagement_score"] == 2 + 1 + 3 + 5 + 0 + 10
    cfg = ProfilesConfig(engagement_weights={**DEFAULT_WEIGHTS, "wishlist_add": 0.25})
    assert view(fold(events, cfg), cfg, T0)["engagement_score"] == 0.5 + 1 + 3 + 5 + 0 + 0.25


def test_anonymous_ids_are_remembered(event_factory: EventFactory) -> None:
    """Events carrying both ids record the anonymous id on the profile once."""
    p = fold(
        [
            event_factory("identify", anonymous_id="a-1"),
            event_factory("page_view", anonymous_id="a-1"),
            event_factory("alias", anonymous_id="a-2"),
        ]
    )
    assert view(p, CFG, T0)["anonymous_ids"] == ["a-1", "a-2"]


def test_duplicate_event_ids_are_skipped(event_factory: EventFactory) -> None:
    """An event id already applied is skipped: apply_events returns 0 and nothing changes."""
    events = [
        event_factory("purchase", item_id="a", properties={"price": 3}),
        event_factory("add_to_cart", item_id="b"),
    ]
    p = fold(events)
    before = copy.deepcopy(p)
    assert apply_events(p, events, CFG) == 0
    assert p == before
    assert apply_events(p, [events[0], event_factory("page_view")], CFG) == 1
    assert view(p, CFG, T0)["order_count"] == 1


def test_dedup_window_bounds_memory(event_factory: EventFactory) -> None:
    """Only the last dedup_window event ids are remembered."""
    cfg = ProfilesConfig(dedup_window=3)
    events = [event_factory("page_view") for _ in range(5)]
    p = fold(events, cfg)
    assert seen_ids(p) == [id_digest(e["event_id"]) for e in events[-3:]]
    assert apply_events(p, events[-3:], cfg) == 0
    assert apply_events(p, events[:1], cfg) == 1  # forgotten, so counted again


def test_remembered_ids_are_compact_and_read_from_the_old_list(
    event_factory: EventFactory,
) -> None:
    """1,000 remembered ids take 12 KB; a profile stored with the old list still dedups."""
    events = [event_factory("page_view") for _ in range(1200)]
    p = fold(events, CFG)
    assert len(seen_ids(p)) == CFG.dedup_window == 1000
    assert len(orjson.dumps(p["seen"])) < 12_100
    assert apply_events(p, events[-1000:], CFG) == 0
    old = decode(encode(p))
    old["seen"] = seen_ids(p)  # as profiles were stored before
    assert apply_events(old, events[-5:], CFG) == 0
    assert apply_events(old, [event_factory("page_view")], CFG) == 1
    assert seen_ids(old)[:-1] == seen_ids(p)[1:]


def test_encode_decode_round_trip(event_factory: EventFactory) -> None:
    """decode(encode(p)) == p, and the decoded profile keeps folding like the original."""
    p = fold(
        [
            event_factory("product_view", item_id="a", properties={"category": "x/y"}),
            event_factory("add_to_cart", item_id="a", properties={"price": 2.5}),
            event_factory("search", properties={"query": "q", "filters": {"k": [1, 2]}}),
            event_factory("purchase", properties={"items": [{"item_id": "b", "price": 1}]}),
        ]
    )
    data = encode(p)
    assert isinstance(data, bytes)
    q = decode(data)
    assert q == p
    more = [event_factory("product_view", T0 + HOUR, item_id="c", properties={"category": "x"})]
    apply_events(p, more, CFG)
    apply_events(q, more, CFG)
    assert q == p


# -- properties (hypothesis) --------------------------------------------------------------

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_wire_events = st.fixed_dictionaries(
    {
        "event_id": st.sampled_from([f"e-{i}" for i in range(12)]),
        "dt": st.integers(0, 3 * DAY),
        "kind": st.sampled_from(
            [
                "page_view",
                "product_view",
                "search",
                "add_to_cart",
                "remove_from_cart",
                "purchase",
                "chat_message",
                "impression",
                "click",
                "identify",
                "wishlist_add",
            ]
        ),
        "item": st.sampled_from(["a", "b", "c"]),
        "category": st.sampled_from([None, "x", "x/y", "z/w/v"]),
        "quantity": st.integers(1, 3),
        "price": st.none() | st.floats(0, 500, allow_nan=False).map(lambda f: round(f, 2)),
        "currency": st.sampled_from(["USD", "EUR"]),
    }
)


def _build(spec: dict[str, Any]) -> dict[str, Any]:
    kind = spec["kind"]
    props: dict[str, Any] = {}
    if spec["category"] is not None:
        props["category"] = spec["category"]
    wire: dict[str, Any] = {
        "type": kind,
        "user_id": "u-1",
        "event_id": spec["event_id"],
        "ts": T0 + spec["dt"],
        "properties": props,
    }
    if kind in ("product_view", "add_to_cart", "remove_from_cart", "click"):
        wire["item_id"] = spec["item"]
    if kind in ("add_to_cart", "remove_from_cart"):
        props.update(quantity=spec["quantity"], price=spec["price"])
    elif kind == "purchase":
        props.update(
            items=[{"item_id": spec["item"], "quantity": spec["quantity"], "price": spec["price"]}],
            currency=spec["currency"],
        )
    elif kind == "search":
        props["query"] = f"q-{spec['item']}"
    elif kind == "chat_message":
        props["text"] = "hello"
    elif kind == "identify":
        wire["anonymous_id"] = f"anon-{spec['item']}"
    return validate_event(wire, EVENTS_CFG, now_ms=T0 + 3 * DAY)


event_lists = st.lists(_wire_events.map(_build), max_size=25)


@SETTINGS
@given(events=event_lists)
def test_applying_twice_changes_nothing(events: list[dict[str, Any]]) -> None:
    """For any list of events, applying it a second time leaves the profile unchanged."""
    p = fold(events)
    once = copy.deepcopy(p)
    assert apply_events(p, events, CFG) == 0
    assert p == once
    assert view(p, CFG, T0 + 3 * DAY) == view(once, CFG, T0 + 3 * DAY)


@SETTINGS
@given(events=event_lists, split=st.integers(0, 25))
def test_redelivery_of_a_prefix_changes_nothing(events: list[dict[str, Any]], split: int) -> None:
    """Applying a prefix, then the whole list (a redelivery), equals applying the list once."""
    p = new_profile("u-1")
    apply_events(p, events[:split], CFG)
    apply_events(p, events, CFG)
    assert p == fold(events)


@SETTINGS
@given(events=event_lists)
def test_encode_decode_round_trip_any_profile(events: list[dict[str, Any]]) -> None:
    """Any folded profile survives encode/decode unchanged."""
    p = fold(events)
    assert decode(encode(p)) == p
    assert view(decode(encode(p)), CFG, T0 + DAY) == view(p, CFG, T0 + DAY)


@SETTINGS
@given(events=event_lists, data=st.data())
def test_sessions_do_not_depend_on_arrival_order(
    events: list[dict[str, Any]], data: st.DataObject
) -> None:
    """Counts, sessions, first/last seen and frequency are the same in any arrival order."""
    unique = list({e["event_id"]: e for e in events}.values())
    shuffled = data.draw(st.permutations(unique))
    now = T0 + 3 * DAY
    a, b = view(fold(unique), CFG, now), view(fold(shuffled), CFG, now)
    for key in ("counts", "sessions", "first_seen", "last_seen", "frequency"):
        assert a[key] == b[key], key


@SETTINGS
@given(events=event_lists)
def test_applied_count_matches_unique_ids(events: list[dict[str, Any]]) -> None:
    """apply_events returns the number of distinct event ids, and counts sum to it."""
    p = new_profile("u-1")
    n = apply_events(p, events, CFG)
    assert n == len({e["event_id"] for e in events})
    assert sum(p["counts"].values()) == n
    assert view(p, CFG, T0)["cart"]["count"] >= 0


def test_late_events_take_their_place_in_recent_lists(event_factory: EventFactory) -> None:
    """A late event is placed by its time in recent items and searches, not at the front."""
    p = fold(
        [
            event_factory("product_view", T0 + 2000, item_id="new"),
            event_factory("product_view", T0, item_id="old"),
            event_factory("product_view", T0 + 1000, item_id="mid"),
            event_factory("product_view", T0 - 5000, item_id="new"),  # older than what we have
            event_factory("search", T0 + 10, properties={"query": "later"}),
            event_factory("search", T0 + 5, properties={"query": "earlier"}),
        ]
    )
    v = view(p, CFG, T0 + 3000)
    assert [r["item_id"] for r in v["recent_items"]] == ["new", "mid", "old"]
    assert v["recent_items"][0]["ts"] == "2026-11-22T10:00:02.000Z"
    assert [s["query"] for s in v["recent_searches"]] == ["later", "earlier"]


def test_cart_is_bounded(event_factory: EventFactory) -> None:
    """Past max_cart_items the line added longest ago leaves the cart."""
    cfg = ProfilesConfig(max_cart_items=3)
    p = fold(
        [event_factory("add_to_cart", T0 + i, item_id=f"i{i}") for i in range(5)]
        + [event_factory("add_to_cart", T0 + 9, item_id="i3")],
        cfg,
    )
    assert [line["item_id"] for line in view(p, cfg, T0 + 10)["cart"]["items"]] == [
        "i2",
        "i3",
        "i4",
    ]


def test_without_personalization_consent_events_change_nothing(
    event_factory: EventFactory,
) -> None:
    """After a consent withdrawal, events are vetoed: not applied, not even remembered."""
    p = new_profile("u-1")
    view1 = event_factory("product_view", item_id="sku-1")
    assert apply_events(p, [view1], CFG) == 1
    withdraw = event_factory("consent", ts=T0 + 1000, properties={"personalization": False})
    apply_events(p, [withdraw], CFG)
    before = encode(p)
    vetoed: list[dict[str, Any]] = []
    later = event_factory("product_view", ts=T0 + 2000, item_id="sku-2")
    assert apply_events(p, [later], CFG, vetoed=vetoed) == 0
    assert vetoed == [later] and encode(p) == before
    assert view(p, CFG, T0 + 3000)["consent"] == {
        "analytics": True,
        "personalization": False,
        "marketing": True,
    }
    grant = event_factory("consent", ts=T0 + 4000, properties={"personalization": True})
    assert apply_events(p, [grant, later], CFG) == 2  # the same event applies once consented
    assert [r["item_id"] for r in p["recent_items"]] == ["sku-2", "sku-1"]


def test_opt_in_withholds_until_granted_and_the_later_choice_wins(
    event_factory: EventFactory,
) -> None:
    cfg = ProfilesConfig(consent="opt-in")
    p = new_profile("u-1")
    vetoed: list[dict[str, Any]] = []
    assert (
        apply_events(p, [event_factory("search", properties={"query": "x"})], cfg, vetoed=vetoed)
        == 0
    )
    assert len(vetoed) == 1 and p["searches"] == []
    newer = event_factory("consent", ts=T0 + 5000, properties={"personalization": True})
    older = event_factory("consent", ts=T0 + 1000, properties={"personalization": False})
    apply_events(p, [newer, older], cfg)  # arrives late: the earlier choice does not win
    assert view(p, cfg, T0)["consent"]["personalization"] is True
    assert view(p, cfg, T0)["consent"]["marketing"] is False


def test_consent_events_are_validated() -> None:
    with pytest.raises(ValidationError, match="unknown purpose") as info:
        validate_event(
            {"type": "consent", "user_id": "u", "properties": {"cookies": True}}, EVENTS_CFG, T0
        )
    assert info.value.field == "properties.cookies"
    with pytest.raises(ValidationError, match="true or false"):
        validate_event(
            {"type": "consent", "user_id": "u", "properties": {"marketing": "yes"}}, EVENTS_CFG, T0
        )
    with pytest.raises(ValidationError, match="at least one purpose"):
        validate_event({"type": "consent", "user_id": "u", "properties": {}}, EVENTS_CFG, T0)


def test_bought_products_are_counted_and_bounded(event_factory: EventFactory) -> None:
    """Each purchase counts per product with its last time; past the cap the oldest goes.

    An anonymous visitor's purchases add up when their profile is merged.
    """
    cfg = ProfilesConfig(bought_items=2)
    orders = [
        event_factory("purchase", T0, properties={"items": [{"item_id": "a"}, {"item_id": "b"}]}),
        event_factory("purchase", T0 + 10, properties={"items": [{"item_id": "a"}]}),
        event_factory("purchase", T0 + 20, properties={"items": [{"item_id": "c"}]}),
    ]
    p = fold(orders, cfg)
    assert p["bought"] == {"a": [2, T0 + 10], "c": [1, T0 + 20]}
    anon = fold([event_factory("purchase", T0 + 30, properties={"items": [{"item_id": "c"}]})])
    merge(p, anon, cfg)
    assert p["bought"] == {"a": [2, T0 + 10], "c": [2, T0 + 30]}
