"""JSON bytes kept in memory are allocated to their length."""

from __future__ import annotations

import tracemalloc
from typing import Any

import orjson
import pytest

from personify.engine.jsonbytes import dumps_kept, trimmed

#: A stored list of ten items, as the list builder keeps it.
LIST = [
    {"item_id": f"sku-{n}", "score": 0.5, "reasons": [{"kind": "similar_to", "item_id": "sku-7"}]}
    for n in range(10)
]


def allocated(make: Any, n: int = 200) -> float:
    """Bytes allocated per object kept, over ``n`` objects made by ``make()``."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make() for _ in range(n)]
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(kept) == n
    return (after - before) / n


@pytest.mark.parametrize("value", [LIST, "u-1", "x" * 20_000])
def test_kept_json_is_allocated_to_its_length(value: Any) -> None:
    data = orjson.dumps(value)
    assert dumps_kept(value) == data and trimmed(data) == data
    # The bytes object's header (33 bytes) and the list slot aside, nothing beyond its length.
    assert allocated(lambda: dumps_kept(value)) <= len(data) + 64
