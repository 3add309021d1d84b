"""Bad input gets the documented error, and the valid events of a batch still count."""

from __future__ import annotations

import time
from typing import Any


def _total(profile: dict[str, Any]) -> int:
    return sum(profile["counts"].values())


def test_malformed_json_is_400(engine: Any) -> None:
    """A body that is not JSON answers 400 with a JSON error."""
    status, body = engine.request("POST", "/v1/events", raw=b'{"type": "page_view",')
    assert status == 400
    assert body["field"] == "body" and "malformed JSON" in body["error"]


def test_wrong_content_type_is_415(engine: Any) -> None:
    """A body that is not declared as JSON answers 415."""
    status, body = engine.request(
        "POST",
        "/v1/events",
        raw=b"type=page_view",
        content_type="application/x-www-form-urlencoded",
    )
    assert status == 415
    assert body["field"] == "Content-Type"


def test_oversized_body_is_413(engine: Any) -> None:
    """A body over [events] max_body_bytes answers 413 naming the limit."""
    big = {"type": "page_view", "user_id": "u", "properties": {"blob": "x" * 2_000_000}}
    status, body = engine.request("POST", "/v1/events", big)
    assert status == 413
    assert body["field"] == "body" and "1048576" in body["error"]


def test_oversized_batch_is_413(engine: Any) -> None:
    """A batch longer than [events] max_batch answers 413 and accepts nothing."""
    events = [{"type": "page_view", "user_id": "batch-too-long"} for _ in range(1001)]
    status, body = engine.post_events(events)
    assert status == 413
    assert body["field"] == "events" and "1000" in body["error"]
    assert engine.profile("batch-too-long")[0] == 404


def test_wrong_body_shape_is_422(engine: Any) -> None:
    """A JSON array or an events field that is not a list answers 422."""
    status, body = engine.request("POST", "/v1/events", [1, 2])
    assert status == 422 and body["field"] == "body"
    status, body = engine.request("POST", "/v1/events", {"events": "nope"})
    assert status == 422 and body["field"] == "events"


def test_single_invalid_event_is_422_with_field(engine: Any) -> None:
    """One invalid event answers 422 naming the field and the reason."""
    status, body = engine.post_events({"type": "page_view"})
    assert status == 422
    assert body["field"] == "user_id" and "required" in body["error"]
    assert body["accepted"] == 0 and body["rejected"][0]["index"] == 0


def test_mixed_batch_accepts_valid_and_names_each_rejection(engine: Any, uid: str) -> None:
    """Each invalid event is rejected with its index and field; the valid ones are applied."""
    future = int(time.time() * 1000) + 3_600_000
    events = [
        {"type": "page_view", "user_id": uid},  # 0 ok
        {"type": "page_view", "user_id": 42},  # 1 wrong type
        {"type": "page_view"},  # 2 no id
        {"type": "teleport", "user_id": uid},  # 3 unknown type
        {"type": "page_view", "user_id": uid, "ts": future},  # 4 future
        {"type": "page_view", "user_id": uid, "ts": "yesterday"},  # 5 bad ts
        {"type": "product_view", "user_id": uid},  # 6 no item
        {"type": "search", "user_id": uid, "properties": {}},  # 7 no query
        {
            "type": "add_to_cart",
            "user_id": uid,
            "item_id": "a",
            "properties": {"quantity": "two"},
        },  # 8 bad qty
        {"type": "page_view", "user_id": uid, "color": "red"},  # 9 unknown field
        "not an object",  # 10
        {"type": "wishlist_add", "user_id": uid, "item_id": "a"},  # 11 custom ok
        {"type": "search", "user_id": uid, "properties": {"query": "x" * 5000}},  # 12 too long
        {"type": "product_view", "user_id": uid, "item_id": "b"},  # 13 ok
    ]
    status, body = engine.post_events(events)
    assert status == 202, body
    assert body["accepted"] == 3
    fields = {r["index"]: r["field"] for r in body["rejected"]}
    assert fields == {
        1: "user_id",
        2: "user_id",
        3: "type",
        4: "ts",
        5: "ts",
        6: "item_id",
        7: "properties.query",
        8: "properties.quantity",
        9: "color",
        10: "",
        12: "properties.query",
    }
    assert all(r["error"] for r in body["rejected"])
    assert "future" in next(r["error"] for r in body["rejected"] if r["index"] == 4)
    p = engine.wait_profile(uid, lambda p: _total(p) == 3)
    assert p["counts"] == {"page_view": 1, "wishlist_add": 1, "product_view": 1}


def test_unknown_route_is_json_404(engine: Any) -> None:
    """Unknown paths and unknown visitors answer JSON 404s."""
    status, body = engine.request("GET", "/v1/nothing-here")
    assert status == 404 and "error" in body
    status, body = engine.profile("never-seen-visitor")
    assert status == 404 and body["field"] == "user_id"


def test_rejections_are_counted_in_metrics(engine: Any) -> None:
    """Rejected events show up in the metrics by reason."""
    engine.post_events([{"type": "teleport", "user_id": "m"}])
    status, text = engine.request("GET", "/metrics")
    assert status == 200
    assert 'personify_events_rejected_total{reason="unknown_type",source="http"}' in text


def test_large_body_under_the_limit_is_read_whole(engine: Any, uid: str) -> None:
    """A body just under 1 MiB arrives in many chunks and is accepted whole."""
    events = [
        {"type": "search", "user_id": uid, "properties": {"query": "q" * 1000, "n": i}}
        for i in range(900)
    ]
    status, body = engine.post_events(events)
    assert status == 202, body
    assert body["accepted"] == 900
    engine.wait_profile(uid, lambda p: p["counts"].get("search") == 900)
