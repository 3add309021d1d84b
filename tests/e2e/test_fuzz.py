"""Generated requests against the served OpenAPI document: no 5xx, every answer as documented."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.e2e

#: Generated requests per operation (fixed seed: the same ones on every run).
EXAMPLES = 50
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


ADMIN = "fuzz-admin-key-0123456789"
READ = "fuzz-read-key-0123456789"
SECURED = f"""
[auth.keys.admin]
key = "{ADMIN}"
scopes = ["admin"]
[auth.keys.backend]
key = "{READ}"
scopes = ["read"]
"""


@pytest.fixture(scope="module")
def fuzzed(module_engine: Any) -> Iterator[Any]:
    eng = module_engine(SECURED)
    eng.start()
    yield eng
    assert eng.stop() == 0, eng.tail()


def _fuzz(engine: Any, key: str | None) -> None:
    """Every operation of the served document, with generated (also invalid) requests."""
    schema = schemathesis.openapi.from_url(
        f"{engine.url}/v1/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        fuzz()
    # and it still counts exactly
    user = f"after-fuzz-{key}"
    event = {"type": "page_view", "user_id": user}
    assert engine.request("POST", "/v1/events", event, key=ADMIN)[0] == 202
    assert engine.wait_for(
        lambda: engine.request("GET", f"/v1/users/{user}", key=ADMIN)[1].get("counts")
        == {"page_view": 1},
        what="the profile after fuzzing",
    )


@pytest.mark.parametrize("key", [ADMIN, READ, None], ids=["admin", "read", "no key"])
def test_every_endpoint_answers_as_documented(fuzzed: Any, key: str | None) -> None:
    """With each kind of key, and none: no 5xx, and every answer is as documented."""
    _fuzz(fuzzed, key)
