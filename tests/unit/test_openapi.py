"""The OpenAPI document covers every route the server has, and only those."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from personify.api.openapi import OPENAPI
from personify.engine.app import app, configure
from personify.engine.config import Config


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> set[tuple[str, str]]:
    """Every (path, method) of the server's route tables."""
    data = Path(tmp_path_factory.mktemp("openapi"))
    if app.personify_config is None:
        configure(Config().replace(storage={"data_dir": str(data)}), "kafka://127.0.0.1:9")
    server = importlib.import_module("personify.api.server")
    found = set()
    for route in server.build_app().router.routes():
        info = route.resource.canonical if route.resource is not None else ""
        if route.method != "HEAD":
            found.add((info, route.method.lower()))
    return found


def test_every_route_is_documented(served: set[tuple[str, str]]) -> None:
    """Each (path, method) served by the API appears in the OpenAPI document and vice versa."""
    documented = {(path, method) for path, ops in OPENAPI["paths"].items() for method in ops}
    assert served == documented
    assert ("/v1/users/{user_id}/recommendations", "get") in served


def test_documented_operations_have_responses() -> None:
    """Every documented operation has a summary and at least one response."""
    for path, ops in OPENAPI["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), (path, method)
            assert op.get("responses"), (path, method)


def test_error_schema_names_field_and_fix() -> None:
    """The shared error body has error, field and detail."""
    assert OPENAPI["components"]["schemas"]["Error"]["required"] == ["error", "field", "detail"]
