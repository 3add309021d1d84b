"""The engine starts, accepts events over HTTP and serves the profile."""

from __future__ import annotations

from typing import Any


def test_posted_event_reaches_profile(engine: Any, uid: str) -> None:
    """An event posted over HTTP shows up in the visitor's profile counts."""
    status, body = engine.post_events([{"type": "page_view", "user_id": uid}])
    assert status == 202, body
    assert body["accepted"] == 1 and body["rejected"] == []
    profile = engine.wait_profile(uid, lambda p: p["counts"].get("page_view") == 1)
    assert profile["user_id"] == uid


def test_healthz_and_openapi(engine: Any) -> None:
    """Health is OK once started and the OpenAPI document lists the event endpoint."""
    status, body = engine.request("GET", "/healthz")
    assert status == 200 and body["status"] == "ok", body
    status, spec = engine.request("GET", "/v1/openapi.json")
    assert status == 200
    assert "/v1/events" in spec["paths"] and "/v1/users/{user_id}" in spec["paths"]
