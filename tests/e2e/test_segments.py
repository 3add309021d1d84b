"""Rule segments and RFM scores, against a running engine.

Visitors enter and leave segments on the events that put them there, each change pushed once
on the WebSocket; a segment defined later applies to visitors seen before; RFM scores after a
sweep; an erased visitor leaves every member list; a restart keeps segments and membership.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

CATALOG = [
    ("h-jacket", "Waterproof hiking jacket", "outdoor/hiking"),
    ("h-boots", "Leather hiking boots", "outdoor/hiking"),
    ("k-pan", "Nonstick frying pan", "home/kitchen"),
]


@pytest.fixture(scope="module")
def live(module_engine: Callable[..., Any]) -> Iterator[Any]:
    eng = module_engine("[push]\ndebounce_ms = 0\n\n[model]\nenabled = false\n")
    eng.start()
    eng.add_items([{"item_id": i, "title": t, "category": c} for i, t, c in CATALOG])
    yield eng
    if eng.proc is not None and eng.proc.poll() is None:
        assert eng.stop() == 0, eng.tail()


def tag(uid: str) -> str:
    """A short prefix of the test's segment ids."""
    return "s" + uid.rsplit("-", 1)[1]


def put_segment(eng: Any, segment: str, rule: str) -> dict[str, Any]:
    status, body = eng.request("PUT", f"/v1/segments/{segment}", {"rule": rule})
    assert status in (200, 201), body
    return dict(body)


def post(eng: Any, events: list[dict[str, Any]]) -> None:
    status, body = eng.post_events(events)
    assert status == 202, body


def members(eng: Any, segment: str) -> list[str]:
    found: list[str] = []
    after = ""
    while True:
        status, body = eng.request("GET", f"/v1/segments/{segment}/members?limit=2&after={after}")
        assert status == 200, body
        found += body["members"]
        if body["next"] is None:
            return found
        after = body["next"]


def size(eng: Any, segment: str) -> int:
    status, body = eng.request("GET", f"/v1/segments/{segment}")
    assert status == 200, body
    return int(body["size"])


def variant(eng: Any, user: str) -> str:
    """The variant the visitor's list was ranked for."""
    status, listed = eng.request("GET", f"/v1/users/{user}/recommendations")
    assert status == 200, listed
    return str(listed["variant"])


def purchase(user: str, price: float, quantity: int = 1, item: str = "k-pan") -> dict[str, Any]:
    return {
        "type": "purchase",
        "user_id": user,
        "properties": {"items": [{"item_id": item, "price": price, "quantity": quantity}]},
    }


def test_a_rule_outside_the_language_is_refused(live: Any) -> None:
    for rule, reason in [
        ("__import__('os').system('true')", "unknown function"),
        ("orders.real > 1", "attribute"),
        ("lifetime_value > 3", "unknown field 'lifetime_value'"),
        ("orders >", "not an expression"),
    ]:
        status, body = live.request("PUT", "/v1/segments/bad", {"rule": rule})
        assert status == 422, body
        assert body["field"] == "rule" and reason in body["error"], body
    assert live.request("GET", "/v1/segments/bad")[0] == 404


def test_visitors_enter_and_leave_on_their_events_each_change_pushed_once(
    live: Any, uid: str
) -> None:
    put_segment(live, f"{tag(uid)}-cart", "cart_value >= 100")
    put_segment(live, f"{tag(uid)}-buyer", "orders >= 1 and spend >= 50")
    put_segment(live, f"{tag(uid)}-loyal", 'orders >= 2 and affinity("outdoor") > 0')
    mine = {f"{tag(uid)}-cart", f"{tag(uid)}-buyer", f"{tag(uid)}-loyal"}
    cart = {"type": "add_to_cart", "user_id": uid, "item_id": "k-pan"}

    async def run() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(live.ws_url(f"user_id={uid}")) as ws,
        ):
            await live.next_message(ws, "recommendations")

            async def next_change() -> dict[str, Any]:
                while True:
                    message = await live.next_message(ws, "segments")
                    if set(message["added"] + message["removed"]) & mine:
                        seen.append(message)
                        return message

            await asyncio.to_thread(
                post, live, [{**cart, "properties": {"price": 60.0, "quantity": 1}}]
            )
            await asyncio.to_thread(live.wait_profile, uid, lambda p: p["cart"]["total"] == 60.0)
            await asyncio.to_thread(
                post, live, [{**cart, "properties": {"price": 60.0, "quantity": 1}}]
            )
            entered = await next_change()
            assert entered["added"] == [f"{tag(uid)}-cart"] and entered["removed"] == []
            await asyncio.to_thread(post, live, [purchase(uid, 60.0, 2)])
            bought = await next_change()
            assert bought["added"] == [f"{tag(uid)}-buyer"]
            assert bought["removed"] == [f"{tag(uid)}-cart"]  # the purchase emptied the cart
            await asyncio.to_thread(
                post,
                live,
                [
                    {"type": "product_view", "user_id": uid, "item_id": "h-jacket"},
                    purchase(uid, 5.0, item="h-boots"),
                ],
            )
            loyal = await next_change()
            assert loyal["added"] == [f"{tag(uid)}-loyal"] and loyal["removed"] == []
            assert loyal["segments"] == sorted([f"{tag(uid)}-buyer", f"{tag(uid)}-loyal"])
        return seen

    seen = asyncio.run(run())
    assert len(seen) == 3  # one message per change, none twice
    profile = live.wait_profile(uid, lambda p: p["order_count"] == 2)
    assert profile["segments"] == sorted([f"{tag(uid)}-buyer", f"{tag(uid)}-loyal"])
    assert uid in members(live, f"{tag(uid)}-buyer") and uid not in members(
        live, f"{tag(uid)}-cart"
    )
    assert size(live, f"{tag(uid)}-buyer") == 1 and size(live, f"{tag(uid)}-cart") == 0


def test_a_segment_defined_later_applies_to_visitors_seen_before(live: Any, uid: str) -> None:
    spenders = [f"{uid}-{n}" for n in range(5)]
    post(live, [purchase(user, 1000.0 * (n + 1)) for n, user in enumerate(spenders)])
    for user in spenders:
        live.wait_profile(user, lambda p: p["order_count"] == 1)
    put_segment(live, f"{tag(uid)}-over-25", "spend > 2500")
    live.wait_for(
        lambda: members(live, f"{tag(uid)}-over-25")[:3] == sorted(spenders[2:]),
        what="the sweep to put the visitors seen before in",
    )
    assert set(members(live, f"{tag(uid)}-over-25")).isdisjoint(spenders[:2])
    assert f"{tag(uid)}-over-25" in live.profile(spenders[4])[1]["segments"]
    assert f"{tag(uid)}-over-25" not in live.profile(spenders[0])[1]["segments"]

    # RFM scores: the cut points are computed over every buyer in a sweep (the other tests'
    # buyers spend less than these).
    put_segment(live, f"{tag(uid)}-top", "monetary == 5")
    live.wait_for(
        lambda: spenders[4] in members(live, f"{tag(uid)}-top"),
        what="the top spender in the top monetary quintile",
    )
    assert spenders[0] not in members(live, f"{tag(uid)}-top")
    status, body = live.request("GET", "/v1/segments")
    assert status == 200 and len(body["rfm"]["monetary"]) == 4, body

    # Deleted: its members leave it.
    assert live.request("DELETE", f"/v1/segments/{tag(uid)}-over-25")[0] == 200
    live.wait_profile(spenders[4], lambda p: f"{tag(uid)}-over-25" not in p["segments"])


def test_behavioural_clusters_after_a_refit(live: Any, uid: str) -> None:
    keen = [f"{uid}-keen-{n}" for n in range(30)]
    quiet = [f"{uid}-quiet-{n}" for n in range(30)]
    events = [
        {"type": "product_view", "user_id": user, "item_id": CATALOG[j % 3][0]}
        for user in keen
        for j in range(12)
    ] + [purchase(user, 20.0) for user in keen]
    events += [{"type": "product_view", "user_id": user, "item_id": "k-pan"} for user in quiet]
    post(live, events)
    live.wait_profile(keen[-1], lambda p: p["order_count"] == 1)
    live.wait_profile(quiet[-1], lambda p: p["counts"].get("product_view") == 1)
    put_segment(live, f"{tag(uid)}-any-cluster", "cluster >= 0")  # a sweep refits the clusters
    live.wait_for(
        lambda: keen[0] in members(live, f"{tag(uid)}-any-cluster"), what="the refit and sweep"
    )
    status, body = live.request("GET", "/v1/segments")
    assert status == 200 and body["clusters"] is not None, body
    fitted = body["clusters"]
    assert len(fitted["clusters"]) >= 2 and "2" in fitted["silhouette"]
    assert all(c["distinctive"] for c in fitted["clusters"])
    keen_cluster = live.profile(keen[0])[1]["scores"]["cluster"]
    assert {live.profile(user)[1]["scores"]["cluster"] for user in keen[:5]} == {keen_cluster}
    assert live.profile(quiet[0])[1]["scores"]["cluster"] != keen_cluster


def test_an_erased_visitor_leaves_every_segment(live: Any, uid: str) -> None:
    put_segment(live, f"{tag(uid)}-viewer", "views >= 1")
    post(live, [{"type": "product_view", "user_id": uid, "item_id": "h-boots"}])
    live.wait_for(lambda: uid in members(live, f"{tag(uid)}-viewer"), what="the viewer a member")
    assert live.request("DELETE", f"/v1/users/{uid}")[0] == 202
    live.wait_for(lambda: live.profile(uid)[0] == 404, what="the erasure")
    live.wait_for(lambda: members(live, f"{tag(uid)}-viewer") == [], what="off the member list")
    assert size(live, f"{tag(uid)}-viewer") == 0


def test_kpis_per_segment(live: Any, uid: str) -> None:
    put_segment(live, f"{tag(uid)}-kpi", "views >= 1")
    post(live, [{"type": "product_view", "user_id": uid, "item_id": "h-jacket"}])
    live.wait_profile(uid, lambda p: f"{tag(uid)}-kpi" in p["segments"])
    sent = live.metric("personify_exposures_sent_total")
    status, listed = live.request("GET", f"/v1/users/{uid}/recommendations?k=3")
    assert status == 200, listed
    live.wait_for(
        lambda: live.metric("personify_exposures_sent_total") > sent, what="the exposure sent"
    )
    item = listed["items"][0]["item_id"]
    click = {"recommendation_id": listed["recommendation_id"], "position": 0}
    post(live, [{"type": "click", "user_id": uid, "item_id": item, "properties": click}])

    def row() -> dict[str, Any] | None:
        status, body = live.request("GET", "/v1/kpis?by=segment")
        assert status == 200, body
        rows = {r["segment"]: r for r in body["rows"]}
        return rows.get(f"{tag(uid)}-kpi")

    found = live.wait_for(lambda: (r := row()) and r["clicks"] == 1 and r, what="the click")
    assert found["exposures"] == 1 and found["visitors"] == 1 and found["ctr"] == 1.0


def test_an_experiment_on_a_segment_takes_only_its_visitors(live: Any, uid: str) -> None:
    put_segment(live, f"{tag(uid)}-hiker", 'affinity("outdoor") > 0')
    doc = {
        "variants": [{"name": "A"}, {"name": "B", "setting": {"weights.trending": 2.0}}],
        "segment": f"{tag(uid)}-hiker",
    }
    status, body = live.request("PUT", f"/v1/experiments/{tag(uid)}-exp", doc)
    assert status == 201 and body["segment"] == f"{tag(uid)}-hiker", body
    try:
        hiker, cook = f"{uid}-hiker", f"{uid}-cook"
        post(live, [{"type": "product_view", "user_id": hiker, "item_id": "h-boots"}])
        post(live, [{"type": "product_view", "user_id": cook, "item_id": "k-pan"}])
        live.wait_profile(hiker, lambda p: f"{tag(uid)}-hiker" in p["segments"])
        live.wait_profile(cook, lambda p: p["counts"].get("product_view") == 1)

        assert live.wait_for(
            lambda: variant(live, hiker).startswith(f"{tag(uid)}-exp/") and variant(live, hiker),
            what="the hiker's list in the experiment",
        )
        assert variant(live, cook) == "default"
    finally:
        live.request("DELETE", f"/v1/experiments/{tag(uid)}-exp")


def test_a_segment_ranks_its_members_lists_its_own_way(live: Any, uid: str) -> None:
    doc = {"rule": 'affinity("home") > 0', "ranking": {"weights.trending": 3.0}}
    status, body = live.request("PUT", f"/v1/segments/{tag(uid)}-cooks", doc)
    assert status == 201 and body["ranking"] == {"weights.trending": 3.0}, body
    try:
        cook, hiker = f"{uid}-cook", f"{uid}-hiker"
        post(live, [{"type": "product_view", "user_id": cook, "item_id": "k-pan"}])
        post(live, [{"type": "product_view", "user_id": hiker, "item_id": "h-boots"}])
        live.wait_profile(cook, lambda p: f"{tag(uid)}-cooks" in p["segments"])
        live.wait_profile(hiker, lambda p: p["counts"].get("product_view") == 1)

        live.wait_for(
            lambda: variant(live, cook) == f"segment:{tag(uid)}-cooks",
            what="the cook's own ranking",
        )
        assert variant(live, hiker) == "default"
    finally:
        live.request("DELETE", f"/v1/segments/{tag(uid)}-cooks")


def test_a_restart_keeps_segments_and_membership(
    live: Any, engine_factory: Callable[..., Any], uid: str
) -> None:
    put_segment(live, f"{tag(uid)}-searcher", "searches >= 1")
    post(live, [{"type": "search", "user_id": uid, "properties": {"query": "boots"}}])
    live.wait_for(lambda: members(live, f"{tag(uid)}-searcher") == [uid], what="the searcher in")
    before = live.request("GET", "/v1/segments")[1]
    assert live.stop() == 0, live.tail()
    again = engine_factory(live.data_dir, config=live.config.read_text()).start()
    try:
        kept = again.request("GET", "/v1/segments")[1]
        assert [dict(x, size=0) for x in kept["segments"]] == [
            dict(x, size=0) for x in before["segments"]
        ]
        assert kept["rfm"]["monetary"] == before["rfm"]["monetary"]
        assert members(again, f"{tag(uid)}-searcher") == [uid]
        assert f"{tag(uid)}-searcher" in again.profile(uid)[1]["segments"]
    finally:
        assert again.stop() == 0, again.tail()
