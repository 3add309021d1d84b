"""The event model: taxonomy, wire format and validation (schema version 1).

An event on the wire is a JSON object::

    {"event_id": "e-1", "type": "product_view", "user_id": "u-1", "anonymous_id": null,
     "item_id": "sku-1", "ts": "2026-11-22T10:00:00Z", "properties": {...}}

`validate_event` turns one into its normalised form (a plain dict, cheap to serialise):
the event id is generated when absent, the timestamp becomes UTC ISO 8601 (``ts``) plus epoch
milliseconds (``ts_ms``), per-type properties are checked and defaulted, and ``v`` records the
schema version. Errors raise `ValidationError` naming the field and the reason.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import os
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from personify.engine.config import EventsConfig
from personify.engine.errors import ValidationError

__all__ = [
    "EVENT_TYPES",
    "ITEM_EVENT_TYPES",
    "PURPOSES",
    "SCHEMA_VERSION",
    "Event",
    "Item",
    "event_key",
    "format_ts",
    "internal_event",
    "new_id",
    "pseudonym",
    "stored_id",
    "validate_event",
    "validate_item",
]

SCHEMA_VERSION: Final = 1

#: Seeded from the system's entropy at start (and again in a forked child).
_IDS = random.Random()
os.register_at_fork(after_in_child=_IDS.seed)


def new_id() -> str:
    """A random 128-bit id as 32 hex digits (like ``uuid4().hex``).

    Without a system call per id: each one made the event loop give up the GIL, and wait for
    it behind any other busy thread.
    """
    return f"{_IDS.getrandbits(128):032x}"


#: The built-in taxonomy. Other types are accepted only when listed in [events] custom_types.
EVENT_TYPES: Final = frozenset(
    {
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
    }
)
#: The purposes a visitor consents to (a ``consent`` event sets any of them to true or false).
PURPOSES: Final = ("analytics", "personalization", "marketing")
#: Types that must name an item.
ITEM_EVENT_TYPES: Final = frozenset({"product_view", "add_to_cart", "remove_from_cart", "click"})

_TOP_LEVEL: Final = frozenset(
    {"event_id", "type", "user_id", "anonymous_id", "item_id", "ts", "properties", "v", "ts_ms"}
)

#: A normalised event (see module docstring).
Event = dict[str, Any]

#: 1980-01-01: smaller numbers are not epoch milliseconds (epoch seconds of any time since 1980
#: read as milliseconds fall in 1970), and a shop's backfill of old history still fits.
_EPOCH_MS_MIN: Final = 315_532_800_000
_EPOCH_MS_MAX: Final = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


@functools.lru_cache(maxsize=8192)
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")


@functools.lru_cache(maxsize=1 << 16)  # profiles show the same timestamps view after view
def format_ts(ts_ms: int) -> str:
    """Format epoch milliseconds as UTC ISO 8601 with milliseconds and a ``Z``."""
    seconds, millis = divmod(ts_ms, 1000)
    return f"{_second(seconds)}{millis:03d}Z"


def _parse_ts(value: Any) -> int:
    if isinstance(value, bool):
        raise ValidationError("ts", f"expected ISO 8601 text or epoch milliseconds, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or not _EPOCH_MS_MIN <= value <= _EPOCH_MS_MAX:
            raise ValidationError(
                "ts", f"expected epoch milliseconds between 1980 and 9999, got {value!r}"
            )
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValidationError(
                "ts", f"expected ISO 8601 like 2026-11-22T10:00:00Z, got {value!r}"
            ) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)  # a timestamp without offset is taken as UTC
        try:
            ts_ms = (dt - _EPOCH) // _ONE_MS  # integer arithmetic: no float rounding
        except OverflowError:
            ts_ms = -1
        if not _EPOCH_MS_MIN <= ts_ms <= _EPOCH_MS_MAX:
            raise ValidationError("ts", f"expected a time between 1980 and 9999, got {value!r}")
        return ts_ms
    raise ValidationError("ts", f"expected ISO 8601 text or epoch milliseconds, got {value!r}")


def _opt_id(obj: Mapping[str, Any], name: str, limit: int) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(name, f"expected a string, got {type(value).__name__}")
    if not value or len(value) > limit:
        raise ValidationError(name, f"expected 1-{limit} characters, got {len(value)}")
    if value[0] < " ":
        raise ValidationError(name, "must not start with a control character")
    return value


def _number(props: Mapping[str, Any], name: str, *, default: float | None = None) -> float | None:
    value = props.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(f"properties.{name}", f"expected a number, got {value!r}")
    if value < 0:
        raise ValidationError(f"properties.{name}", f"expected a number >= 0, got {value!r}")
    return float(value)


def _quantity(props: Mapping[str, Any], field: str, value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(field, f"expected an integer >= 1, got {value!r}")
    return value


def _text(
    props: Mapping[str, Any], name: str, limit: int, *, required: bool, prefix: str = "properties."
) -> str | None:
    value = props.get(name)
    if value is None:
        if required:
            raise ValidationError(
                f"{prefix}{name}", "required" if not prefix else "required for this event type"
            )
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{prefix}{name}", f"expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ValidationError(
            f"{prefix}{name}", f"expected at most {limit} characters, got {len(value)}"
        )
    if required and not value.strip():
        raise ValidationError(f"{prefix}{name}", "must not be empty")
    return value


def _check_sizes(value: Any, path: str, cfg: EventsConfig, depth: int = 0) -> None:
    """Bound strings, lists and nesting anywhere inside ``properties``."""
    if depth > 8:
        raise ValidationError(path, "nested deeper than 8 levels")
    if isinstance(value, str):
        if len(value) > cfg.max_string_length:
            raise ValidationError(
                path, f"expected at most {cfg.max_string_length} characters, got {len(value)}"
            )
    elif isinstance(value, dict):
        if len(value) > cfg.max_list_length:
            raise ValidationError(
                path, f"expected at most {cfg.max_list_length} keys, got {len(value)}"
            )
        for k, v in value.items():
            _check_sizes(v, f"{path}.{k}", cfg, depth + 1)
    elif isinstance(value, list):
        if len(value) > cfg.max_list_length:
            raise ValidationError(
                path, f"expected at most {cfg.max_list_length} entries, got {len(value)}"
            )
        for i, v in enumerate(value):
            _check_sizes(v, f"{path}[{i}]", cfg, depth + 1)


def _purchase(props: dict[str, Any], item_id: str | None, cfg: EventsConfig) -> None:
    items = props.get("items")
    if items is None:
        if item_id is None:
            raise ValidationError("properties.items", "a purchase needs items or item_id")
        items = [
            {"item_id": item_id, "quantity": props.get("quantity"), "price": props.get("price")}
        ]
    if not isinstance(items, list) or not items:
        raise ValidationError("properties.items", f"expected a non-empty list, got {items!r}")
    clean: list[dict[str, Any]] = []
    total = 0.0
    for i, line in enumerate(items):
        where = f"properties.items[{i}]"
        if not isinstance(line, dict):
            raise ValidationError(where, f"expected an object, got {line!r}")
        line_id = _opt_id(line, "item_id", cfg.max_id_length)
        if line_id is None:
            raise ValidationError(f"{where}.item_id", "required")
        qty = _quantity(line, f"{where}.quantity", line.get("quantity"))
        price = line.get("price")
        if price is not None and (
            isinstance(price, bool)
            or not isinstance(price, int | float)
            or price < 0
            or not math.isfinite(price)
        ):
            raise ValidationError(f"{where}.price", f"expected a number >= 0, got {price!r}")
        out = {**line, "item_id": line_id, "quantity": qty}
        if price is not None:
            out["price"] = float(price)
            total += float(price) * qty
        clean.append(out)
    props["items"] = clean
    revenue = _number(props, "revenue")
    props["revenue"] = round(total, 2) if revenue is None else revenue
    currency = props.get("currency", cfg.default_currency)
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
        raise ValidationError(
            "properties.currency", f"expected a 3-letter code like USD, got {currency!r}"
        )
    props["currency"] = currency.upper()


def validate_event(obj: Any, cfg: EventsConfig, now_ms: int) -> Event:
    """Validate one wire event and return its normalised form.

    Args:
        obj: the decoded JSON value.
        cfg: the [events] settings.
        now_ms: the current time in epoch milliseconds (for defaults and the future-skew check).

    Returns:
        The normalised event.

    Raises:
        ValidationError: naming the field and the reason.
    """
    if not isinstance(obj, dict):
        raise ValidationError("", f"expected a JSON object, got {type(obj).__name__}")
    unknown = obj.keys() - _TOP_LEVEL
    if unknown:
        name = sorted(unknown)[0]
        raise ValidationError(name, "unknown field; put extra data under properties")
    etype = obj.get("type")
    if not isinstance(etype, str) or not etype:
        raise ValidationError("type", f"expected an event type string, got {etype!r}")
    if etype.startswith("$"):
        raise ValidationError("type", f"{etype!r}: types starting with $ are reserved")
    if etype not in EVENT_TYPES and etype not in cfg.custom_types and "*" not in cfg.custom_types:
        raise ValidationError(
            "type",
            f"unknown event type {etype!r}; expected one of {', '.join(sorted(EVENT_TYPES))} "
            "or a type listed in [events] custom_types",
        )
    user_id = _opt_id(obj, "user_id", cfg.max_id_length)
    anonymous_id = _opt_id(obj, "anonymous_id", cfg.max_id_length)
    if user_id is None and anonymous_id is None:
        raise ValidationError("user_id", "one of user_id or anonymous_id is required")
    if etype in ("identify", "alias") and (user_id is None or anonymous_id is None):
        raise ValidationError(
            "anonymous_id" if user_id else "user_id",
            f"{etype} links an anonymous_id to a user_id: both are required",
        )
    event_id = _opt_id(obj, "event_id", cfg.max_id_length)
    if event_id is None:
        event_id = new_id()
    item_id = _opt_id(obj, "item_id", cfg.max_id_length)
    if etype in ITEM_EVENT_TYPES and item_id is None:
        raise ValidationError("item_id", f"required for {etype} events")

    raw_ts = obj.get("ts_ms") if obj.get("ts") is None else obj.get("ts")
    ts_ms = now_ms if raw_ts is None else _parse_ts(raw_ts)
    if ts_ms > now_ms + cfg.max_future_skew_s * 1000:
        raise ValidationError(
            "ts",
            f"{format_ts(ts_ms)} is more than {cfg.max_future_skew_s:g} s in the future "
            "([events] max_future_skew_s)",
        )

    raw_props = obj.get("properties")
    if raw_props is None:
        props: dict[str, Any] = {}
    elif isinstance(raw_props, dict):
        props = dict(raw_props)
    else:
        raise ValidationError("properties", f"expected an object, got {type(raw_props).__name__}")
    _check_sizes(props, "properties", cfg)

    if etype == "search":
        _text(props, "query", cfg.max_string_length, required=True)
        filters = props.get("filters")
        if filters is not None and not isinstance(filters, dict):
            raise ValidationError("properties.filters", f"expected an object, got {filters!r}")
    elif etype in ("add_to_cart", "remove_from_cart"):
        props["quantity"] = _quantity(props, "properties.quantity", props.get("quantity"))
        _number(props, "price")
        _text(props, "recommendation_id", cfg.max_id_length, required=False)
    elif etype == "purchase":
        _purchase(props, item_id, cfg)
        _text(props, "recommendation_id", cfg.max_id_length, required=False)
    elif etype == "chat_message":
        _text(props, "text", cfg.max_string_length, required=True)
    elif etype == "consent":
        for key, value in props.items():
            if key not in PURPOSES:
                raise ValidationError(
                    f"properties.{key}", f"unknown purpose; expected one of {', '.join(PURPOSES)}"
                )
            if not isinstance(value, bool):
                raise ValidationError(f"properties.{key}", f"expected true or false, got {value!r}")
        if not props:
            raise ValidationError(
                "properties", f"expected at least one purpose: {', '.join(PURPOSES)}"
            )
    elif etype in ("impression", "click"):
        _text(props, "recommendation_id", cfg.max_id_length, required=False)
        if etype == "impression":
            shown = props.get("items")
            if shown is not None and not (
                isinstance(shown, list) and all(isinstance(s, str) for s in shown)
            ):
                raise ValidationError("properties.items", "expected a list of item ids")
        else:
            pos = props.get("position")
            if pos is not None and (isinstance(pos, bool) or not isinstance(pos, int) or pos < 0):
                raise ValidationError(
                    "properties.position", f"expected an integer >= 0, got {pos!r}"
                )
    category = props.get("category")
    if category is not None and not isinstance(category, str):
        raise ValidationError(
            "properties.category", f"expected a string like a/b, got {category!r}"
        )

    if cfg.pseudonymize_ids:
        user_id = None if user_id is None else pseudonym(user_id, cfg.id_secret)
        anonymous_id = None if anonymous_id is None else pseudonym(anonymous_id, cfg.id_secret)
    return internal_event(
        etype,
        event_id,
        user_id=user_id,
        anonymous_id=anonymous_id,
        item_id=item_id,
        ts_ms=ts_ms,
        properties=props,
    )


@functools.lru_cache(maxsize=65536)
def pseudonym(visitor_id: str, secret: str) -> str:
    """The pseudonym of ``visitor_id``: ``p-`` and 32 hex digits of HMAC-SHA256 by ``secret``."""
    digest = hmac.new(secret.encode(), visitor_id.encode(), hashlib.sha256).hexdigest()
    return "p-" + digest[:32]


def stored_id(visitor_id: str, cfg: EventsConfig) -> str:
    """The id under which ``visitor_id`` is stored (its pseudonym when ids are pseudonymised)."""
    return pseudonym(visitor_id, cfg.id_secret) if cfg.pseudonymize_ids else visitor_id


def event_key(event: Mapping[str, Any]) -> str:
    """The partitioning key of a normalised event: the user id, else the anonymous id."""
    key = event.get("user_id") or event.get("anonymous_id")
    assert isinstance(key, str)
    return key


#: A normalised catalog item (see `validate_item`).
Item = dict[str, Any]

_ITEM_FIELDS: Final = frozenset(
    {"item_id", "title", "description", "category", "price", "tags", "in_stock", "attributes"}
)


def validate_item(obj: Any, cfg: EventsConfig) -> Item:
    """Validate one catalog item and return its normalised form.

    The wire format is ``{"item_id", "title", "description", "category", "price", "tags",
    "in_stock", "attributes"}``: ``item_id`` and ``title`` are required; ``category`` is a path
    like ``"outdoor/jackets"`` (normalised without empty or surrounding slashes); ``tags`` is a
    list of strings (duplicates dropped, order kept); ``in_stock`` defaults to true;
    ``attributes`` holds anything else.

    Raises:
        ValidationError: naming the field and the reason.
    """
    if not isinstance(obj, dict):
        raise ValidationError("", f"expected a JSON object, got {type(obj).__name__}")
    unknown = obj.keys() - _ITEM_FIELDS
    if unknown:
        raise ValidationError(sorted(unknown)[0], "unknown field; put extra data under attributes")
    item_id = _opt_id(obj, "item_id", cfg.max_id_length)
    if item_id is None:
        raise ValidationError("item_id", "required")
    title = _text(obj, "title", cfg.max_string_length, required=True, prefix="")
    description = _text(obj, "description", cfg.max_string_length, required=False, prefix="") or ""
    raw_category = obj.get("category")
    if raw_category is not None and not isinstance(raw_category, str):
        raise ValidationError("category", f"expected a path like a/b, got {raw_category!r}")
    category = "/".join(p.strip() for p in (raw_category or "").split("/") if p.strip())
    if len(category) > cfg.max_string_length:
        raise ValidationError("category", f"expected at most {cfg.max_string_length} characters")
    price = obj.get("price")
    if price is not None and (
        isinstance(price, bool)
        or not isinstance(price, int | float)
        or not math.isfinite(price)
        or price < 0
    ):
        raise ValidationError("price", f"expected a number >= 0, got {price!r}")
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise ValidationError("tags", f"expected a list of non-empty strings, got {tags!r}")
    if len(tags) > cfg.max_list_length:
        raise ValidationError(
            "tags", f"expected at most {cfg.max_list_length} tags, got {len(tags)}"
        )
    in_stock = obj.get("in_stock", True)
    if not isinstance(in_stock, bool):
        raise ValidationError("in_stock", f"expected true or false, got {in_stock!r}")
    attributes = obj.get("attributes", {})
    if not isinstance(attributes, dict):
        raise ValidationError("attributes", f"expected an object, got {type(attributes).__name__}")
    _check_sizes(attributes, "attributes", cfg)
    return {
        "item_id": item_id,
        "title": title,
        "description": description,
        "category": category or None,
        "price": None if price is None else float(price),
        "tags": list(dict.fromkeys(tags)),
        "in_stock": in_stock,
        "attributes": attributes,
    }


def internal_event(
    etype: str,
    event_id: str,
    *,
    user_id: str | None,
    anonymous_id: str | None = None,
    item_id: str | None = None,
    ts_ms: int,
    properties: dict[str, Any],
) -> Event:
    """An event in its normalised form, as `validate_event` returns it.

    The engine makes its own events with it (``etype`` starting with ``$``; never validated).
    """
    return {
        "v": SCHEMA_VERSION,
        "event_id": event_id,
        "type": etype,
        "user_id": user_id,
        "anonymous_id": anonymous_id,
        "item_id": item_id,
        "ts": format_ts(ts_ms),
        "ts_ms": ts_ms,
        "properties": properties,
    }
