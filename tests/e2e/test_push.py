"""Live recommendations over a real WebSocket: pushes after events, resume after a reconnect."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import urllib.parse
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


@pytest.fixture(scope="module")
def live(module_engine: Callable[..., Any]) -> Iterator[Any]:
    """An engine with a small catalog, pushing without delay."""
    eng = module_engine("[push]\ndebounce_ms = 0\n[recommend]\nsignal_flush_interval_s = 0.2\n")
    eng.start()
    eng.add_items([{"item_id": i, "title": t, "category": c} for i, t, c in CATALOG])
    yield eng
    assert eng.stop() == 0, eng.tail()


def view(user: str, item: str) -> dict[str, Any]:
    return {"type": "product_view", "user_id": user, "item_id": item}


async def post(eng: Any, events: list[dict[str, Any]]) -> None:
    status, body = await asyncio.to_thread(eng.post_events, events)
    assert status == 202, body


def test_recommendations_are_pushed_after_each_event(live: Any, uid: str) -> None:
    """The current list arrives at once, and a fresh one after each of the visitor's events."""

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(live.ws_url(f"user_id={uid}")) as ws,
        ):
            first = await live.next_message(ws)
            assert first["type"] == "recommendations" and first["seq"] == 1
            assert first["user_id"] == uid and first["recommendation_id"]
            assert len(first["items"]) > 0
            for n, item in enumerate(["h-jacket", "k-knife"], start=2):
                await post(live, [view(uid, item)])
                got = await live.next_message(ws)
                assert got["type"] == "recommendations"
                assert got["seq"] == n  # one push per event, in order
                assert item not in [r["item_id"] for r in got["items"]]  # seen: not shown again
                assert got["recommendation_id"] != first["recommendation_id"]
            # The pushed list is the one the HTTP API answers now.
            status, body = await asyncio.to_thread(
                live.request, "GET", f"/v1/users/{uid}/recommendations"
            )
            assert status == 200
            assert body["recommendation_id"] == got["recommendation_id"]
            assert body["items"] == got["items"]

    stages = ("broker", "fold", "queue", "rank", "send")
    before = {s: live.metric(f'personify_push_stage_seconds_count{{stage="{s}"}}') for s in stages}
    asyncio.run(run())
    # Each push is timed stage by stage (bench/push.py prints their shares).
    for stage in stages:
        count = live.metric(f'personify_push_stage_seconds_count{{stage="{stage}"}}')
        assert count >= before[stage] + 2, stage


def pushed(eng: Any) -> float:
    """Recommendation messages pushed so far, from GET /metrics."""
    return float(eng.metric('personify_ws_messages_total{type="recommendations"}'))


def test_reconnect_resumes_without_losing_messages(live: Any, uid: str) -> None:
    """Messages pushed while the client was away arrive, in order, when it resumes."""

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(live.ws_url(f"user_id={uid}")) as ws:
                first = await live.next_message(ws)
            before = await asyncio.to_thread(pushed, live)
            await post(live, [view(uid, "h-boots")])
            await asyncio.to_thread(
                live.wait_for,
                lambda: pushed(live) > before,
                what="the list pushed while the client is away",
            )
            url = live.ws_url(f"user_id={uid}&resume_from={first['seq']}")
            async with session.ws_connect(url) as ws:
                missed = await live.next_message(ws)
                assert missed["seq"] == first["seq"] + 1
                assert "h-boots" not in [r["item_id"] for r in missed["items"]]
                await post(live, [view(uid, "h-poles")])
                after = await live.next_message(ws)
                assert after["seq"] == missed["seq"] + 1
            # Resuming from a sequence never sent (e.g. after a restart) gets a fresh list.
            async with session.ws_connect(live.ws_url(f"user_id={uid}&resume_from=999")) as ws:
                fresh = await live.next_message(ws)
                assert fresh["seq"] == after["seq"] + 1
                assert "h-poles" not in [r["item_id"] for r in fresh["items"]]

    asyncio.run(run())


def test_each_socket_gets_only_its_visitor(live: Any, uid: str) -> None:
    """Two visitors' sockets: an event of one is pushed to that one alone."""

    async def run() -> None:
        other = uid + "-other"
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(live.ws_url(f"user_id={uid}")) as mine,
            session.ws_connect(live.ws_url(f"user_id={other}")) as theirs,
        ):
            await live.next_message(mine)
            await live.next_message(theirs)
            await post(live, [view(other, "e-buds")])
            got = await live.next_message(theirs)
            assert got["user_id"] == other and got["seq"] == 2
            with pytest.raises(asyncio.TimeoutError):
                await mine.receive(timeout=1.0)

    asyncio.run(run())


def test_bad_requests_name_the_field(live: Any) -> None:
    status, body = live.request("GET", "/v1/ws")
    assert status == 400 and body["field"] == "user_id"
    status, body = live.request("GET", "/v1/ws?user_id=u&resume_from=-1")
    assert status == 400 and body["field"] == "resume_from"
    status, body = live.request("GET", "/v1/ws?user_id=u")  # plain HTTP, no upgrade
    assert status == 400 and "WebSocket" in body["error"]


def test_server_stop_closes_sockets_with_going_away(module_engine: Callable[..., Any]) -> None:
    """A stopping worker closes its sockets with 1001."""
    eng = module_engine()
    eng.start()

    async def run() -> int | None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(eng.ws_url("user_id=someone")) as ws,
        ):
            await eng.next_message(ws)
            stopping = asyncio.create_task(asyncio.to_thread(eng.stop))
            msg = await ws.receive(timeout=60)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
            assert await stopping == 0
            return ws.close_code

    assert asyncio.run(run()) == 1001


def _open_and_never_read(url: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads again."""
    parsed = urllib.parse.urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: fills fast
    sock.connect((parsed.hostname, parsed.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {parsed.path}?{parsed.query} HTTP/1.1\r\nHost: {parsed.netloc}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: nothing past the handshake is read
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_a_slow_client_does_not_delay_a_fast_one(engine_factory: Any, uid: str) -> None:
    """A socket that stops reading loses its oldest messages; the others get every one, in order.

    Two sockets follow the same visitor: one never reads past the handshake, the other reads.
    Large lists (100 items with long ids) fill the stalled socket's buffers within a few dozen
    pushes; after that its queue (``queue_size`` 4) drops the oldest messages, while the
    reading socket receives each push, with consecutive numbers, right after its event.
    """
    # 50 recent items: the visitor views the whole catalog in turn, and the lists (which leave
    # out what the visitor has seen) must stay long enough to fill the stalled socket.
    eng = engine_factory(
        config="[push]\ndebounce_ms = 0\nqueue_size = 4\n[recommend]\nlist_size = 100\n"
        "[profiles]\nrecent_items = 50\n"
    ).start()
    items = [
        {
            "item_id": f"{i:03d}-" + "x" * 180,
            "title": f"Product number {i}",
            "category": f"c/{i % 5}",
        }
        for i in range(120)
    ]
    eng.add_items(items)
    dropped = "personify_ws_dropped_total"
    before = eng.metric(dropped)
    stalled = _open_and_never_read(eng.ws_url(f"user_id={uid}"))

    async def run() -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(eng.ws_url(f"user_id={uid}"), max_msg_size=0) as ws,
        ):
            seq = (await eng.next_message(ws, "recommendations"))["seq"]
            for n in range(400):
                await post(eng, [view(uid, items[n % len(items)]["item_id"])])
                while True:  # the event's list (an offer may come first): none lost, in order
                    got = await eng.next_message(ws)
                    assert got["seq"] == seq + 1, (got, seq)
                    seq = got["seq"]
                    if got["type"] == "recommendations":
                        assert len(got["items"]) > 50
                        break
                if n >= 10 and await asyncio.to_thread(eng.metric, dropped) > before:
                    return n + 1
            raise AssertionError("the stalled socket never dropped a message")

    pushes = asyncio.run(run())
    assert pushes > 10
    assert eng.metric(dropped) > before
    stalled.close()
    assert eng.stop() == 0, eng.tail()


def test_without_lists_computed_ahead_sockets_still_get_theirs(
    engine_factory: Any, uid: str
) -> None:
    """With [recommend] precompute off, a socket gets its first list and one after each event."""
    eng = engine_factory(config="[push]\ndebounce_ms = 0\n[recommend]\nprecompute = false\n")
    eng.start()
    eng.add_items([{"item_id": i, "title": t, "category": c} for i, t, c in CATALOG])
    other = f"{uid}-no-socket"
    assert eng.post_events([view(uid, "h-jacket"), view(other, "h-boots")])[0] == 202
    eng.wait_profile(other, lambda p: len(p["recent_items"]) == 1)

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(eng.ws_url(f"user_id={uid}")) as ws,
        ):
            first = await eng.next_message(ws, "recommendations")
            assert first["items"] and "h-jacket" not in [r["item_id"] for r in first["items"]]
            await post(eng, [view(uid, "k-knife")])
            got = await eng.next_message(ws, "recommendations")
            assert got["seq"] == first["seq"] + 1
            assert "k-knife" not in [r["item_id"] for r in got["items"]]

    asyncio.run(run())
    # The visitor without a socket gets a list when asked, ranked then.
    status, body = eng.request("GET", f"/v1/users/{other}/recommendations?k=3")
    assert status == 200 and len(body["items"]) == 3, body
    assert "h-boots" not in [r["item_id"] for r in body["items"]]
