"""Right of access and erasure: export, then DELETE leaves no trace, also after a restart."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

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
