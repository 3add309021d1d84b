"""Catalog item validation: the item wire format and its field-level errors."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from personify.engine.config import EventsConfig
from personify.engine.errors import ValidationError
from personify.engine.models import validate_item

CFG = EventsConfig()


def _error(obj: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate_item(obj, CFG)
    return info.value


def test_full_item_is_normalised() -> None:
    """A complete item keeps its fields; the category path and tags are tidied."""
    item = validate_item(
        {
            "item_id": "sku-1",
            "title": "Rain jacket",
            "description": "Waterproof shell for hiking",
            "category": "/outdoor//jackets/ ",
            "price": 129,
            "tags": ["waterproof", "hiking", "waterproof"],
            "in_stock": False,
            "attributes": {"color": "red"},
        },
        CFG,
    )
    assert item == {
        "item_id": "sku-1",
        "title": "Rain jacket",
        "description": "Waterproof shell for hiking",
        "category": "outdoor/jackets",
        "price": 129.0,
        "tags": ["waterproof", "hiking"],
        "in_stock": False,
        "attributes": {"color": "red"},
    }


def test_minimal_item_gets_defaults() -> None:
    """Only item_id and title are required; the rest has defaults."""
    item = validate_item({"item_id": "a", "title": "A"}, CFG)
    assert item["in_stock"] is True and item["tags"] == [] and item["category"] is None
    assert item["description"] == "" and item["price"] is None and item["attributes"] == {}


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ([], ""),
        ({"title": "x"}, "item_id"),
        ({"item_id": 5, "title": "x"}, "item_id"),
        ({"item_id": "a"}, "title"),
        ({"item_id": "a", "title": "  "}, "title"),
        ({"item_id": "a", "title": "x", "price": -1}, "price"),
        ({"item_id": "a", "title": "x", "price": True}, "price"),
        ({"item_id": "a", "title": "x", "tags": "red"}, "tags"),
        ({"item_id": "a", "title": "x", "tags": [""]}, "tags"),
        ({"item_id": "a", "title": "x", "in_stock": "yes"}, "in_stock"),
        ({"item_id": "a", "title": "x", "attributes": []}, "attributes"),
        ({"item_id": "a", "title": "x", "category": 3}, "category"),
        ({"item_id": "a", "title": "x", "colour": "red"}, "colour"),
        ({"item_id": "a", "title": "x" * 5000}, "title"),
    ],
)
def test_invalid_items_name_the_field(obj: Any, field: str) -> None:
    """Each kind of bad item fails with a ValidationError on the offending field."""
    err = _error(obj)
    assert err.field == field
    assert err.reason


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "item_id",
                "title",
                "description",
                "category",
                "price",
                "tags",
                "in_stock",
                "attributes",
                "other",
            ]
        ),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=5)
        | st.lists(st.text(max_size=3), max_size=3)
        | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )
)
def test_validation_only_raises_validation_errors(obj: dict[str, Any]) -> None:
    """Any input gives an item or a ValidationError; a normalised item validates to itself."""
    try:
        item = validate_item(obj, CFG)
    except ValidationError:
        return
    assert validate_item(item, CFG) == item
