"""API keys with scopes, and WebSocket tokens scoped to one visitor.

With no ``[auth.keys]`` (the local default) every request is allowed and the API binds to
loopback only (the configuration refuses another address). With keys, every request but
``/healthz`` and ``/v1/openapi.json`` needs ``Authorization: Bearer <key>`` whose scopes allow
the route: ``ingest`` sends events (and can do nothing else: safe to ship in a browser),
``read`` reads profiles, recommendations and items and mints WebSocket tokens, ``admin``
changes the catalog and reads the metrics. A WebSocket from a browser authenticates with
``token=``: an HMAC-SHA256 token for one visitor, valid ``[auth] token_ttl_s``, minted by a
backend with ``POST /v1/ws/tokens``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from personify.api.routes import read_json
from personify.api.schemas import ROUTE_SCOPES, json_error, json_response
from personify.engine.app import current_config
from personify.engine.logging import get_logger

__all__ = ["auth_middleware", "auth_routes", "make_token", "verify_token"]

auth_routes = web.RouteTableDef()
_log = get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@functools.cache
def _secret() -> bytes:
    configured = current_config().auth.token_secret
    if configured:
        return configured.encode()
    return secrets.token_bytes(32)


def _sign(payload: bytes) -> str:
    mac = hmac.new(_secret(), payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def make_token(user_id: str, ttl_s: float, now: float | None = None) -> tuple[str, int]:
    """A token for ``user_id``'s WebSocket, and when it expires (epoch seconds)."""
    expires = int((time.time() if now is None else now) + ttl_s)
    uid = base64.urlsafe_b64encode(user_id.encode()).decode().rstrip("=")
    body = f"{uid}.{expires}"
    return f"{body}.{_sign(body.encode())}", expires


def verify_token(token: str, user_id: str, now: float | None = None) -> str | None:
    """None when ``token`` is valid for ``user_id`` now, else why not."""
    try:
        uid, expires_text, mac = token.split(".")
        expires = int(expires_text)
        owner = base64.urlsafe_b64decode(uid + "=" * (-len(uid) % 4)).decode()
    except ValueError:
        return "malformed token"
    if not hmac.compare_digest(mac, _sign(f"{uid}.{expires_text}".encode())):
        return "invalid token"
    if owner != user_id:
        return "the token is for another visitor"
    if (time.time() if now is None else now) > expires:
        return "the token has expired"
    return None


def _scopes_of(request: web.Request) -> tuple[str, frozenset[str]] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        return None
    for name, api_key in current_config().auth.keys.items():
        if hmac.compare_digest(api_key.key.encode(), key.strip().encode()):
            return name, frozenset(api_key.scopes)
    return None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let a request through when its key (or visitor token) allows the route."""
    keys = current_config().auth.keys
    if not keys:
        return await handler(request)
    route = request.match_info.route.resource
    name = route.canonical if route is not None else request.path
    needed = ROUTE_SCOPES.get((request.method, name), "admin")
    if needed is None:
        return await handler(request)
    if name == "/v1/ws" and "token" in request.query:
        problem = verify_token(request.query["token"], request.query.get("user_id", ""))
        if problem is not None:
            return json_error(401, problem, "token", "mint one with POST /v1/ws/tokens")
        return await handler(request)
    found = _scopes_of(request)
    if found is None:
        return json_error(
            401,
            "a valid API key is required",
            "Authorization",
            "send Authorization: Bearer <key> (see [auth.keys])",
        )
    key_name, scopes = found
    if needed not in scopes and "admin" not in scopes:
        return json_error(
            403,
            f"the key {key_name!r} lacks the {needed!r} scope",
            "Authorization",
            f"this route needs a key with scope {needed!r}",
        )
    return await handler(request)


@auth_routes.post("/v1/ws/tokens")
async def ws_token(request: web.Request) -> web.Response:
    """A token that lets a browser open GET /v1/ws for one visitor."""
    doc = await read_json(request, "the token request")
    if isinstance(doc, web.Response):
        return doc
    user_id = doc.get("user_id") if isinstance(doc, dict) else None
    if not isinstance(user_id, str) or not user_id:
        return json_error(422, "expected a non-empty string", "user_id", '{"user_id": "U"}')
    token, expires = make_token(user_id, current_config().auth.token_ttl_s)
    return json_response({"user_id": user_id, "token": token, "expires": expires})
