"""JSON bodies of the HTTP API, as TypedDicts, and the helper that renders errors."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

import orjson
from aiohttp import web

__all__ = ["ErrorBody", "EventsAccepted", "Rejection", "json_error", "json_response"]


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
