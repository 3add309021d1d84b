"""Recommendations end to end: catalog, real model, real FAISS index, live signals, reasons."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

CATALOG = [
    ("h-jacket", "Waterproof hiking jacket", "outdoor/hiking", ["waterproof", "hiking"]),
    ("h-boots", "Leather hiking boots, waterproof", "outdoor/hiking", ["hiking"]),
    ("h-poles", "Carbon trekking poles", "outdoor/hiking", ["trekking"]),
    ("h-pack", "Hiking backpack 40 litres", "outdoor/hiking", ["hiking"]),
    ("h-socks", "Merino wool hiking socks", "outdoor/hiking", ["hiking"]),
    ("h-tent", "Two-person camping tent", "outdoor/camping", ["camping"]),
    ("k-knife", "Chef's kitchen knife, 8 inch", "home/kitchen", ["cooking"]),
    ("k-skillet", "Cast iron skillet", "home/kitchen", ["cooking"]),
    ("k-board", "Bamboo cutting board", "home/kitchen", ["cooking"]),
    ("k-pan", "Nonstick frying pan", "home/kitchen", ["cooking"]),
    ("k-espresso", "Espresso machine", "home/kitchen", ["coffee"]),
    ("f-silk", "Silk evening dress", "fashion/dresses", ["evening"]),
    ("f-cotton", "Summer cotton dress", "fashion/dresses", ["summer"]),
    ("f-linen", "Linen shirt dress", "fashion/dresses", ["summer"]),
    ("e-buds", "Wireless earbuds", "electronics/audio", ["bluetooth"]),
    ("e-speaker", "Portable bluetooth speaker", "electronics/audio", ["bluetooth"]),
]
CATEGORY = {item_id: category for item_id, _t, category, _tags in CATALOG}
HIKING = [i for i, c in CATEGORY.items() if c.startswith("outdoor/")]
KITCHEN = [i for i, c in CATEGORY.items() if c == "home/kitchen"]


def recs(eng: Any, user: str, query: str = "k=5") -> dict[str, Any]:
    status, body = eng.request("GET", f"/v1/users/{user}/recommendations?{query}")
    assert status == 200, body
    return dict(body)


def show(body: dict[str, Any]) -> str:
    """A compact form of a recommendation list for assertion messages."""
    return "; ".join(f"{r['item_id']} {r['score']} {r['reasons']}" for r in body["items"])


def ids(body: dict[str, Any]) -> list[str]:
    return [r["item_id"] for r in body["items"]]


def views(user: str, items: list[str], start_ms: int) -> list[dict[str, Any]]:
    return [
        {"type": "product_view", "user_id": user, "item_id": item, "ts": start_ms + i * 60_000}
        for i, item in enumerate(items)
    ]


@pytest.fixture(scope="module")
def shop(module_engine: Callable[..., Any]) -> Iterator[Any]:
    """An engine with the catalog above and some shoppers' history."""
    # Signal rows are written every signal_flush_interval_s: often, for the test.
    eng = module_engine("[recommend]\nsignal_flush_interval_s = 0.2\n")
    eng.start()
    items = [
        {"item_id": i, "title": t, "category": c, "tags": tags, "price": 50.0}
        for i, t, c, tags in CATALOG
    ]
    eng.add_items(items)
    now = int(time.time() * 1000) - 3_600_000
    history: list[dict[str, Any]] = []
    for n in range(6):  # hikers: the jacket goes with the boots, then the poles
        history += views(f"hiker-{n}", ["h-jacket", "h-boots", "h-poles"], now + n)
    for n in range(3):
        history += views(f"cook-{n}", ["k-knife", "k-board", "k-skillet"], now + n)
    for n in range(4):  # bought together: the skillet with the pan
        history.append(
            {
                "type": "purchase",
                "user_id": f"buyer-{n}",
                "ts": now + n,
                "properties": {
                    "items": [
                        {"item_id": "k-skillet", "quantity": 1, "price": 40.0},
                        {"item_id": "k-pan", "quantity": 1, "price": 30.0},
                    ],
                    "revenue": 70.0,
                    "currency": "USD",
                },
            }
        )
    status, body = eng.post_events(history)
    assert status == 202, body
    eng.wait_profile("buyer-3", lambda p: p["order_count"] == 1)
    eng.wait_profile("hiker-5", lambda p: p["counts"].get("product_view") == 3)
    # Every shopper's signals are written once all of them count (4 x 5 for each of the
    # skillet and the pan, 6 for the jacket, the boots and the poles, 3 for the board).
    eng.wait_for(
        lambda: (
            set(ids(recs(eng, "warm-up-visitor", "k=3"))[:2]) == {"k-skillet", "k-pan"}
            and ids(recs(eng, "warm-up-visitor", "k=3"))[2] in ("h-jacket", "h-boots", "h-poles")
            and ids(eng.request("GET", "/v1/items/h-jacket/similar?k=1")[1])[:1] == ["h-boots"]
        ),
        what="the shoppers' signals to be written",
    )
    yield eng
    assert eng.stop() == 0, eng.tail()


def test_new_visitor_gets_trending_items(shop: Any) -> None:
    """A visitor never seen gets the items with the most (weighted) interest, as trending."""
    body = recs(shop, "never-seen-visitor", "k=3")
    assert body["user_id"] == "never-seen-visitor"
    assert body["recommendation_id"]
    # 4 purchases (weight 5 each) outweigh 6 views (weight 1 each).
    assert set(ids(body)[:2]) == {"k-skillet", "k-pan"}, body
    assert ids(body)[2] in {"h-jacket", "h-boots", "h-poles"}, body
    for item in body["items"]:
        assert item["reasons"][0] == {"kind": "trending", "category": None}
    scores = [r["score"] for r in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_hiking_viewer_gets_hiking_gear(shop: Any, uid: str) -> None:
    """A visitor who views hiking gear is shown hiking gear, explained by what they viewed."""
    now = int(time.time() * 1000)
    status, _ = shop.post_events(views(uid, ["h-jacket", "h-boots"], now - 120_000))
    assert status == 202
    shop.wait_profile(uid, lambda p: len(p["recent_items"]) == 2)
    body = recs(shop, uid, "k=4")
    got = ids(body)
    assert got[0] == "h-poles", body  # what the other hikers viewed next
    assert all(CATEGORY[i].startswith("outdoor/") for i in got[:3]), (
        show(body) + " || " + show(shop.request("GET", "/v1/items/h-boots/similar")[1])
    )
    assert "h-jacket" not in got and "h-boots" not in got  # already seen
    profile = shop.profile(uid)[1]  # the views carried no category: the catalog's counts
    assert next(iter(profile["category_affinity"])) in ("outdoor", "outdoor/hiking"), profile
    first = body["items"][0]
    assert {"kind": "similar_to", "item_id": "h-boots"} in first["reasons"] or {
        "kind": "similar_to",
        "item_id": "h-jacket",
    } in first["reasons"]


def test_chat_message_shifts_recommendations(shop: Any, uid: str) -> None:
    """A chat message about a hiking jacket brings hiking gear to a kitchen shopper."""
    now = int(time.time() * 1000)
    shop.post_events(views(uid, ["k-knife", "k-board"], now - 120_000))
    shop.wait_profile(uid, lambda p: len(p["recent_items"]) == 2)
    before = recs(shop, uid, "k=3")
    # The kitchen items lead; the third place goes to whatever trends most.
    assert all(CATEGORY[i] == "home/kitchen" for i in ids(before)[:2]), show(before)
    assert "h-jacket" not in ids(before), show(before)
    status, _ = shop.post_events(
        [
            {
                "type": "chat_message",
                "user_id": uid,
                "properties": {"text": "I'm looking for a waterproof jacket for hiking"},
            }
        ]
    )
    assert status == 202
    after = shop.wait_for(
        lambda: (b := recs(shop, uid, "k=3")) and "h-jacket" in ids(b) and b,
        what="the chat to change the recommendations",
    )
    jacket = next(r for r in after["items"] if r["item_id"] == "h-jacket")
    assert {"kind": "matches_chat"} in jacket["reasons"]
    assert ids(after) != ids(before)


def test_purchase_removes_the_item(shop: Any, uid: str) -> None:
    """An item the visitor buys is no longer recommended to them."""
    now = int(time.time() * 1000)
    shop.post_events(views(uid, ["h-jacket", "h-boots"], now - 120_000))
    shop.wait_profile(uid, lambda p: len(p["recent_items"]) == 2)
    assert "h-poles" in ids(recs(shop, uid))
    purchase = {
        "type": "purchase",
        "user_id": uid,
        "properties": {
            "items": [{"item_id": "h-poles", "quantity": 1, "price": 80.0}],
            "revenue": 80.0,
            "currency": "USD",
        },
    }
    assert shop.post_events([purchase])[0] == 202
    shop.wait_profile(uid, lambda p: p["order_count"] == 1)
    assert "h-poles" not in ids(recs(shop, uid, "k=20"))


def test_bought_together_reason(shop: Any, uid: str) -> None:
    """Buying the skillet recommends the pan others bought with it, with that reason."""
    purchase = {
        "type": "purchase",
        "user_id": uid,
        "properties": {
            "items": [{"item_id": "k-skillet", "quantity": 1, "price": 40.0}],
            "revenue": 40.0,
            "currency": "USD",
        },
    }
    assert shop.post_events([purchase])[0] == 202
    shop.wait_profile(uid, lambda p: p["order_count"] == 1)
    body = recs(shop, uid, "k=3")
    pan = next(r for r in body["items"] if r["item_id"] == "k-pan")
    assert {"kind": "bought_together", "item_id": "k-skillet"} in pan["reasons"]
    assert ids(body)[0] == "k-pan", body


def test_filters_exclude_category_and_context(shop: Any, uid: str) -> None:
    """exclude, category, context_item and max_per_category shape the list."""
    now = int(time.time() * 1000)
    shop.post_events(views(uid, ["h-jacket"], now - 60_000))
    shop.wait_profile(uid, lambda p: len(p["recent_items"]) == 1)
    body = recs(shop, uid, "k=5&exclude=h-boots,h-poles")
    assert not {"h-boots", "h-poles"} & set(ids(body))
    body = recs(shop, uid, "k=5&category=home/kitchen")
    assert ids(body) and all(CATEGORY[i] == "home/kitchen" for i in ids(body)), body
    body = recs(shop, uid, "k=3&context_item=k-knife")
    assert "k-knife" not in ids(body)
    assert set(ids(body)) & {"k-board", "k-skillet"}, body
    body = recs(shop, uid, "k=6&max_per_category=1")
    cats = [CATEGORY[i] for i in ids(body)]
    assert len(cats) == len(set(cats)), body


def test_similar_items(shop: Any) -> None:
    """Items similar to one: seen together with it first, then close in content."""
    status, body = shop.request("GET", "/v1/items/h-jacket/similar?k=3")
    assert status == 200
    assert body["item_id"] == "h-jacket" and body["recommendation_id"]
    assert ids(body)[0] == "h-boots"
    assert all(CATEGORY[i].startswith("outdoor/") for i in ids(body)), body
    status, body = shop.request("GET", "/v1/items/no-such-item/similar")
    assert status == 404 and body["field"] == "item_id"


def test_deleted_item_never_appears_again(shop: Any, uid: str) -> None:
    """A deleted item leaves recommendations, similar items and trending lists for good."""
    now = int(time.time() * 1000)
    shop.post_events(views(uid, ["e-buds", "h-jacket"], now - 60_000))
    shop.wait_profile(uid, lambda p: len(p["recent_items"]) == 2)
    assert "e-speaker" in ids(recs(shop, uid, "k=20"))
    status, body = shop.request("DELETE", "/v1/items/e-speaker")
    assert status == 202 and body == {"deleted": "e-speaker"}
    shop.wait_for(
        lambda: shop.request("GET", "/v1/items/e-speaker")[0] == 404, what="the delete to apply"
    )
    assert "e-speaker" not in ids(recs(shop, uid, "k=20"))
    assert "e-speaker" not in ids(recs(shop, "someone-new", "k=20"))
    for item_id, _t, _c, _tags in CATALOG:
        if item_id != "e-speaker":
            status, body = shop.request("GET", f"/v1/items/{item_id}/similar?k=20")
            assert "e-speaker" not in ids(body)


def test_item_api_errors_name_the_field(shop: Any) -> None:
    """Bad catalog input gets a 4xx JSON error naming the field and the reason."""
    status, body = shop.request("POST", "/v1/items", {"item_id": "x"})
    assert status == 422 and body["field"] == "title"
    status, body = shop.request("POST", "/v1/items", {"items": [{"item_id": "y", "price": -1}]})
    assert status == 422 and body["rejected"][0]["field"] in ("title", "price")
    status, body = shop.request(
        "POST", "/v1/items", {"items": [{"item_id": "ok-1", "title": "Fine"}, {"title": "no id"}]}
    )
    assert status == 202 and body["accepted"] == 1
    assert body["rejected"] == [{"index": 1, "error": "required", "field": "item_id"}]
    status, body = shop.request("PUT", "/v1/items/a", {"item_id": "b", "title": "T"})
    assert status == 422 and body["field"] == "item_id"
    status, body = shop.request("POST", "/v1/items", raw=b"{", content_type="application/json")
    assert status == 400 and body["field"] == "body"
    status, body = shop.request("POST", "/v1/items", raw=b"x", content_type="text/plain")
    assert status == 415
    status, body = shop.request("GET", "/v1/users/x/recommendations?k=0")
    assert status == 400 and body["field"] == "k"
    status, body = shop.request("GET", "/v1/users/x/recommendations?k=many")
    assert status == 400 and body["field"] == "k"


def test_put_replaces_an_item(shop: Any) -> None:
    """PUT /v1/items/{id} stores the item; a second PUT replaces it (out of stock: not shown)."""
    item = {"title": "Trail running shoes", "category": "outdoor/hiking", "price": 120.0}
    status, body = shop.request("PUT", "/v1/items/h-shoes", item)
    assert status == 202 and body["item_ids"] == ["h-shoes"]
    stored = shop.wait_for(
        lambda: (r := shop.request("GET", "/v1/items/h-shoes"))[0] == 200 and r[1],
        what="the item to be stored",
    )
    assert stored["title"] == "Trail running shoes" and stored["in_stock"] is True
    status, _ = shop.request("PUT", "/v1/items/h-shoes", {**item, "in_stock": False})
    assert status == 202
    shop.wait_for(
        lambda: shop.request("GET", "/v1/items/h-shoes")[1].get("in_stock") is False,
        what="the replacement",
    )
    body = recs(shop, "shoe-browser", "k=20&category=outdoor/hiking")
    assert "h-shoes" not in ids(body)


def served(eng: Any, how: str) -> float:
    """How many answers were served ``how`` (memory or computed), from GET /metrics."""
    return float(eng.metric(f'personify_lists_served_total{{how="{how}"}}'))


def test_stored_list_follows_profile_and_catalog(shop: Any, uid: str) -> None:
    """A stored list is served from memory, follows the visitor's events, drops deleted items."""
    now = int(time.time() * 1000)
    shop.post_events(views(uid, ["h-jacket"], now - 60_000))
    shop.wait_profile(uid, lambda p: len(p["recent_items"]) == 1)
    first = recs(shop, uid, "k=5")
    memory = served(shop, "memory")
    again = recs(shop, uid, "k=5")
    assert served(shop, "memory") == memory + 1  # answered from the stored list
    assert again == first  # the same list, the same recommendation id
    shorter = recs(shop, uid, "k=2")
    assert (
        ids(shorter) == ids(first)[:2]
        and shorter["recommendation_id"] == first["recommendation_id"]
    )

    shop.post_events(views(uid, ["h-boots"], now - 30_000))
    shop.wait_profile(uid, lambda p: len(p["recent_items"]) == 2)
    after = recs(shop, uid, "k=5")
    assert after["recommendation_id"] != first["recommendation_id"]
    assert "h-boots" not in ids(after)  # viewed now: the list was recomputed

    gone = ids(after)[0]
    status, _ = shop.request("DELETE", f"/v1/items/{gone}")
    assert status == 202
    shop.wait_for(
        lambda: shop.request("GET", f"/v1/items/{gone}")[0] == 404,
        what="the delete to be applied",
    )
    body = recs(shop, uid, "k=5")
    assert gone not in ids(body), body
    assert len(ids(body)) == 5
    status, _ = shop.request("PUT", f"/v1/items/{gone}", item_of(gone))
    assert status == 202
    # Back in the catalog the lists are ranked from before the next test, which counts on it.
    shop.wait_for(
        lambda: shop.request("GET", f"/v1/items/{gone}/similar")[0] == 200,
        what="the item to be back",
    )


def test_a_visitor_who_never_asked_finds_their_list_ready_once_the_engine_is_idle(
    shop: Any, uid: str
) -> None:
    """Nobody asked for this visitor's list: it is computed while the loop is all but idle."""
    now = int(time.time() * 1000)
    shop.post_events(views(uid, ["k-knife", "k-board"], now - 60_000))
    shop.wait_profile(uid, lambda p: len(p["recent_items"]) == 2)

    def computed() -> bool:
        # Polling GET /metrics ten times a second would itself keep the loop busy: once a second.
        time.sleep(1.0)
        return shop.metric("personify_lists_unasked") == 0

    shop.wait_for(computed, what="the idle loop to compute the list")
    memory = served(shop, "memory")
    body = recs(shop, uid, "k=5")
    assert served(shop, "memory") == memory + 1  # the first request: answered from memory
    assert "k-knife" not in ids(body) and body["items"]


def item_of(item_id: str) -> dict[str, Any]:
    """The catalog entry of ``item_id`` in the wire form."""
    _i, title, category, tags = next(row for row in CATALOG if row[0] == item_id)
    return {"item_id": item_id, "title": title, "category": category, "tags": tags, "price": 50.0}


def test_without_personalization_consent_nothing_personal(shop: Any, uid: str) -> None:
    """A visitor who withdraws consent: their events change nothing, their list is trending."""
    now = int(time.time() * 1000)
    shop.post_events(views(uid, ["h-jacket", "h-boots"], now - 120_000))
    shop.wait_profile(uid, lambda p: len(p["recent_items"]) == 2)
    assert ids(recs(shop, uid, "k=3"))[0] == "h-poles"  # personal while consented
    status, body = shop.request("PUT", f"/v1/users/{uid}/consent", {"personalization": False})
    assert status == 202, body
    shop.wait_profile(uid, lambda p: p["consent"]["personalization"] is False)
    vetoed = shop.metric("personify_events_vetoed_total")
    shop.post_events(views(uid, ["k-knife"], now - 10_000))
    shop.wait_for(
        lambda: shop.metric("personify_events_vetoed_total") > vetoed,
        what="the event to be vetoed",
    )
    profile = shop.profile(uid)[1]
    assert [r["item_id"] for r in profile["recent_items"]] == ["h-boots", "h-jacket"]
    assert profile["counts"] == {"product_view": 2}
    # The same list as a visitor never seen (read twice: trending may move between reads).
    shop.wait_for(
        lambda: ids(recs(shop, uid, "k=3")) == ids(recs(shop, "never-seen-visitor", "k=3")),
        what="the list of a visitor never seen",
    )
    body = recs(shop, uid, "k=3")
    assert all(r["reasons"][0]["kind"] in ("trending", "popular") for r in body["items"])
    status, body = shop.request("PUT", f"/v1/users/{uid}/consent", {"cookies": True})
    assert status == 422 and body["field"] == "properties.cookies"
