"""The OpenAPI document covers every route the server has, and only those."""

from __future__ import annotations

from aiohttp import web

from personify.api.openapi import OPENAPI
from personify.api.routes import routes


def _served() -> set[tuple[str, str]]:
    found = set()
    for route in routes:
        assert isinstance(route, web.RouteDef)
        found.add((route.path, route.method.lower()))
    return found


def test_every_route_is_documented() -> None:
    """Each (path, method) served by the API appears in the OpenAPI document and vice versa."""
    documented = {(path, method) for path, ops in OPENAPI["paths"].items() for method in ops}
    assert _served() == documented


def test_documented_operations_have_responses() -> None:
    """Every documented operation has a summary and at least one response."""
    for path, ops in OPENAPI["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), (path, method)
            assert op.get("responses"), (path, method)


def test_error_schema_names_field_and_fix() -> None:
    """The shared error body has error, field and detail."""
    assert OPENAPI["components"]["schemas"]["Error"]["required"] == ["error", "field", "detail"]
