"""Generated requests against the served OpenAPI document: no 5xx, every answer as documented."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.e2e

#: Generated requests per operation (fixed seed: the same ones on every run).
EXAMPLES = 30
#: Hypothesis as the fuzz tests run it: the same generated cases on every run, no time limit.
FIXED = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
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
        @FIXED
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        fuzz()
    # and it still counts exactly
    user = f"after-fuzz-{key}"
    event = {"type": "page_view", "user_id": user}
    assert engine.request("POST", "/v1/events", event, key=ADMIN)[0] == 202
    assert engine.wait_for(
        lambda: (
            engine.request("GET", f"/v1/users/{user}", key=ADMIN)[1].get("counts")
            == {"page_view": 1}
        ),
        what="the profile after fuzzing",
    )


@pytest.mark.parametrize("key", [ADMIN, READ, None], ids=["admin", "read", "no key"])
def test_every_endpoint_answers_as_documented(fuzzed: Any, key: str | None) -> None:
    """With each kind of key, and none: no 5xx, and every answer is as documented."""
    _fuzz(fuzzed, key)


USERS = [f"stream-{i}" for i in range(4)]
#: Event types whose count a profile keeps, with what each needs to be valid.
_NEEDS: dict[str, dict[str, Any]] = {
    "page_view": {},
    "product_view": {"item_id": "sku-1"},
    "add_to_cart": {"item_id": "sku-2", "properties": {"quantity": 2, "price": 3.5}},
    "search": {"properties": {"query": "lamp"}},
}
_JUNK = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.text(min_size=300, max_size=400),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@st.composite
def _event(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event of a tracked visitor, maybe spoiled: a field dropped or its value junk."""
    kind = draw(st.sampled_from(sorted(_NEEDS)))
    event: dict[str, Any] = {"type": kind, "user_id": draw(st.sampled_from(USERS))}
    event |= _NEEDS[kind]
    if draw(st.booleans()):
        event["ts"] = draw(st.sampled_from(["2026-01-02T03:04:05Z", 1767225600000]))
    spoil = draw(st.sampled_from(["none", "none", "drop", "junk", "extra"]))
    field = draw(st.sampled_from(sorted({*event, "properties", "item_id", "ts", "event_id"})))
    if spoil == "drop":
        event.pop(field, None)
    elif spoil == "junk":
        event[field] = draw(_JUNK)
    elif spoil == "extra":
        event[draw(st.text(min_size=1, max_size=8))] = draw(_JUNK)
    return event


def _counted(event: Any) -> tuple[str, str] | None:
    """(visitor, type) an accepted event counts for, if it is one of the tracked ones."""
    if not isinstance(event, dict):
        return None
    user, kind = event.get("user_id"), event.get("type")
    if not (isinstance(user, str) and isinstance(kind, str)):
        return None
    if user in USERS and kind in _NEEDS and event.get("anonymous_id") is None:
        return user, kind
    return None


def test_generated_event_streams_count_exactly(fuzzed: Any) -> None:
    """Batches of valid and spoiled events over HTTP, and junk on the events topic.

    Every answer is 202 or 422 with each rejection's index; afterwards every tracked visitor
    counts exactly the accepted events, and the engine still answers.
    """
    expected: Counter[tuple[str, str]] = Counter()

    @given(batch=st.lists(_event(), min_size=1, max_size=12), junk=st.lists(_JUNK, max_size=2))
    @FIXED
    def stream(batch: list[dict[str, Any]], junk: list[Any]) -> None:
        status, body = fuzzed.request("POST", "/v1/events", {"events": batch}, key=ADMIN)
        assert status in (202, 422), body
        rejected = {r["index"] for r in body["rejected"]}
        assert body["accepted"] == len(batch) - len(rejected)
        for i, event in enumerate(batch):
            counted = _counted(event)
            if i not in rejected and counted is not None:
                expected[counted] += 1
        # The events topic: junk goes to the dead letters, a valid event next to it counts.
        valid = {"type": "page_view", "user_id": USERS[0]}
        messages = [(None, json.dumps(j).encode()) for j in junk] + [(None, b"\xff not json")]
        asyncio.run(fuzzed.produce("events", *messages, (None, orjson.dumps(valid))))
        expected[(USERS[0], "page_view")] += 1

    stream()
    assert sum(expected.values()) > EXAMPLES  # most generated events were accepted

    def exact() -> bool:
        for user in USERS:
            status, profile = fuzzed.request("GET", f"/v1/users/{user}", key=ADMIN)
            counts = profile.get("counts", {}) if status == 200 else {}
            if any(counts.get(kind, 0) != expected[(user, kind)] for kind in _NEEDS):
                return False
        return True

    fuzzed.wait_for(exact, what=f"exact counts {dict(expected)}")
    assert fuzzed.request("GET", "/healthz")[0] == 200
