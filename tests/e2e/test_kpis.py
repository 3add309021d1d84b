"""What lists earn, against a running engine.

Exposures over HTTP and WebSocket joined to clicks, cart additions and purchases; analytics
consent; erasure; a kill -9 and a restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

CATALOG = [
    ("h-jacket", "Waterproof hiking jacket", "outdoor/hiking"),
    ("h-boots", "Leather hiking boots", "outdoor/hiking"),
    ("h-poles", "Carbon trekking poles", "outdoor/hiking"),
    ("k-knife", "Chef's kitchen knife", "home/kitchen"),
    ("k-pan", "Nonstick frying pan", "home/kitchen"),
    ("e-buds", "Wireless earbuds", "electronics/audio"),
]
SENT = "personify_exposures_sent_total"


@pytest.fixture(scope="module")
def live(module_engine: Callable[..., Any]) -> Iterator[Any]:
    eng = module_engine("[push]\ndebounce_ms = 0\n")
    eng.start()
    eng.add_items([{"item_id": i, "title": t, "category": c} for i, t, c in CATALOG])
    # Some history, so that lists have several sources.
    history = [
        {"type": "product_view", "user_id": f"crowd-{n}", "item_id": i}
        for n in range(6)
        for i in ("h-jacket", "h-boots", "k-pan")
    ]
    assert eng.post_events(history)[0] == 202
    yield eng
    if eng.proc is not None and eng.proc.poll() is None:
        assert eng.stop() == 0, eng.tail()


def totals(eng: Any) -> dict[str, Any]:
    status, body = eng.request("GET", "/v1/kpis")
    assert status == 200, body
    return dict(body["totals"])


def served(eng: Any, user: str) -> dict[str, Any]:
    """GET the visitor's list, and wait until it is sent on to be recorded."""
    before = eng.metric(SENT)
    status, body = eng.request("GET", f"/v1/users/{user}/recommendations?k=5")
    assert status == 200, body
    eng.wait_for(lambda: eng.metric(SENT) > before, what="the exposure to be sent")
    return dict(body)


def post(eng: Any, events: list[dict[str, Any]]) -> None:
    status, body = eng.post_events(events)
    assert status == 202, body


def grew(before: dict[str, Any], after: dict[str, Any], **want: float) -> dict[str, float]:
    return {k: round(after[k] - before[k], 6) for k in want}


def test_lists_served_join_what_visitors_do_next(live: Any, uid: str) -> None:
    """HTTP and WebSocket lists are exposures; outcomes join by id or by the item shown."""
    before, sent = totals(live), live.metric(SENT)
    buyer, watcher = f"{uid}-buyer", f"{uid}-watcher"
    post(live, [{"type": "product_view", "user_id": buyer, "item_id": "h-jacket"}])
    live.wait_profile(buyer, lambda p: p["counts"].get("product_view") == 1)
    listed = served(live, buyer)
    shown = [x["item_id"] for x in listed["items"]]
    post(
        live,
        [
            {
                "type": "click",
                "user_id": buyer,
                "item_id": shown[0],
                "properties": {"recommendation_id": listed["recommendation_id"], "position": 0},
            },
            {"type": "add_to_cart", "user_id": buyer, "item_id": shown[1]},  # by the item shown
            {
                "type": "purchase",
                "user_id": buyer,
                "properties": {
                    "items": [
                        {"item_id": shown[0], "price": 10.0, "quantity": 2},
                        {"item_id": "not-shown", "price": 5.0, "quantity": 1},
                    ]
                },
            },
        ],
    )

    async def watch() -> str:
        before_sent = live.metric(SENT)
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(live.ws_url(f"user_id={watcher}")) as ws,
        ):
            first = await live.next_message(ws, "recommendations")
            await asyncio.to_thread(
                live.wait_for, lambda: live.metric(SENT) > before_sent, what="the pushed list"
            )
            pushed: str = first["items"][0]["item_id"]
            await asyncio.to_thread(
                post, live, [{"type": "click", "user_id": watcher, "item_id": pushed}]
            )
            before_sent = live.metric(SENT)
            await live.next_message(ws, "recommendations")  # the list after the click
            await asyncio.to_thread(
                live.wait_for, lambda: live.metric(SENT) > before_sent, what="the second push"
            )
            return pushed

    asyncio.run(watch())
    want = {
        "clicks": 2,
        "add_to_carts": 1,
        "orders": 1,
        "converters": 1,
        "revenue": 20.0,
        "order_revenue": 25.0,
        "visitors": 2,
    }
    live.wait_for(lambda: grew(before, totals(live), **want) == want, what="the outcomes joined")
    # Every list served counts once: one GET, and each list pushed (at least two).
    lists = live.metric(SENT) - sent
    assert lists >= 3
    live.wait_for(
        lambda: totals(live)["exposures"] - before["exposures"] == lists,
        what="every exposure counted",
    )
    by_source = live.request("GET", "/v1/kpis?by=source")[1]["rows"]
    assert sum(row["clicks"] for row in by_source) >= 2
    assert all(row["source"] for row in by_source)
    status, exported = live.request("GET", f"/v1/users/{buyer}/export")
    assert status == 200
    assert [x["recommendation_id"] for x in exported["exposures"]] == [listed["recommendation_id"]]
    assert exported["exposures"][0]["items"] == shown
    assert live.metric('personify_kpi_variant_total{kpi="clicks",variant="default"}') >= 2


def test_without_analytics_consent_nothing_counts(live: Any, uid: str) -> None:
    before = totals(live)
    status, _ = live.request("PUT", f"/v1/users/{uid}/consent", {"analytics": False})
    assert status == 202
    post(live, [{"type": "product_view", "user_id": uid, "item_id": "k-knife"}])
    live.wait_profile(uid, lambda p: p["counts"].get("product_view") == 1)
    listed = served(live, uid)
    click = {
        "type": "click",
        "user_id": uid,
        "item_id": listed["items"][0]["item_id"],
        "properties": {"recommendation_id": listed["recommendation_id"]},
    }
    post(live, [click])
    live.wait_profile(uid, lambda p: p["counts"].get("click") == 1)
    after = totals(live)
    assert grew(before, after, exposures=0, clicks=0) == {"exposures": 0, "clicks": 0}
    assert live.request("GET", f"/v1/users/{uid}/export")[1]["exposures"] == []

    # Consent given: the visitor's lists and clicks count from then on.
    assert live.request("PUT", f"/v1/users/{uid}/consent", {"analytics": True})[0] == 202
    live.wait_profile(uid, lambda p: p["consent"]["analytics"] is True)
    listed = served(live, uid)
    post(live, [{**click, "properties": {"recommendation_id": listed["recommendation_id"]}}])
    want = {"exposures": 1, "clicks": 1}
    live.wait_for(lambda: grew(before, totals(live), **want) == want, what="the click counted")


def test_an_erased_visitor_leaves_every_exposure(live: Any, uid: str) -> None:
    served(live, uid)  # a visitor never seen: the shared list, recorded all the same
    live.wait_for(
        lambda: live.request("GET", f"/v1/users/{uid}/export")[1].get("exposures"),
        what="the exposure to be held",
    )
    assert live.profile(uid)[0] == 404  # a list served makes no profile
    assert live.request("DELETE", f"/v1/users/{uid}")[0] == 202
    live.wait_for(
        lambda: live.request("GET", f"/v1/users/{uid}/export")[0] == 404,
        what="the exposures to be erased",
    )


def test_kpis_count_once_after_a_kill_9_and_a_restart(
    live: Any, engine_factory: Callable[..., Any], uid: str
) -> None:
    listed = served(live, uid)
    clicks = [
        {
            "event_id": f"{uid}-click-{n}",
            "type": "click",
            "user_id": uid,
            "item_id": listed["items"][n % len(listed["items"])]["item_id"],
            "properties": {"recommendation_id": listed["recommendation_id"]},
        }
        for n in range(40)
    ]
    post(live, clicks)
    live.wait_profile(uid, lambda p: p["counts"].get("click") == 40)
    before = live.request("GET", "/v1/kpis?by=day")[1]
    os.kill(live.proc.pid, signal.SIGKILL)
    live.stop()
    again = engine_factory(live.data_dir).start()
    try:
        post(again, clicks[:10])  # a client retrying: the same event ids count once
        post(again, [{"type": "search", "user_id": uid, "properties": {"query": "boots"}}])
        again.wait_profile(uid, lambda p: p["counts"].get("search") == 1)
        assert again.request("GET", "/v1/kpis?by=day")[1] == before
    finally:
        assert again.stop() == 0, again.tail()
