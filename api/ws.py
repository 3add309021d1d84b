"""GET /v1/ws: a visitor's live recommendations over a WebSocket.

The socket follows one visitor (``user_id``). It receives at once their current list, then a
fresh one after each of their events (at once; a burst's events within ``[push] debounce_ms``
of the list before gather into one more push).
Every message is a JSON object with ``type`` and ``seq``, the visitor's message number: a
client that reconnects with ``resume_from=SEQ`` first receives what it missed while away (up to
``[push] replay_size`` messages; past that, or after a restart of the worker, a fresh list).
The server pings every ``[push] heartbeat_s`` and closes a socket that stops answering; it
closes with 1001 (going away) when it stops. Messages from the client are ignored.

With several workers the socket may be open on a worker that does not own the visitor: the
owner then sends their messages here through the push topic (see `personify.agents.relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref

from aiohttp import WSCloseCode, WSMsgType, web

from personify.agents.lists import push_list, serve_recommendations
from personify.agents.push import Subscriber, hub
from personify.agents.recommend import Request
from personify.agents.relay import open_socket
from personify.api.schemas import json_error
from personify.engine.app import current_config
from personify.engine.logging import get_logger
from personify.engine.metrics import WS_SOCKETS
from personify.engine.models import stored_id

__all__ = ["close_sockets", "ws_routes"]

ws_routes = web.RouteTableDef()
_log = get_logger(__name__)
_SOCKETS: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()


def _params(request: web.Request) -> tuple[str, int | None] | web.Response:
    cfg = current_config()
    user_id = request.query.get("user_id", "")
    if not user_id:
        return json_error(400, "user_id is required", "user_id", "GET /v1/ws?user_id=U")
    if len(user_id) > cfg.events.max_id_length or not user_id.isprintable():
        return json_error(
            400,
            f"expected a printable id of at most {cfg.events.max_id_length} characters",
            "user_id",
            "",
        )
    text = request.query.get("resume_from")
    if text is None or text == "":
        return user_id, None
    try:
        resume_from = int(text)
    except ValueError:
        return json_error(400, f"expected an integer, got {text!r}", "resume_from", "")
    if resume_from < 0:
        return json_error(400, f"expected >= 0, got {resume_from}", "resume_from", "")
    return user_id, resume_from


async def _send(ws: web.WebSocketResponse, sub: Subscriber) -> None:
    """Send what the socket's queue holds, as it comes, until either side closes."""
    while not ws.closed:
        batch = await sub.take()
        if not batch:
            return
        for data in batch:
            await ws.send_frame(data, WSMsgType.TEXT)  # JSON text, encoded once for all


@ws_routes.get("/v1/ws")
async def websocket(request: web.Request) -> web.StreamResponse:
    """Follow one visitor: their recommendations now and after each of their events."""
    params = _params(request)
    if isinstance(params, web.Response):
        return params
    user_id, resume_from = params
    key = stored_id(user_id, current_config().events)
    ws = web.WebSocketResponse(heartbeat=current_config().push.heartbeat_s)
    if not ws.can_prepare(request).ok:
        return json_error(
            400, "expected a WebSocket upgrade", "", "connect with a WebSocket client"
        )
    await ws.prepare(request)
    live = hub()
    sub, fresh = live.subscribe(key, resume_from, display=user_id)
    _SOCKETS.add(ws)
    WS_SOCKETS.set(len(_SOCKETS))
    sender = asyncio.create_task(_send(ws, sub))
    try:
        # With several workers, the worker owning the visitor sends their current list.
        remote = open_socket(key)
        if fresh and not remote:
            size = current_config().recommend.list_size
            served = await serve_recommendations(key, Request(k=size))
            push_list(key, served.rec_id, served.items, here_only=True, variant=served.variant)
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
    except Exception:
        _log.exception("websocket failed", user_id=key)
    finally:
        live.unsubscribe(key, sub)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        _SOCKETS.discard(ws)
        WS_SOCKETS.set(len(_SOCKETS))
    return ws


async def close_sockets(app: web.Application) -> None:
    """On shutdown: close every socket with 1001 (going away)."""
    hub().close_all()
    for ws in list(_SOCKETS):
        with contextlib.suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")
