"""Unit tests of `personify.engine.models.validate_event`: taxonomy, errors, normalisation."""

from __future__ import annotations

import contextlib
import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from personify.engine.config import EventsConfig
from personify.engine.errors import ValidationError
from personify.engine.models import (
    EVENT_TYPES,
    ITEM_EVENT_TYPES,
    SCHEMA_VERSION,
    event_key,
    format_ts,
    new_id,
    pseudonym,
    stored_id,
    validate_event,
)

CFG = EventsConfig()
NOW_MS = 1_795_341_600_000  # 2026-11-22T10:00:00Z
NOW_ISO = "2026-11-22T10:00:00.000Z"

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def ev(etype: str, **fields: Any) -> dict[str, Any]:
    """A wire event of ``etype`` for user u-1 with the given fields."""
    return {"type": etype, "user_id": "u-1", **fields}


def check(obj: Any, cfg: EventsConfig = CFG, now_ms: int = NOW_MS) -> dict[str, Any]:
    return validate_event(obj, cfg, now_ms)


def error(obj: Any, cfg: EventsConfig = CFG, now_ms: int = NOW_MS) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate_event(obj, cfg, now_ms)
    return info.value


# -- the taxonomy ----------------------------------------------------------------------


def test_taxonomy_is_the_documented_one() -> None:
    """The built-in taxonomy has exactly the twelve documented types."""
    assert {
        "page_view",
        "product_view",
        "search",
        "add_to_cart",
        "remove_from_cart",
        "purchase",
        "chat_message",
        "impression",
        "click",
        "identify",
        "alias",
        "consent",
    } == EVENT_TYPES
    assert {"product_view", "add_to_cart", "remove_from_cart", "click"} == ITEM_EVENT_TYPES


def test_page_view_normalised_shape() -> None:
    """A minimal page_view gets every top-level field, the schema version and ts defaults."""
    out = check({"type": "page_view", "user_id": "u-1", "event_id": "e-1"})
    assert out == {
        "v": SCHEMA_VERSION,
        "event_id": "e-1",
        "type": "page_view",
        "user_id": "u-1",
        "anonymous_id": None,
        "item_id": None,
        "ts": NOW_ISO,
        "ts_ms": NOW_MS,
        "properties": {},
    }


def test_anonymous_only_event() -> None:
    """An event with only anonymous_id is accepted and keyed by it."""
    out = check({"type": "page_view", "anonymous_id": "a-1"})
    assert out["user_id"] is None
    assert out["anonymous_id"] == "a-1"
    assert event_key(out) == "a-1"
    assert event_key(check(ev("page_view", anonymous_id="a-1"))) == "u-1"


def test_product_view() -> None:
    """product_view keeps its item and category."""
    out = check(ev("product_view", item_id="sku-1", properties={"category": "outdoor/jackets"}))
    assert out["item_id"] == "sku-1"
    assert out["properties"] == {"category": "outdoor/jackets"}


def test_search_with_filters() -> None:
    """A search needs a query and accepts an object of filters."""
    out = check(ev("search", properties={"query": "red jacket", "filters": {"size": "M"}}))
    assert out["properties"] == {"query": "red jacket", "filters": {"size": "M"}}


@pytest.mark.parametrize(
    ("props", "field", "reason"),
    [
        ({}, "properties.query", "required for this event type"),
        ({"query": "   "}, "properties.query", "must not be empty"),
        ({"query": 3}, "properties.query", "expected a string, got int"),
        ({"query": "x", "filters": ["a"]}, "properties.filters", "expected an object, got ['a']"),
    ],
)
def test_search_errors(props: dict[str, Any], field: str, reason: str) -> None:
    """An invalid search names the offending property."""
    err = error(ev("search", properties=props))
    assert (err.field, err.reason) == (field, reason)


@pytest.mark.parametrize("etype", ["add_to_cart", "remove_from_cart"])
def test_cart_events_default_quantity(etype: str) -> None:
    """Cart events default quantity to 1 and keep the price."""
    out = check(ev(etype, item_id="sku-1", properties={"price": 10}))
    assert out["properties"] == {"quantity": 1, "price": 10}
    out = check(ev(etype, item_id="sku-1", properties={"quantity": 3}))
    assert out["properties"]["quantity"] == 3


@pytest.mark.parametrize(
    ("props", "field", "reason"),
    [
        ({"quantity": 0}, "properties.quantity", "expected an integer >= 1, got 0"),
        ({"quantity": 1.5}, "properties.quantity", "expected an integer >= 1, got 1.5"),
        ({"quantity": True}, "properties.quantity", "expected an integer >= 1, got True"),
        ({"price": -1}, "properties.price", "expected a number >= 0, got -1"),
        ({"price": "9.99"}, "properties.price", "expected a number, got '9.99'"),
        ({"price": float("nan")}, "properties.price", "expected a number, got nan"),
    ],
)
def test_cart_errors(props: dict[str, Any], field: str, reason: str) -> None:
    """Invalid quantities and prices name the property."""
    err = error(ev("add_to_cart", item_id="sku-1", properties=props))
    assert (err.field, err.reason) == (field, reason)


def test_purchase_revenue_defaults_to_sum_of_lines() -> None:
    """A purchase without revenue gets the sum of price x quantity, and the default currency."""
    out = check(
        ev(
            "purchase",
            properties={
                "items": [
                    {"item_id": "a", "quantity": 2, "price": 10.25},
                    {"item_id": "b", "price": 5},
                    {"item_id": "c"},
                ]
            },
        )
    )
    props = out["properties"]
    assert props["revenue"] == 25.5
    assert props["currency"] == "USD"
    assert props["items"] == [
        {"item_id": "a", "quantity": 2, "price": 10.25},
        {"item_id": "b", "quantity": 1, "price": 5.0},
        {"item_id": "c", "quantity": 1},
    ]


def test_purchase_explicit_revenue_and_currency() -> None:
    """An explicit revenue is kept and the currency is upper-cased."""
    out = check(
        ev(
            "purchase",
            properties={"items": [{"item_id": "a", "price": 10}], "revenue": 8, "currency": "eur"},
        )
    )
    assert out["properties"]["revenue"] == 8.0
    assert out["properties"]["currency"] == "EUR"


def test_purchase_default_currency_from_config() -> None:
    """The currency defaults to [events] default_currency."""
    out = check(ev("purchase", item_id="a"), cfg=EventsConfig(default_currency="GBP"))
    assert out["properties"]["currency"] == "GBP"


def test_purchase_of_single_item_id() -> None:
    """A purchase with item_id and no items becomes a one-line purchase."""
    out = check(ev("purchase", item_id="sku-9", properties={"quantity": 3, "price": 2.5}))
    assert out["properties"]["items"] == [{"item_id": "sku-9", "quantity": 3, "price": 2.5}]
    assert out["properties"]["revenue"] == 7.5


@pytest.mark.parametrize(
    ("props", "field", "reason_part"),
    [
        ({}, "properties.items", "a purchase needs items or item_id"),
        ({"items": []}, "properties.items", "expected a non-empty list"),
        ({"items": "a"}, "properties.items", "expected a non-empty list"),
        ({"items": ["a"]}, "properties.items[0]", "expected an object, got 'a'"),
        ({"items": [{"price": 1}]}, "properties.items[0].item_id", "required"),
        ({"items": [{"item_id": 5}]}, "item_id", "expected a string, got int"),
        (
            {"items": [{"item_id": "a"}, {"item_id": "b", "quantity": 0}]},
            "properties.items[1].quantity",
            "expected an integer >= 1, got 0",
        ),
        (
            {"items": [{"item_id": "a", "price": -2}]},
            "properties.items[0].price",
            "expected a number >= 0, got -2",
        ),
        ({"items": [{"item_id": "a"}], "revenue": -1}, "properties.revenue", ">= 0"),
        ({"items": [{"item_id": "a"}], "currency": "EURO"}, "properties.currency", "3-letter"),
        ({"items": [{"item_id": "a"}], "currency": "U$D"}, "properties.currency", "3-letter"),
        ({"items": [{"item_id": "a"}], "currency": 840}, "properties.currency", "3-letter"),
        ({"items": [{"item_id": "a"}], "currency": None}, "properties.currency", "3-letter"),
    ],
)
def test_purchase_errors(props: dict[str, Any], field: str, reason_part: str) -> None:
    """Invalid purchase lines, revenue and currency name the field."""
    err = error(ev("purchase", properties=props))
    assert err.field == field
    assert reason_part in err.reason


def test_chat_message() -> None:
    """chat_message needs non-empty text."""
    assert check(ev("chat_message", properties={"text": "hi"}))["properties"] == {"text": "hi"}
    err = error(ev("chat_message"))
    assert (err.field, err.reason) == ("properties.text", "required for this event type")


def test_impression_and_click() -> None:
    """An impression takes a list of item ids; click needs an item and a position >= 0."""
    imp = check(ev("impression", properties={"recommendation_id": "r-1", "items": ["a", "b"]}))
    assert imp["properties"]["items"] == ["a", "b"]
    assert imp["item_id"] is None
    clk = check(ev("click", item_id="a", properties={"recommendation_id": "r-1", "position": 0}))
    assert clk["properties"]["position"] == 0
    err = error(ev("impression", properties={"items": ["a", 1]}))
    assert (err.field, err.reason) == ("properties.items", "expected a list of item ids")
    err = error(ev("click", item_id="a", properties={"position": -1}))
    assert (err.field, err.reason) == ("properties.position", "expected an integer >= 0, got -1")
    err = error(ev("click", item_id="a", properties={"recommendation_id": 7}))
    assert err.field == "properties.recommendation_id"


@pytest.mark.parametrize("etype", ["identify", "alias"])
def test_identify_and_alias_need_both_ids(etype: str) -> None:
    """Both identify and alias link an anonymous id to a user id: both are required."""
    out = check({"type": etype, "user_id": "u-1", "anonymous_id": "a-1"})
    assert (out["user_id"], out["anonymous_id"]) == ("u-1", "a-1")
    err = error({"type": etype, "user_id": "u-1"})
    assert err.field == "anonymous_id"
    assert "both are required" in err.reason
    err = error({"type": etype, "anonymous_id": "a-1"})
    assert err.field == "user_id"


def test_custom_types() -> None:
    """A custom type is accepted only when listed in custom_types, or with "*"."""
    wire = ev("wishlist_add", item_id="sku-1", properties={"list": "xmas"})
    err = error(wire)
    assert err.field == "type"
    assert "unknown event type 'wishlist_add'" in err.reason
    out = check(wire, cfg=EventsConfig(custom_types=("wishlist_add",)))
    assert out["type"] == "wishlist_add"
    assert out["properties"] == {"list": "xmas"}
    assert error(ev("share"), cfg=EventsConfig(custom_types=("wishlist_add",))).field == "type"
    assert check(ev("anything_at_all"), cfg=EventsConfig(custom_types=("*",)))["type"] == (
        "anything_at_all"
    )


# -- field-level errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "field", "reason_part"),
    [
        ([], "", "expected a JSON object, got list"),
        ("x", "", "expected a JSON object, got str"),
        ({"user_id": "u"}, "type", "expected an event type string, got None"),
        ({"type": "", "user_id": "u"}, "type", "expected an event type string"),
        ({"type": 3, "user_id": "u"}, "type", "expected an event type string, got 3"),
        ({"type": "page_veiw", "user_id": "u"}, "type", "unknown event type 'page_veiw'"),
        ({"type": "page_view"}, "user_id", "one of user_id or anonymous_id is required"),
        ({"type": "page_view", "user_id": None}, "user_id", "one of user_id or anonymous_id"),
        ({"type": "page_view", "user_id": 42}, "user_id", "expected a string, got int"),
        ({"type": "page_view", "user_id": ""}, "user_id", "expected 1-256 characters, got 0"),
        ({"type": "page_view", "user_id": "u" * 257}, "user_id", "got 257"),
        ({"type": "page_view", "anonymous_id": ["a"]}, "anonymous_id", "expected a string"),
        ({"type": "page_view", "user_id": "u", "event_id": 1}, "event_id", "expected a string"),
        ({"type": "page_view", "user_id": "u", "item_id": {}}, "item_id", "expected a string"),
        ({"type": "page_view", "user_id": "u", "userid": "u"}, "userid", "unknown field"),
        ({"type": "page_view", "user_id": "u", "properties": []}, "properties", "got list"),
        (
            {"type": "page_view", "user_id": "u", "properties": {"category": 3}},
            "properties.category",
            "expected a string like a/b, got 3",
        ),
    ],
)
def test_field_errors(obj: Any, field: str, reason_part: str) -> None:
    """Each invalid event names the offending field and the reason."""
    err = error(obj)
    assert err.field == field
    assert reason_part in err.reason
    assert str(err) == (f"{field}: {err.reason}" if field else err.reason)


def test_unknown_top_level_field_advice() -> None:
    """An unknown top-level field says to put extra data under properties."""
    err = error(ev("page_view", price=3))
    assert (err.field, err.reason) == ("price", "unknown field; put extra data under properties")


@pytest.mark.parametrize("etype", sorted(ITEM_EVENT_TYPES))
def test_item_events_need_item_id(etype: str) -> None:
    """Item events without item_id fail on item_id."""
    err = error(ev(etype))
    assert (err.field, err.reason) == ("item_id", f"required for {etype} events")


def test_id_length_limit_from_config() -> None:
    """Ids longer than [events] max_id_length are rejected."""
    cfg = EventsConfig(max_id_length=4)
    assert check(ev("page_view", user_id="abcd"), cfg=cfg)["user_id"] == "abcd"
    err = error(ev("page_view", user_id="abcde"), cfg=cfg)
    assert (err.field, err.reason) == ("user_id", "expected 1-4 characters, got 5")


# -- timestamps ---------------------------------------------------------------------------


def test_ts_absent_means_now() -> None:
    """Without ts, the event happens at now_ms."""
    out = check(ev("page_view"), now_ms=NOW_MS + 1234)
    assert out["ts_ms"] == NOW_MS + 1234
    assert out["ts"] == "2026-11-22T10:00:01.234Z"


def test_epoch_ms_ts() -> None:
    """Epoch milliseconds (int or float) are normalised to UTC ISO with milliseconds."""
    out = check(ev("page_view", ts=1_700_000_000_123))
    assert out["ts_ms"] == 1_700_000_000_123
    assert out["ts"] == "2023-11-14T22:13:20.123Z"
    assert check(ev("page_view", ts=1_700_000_000_123.9))["ts_ms"] == 1_700_000_000_123


def test_ts_ms_field_is_read_when_ts_absent() -> None:
    """A ts_ms field is used when ts is absent (normalised events carry it)."""
    assert check(ev("page_view", ts_ms=1_700_000_000_000))["ts"] == "2023-11-14T22:13:20.000Z"


@pytest.mark.parametrize(
    ("text", "iso", "ms"),
    [
        ("2026-11-22T10:00:00Z", "2026-11-22T10:00:00.000Z", 1_795_341_600_000),
        ("2026-11-22T10:00:00z", "2026-11-22T10:00:00.000Z", 1_795_341_600_000),
        ("2026-11-22T12:00:00+02:00", "2026-11-22T10:00:00.000Z", 1_795_341_600_000),
        ("2026-11-22T05:30:00.250-04:30", "2026-11-22T10:00:00.250Z", 1_795_341_600_250),
        ("2026-11-22T10:00:00", "2026-11-22T10:00:00.000Z", 1_795_341_600_000),
        ("  2026-11-22T10:00:00.5Z ", "2026-11-22T10:00:00.500Z", 1_795_341_600_500),
        ("2026-11-23T01:00:00+15:00", "2026-11-22T10:00:00.000Z", 1_795_341_600_000),
    ],
)
def test_iso_ts_normalised_to_utc(text: str, iso: str, ms: int) -> None:
    """ISO 8601 with Z, an offset or none (taken as UTC) is normalised to UTC."""
    out = check(ev("page_view", ts=text))
    assert (out["ts"], out["ts_ms"]) == (iso, ms)


@pytest.mark.parametrize(
    "value",
    ["yesterday", "2026-13-01T00:00:00Z", "2026-11-22T10:00:00+02:00Z", "", True, [1], {}],
)
def test_unparseable_ts(value: Any) -> None:
    """A timestamp that is neither ISO 8601 nor epoch milliseconds fails on ts."""
    err = error(ev("page_view", ts=value))
    assert err.field == "ts"
    assert "expected" in err.reason


@pytest.mark.parametrize("value", [0, 1_700_000_000, -5, float("inf"), float("nan")])
def test_epoch_seconds_and_non_finite_are_rejected(value: float) -> None:
    """Numbers before 2000-01-01 in milliseconds (e.g. epoch seconds) and non-finite ones fail."""
    err = error(ev("page_view", ts=value))
    assert err.field == "ts"
    assert "epoch milliseconds" in err.reason


def test_far_future_ts_is_rejected() -> None:
    """A ts more than max_future_skew_s ahead of now is rejected; up to the limit is fine."""
    assert check(ev("page_view", ts=NOW_MS + 300_000))["ts_ms"] == NOW_MS + 300_000
    err = error(ev("page_view", ts=NOW_MS + 300_001))
    assert err.field == "ts"
    assert "more than 300 s in the future" in err.reason
    assert "2026-11-22T10:05:00.001Z" in err.reason
    cfg = EventsConfig(max_future_skew_s=10.0)
    assert error(ev("page_view", ts="2026-11-22T10:00:11Z"), cfg=cfg).field == "ts"


@pytest.mark.parametrize("value", [10**20, 1e20, "9999-12-31T23:59:59-10:00"])
def test_absurd_future_ts_is_a_validation_error(value: Any) -> None:
    """A timestamp beyond year 9999 fails with a ValidationError on ts."""
    assert error(ev("page_view", ts=value)).field == "ts"


def test_year_zero_ts_is_a_validation_error() -> None:
    """An ISO ts before 0001-01-01 UTC fails with a ValidationError on ts."""
    assert error(ev("page_view", ts="0001-01-01T00:00:00+01:00")).field == "ts"


def test_iso_ts_before_1980_is_rejected_like_epoch_ms() -> None:
    """ISO timestamps before 1980 are rejected, as epoch numbers before 1980 are."""
    err = error(ev("page_view", ts="0999-05-01T00:00:00Z"))
    assert err.field == "ts" and "1980" in err.reason
    assert error(ev("page_view", ts="1979-12-31T23:59:59Z")).field == "ts"


def test_old_history_and_epoch_seconds() -> None:
    """A backfill from 1997 is accepted; epoch seconds (read as milliseconds: 1970) are not."""
    assert check(ev("page_view", ts=874_724_710_000))["ts_ms"] == 874_724_710_000
    assert check(ev("page_view", ts="1997-09-20T03:05:10Z"))["ts_ms"] == (874_724_710_000)
    err = error(ev("page_view", ts=1_764_000_000))
    assert err.field == "ts" and "epoch milliseconds" in err.reason


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2004-01-10T18:08:40.626Z", 1_073_758_120_626),
        ("2039-01-16T22:38:49.515Z", 2_178_830_329_515),
    ],
)
def test_iso_ms_is_exact(text: str, ms: int) -> None:
    """The milliseconds of an ISO timestamp are kept exactly."""
    assert check(ev("page_view", ts=text), now_ms=4_000_000_000_000)["ts_ms"] == ms


def test_epoch_ms_normalisation_idempotent_in_2004() -> None:
    """Re-validating a normalised 2004 event keeps its ts_ms."""
    once = check(ev("page_view", ts=1_073_744_006_274, event_id="e"), now_ms=4_000_000_000_000)
    assert check(once, now_ms=4_000_000_000_000) == once


def test_format_ts() -> None:
    """format_ts writes UTC ISO 8601 with milliseconds and Z."""
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"
    assert format_ts(1_795_341_600_007) == "2026-11-22T10:00:00.007Z"


# -- event ids ----------------------------------------------------------------------------


def test_event_id_generated_when_absent() -> None:
    """A missing event_id is generated, unique per event; a given one is kept."""
    a = check(ev("page_view"))["event_id"]
    b = check(ev("page_view"))["event_id"]
    assert isinstance(a, str)
    assert len(a) == 32
    assert a != b
    assert check(ev("page_view", event_id=None))["event_id"] != a
    assert check(ev("page_view", event_id="mine"))["event_id"] == "mine"
    many = {new_id() for _ in range(20_000)}
    assert len(many) == 20_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in list(many)[:100])


# -- size limits inside properties ------------------------------------------------------


def test_string_limit_inside_properties() -> None:
    """Any string inside properties, however nested, is bounded by max_string_length."""
    cfg = EventsConfig(max_string_length=5)
    assert check(ev("page_view", properties={"a": {"b": ["12345"]}}), cfg=cfg)
    err = error(ev("page_view", properties={"a": {"b": ["ok", "123456"]}}), cfg=cfg)
    assert err.field == "properties.a.b[1]"
    assert err.reason == "expected at most 5 characters, got 6"


def test_list_and_object_limits_inside_properties() -> None:
    """Lists and objects inside properties are bounded by max_list_length."""
    cfg = EventsConfig(max_list_length=3)
    assert check(ev("page_view", properties={"xs": [1, 2, 3]}), cfg=cfg)
    err = error(ev("page_view", properties={"xs": [1, 2, 3, 4]}), cfg=cfg)
    assert (err.field, err.reason) == ("properties.xs", "expected at most 3 entries, got 4")
    err = error(ev("page_view", properties={"o": {"a": 1, "b": 2, "c": 3, "d": 4}}), cfg=cfg)
    assert (err.field, err.reason) == ("properties.o", "expected at most 3 keys, got 4")
    err = error(ev("page_view", properties={str(i): i for i in range(4)}), cfg=cfg)
    assert (err.field, err.reason) == ("properties", "expected at most 3 keys, got 4")


def test_nesting_limit_inside_properties() -> None:
    """Properties nested deeper than 8 levels are rejected."""
    ok: Any = "leaf"
    for _ in range(8):
        ok = {"k": ok}
    assert check(ev("page_view", properties=ok))
    err = error(ev("page_view", properties={"k": ok}))
    assert err.reason == "nested deeper than 8 levels"
    assert err.field.startswith("properties.k.k")


def test_input_is_not_mutated() -> None:
    """validate_event does not change the object it is given."""
    wire = ev("purchase", properties={"items": [{"item_id": "a", "price": 1}], "currency": "eur"})
    before = copy.deepcopy(wire)
    check(wire)
    assert wire == before


# -- properties (hypothesis) --------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["event_id", "type", "user_id", "anonymous_id", "item_id", "ts", "ts_ms", "properties", "v"]
)
type_names = st.sampled_from([*sorted(EVENT_TYPES), "wishlist_add", "", "bogus"])
item_line = st.fixed_dictionaries(
    {},
    optional={
        "item_id": st.text(max_size=4) | json_scalars,
        "quantity": st.integers(-1, 3) | json_scalars,
        "price": st.floats(-1, 100) | json_scalars,
        "category": st.sampled_from(["a", "a/b"]) | json_scalars,
    },
)
properties = st.fixed_dictionaries(
    {},
    optional={
        "query": st.text(max_size=8) | json_scalars,
        "text": st.text(max_size=8) | json_scalars,
        "quantity": st.integers(-1, 5) | json_scalars,
        "price": st.floats(-5, 100) | json_scalars,
        "items": st.lists(item_line, max_size=3) | st.lists(st.text(max_size=3), max_size=3),
        "revenue": st.floats(-5, 100) | json_scalars,
        "currency": st.sampled_from(["USD", "eur", "EURO", "", "12x"]) | json_scalars,
        "category": st.sampled_from(["a", "a/b", "/x/"]) | json_scalars,
        "filters": json_values,
        "recommendation_id": st.text(max_size=4) | json_scalars,
        "position": st.integers(-2, 5) | json_scalars,
        "extra": json_values,
    },
)
# Timestamps anywhere in the accepted range (2000-9999), as numbers and as ISO text.
sane_ms = st.integers(946_684_800_000, 253_402_300_799_999)
sane_ts = (
    st.none()
    | sane_ms
    | sane_ms.map(format_ts)
    | st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(9999, 12, 31)).map(
        lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000).isoformat()
    )
    | st.text(max_size=10)
    | st.booleans()
)


def wire_events(ts: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Events that are plausible enough to reach the deep checks, or wrong anywhere."""
    ids = st.text(min_size=1, max_size=6) | json_scalars
    return st.fixed_dictionaries(
        {"type": type_names | json_scalars},
        optional={
            "event_id": ids,
            "user_id": st.text(min_size=1, max_size=4),
            "anonymous_id": ids,
            "item_id": ids,
            "ts": ts,
            "properties": properties | json_values,
        },
    )


ANY_CFG = EventsConfig(custom_types=("wishlist_add",), max_list_length=5, max_string_length=20)


@PROPERTY_SETTINGS
@given(obj=json_values | st.dictionaries(field_names, json_values, max_size=6))
def test_arbitrary_json_raises_only_validation_error(obj: Any) -> None:
    """On any JSON-like value, validate_event returns an event or raises ValidationError."""
    try:
        out = validate_event(obj, ANY_CFG, NOW_MS)
    except ValidationError as err:
        assert isinstance(err.field, str)
        assert err.reason
    else:
        assert out["v"] == SCHEMA_VERSION


@PROPERTY_SETTINGS
@given(obj=wire_events(sane_ts))
def test_plausible_events_raise_only_validation_error(obj: dict[str, Any]) -> None:
    """On near-valid events, validate_event returns an event or raises ValidationError."""
    try:
        out = validate_event(obj, ANY_CFG, NOW_MS)
    except ValidationError as err:
        assert isinstance(err.field, str)
        assert err.reason
    else:
        assert out["ts_ms"] <= NOW_MS + ANY_CFG.max_future_skew_s * 1000
        assert out["ts"] == format_ts(out["ts_ms"])
        assert datetime.fromisoformat(out["ts"]).tzinfo == UTC


@PROPERTY_SETTINGS
@example(obj={"type": "page_view", "user_id": "u", "ts": 10**20})
@given(obj=wire_events(json_values))
def test_any_ts_raises_only_validation_error(obj: dict[str, Any]) -> None:
    """Whatever ts holds, validate_event returns an event or raises ValidationError."""
    with contextlib.suppress(ValidationError):
        validate_event(obj, ANY_CFG, NOW_MS)


@PROPERTY_SETTINGS
@given(obj=wire_events(sane_ts))
def test_normalisation_is_idempotent(obj: dict[str, Any]) -> None:
    """Validating a normalised event again returns the same event."""
    try:
        once = validate_event(obj, ANY_CFG, NOW_MS)
    except ValidationError:
        return
    assert validate_event(once, ANY_CFG, NOW_MS) == once
    # and later, too: a normalised event does not depend on the clock
    assert validate_event(once, ANY_CFG, NOW_MS + 86_400_000) == once


def test_pseudonymised_ids_replace_both_ids_and_are_stable() -> None:
    cfg = EventsConfig(pseudonymize_ids=True, id_secret="0123456789abcdef")
    wire = {"type": "identify", "user_id": "alice", "anonymous_id": "cookie-1"}
    event = validate_event(wire, cfg, now_ms=1_795_341_600_000)
    assert event["user_id"] == stored_id("alice", cfg) == pseudonym("alice", cfg.id_secret)
    assert event["anonymous_id"] == pseudonym("cookie-1", cfg.id_secret)
    assert event["user_id"].startswith("p-") and len(event["user_id"]) == 34
    assert pseudonym("alice", "another-secret-xx") != event["user_id"]
    assert stored_id("alice", EventsConfig()) == "alice"  # off by default
