"""JSON bodies of the HTTP API, as TypedDicts, and the helper that renders errors."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

import orjson
from aiohttp import web

from personify.engine.config import Scope

__all__ = [
    "ROUTE_SCOPES",
    "ErrorBody",
    "EventsAccepted",
    "Rejection",
    "json_error",
    "json_response",
]


class Rejection(TypedDict):
    """One rejected event of a POST /v1/events request."""

    index: int
    error: str
    field: str


class EventsAccepted(TypedDict):
    """Answer of POST /v1/events."""

    accepted: int
    rejected: list[Rejection]
    event_ids: list[str]
    error: NotRequired[str]


class ErrorBody(TypedDict):
    """Every 4xx/5xx answer: what went wrong, which field, and how to fix it."""

    error: str
    field: str
    detail: str


def json_response(body: Any, status: int = 200) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def json_error(status: int, error: str, field: str = "", detail: str = "") -> web.Response:
    """A JSON error response ``{"error", "field", "detail"}``."""
    body: ErrorBody = {"error": error, "field": field, "detail": detail}
    return json_response(body, status)


#: (method, route) -> the scope it needs; routes not listed need "admin".
ROUTE_SCOPES: dict[tuple[str, str], Scope | None] = {
    ("GET", "/healthz"): None,
    ("GET", "/v1/openapi.json"): None,
    ("POST", "/v1/events"): "ingest",
    ("PUT", "/v1/users/{user_id}/consent"): "ingest",
    # Export and erasure (GET .../export, DELETE /v1/users/{id}) need "admin".
    ("GET", "/v1/users/{user_id}"): "read",
    ("GET", "/v1/users/{user_id}/recommendations"): "read",
    ("GET", "/v1/items/{item_id}"): "read",
    ("GET", "/v1/items/{item_id}/similar"): "read",
    ("POST", "/v1/ws/tokens"): "read",
    ("GET", "/v1/ws"): "read",  # or a visitor's token
}
