"""Right of access and erasure: export, then DELETE leaves no trace, also after a restart."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.e2e


def test_export_then_erase_leaves_no_trace(engine_factory: Callable[..., Any], uid: str) -> None:
    eng = engine_factory().start()
    anon = f"anon-{uid}"
    events = [
        {"type": "product_view", "anonymous_id": anon, "item_id": "sku-1"},
        {"type": "chat_message", "anonymous_id": anon, "properties": {"text": "red boots"}},
        {"type": "identify", "anonymous_id": anon, "user_id": uid},
        {"type": "search", "user_id": uid, "properties": {"query": "boots"}},
    ]
    for n, e in enumerate(events):
        e["event_id"] = f"{uid}-e{n}"
    assert eng.post_events(events)[0] == 202
    eng.wait_profile(uid, lambda p: p["counts"].get("product_view") == 1)
    status, exported = eng.request("GET", f"/v1/users/{uid}/export")
    assert status == 200 and exported["user_id"] == uid
    assert exported["profile"]["counts"]["search"] == 1
    assert anon in exported["stored"]["anonymous_ids"]
    assert exported["stored"]["seen"]  # the dedup memory is part of what is held

    status, body = eng.request("DELETE", f"/v1/users/{uid}")
    assert status == 202 and body["request_id"]
    eng.wait_for(lambda: eng.profile(uid)[0] == 404, what="the profile to be erased")
    eng.wait_for(lambda: eng.profile(anon)[0] == 404, what="the linked anonymous id erased")
    assert eng.request("GET", f"/v1/users/{uid}/export")[0] == 404
    assert eng.request("GET", f"/v1/users/{anon}/export")[0] == 404
    recs = eng.request("GET", f"/v1/users/{uid}/recommendations")[1]
    fresh = eng.request("GET", "/v1/users/never-seen-anyone/recommendations")[1]
    assert recs["items"] == fresh["items"]  # nothing personal left to rank with

    # The audit topic records the erasure, without the id.
    digest = hashlib.sha256(uid.encode()).hexdigest()
    records = asyncio.run(eng.dead_letters(2, lambda r: r.get("action") == "erase", topic="audit"))
    mine = [r for r in records if r["request_id"] == body["request_id"]]
    assert len(mine) == 1 and mine[0]["user_digest"] == digest, records
    anon_digest = hashlib.sha256(anon.encode()).hexdigest()
    assert any(r["user_digest"] == anon_digest for r in records), records
    assert uid not in str(records) and anon not in str(records)

    # The same events again count as new: the dedup memory went too.
    assert eng.post_events([events[3]])[0] == 202
    eng.wait_profile(uid, lambda p: p["counts"] == {"search": 1})
    assert eng.request("DELETE", f"/v1/users/{uid}")[0] == 202
    eng.wait_for(lambda: eng.profile(uid)[0] == 404, what="the second erasure")
    assert eng.stop() == 0
    again = engine_factory(eng.data_dir).start()
    assert again.profile(uid)[0] == 404
    assert again.profile(anon)[0] == 404
    assert again.request("GET", f"/v1/users/{uid}/export")[0] == 404
    assert again.stop() == 0


def test_pseudonymised_ids_are_never_stored_and_the_api_takes_the_real_ones(
    engine_factory: Callable[..., Any], uid: str
) -> None:
    """With [events] pseudonymize_ids, the routed topic and tables hold only HMAC pseudonyms."""
    secret = "a-long-and-stable-secret"
    eng = engine_factory(
        config=f'[events]\npseudonymize_ids = true\nid_secret = "{secret}"\n'
        "[push]\ndebounce_ms = 0\n"
    ).start()
    email, anon = f"{uid}@example.com", f"cookie-{uid}"
    pseudo = "p-" + hmac.new(secret.encode(), email.encode(), hashlib.sha256).hexdigest()[:32]
    events = [
        {"type": "product_view", "anonymous_id": anon, "item_id": "sku-1"},
        {"type": "identify", "anonymous_id": anon, "user_id": email},
        {"type": "search", "user_id": email, "properties": {"query": "boots"}},
    ]
    assert eng.post_events(events)[0] == 202
    profile = eng.wait_profile(email, lambda p: p["counts"].get("product_view") == 1)
    assert profile["user_id"] == email  # the API answers for the id it was asked about ...
    assert email not in str(profile["anonymous_ids"]) and anon not in str(profile)
    status, exported = eng.request("GET", f"/v1/users/{email}/export")
    assert status == 200 and exported["stored"]["user_id"] == pseudo  # ... which is not stored

    async def routed_and_pushed() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        records = await eng.dead_letters(1, topic="events-routed")
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(eng.ws_url(f"user_id={email}")) as ws,
        ):
            first = await eng.next_message(ws, "recommendations")
        return records, first

    records, first = asyncio.run(routed_and_pushed())
    routed = json.dumps(records)
    assert pseudo in routed and email not in routed and anon not in routed
    assert first["user_id"] == email  # the socket sees the id it asked for

    assert eng.request("DELETE", f"/v1/users/{email}")[0] == 202
    eng.wait_for(lambda: eng.profile(email)[0] == 404, what="the pseudonymous profile erased")
    assert eng.stop() == 0, eng.tail()
    assert email not in eng.tail(1_000_000) and anon not in eng.tail(1_000_000)
