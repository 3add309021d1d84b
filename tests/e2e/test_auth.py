"""API keys with scopes and visitor-scoped WebSocket tokens, against a running engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.e2e

ADMIN = "admin-key-0123456789"
READ = "read-key-0123456789"
BROWSER = "browser-key-0123456789"
CONFIG = f"""
[auth]
token_ttl_s = 600.0
[auth.keys.admin]
key = "{ADMIN}"
scopes = ["admin"]
[auth.keys.backend]
key = "{READ}"
scopes = ["read"]
[auth.keys.browser]
key = "{BROWSER}"
scopes = ["ingest"]
"""


@pytest.fixture(scope="module")
def secured(module_engine: Callable[..., Any]) -> Iterator[Any]:
    eng = module_engine(CONFIG)
    eng.start()
    yield eng
    assert eng.stop() == 0, eng.tail()


def test_open_routes_and_missing_keys(secured: Any) -> None:
    assert secured.request("GET", "/healthz")[0] == 200
    assert secured.request("GET", "/v1/openapi.json")[0] == 200
    status, body = secured.request("GET", "/v1/users/someone")
    assert status == 401 and body["field"] == "Authorization"
    status, body = secured.request("GET", "/v1/users/someone", key="not-a-key-at-all")
    assert status == 401


def test_each_scope_allows_its_routes_only(secured: Any, uid: str) -> None:
    event = {"type": "product_view", "user_id": uid, "item_id": "sku-1"}
    assert secured.request("POST", "/v1/events", event)[0] == 401
    assert secured.request("POST", "/v1/events", event, key=READ)[0] == 403
    assert secured.request("POST", "/v1/events", event, key=BROWSER)[0] == 202
    # The browser's ingest key can do nothing else.
    for method, path in [
        ("GET", f"/v1/users/{uid}"),
        ("GET", f"/v1/users/{uid}/recommendations"),
        ("GET", "/metrics"),
        ("PUT", "/v1/items/sku-1"),
    ]:
        status, body = secured.request(method, path, {"title": "x"}, key=BROWSER)
        assert status == 403, (method, path, body)
        assert "ingest" in body["error"] or "browser" in body["error"]
    deadline = time.monotonic() + 30
    while secured.request("GET", f"/v1/users/{uid}", key=READ)[0] != 200:
        assert time.monotonic() < deadline, "the event never showed in the profile"
        time.sleep(0.1)
    assert secured.request("GET", f"/v1/users/{uid}/recommendations", key=READ)[0] == 200
    assert secured.request("GET", "/metrics", key=READ)[0] == 403
    assert secured.request("PUT", "/v1/items/sku-1", {"title": "x"}, key=READ)[0] == 403
    assert secured.request("PUT", "/v1/items/sku-1", {"title": "Boots"}, key=ADMIN)[0] == 202
    assert secured.request("GET", "/metrics", key=ADMIN)[0] == 200


def test_websocket_token_is_for_one_visitor(secured: Any, uid: str) -> None:
    status, body = secured.request("POST", "/v1/ws/tokens", {"user_id": uid}, key=BROWSER)
    assert status == 403
    status, body = secured.request("POST", "/v1/ws/tokens", {"user_id": uid}, key=READ)
    assert status == 200 and body["user_id"] == uid and body["expires"] > time.time()
    token = body["token"]
    base = secured.url.replace("http://", "ws://", 1) + "/v1/ws"

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{base}?user_id={uid}&token={token}") as ws:
                msg = await ws.receive(timeout=30)
                assert msg.type == aiohttp.WSMsgType.TEXT
                assert msg.json()["user_id"] == uid
            for query in (
                f"user_id=someone-else&token={token}",
                f"user_id={uid}",
                f"user_id={uid}&token=x.y.z",
            ):
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    async with session.ws_connect(f"{base}?{query}"):
                        pass
                assert info.value.status == 401, query
            # A backend key may follow any visitor.
            headers = {"Authorization": f"Bearer {READ}"}
            async with session.ws_connect(f"{base}?user_id=anyone", headers=headers) as ws:
                msg = await ws.receive(timeout=30)
                assert msg.json()["user_id"] == "anyone"

    asyncio.run(run())
