"""The built-in plugins on real profiles (folded from validated events), timers and bookkeeping."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from itertools import count
from typing import Any

from personify.engine.config import EventsConfig, ProfilesConfig, TriggersConfig
from personify.engine.models import internal_event, validate_event
from personify.plugins.builtin import (
    BrowseWithoutBuy,
    CartAbandonment,
    FrequencyCap,
    Webhook,
    builtin_plugins,
)
from personify.plugins.timers import Timers
from personify.tables.profiles import FIRED, SCHEDULE, SENT, apply_events, new_profile, view

CFG = ProfilesConfig()
T0 = int(time.time() * 1000) - 600_000
_ids = count()


def event(etype: str, ts: int = T0, **fields: Any) -> dict[str, Any]:
    wire = {"type": etype, "user_id": "u", "ts": ts, "event_id": f"e-{next(_ids)}", **fields}
    return validate_event(wire, EventsConfig(), now_ms=ts)


def profile_after(events: list[dict[str, Any]], now_ms: int | None = None) -> dict[str, Any]:
    p = new_profile("u")
    apply_events(p, events, CFG)
    return view(p, CFG, now_ms or events[-1]["ts_ms"])


def add(item: str, ts: int = T0, price: float = 20.0) -> dict[str, Any]:
    return event("add_to_cart", ts, item_id=item, properties={"quantity": 1, "price": price})


def purchase(items: list[str], revenue: float, ts: int = T0) -> dict[str, Any]:
    lines = [{"item_id": i, "quantity": 1, "price": revenue / len(items)} for i in items]
    return event("purchase", ts, properties={"revenue": revenue, "items": lines})


def test_cart_abandonment_schedules_on_add_and_offers_only_for_a_cart_still_full() -> None:
    plugin = CartAbandonment(delay_s=900)
    added = add("boots")
    assert plugin.personify_on_event(added, profile_after([added])) == [
        {"type": "schedule", "timer": "cart_abandonment", "after_s": 900}
    ]
    view_ = event("product_view", item_id="boots")
    assert plugin.personify_on_event(view_, profile_after([view_])) == []

    waiting = profile_after([added, add("socks", T0 + 1000)])
    # A timer runs already: another addition starts none.
    assert plugin.personify_on_event(added, {**waiting, "timers": {"cart_abandonment": "x"}}) == []
    # Due 900 s after the first addition, but socks came 1 s later: wait 1 s more.
    assert plugin.personify_on_timer("cart_abandonment", "u", waiting, T0 + 900_000) == [
        {"type": "schedule", "timer": "cart_abandonment", "after_s": 1.0}
    ]
    offers = plugin.personify_on_timer("cart_abandonment", "u", waiting, T0 + 901_000)
    assert len(offers) == 1 and offers[0]["type"] == "offer"
    assert offers[0]["trigger"] == "cart_abandonment"
    assert sorted(offers[0]["payload"]["items"]) == ["boots", "socks"]
    assert offers[0]["payload"]["cart_total"] == 40.0
    assert plugin.personify_on_timer("another_timer", "u", waiting, T0) == []

    bought = profile_after([added, purchase(["boots"], 20.0, T0 + 2000)])
    assert plugin.personify_on_timer("cart_abandonment", "u", bought, T0 + 900_000) == []


def test_browse_without_buy_nudges_once_per_session_and_never_after_an_add() -> None:
    plugin = BrowseWithoutBuy(views=3)
    views = [event("product_view", T0 + i * 1000, item_id=f"p{i}") for i in range(5)]
    fired = [
        plugin.personify_on_event(v, profile_after(views[: i + 1])) for i, v in enumerate(views)
    ]
    assert [len(f) for f in fired] == [0, 0, 1, 0, 0]
    assert fired[2][0]["trigger"] == "browse_without_buy"
    assert set(fired[2][0]["payload"]["items"]) == {"p0", "p1", "p2"}

    with_cart = [views[0], add("p0", T0 + 500), *views[1:3]]
    assert plugin.personify_on_event(views[2], profile_after(with_cart)) == []


def test_frequency_cap_counts_recorded_offers_and_recent_ones() -> None:
    offer = {"type": "offer", "trigger": "t"}
    cap = FrequencyCap(max_offers=2, window_s=3600, min_gap_s=0)
    empty = profile_after([event("page_view", int(time.time() * 1000))])
    assert cap.personify_allow_action("u", offer, empty)
    assert cap.personify_allow_action("u", offer, empty)
    assert not cap.personify_allow_action("u", offer, empty)  # third within the window
    assert cap.personify_allow_action("u", {"type": "segments"}, empty)  # only offers count
    assert cap.personify_allow_action("v", offer, empty)  # per visitor

    # Offers recorded in the profile (before a restart) count too.
    now = int(time.time() * 1000)
    p = new_profile("w")
    sent = [
        internal_event(SENT, f"s{i}", user_id="w", ts_ms=now - 1000 * i, properties={"trigger": t})
        for i, t in enumerate(["t", "t"])
    ]
    apply_events(p, sent, CFG)
    fresh_cap = FrequencyCap(max_offers=2, window_s=3600, min_gap_s=0)
    assert not fresh_cap.personify_allow_action("w", offer, view(p, CFG, now))
    gap_cap = FrequencyCap(max_offers=10, window_s=3600, min_gap_s=60)
    assert not gap_cap.personify_allow_action("w", offer, view(p, CFG, now))  # 1 s ago < 60 s


def test_schedule_fired_and_sent_are_recorded_whatever_the_consent() -> None:
    p = new_profile("u")
    no = event("consent", T0, properties={"personalization": False, "marketing": False})
    due = T0 + 60_000
    apply_events(
        p,
        [
            no,
            internal_event(
                SCHEDULE, "s1", user_id="u", ts_ms=T0, properties={"timer": "t", "due_ms": due}
            ),
        ],
        CFG,
    )
    assert p["timers"] == {"t": due}
    shown = view(p, CFG, T0)
    assert list(shown["timers"]) == ["t"]
    # A fire for an older schedule leaves the newer one; the matching fire clears it.
    later = due + 1000
    apply_events(
        p,
        [
            internal_event(
                SCHEDULE, "s2", user_id="u", ts_ms=T0, properties={"timer": "t", "due_ms": later}
            ),
            internal_event(
                FIRED, "f1", user_id="u", ts_ms=T0, properties={"timer": "t", "due_ms": due}
            ),
        ],
        CFG,
    )
    assert p["timers"] == {"t": later}
    apply_events(
        p,
        [
            internal_event(
                FIRED, "f2", user_id="u", ts_ms=T0, properties={"timer": "t", "due_ms": later}
            )
        ],
        CFG,
    )
    assert p["timers"] == {}
    assert p["counts"] == {}  # bookkeeping is not activity


def test_timers_fire_in_order_and_a_reschedule_replaces_the_earlier_time() -> None:
    timers = Timers()
    timers.add("a", "t", 300)
    timers.add("b", "t", 100)
    timers.add("a", "t", 200)  # replaces 300
    timers.add("c", "t", 500)
    timers.cancel("c", "t", 999)  # not the current time: kept
    assert timers.due(50) == []
    assert timers.due(250) == [("b", "t", 100), ("a", "t", 200)]
    assert timers.due(400) == []  # a's old 300 no longer counts
    timers.cancel("c", "t", 500)
    assert timers.due(1000) == [] and len(timers) == 0


def test_webhook_posts_signed_actions_of_the_chosen_types(hook_server: Any) -> None:
    hook = Webhook(hook_server.url, ("offer",), "s3cret", timeout_s=5.0)
    hook.personify_action("u", {"type": "segments", "added": ["high_value"]})  # not chosen
    hook.personify_action("u", {"type": "offer", "trigger": "t", "payload": {"x": 1}})
    hook.personify_action("u", {"type": "offer", "trigger": "last"})
    received = hook_server.wait(2)
    assert len(received) == 2  # in order, the segments message left out
    body, signature = received[0]
    sent = json.loads(body)
    assert sent["user_id"] == "u" and sent["action"]["trigger"] == "t"
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature == f"sha256={expected}"
    assert json.loads(received[1][0])["action"]["trigger"] == "last"


def test_builtins_follow_the_config() -> None:
    names = [name for name, _plugin in builtin_plugins(TriggersConfig())]
    assert names == ["frequency_cap"]  # the triggers are opt-in
    on = TriggersConfig(
        cart_abandonment_s=60, high_value_spend=500, browse_views=5, webhook_url="http://h/x"
    )
    assert [name for name, _plugin in builtin_plugins(on)] == [
        "cart_abandonment",
        "browse_without_buy",
        "frequency_cap",
        "webhook",
    ]


def test_a_denied_builtin_is_not_registered() -> None:
    from personify.engine.config import PluginsConfig
    from personify.plugins.manager import Plugins

    on = TriggersConfig(cart_abandonment_s=60)
    loaded = Plugins(PluginsConfig(deny=("frequency_cap",)), builtin_plugins(on))
    try:
        names = loaded.names()
    finally:
        loaded.close()
    assert "cart_abandonment" in names and "frequency_cap" not in names


def test_browse_without_buy_counts_up_to_each_event_when_a_batch_folds_several() -> None:
    """Events folded in one round share the profile after the round: each counts up to itself."""
    plugin = BrowseWithoutBuy(views=3)
    views = [event("product_view", T0 + i * 1000, item_id=f"p{i}") for i in range(5)]
    after_all = profile_after(views)
    fired = [plugin.personify_on_event(v, after_all) for v in views]
    assert [len(f) for f in fired] == [0, 0, 1, 0, 0]
