"""The built-in triggers against a running engine: offers on the WebSocket, the webhook, timers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

SECRET = "webhook-secret"
DELAY_S = 1.0


def config(hook_url: str, delay_s: float = DELAY_S) -> str:
    return f"""
[push]
debounce_ms = 0
[triggers]
cart_abandonment_s = {delay_s}
tick_s = 0.2
high_value_spend = 100.0
browse_views = 3
max_offers = 2
min_offer_gap_s = 0
webhook_url = "{hook_url}"
webhook_secret = "{SECRET}"
"""


@pytest.fixture(scope="module")
def hooks(module_hook_server: Any) -> Any:
    return module_hook_server


@pytest.fixture(scope="module")
def shop(module_engine: Callable[..., Any], hooks: Any) -> Iterator[Any]:
    eng = module_engine(config(hooks.url))
    eng.start()
    yield eng
    assert eng.stop() == 0, eng.tail()


def add(user: str, item: str, price: float = 30.0) -> dict[str, Any]:
    return {
        "type": "add_to_cart",
        "user_id": user,
        "item_id": item,
        "properties": {"quantity": 1, "price": price},
    }


def purchase(user: str, item: str, revenue: float) -> dict[str, Any]:
    line = {"item_id": item, "quantity": 1, "price": revenue}
    return {
        "type": "purchase",
        "user_id": user,
        "properties": {"revenue": revenue, "items": [line]},
    }


async def post(eng: Any, *events: dict[str, Any]) -> None:
    status, body = await asyncio.to_thread(eng.post_events, list(events))
    assert status == 202, body


def test_an_abandoned_cart_gets_an_offer_after_the_delay(shop: Any, hooks: Any, uid: str) -> None:
    """The offer reaches the socket and the webhook; the timer shows in the profile until then."""

    async def run() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(shop.ws_url(f"user_id={uid}")) as ws,
        ):
            await shop.next_message(ws, "recommendations")
            await post(shop, add(uid, "tent"))
            return await shop.next_message(ws, "offer")

    offer = asyncio.run(run())
    assert offer["trigger"] == "cart_abandonment" and offer["plugin"] == "cart_abandonment"
    assert offer["payload"]["items"] == ["tent"] and offer["payload"]["cart_total"] == 30.0
    profile = shop.wait_profile(uid, lambda p: p["offers_sent"] and not p["timers"])
    assert [o["trigger"] for o in profile["offers_sent"]] == ["cart_abandonment"]

    for body, signature in hooks.wait(1):
        sent = json.loads(body)
        if sent["user_id"] == uid:
            assert sent["action"]["trigger"] == "cart_abandonment"
            digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert signature == f"sha256={digest}"
            break
    else:
        raise AssertionError(f"no webhook call for {uid}: {hooks.received}")


def test_a_timer_is_pending_in_the_profile_until_it_fires(shop: Any, uid: str) -> None:
    assert shop.post_events([add(uid, "lamp")])[0] == 202
    pending = shop.wait_profile(uid, lambda p: bool(p["timers"]) or bool(p["offers_sent"]))
    # Either seen while pending, or already fired: in both cases it fires exactly once.
    assert set(pending["timers"]) <= {"cart_abandonment"}
    done = shop.wait_profile(uid, lambda p: not p["timers"] and p["offers_sent"])
    assert len(done["offers_sent"]) == 1


def test_no_offer_when_the_cart_is_bought(shop: Any, uid: str) -> None:
    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(shop.ws_url(f"user_id={uid}")) as ws,
        ):
            await shop.next_message(ws, "recommendations")
            await post(shop, add(uid, "stove"), purchase(uid, "stove", 30.0))
            # The timer fires (and is cleared) with nothing in the cart: no offer.
            await asyncio.to_thread(
                shop.wait_profile, uid, lambda p: p["order_count"] == 1 and not p["timers"]
            )
            with pytest.raises(TimeoutError):
                await shop.next_message(ws, "offer", limit_s=2 * DELAY_S)

    asyncio.run(run())
    status, profile = shop.profile(uid)
    assert status == 200 and profile["offers_sent"] == []


def test_offers_are_capped_per_visitor(shop: Any, uid: str) -> None:
    """[triggers] max_offers = 2: the third abandoned cart of the day gets no offer."""
    capped = (
        'personify_trigger_actions_total{outcome="capped",plugin="cart_abandonment",type="offer"}'
    )
    before = shop.metric(capped)

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(shop.ws_url(f"user_id={uid}")) as ws,
        ):
            await shop.next_message(ws, "recommendations")
            for n, item in enumerate(["a", "b", "c"], start=1):
                await post(shop, add(uid, item))
                if n <= 2:
                    offer = await shop.next_message(ws, "offer")
                    assert item in offer["payload"]["items"]
                else:
                    await asyncio.to_thread(
                        shop.wait_for,
                        lambda: shop.metric(capped) > before,
                        what="the third offer to be capped",
                    )
                    with pytest.raises(TimeoutError):
                        await shop.next_message(ws, "offer", limit_s=1.0)

    asyncio.run(run())
    status, profile = shop.profile(uid)
    assert status == 200 and len(profile["offers_sent"]) == 2


def test_crossing_the_spend_threshold_pushes_the_high_value_segment(shop: Any, uid: str) -> None:
    async def run() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(shop.ws_url(f"user_id={uid}")) as ws,
        ):
            await shop.next_message(ws, "recommendations")
            await post(shop, purchase(uid, "kayak", 60.0))
            await asyncio.to_thread(shop.wait_profile, uid, lambda p: p["order_count"] == 1)
            await post(shop, purchase(uid, "paddle", 60.0))
            return await shop.next_message(ws, "segments")

    segments = asyncio.run(run())
    assert segments["added"] == ["high_value"] and segments["segments"] == ["high_value"]
    assert segments["user_id"] == uid
    # An ordinary rule segment, set up by [triggers] high_value_spend.
    status, body = shop.request("GET", "/v1/segments/high_value")
    assert status == 200 and body["rule"] == "spend >= 100.0", body
    assert uid in shop.request("GET", "/v1/segments/high_value/members?limit=1000")[1]["members"]


def test_browsing_without_buying_gets_one_nudge(shop: Any, uid: str) -> None:
    views = [{"type": "product_view", "user_id": uid, "item_id": f"p{i}"} for i in range(5)]

    async def run() -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(shop.ws_url(f"user_id={uid}")) as ws,
        ):
            await shop.next_message(ws, "recommendations")
            for view in views:
                await post(shop, view)
            await asyncio.to_thread(
                shop.wait_profile, uid, lambda p: p["counts"].get("product_view") == 5
            )
            offers = [await shop.next_message(ws, "offer")]
            with contextlib.suppress(TimeoutError):  # a second nudge would show here
                offers.append(await shop.next_message(ws, "offer", limit_s=2.0))
            return offers

    offers = asyncio.run(run())
    assert [o["trigger"] for o in offers] == ["browse_without_buy"]


def test_timers_survive_a_restart(engine_factory: Any, hook_server: Any, uid: str) -> None:
    """A cart abandoned just before a restart still gets its offer afterwards."""
    eng = engine_factory(config=config(hook_server.url, delay_s=8.0)).start()
    assert eng.post_events([add(uid, "canoe")])[0] == 202
    eng.wait_profile(uid, lambda p: "cart_abandonment" in p["timers"])
    assert eng.stop() == 0, eng.tail()
    eng.start()
    profile = eng.wait_profile(uid, lambda p: p["offers_sent"] and not p["timers"], timeout=90)
    assert [o["trigger"] for o in profile["offers_sent"]] == ["cart_abandonment"]
    calls = [json.loads(body) for body, _sig in hook_server.wait(1)]
    assert any(c["user_id"] == uid and c["action"]["type"] == "offer" for c in calls)
    assert eng.stop() == 0, eng.tail()
