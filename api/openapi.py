"""The OpenAPI 3.1 document of the HTTP API, served at GET /v1/openapi.json."""

from __future__ import annotations

from typing import Any

from personify.api.schemas import ROUTE_SCOPES

__all__ = ["OPENAPI"]

_ERROR = {
    "type": "object",
    "required": ["error", "field", "detail"],
    "properties": {
        "error": {"type": "string", "description": "What went wrong."},
        "field": {
            "type": "string",
            "description": "The offending field ('' for the whole request).",
        },
        "detail": {"type": "string", "description": "How to fix it."},
    },
}


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_EVENT = {
    "type": "object",
    "required": ["type"],
    "description": "One event. One of user_id / anonymous_id is required; item events need "
    "item_id; everything else goes under properties.",
    "properties": {
        "event_id": {
            "type": "string",
            "maxLength": 256,
            "description": "Idempotency key; generated when absent. An id seen before "
            "for the same visitor is never counted twice.",
        },
        "type": {
            "type": "string",
            "description": "page_view, product_view, search, add_to_cart, remove_from_cart, "
            "purchase, chat_message, impression, click, identify, alias, or a custom type "
            "listed in [events] custom_types.",
        },
        "user_id": {"type": ["string", "null"], "maxLength": 256},
        "anonymous_id": {"type": ["string", "null"], "maxLength": 256},
        "item_id": {"type": ["string", "null"], "maxLength": 256},
        "ts": {
            "oneOf": [{"type": "string", "format": "date-time"}, {"type": "integer"}],
            "description": "ISO 8601 or epoch milliseconds; normalised to UTC. Defaults to the "
            "time of receipt; more than [events] max_future_skew_s ahead is rejected.",
        },
        "properties": {
            "type": "object",
            "description": "search: query (required), filters; add_to_cart/remove_from_cart: "
            "quantity (default 1), price; purchase: items [{item_id, quantity, price}], revenue, "
            "currency; chat_message: text (required); impression: recommendation_id, items; "
            "click: recommendation_id, position; any event: category (a/b/c).",
            "additionalProperties": True,
        },
    },
    "additionalProperties": False,
}

_PROFILE = {
    "type": "object",
    "required": [
        "user_id",
        "counts",
        "sessions",
        "first_seen",
        "last_seen",
        "lifetime_spend",
        "recent_items",
        "cart",
        "category_affinity",
        "engagement_score",
    ],
    "properties": {
        "user_id": {"type": "string"},
        "anonymous_ids": {"type": "array", "items": {"type": "string"}},
        "counts": {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "description": "Events by type.",
        },
        "sessions": {
            "type": "object",
            "properties": {
                "count": {"type": "integer"},
                "current": {"type": "object"},
            },
            "description": "Sessions split by [profiles] session_gap_s of inactivity.",
        },
        "first_seen": {"type": ["string", "null"], "format": "date-time"},
        "last_seen": {"type": ["string", "null"], "format": "date-time"},
        "frequency": {
            "type": "object",
            "description": "Events and sessions in the sliding window ending now.",
            "properties": {
                "window_days": {"type": "number"},
                "events": {"type": "integer"},
                "sessions": {"type": "integer"},
            },
        },
        "lifetime_spend": {"type": "number"},
        "order_count": {"type": "integer"},
        "average_order_value": {"type": "number"},
        "spend_by_currency": {"type": "object", "additionalProperties": {"type": "number"}},
        "recent_items": {"type": "array", "items": {"type": "object"}},
        "cart": {
            "type": "object",
            "properties": {
                "items": {"type": "array", "items": {"type": "object"}},
                "count": {"type": "integer"},
                "total": {"type": "number"},
            },
        },
        "recent_searches": {"type": "array", "items": {"type": "object"}},
        "category_affinity": {
            "type": "object",
            "additionalProperties": {"type": "number"},
            "description": "Decayed with [profiles] affinity_half_life_s.",
        },
        "engagement_score": {"type": "number"},
        "segments": {
            "type": "array",
            "items": {"type": "string"},
            "description": "The rule segments the visitor is in (GET /v1/segments).",
        },
        "last_order": {"type": ["string", "null"], "format": "date-time"},
        "scores": {
            "type": "object",
            "description": "RFM scores (recency, frequency, monetary: 1-5, 0 without orders) "
            "and the learned purchase_propensity (a purchase in the next 7 days) and "
            "churn_propensity (no visit in the next 30 days), 0-1, null before the first "
            "training.",
            "properties": {
                "recency": {"type": "integer"},
                "frequency": {"type": "integer"},
                "monetary": {"type": "integer"},
                "purchase_propensity": {"type": ["number", "null"]},
                "churn_propensity": {"type": ["number", "null"]},
            },
        },
        "consent": {
            "type": "object",
            "additionalProperties": {"type": "boolean"},
            "description": "Consent per purpose (analytics, personalization, marketing).",
        },
        "offers_sent": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "trigger": {"type": "string"},
                    "at": {"type": "string", "format": "date-time"},
                },
            },
            "description": "The latest offers sent to the visitor (frequency capping reads them).",
        },
        "timers": {
            "type": "object",
            "additionalProperties": {"type": "string", "format": "date-time"},
            "description": "Trigger timers pending for the visitor, by name, and when they fire.",
        },
    },
}

_ITEM = {
    "type": "object",
    "required": ["item_id", "title"],
    "description": "A catalog item. Re-sending an item replaces it.",
    "properties": {
        "item_id": {"type": "string", "maxLength": 256},
        "title": {"type": "string"},
        "description": {"type": "string"},
        "category": {
            "type": ["string", "null"],
            "description": "A path like outdoor/jackets; parents count too.",
        },
        "price": {"type": ["number", "null"], "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
        "in_stock": {
            "type": "boolean",
            "default": True,
            "description": "Out-of-stock items are never recommended.",
        },
        "attributes": {"type": "object", "description": "Anything else, kept as given."},
    },
    "additionalProperties": False,
}

_REASON = {
    "type": "object",
    "required": ["kind"],
    "description": "Why an item is recommended: similar_to (item_id: an item the visitor "
    "viewed, seen together with it or close in content), bought_together (item_id: an item "
    "the visitor bought or has in the cart), matches_chat (the visitor's chat messages), "
    "trending (category: where it is trending; null for the whole shop), taste (item_id: "
    "the visitor's item most like it in the learned model), buy_again (item_id: the product "
    "itself, bought times before), popular (a catalog item offered "
    "when there is no signal yet).",
    "properties": {
        "kind": {
            "type": "string",
            "enum": [
                "similar_to",
                "bought_together",
                "matches_chat",
                "trending",
                "taste",
                "buy_again",
                "popular",
            ],
        },
        "item_id": {"type": "string"},
        "category": {"type": ["string", "null"]},
        "times": {"type": "integer"},
    },
}

_QUALITY = {
    "type": "object",
    "required": ["model", "tuning", "evaluation"],
    "properties": {
        "propensity": {
            "type": "object",
            "description": "The learned purchase (purchase_7d) and churn (churn_30d) scores, "
            "measured on a temporal hold-out: roc_auc beside baseline_roc_auc (recency and "
            "frequency quintiles), brier, calibration (predicted and observed by tenth), "
            "visitors, rate; learned with each training of the model.",
            "properties": {
                "trained_to": {"type": ["string", "null"], "format": "date-time"},
                "targets": {"type": "object"},
            },
        },
        "model": {
            "type": "object",
            "required": ["enabled", "trained_at", "interactions"],
            "properties": {
                "enabled": {"type": "boolean"},
                "trained_at": {"type": ["string", "null"], "format": "date-time"},
                "interactions": {
                    "type": "integer",
                    "description": "Interactions in the history at the last training run.",
                },
                "pending": {
                    "type": "integer",
                    "description": "Interactions added since the last training run.",
                },
                "training": {"type": "boolean", "description": "A run is in progress."},
                "repeat": {
                    "type": ["object", "null"],
                    "description": "How visitors re-buy: purchases, share, gap_s, strength.",
                },
                "last_run": {"type": ["object", "null"]},
                "description": {"type": "object"},
            },
        },
        "tuning": {
            "type": "object",
            "required": ["tuned_at", "setting", "validation"],
            "properties": {
                "enabled": {"type": "boolean"},
                "running": {"type": "boolean"},
                "requested": {"type": "boolean"},
                "progress": {
                    "type": "object",
                    "properties": {
                        "trials_done": {"type": "integer"},
                        "trials": {"type": "integer"},
                    },
                },
                "tuned_at": {"type": ["string", "null"], "format": "date-time"},
                "applied_at": {"type": ["string", "null"], "format": "date-time"},
                "setting": {
                    "type": "object",
                    "description": "The [recommend] setting in use (tuned names and values).",
                },
                "ranker": {
                    "type": ["object", "null"],
                    "description": "The learned ranker in use (trees, each feature's share "
                    "of its gain), or null: lists come in the blend's order.",
                },
                "pinned": {"type": "array", "items": {"type": "string"}},
                "validation": {"type": "object"},
                "runs": {
                    "type": "array",
                    "items": {"type": "object"},
                    "description": "Each run: the setting, validation, whether it was "
                    "applied, and the ranker's validation against the blend (choice: learned, "
                    "current or blend).",
                },
            },
        },
        "evaluation": {
            "type": "object",
            "description": "The latest hold-out figures: protocol -> method -> NDCG@10, "
            "Recall@20, MAP@10, HR@10, coverage@10, users.",
        },
    },
}

_RECOMMENDATIONS = {
    "type": "object",
    "required": ["recommendation_id", "items"],
    "properties": {
        "recommendation_id": {
            "type": "string",
            "description": "Send it back with impression, click, add_to_cart and purchase "
            "events to attribute them (GET /v1/kpis).",
        },
        "variant": {
            "type": "string",
            "description": "The experiment variant it was ranked for (experiment/variant), "
            "the visitor's segment's own ranking (segment:<id>), or default.",
        },
        "user_id": {"type": "string"},
        "item_id": {"type": "string"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["item_id", "score", "reasons"],
                "properties": {
                    "item_id": {"type": "string"},
                    "score": {"type": "number", "description": "Blended score, best first."},
                    "reasons": {"type": "array", "items": {"$ref": "#/components/schemas/Reason"}},
                },
            },
        },
    },
}


_RATE = {"type": ["number", "null"]}
_KPI_ROW = {
    "type": "object",
    "description": "Counts, and rates where their denominator is not 0.",
    "properties": {
        "variant": {"type": "string"},
        "source": {"type": "string", "description": "An item's strongest reason (kind)."},
        "segment": {"type": "string", "description": "A rule segment the visitor was in."},
        "day": {"type": "string", "format": "date"},
        "exposures": {"type": "number", "description": "Lists served."},
        "visitors": {"type": "number", "description": "Distinct visitors served, per day."},
        "shown": {"type": "number", "description": "Items shown (per source)."},
        "impressions": {"type": "number"},
        "clicks": {"type": "number"},
        "add_to_carts": {"type": "number"},
        "orders": {"type": "number", "description": "Orders with a line attributed."},
        "converters": {"type": "number", "description": "Distinct buyers, per day."},
        "revenue": {"type": "number", "description": "Of the attributed lines."},
        "order_revenue": {"type": "number", "description": "Of the orders attributed."},
        "ctr": _RATE,
        "add_to_cart_rate": _RATE,
        "conversion": _RATE,
        "revenue_per_visitor": _RATE,
        "average_order_value": _RATE,
    },
}
_KPIS = {
    "type": "object",
    "required": ["from", "to", "by", "rows", "totals"],
    "properties": {
        "from": {"type": "string", "format": "date"},
        "to": {"type": "string", "format": "date"},
        "by": {"type": "string", "enum": ["variant", "source", "segment", "day"]},
        "rows": {"type": "array", "items": _KPI_ROW},
        "totals": _KPI_ROW,
    },
}


_VARIANT = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
        "share": {"type": "number", "minimum": 0, "description": "Of the experiment's traffic."},
        "setting": {
            "type": "object",
            "description": "Ranking settings it overrides, named as GET /v1/quality's "
            "tuning.setting (weights.covisit, ..., seed_half_life).",
            "additionalProperties": {"type": "number", "minimum": 0},
        },
        "ranker": {"type": "boolean", "description": "The learned ranker re-orders its lists."},
        "rerank": {"type": "boolean", "description": "Re-ranking plugins re-order its lists."},
        "size": {
            "type": ["integer", "null"],
            "minimum": 1,
            "maximum": 100,
            "description": "Items its lists show where the request names no k, and on the "
            "WebSocket (at most [recommend] list_size).",
        },
    },
}
_EXPERIMENT_REQUEST = {
    "type": "object",
    "required": ["variants"],
    "properties": {
        "variants": {"type": "array", "minItems": 2, "maxItems": 10, "items": _VARIANT},
        "control": {"type": "string", "description": "Default: the first variant."},
        "traffic": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "Share of all visitors in it (default 1).",
        },
        "start": {"type": ["string", "null"], "format": "date-time"},
        "stop": {"type": ["string", "null"], "format": "date-time"},
        "allocation": {
            "type": "string",
            "enum": ["split", "thompson"],
            "description": "split (by the shares, the default) or thompson (a bandit on goal).",
        },
        "goal": {"type": "string", "enum": ["click", "conversion"]},
        "floor": {
            "type": "number",
            "minimum": 0,
            "description": "With thompson: the share dealt evenly (default 0.05 per variant).",
        },
        "segment": {
            "type": ["string", "null"],
            "description": "Only visitors in this rule segment enter it (GET /v1/segments).",
        },
    },
}
_EXPERIMENT = {
    "type": "object",
    "required": ["id", "variants", "control", "traffic", "running"],
    "properties": {
        "id": {"type": "string"},
        "variants": {"type": "array", "items": _VARIANT},
        "control": {"type": "string"},
        "traffic": {"type": "number"},
        "offset": {"type": "number", "description": "Where its slice of the visitors starts."},
        "start": {"type": ["string", "null"]},
        "stop": {"type": ["string", "null"]},
        "created": {"type": "string"},
        "promoted": {"type": ["string", "null"]},
        "allocation": {"type": "string"},
        "goal": {"type": "string"},
        "floor": {"type": "number"},
        "segment": {"type": ["string", "null"]},
        "running": {"type": "boolean"},
    },
}


_SEGMENT = {
    "type": "object",
    "required": ["id", "rule", "description", "created", "updated"],
    "properties": {
        "id": {"type": "string"},
        "rule": {"type": "string", "description": "The rule (the language: see the README)."},
        "description": {"type": "string"},
        "created": {"type": "string", "format": "date-time"},
        "updated": {"type": "string", "format": "date-time"},
        "size": {"type": "integer", "description": "Its members now."},
        "ranking": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}
_SEGMENT_REQUEST = {
    "type": "object",
    "required": ["rule"],
    "additionalProperties": False,
    "properties": {
        "rule": {
            "type": "string",
            "maxLength": 2000,
            "description": 'An expression over the profile, e.g. "orders >= 2 and '
            'days_since_order > 30" or \'affinity("outdoor") > 0.5 and orders == 0\'.',
        },
        "description": {"type": "string", "maxLength": 500},
        "ranking": {
            "type": "object",
            "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1000},
            "description": "Ranking settings its members' lists use, named as the self-tuning "
            "names them (weights.collab, weights.trending, ..., seed_half_life; 0 turns a "
            "source off). A visitor in an experiment gets the experiment's variant instead.",
        },
    },
}


#: The answer of a DELETE of an experiment or a segment.
_DELETED = {
    "description": "{id, deleted: true}.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"id": {"type": "string"}, "deleted": {"type": "boolean"}},
            }
        }
    },
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_K = _query(
    "k", {"type": "integer", "minimum": 1}, "How many items ([recommend] default_k; at most max_k)."
)
_LIST_PARAMS = [
    _K,
    _query("category", {"type": "string"}, "Only items in this category path or below it."),
    _query("exclude", {"type": "string"}, "Comma-separated item ids never to return."),
    _query(
        "max_per_category",
        {"type": "integer", "minimum": 0},
        "At most this many items of one category (0: no limit; default [recommend] "
        "max_per_category).",
    ),
]


def _json(schema_ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
    }


def _either(schema_ref: str, description: str) -> dict[str, Any]:
    """A response that is ``schema_ref`` or an `Error`."""
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": f"#/components/schemas/{schema_ref}"},
                        {"$ref": "#/components/schemas/Error"},
                    ]
                }
            }
        },
    }


_ITEMS_WRITE_RESPONSES = {
    "202": _json(
        "ItemsAccepted",
        "The valid items are durable and will be applied; invalid ones are listed in rejected.",
    ),
    "400": _err("Malformed JSON."),
    "413": _err("Body larger than [events] max_body_bytes or more than [catalog] max_batch items."),
    "415": _err("Content-Type is not application/json."),
    "422": _either(
        "ItemsAccepted",
        "No item was valid (each rejection names the field), or the body has the wrong shape "
        "(an Error).",
    ),
    "503": _err("The engine is starting or the broker did not acknowledge."),
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Personify",
        "version": "1",
        "description": "Real-time personalization engine: events and catalog in; live "
        "profiles and explained recommendations out. With [auth.keys] configured, every "
        "route but /healthz and /v1/openapi.json needs `Authorization: Bearer <key>` with the "
        "route's scope (ingest: POST /v1/events; read: the GET routes and WebSocket tokens; "
        "admin: everything): 401 without a valid key, 403 when its scopes do not allow the "
        "route. Without keys the API answers on loopback only.",
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/events": {
            "post": {
                "summary": "Send one event or a batch",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    {"$ref": "#/components/schemas/Event"},
                                    {
                                        "type": "object",
                                        "required": ["events"],
                                        "properties": {
                                            "events": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Event"},
                                            }
                                        },
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "202": {
                        "description": "The valid events are acknowledged by the broker; "
                        "invalid ones are listed in rejected.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/EventsAccepted"}
                            }
                        },
                    },
                    "400": _err("Malformed JSON."),
                    "413": _err(
                        "Body larger than [events] max_body_bytes or batch longer than "
                        "[events] max_batch."
                    ),
                    "415": _err("Content-Type is not application/json."),
                    "422": _either(
                        "EventsAccepted",
                        "No event was valid (each rejection names the field), or the body has "
                        "the wrong shape or no event (an Error).",
                    ),
                    "503": _err("The engine is starting or the broker did not acknowledge."),
                },
            }
        },
        "/v1/users/{user_id}": {
            "get": {
                "summary": "A visitor's live profile",
                "parameters": [
                    {
                        "name": "user_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The profile.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Profile"}}
                        },
                    },
                    "404": _err("No profile for this id."),
                },
            },
            "delete": {
                "summary": "Erase the visitor",
                "description": "Right to erasure: the profile (with its dedup memory and chat "
                "vector) and those of the anonymous ids linked to it are deleted, with "
                "tombstones in the changelog, the stored lists and WebSocket buffers dropped, "
                "and an audit record (a digest of the id, never the id) written to the audit "
                "topic. Applied in order with the visitor's events. Needs the admin scope.",
                "parameters": [_path("user_id")],
                "responses": {
                    "202": {"description": "{user_id, request_id}: accepted, durable."},
                    "503": _err("Starting, or the broker did not acknowledge."),
                },
            },
        },
        "/v1/users/{user_id}/recommendations": {
            "get": {
                "summary": "What this visitor should see next, and why",
                "description": "Blends co-visitation with the visitor's recent items, items "
                "bought together with theirs, content similarity (items and chat), and trending "
                "items; skips what they bought, have in the cart or just viewed, out-of-stock "
                "and deleted items. A visitor never seen gets trending items.",
                "parameters": [
                    _path("user_id"),
                    *_LIST_PARAMS,
                    _query(
                        "context_item",
                        {"type": "string"},
                        "The item on screen: seeds the list first.",
                    ),
                ],
                "responses": {
                    "200": _json("Recommendations", "The list, best first."),
                    "400": _err("A query parameter is invalid (field names it)."),
                },
            }
        },
        "/v1/items": {
            "post": {
                "summary": "Add or replace one item or a batch",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    {"$ref": "#/components/schemas/Item"},
                                    {
                                        "type": "object",
                                        "required": ["items"],
                                        "properties": {
                                            "items": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Item"},
                                            }
                                        },
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": _ITEMS_WRITE_RESPONSES,
            }
        },
        "/v1/items/{item_id}": {
            "get": {
                "summary": "One catalog item",
                "parameters": [_path("item_id")],
                "responses": {
                    "200": _json("Item", "The item as stored."),
                    "404": _err("No such item."),
                },
            },
            "put": {
                "summary": "Add or replace the item",
                "parameters": [_path("item_id")],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Item"}}
                    },
                },
                "responses": _ITEMS_WRITE_RESPONSES,
            },
            "delete": {
                "summary": "Remove the item from the catalog, the index and every list",
                "parameters": [_path("item_id")],
                "responses": {
                    "202": {"description": "The delete is durable and will be applied."},
                    "503": _err("The engine is starting or the broker did not acknowledge."),
                },
            },
        },
        "/v1/items/{item_id}/similar": {
            "get": {
                "summary": "Items like this one",
                "description": "Seen together with it, bought together with it, and close to "
                "it in content.",
                "parameters": [_path("item_id"), *_LIST_PARAMS],
                "responses": {
                    "200": _json("Recommendations", "The list, best first."),
                    "400": _err("A query parameter is invalid (field names it)."),
                    "404": _err("No such item in the catalog."),
                },
            }
        },
        "/v1/ws": {
            "get": {
                "summary": "Live recommendations over a WebSocket",
                "description": "Follows one visitor. Server messages are JSON objects with "
                "`type` and `seq` (the visitor's message number, increasing): "
                '`{"type": "recommendations", "seq": 7, "user_id": "U", '
                '"recommendation_id": "...", "items": [...]}` (items as in GET '
                "/v1/users/{id}/recommendations), sent at once and after each of the visitor's "
                "events; trigger messages such as "
                '`{"type": "offer", "seq": 8, "user_id": "U", "trigger": "cart_abandonment", '
                '"plugin": "cart_abandonment", "payload": {...}}` and `{"type": "segments", '
                '"seq": 9, "user_id": "U", "segments": ["high_value"], "added": '
                '["high_value"]}`. With several workers, any worker accepts the socket. '
                "Reconnect with `resume_from` set to the last `seq` received to get "
                "what was sent meanwhile (up to [push] replay_size messages; past that, a "
                "fresh list). The server pings every [push] heartbeat_s and closes with 1001 "
                "when it stops; a client too slow to read loses its oldest queued messages.",
                "parameters": [
                    {
                        "name": "user_id",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "The visitor to follow.",
                    },
                    _query(
                        "resume_from",
                        {"type": "integer", "minimum": 0},
                        "The last seq received before a reconnect.",
                    ),
                ],
                "responses": {
                    "101": {"description": "Switching to the WebSocket protocol."},
                    "400": _err("user_id or resume_from is invalid, or not a WebSocket upgrade."),
                },
            }
        },
        "/v1/users/{user_id}/export": {
            "get": {
                "summary": "Everything held about the visitor",
                "description": "Right of access and portability: the profile as GET "
                "/v1/users/{id} shows it and as stored (dedup memory and chat vector included). "
                "Needs the admin scope.",
                "parameters": [_path("user_id")],
                "responses": {
                    "200": {
                        "description": "{user_id, exported_at, profile, stored, exposures}: "
                        "exposures are the lists served that clicks and purchases can still "
                        "be joined to (GET /v1/kpis)."
                    },
                    "404": _err("Nothing is held about this visitor."),
                },
            }
        },
        "/v1/users/{user_id}/consent": {
            "put": {
                "summary": "Set the visitor's consent per purpose",
                "description": "Any of analytics, personalization, marketing set to true or "
                "false (a `consent` event does the same). Without personalization consent the "
                "visitor's events change nothing and their lists are not personal; without "
                "marketing consent no trigger fires for them. Until they say, [profiles] consent "
                "decides (opt-out grants, opt-in withholds). Needs the ingest scope.",
                "parameters": [_path("user_id")],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    p: {"type": "boolean"}
                                    for p in ("analytics", "personalization", "marketing")
                                },
                                "additionalProperties": False,
                                "minProperties": 1,
                            }
                        }
                    },
                },
                "responses": {
                    "202": {"description": "Recorded; applied like an event."},
                    "422": _err("A purpose is unknown or not a boolean (field names it)."),
                    "503": _err("Starting, or the broker did not acknowledge."),
                },
            }
        },
        "/v1/ws/tokens": {
            "post": {
                "summary": "A WebSocket token for one visitor",
                "description": "For a browser: GET /v1/ws?user_id=U&token=T. The token is "
                "valid for that visitor only, for [auth] token_ttl_s. Needs the read scope.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["user_id"],
                                "properties": {"user_id": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "The token and when it expires (epoch seconds).",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "user_id": {"type": "string"},
                                        "token": {"type": "string"},
                                        "expires": {"type": "integer"},
                                    },
                                }
                            }
                        },
                    },
                    "401": _err("No valid API key."),
                    "422": _err("user_id is missing (field names it)."),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Readiness",
                "responses": {
                    "200": {
                        "description": "Broker reachable, partitions assigned, tables "
                        "recovered, journal replayed."
                    },
                    "503": {"description": "Not ready yet; checks says which part."},
                },
            }
        },
        "/v1/kpis": {
            "get": {
                "summary": "What recommendations earn: exposures joined to outcomes (admin)",
                "description": "Counts per UTC day from the lists served (exposures) and the "
                "impression, click, add_to_cart and purchase events joined to them (the "
                "attribution rules are in the README). visitors and converters are distinct "
                "per day and variant. Rates are null where their denominator is 0.",
                "parameters": [
                    _query(
                        "from",
                        {"type": "string", "format": "date"},
                        "First day, YYYY-MM-DD (default: 6 days before to).",
                    ),
                    _query(
                        "to",
                        {"type": "string", "format": "date"},
                        "Last day, YYYY-MM-DD (default: today, UTC).",
                    ),
                    _query(
                        "by",
                        {"type": "string", "enum": ["variant", "source", "segment", "day"]},
                        "Group per variant (default), per candidate source, per rule segment "
                        "the visitor was in, or per day.",
                    ),
                ],
                "responses": {
                    "200": _json("Kpis", "The KPIs of each group and the totals."),
                    "400": _err("A bad parameter (named in field)."),
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                },
            }
        },
        "/v1/experiments": {
            "get": {
                "summary": "Every experiment, oldest first (admin)",
                "responses": {
                    "200": {
                        "description": "{experiments: [Experiment]}.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "experiments": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Experiment"},
                                        }
                                    },
                                }
                            }
                        },
                    },
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                },
            }
        },
        "/v1/experiments/{experiment_id}": {
            "put": {
                "summary": "Create or replace an experiment (admin)",
                "description": "Variants are named overrides of the ranking settings; the "
                "experiment takes a share (traffic) of all visitors, never shared with another "
                "experiment, split by the variants' shares. It applies to the next list ranked.",
                "parameters": [_path("experiment_id")],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ExperimentRequest"}
                        }
                    },
                },
                "responses": {
                    "200": _json("Experiment", "Replaced."),
                    "201": _json("Experiment", "Created."),
                    "400": _err("Malformed JSON."),
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                    "413": _err("Body too large."),
                    "415": _err("Not JSON."),
                    "422": _err("A bad field (named in field), or not enough free traffic."),
                },
            },
            "get": {
                "summary": "One experiment (admin)",
                "parameters": [_path("experiment_id")],
                "responses": {
                    "200": _json("Experiment", "The experiment."),
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                    "404": _err("No such experiment."),
                },
            },
            "delete": {
                "summary": "Forget an experiment (admin); its counts stay",
                "parameters": [_path("experiment_id")],
                "responses": {
                    "200": _DELETED,
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                    "404": _err("No such experiment."),
                },
            },
        },
        "/v1/experiments/{experiment_id}/results": {
            "get": {
                "summary": "Per-variant results with always-valid intervals and tests (admin)",
                "description": "Each visitor counts once, in the variant first served. "
                "click_rate, conversion and revenue_per_visitor with intervals that stay valid "
                "however often they are looked at, and each variant's lift over the control "
                "with an always-valid p-value ([experiments] alpha, effect).",
                "parameters": [_path("experiment_id")],
                "responses": {
                    "200": {
                        "description": "{experiment, alpha, test, variants: [...]}.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["experiment", "alpha", "variants"],
                                    "properties": {
                                        "experiment": {"$ref": "#/components/schemas/Experiment"},
                                        "alpha": {"type": "number"},
                                        "test": {"type": "string"},
                                        "variants": {"type": "array", "items": {"type": "object"}},
                                    },
                                }
                            }
                        },
                    },
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                    "404": _err("No such experiment."),
                },
            }
        },
        "/v1/experiments/{experiment_id}/promote": {
            "post": {
                "summary": "Make a variant the default setting now; the experiment stops (admin)",
                "parameters": [_path("experiment_id")],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["variant"],
                                "properties": {"variant": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json("Experiment", "Promoted; the experiment as stopped."),
                    "400": _err("Malformed JSON."),
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                    "404": _err("No such experiment."),
                    "413": _err("Body too large."),
                    "415": _err("Not JSON."),
                    "422": _err("No such variant, or one that cannot become the default."),
                },
            }
        },
        "/v1/segments": {
            "get": {
                "summary": "Every rule segment with its size, and the RFM cut points (admin)",
                "responses": {
                    "200": {
                        "description": "{segments: [Segment], rfm: {recency, frequency, "
                        "monetary, at_ms}}.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["segments", "rfm"],
                                    "properties": {
                                        "segments": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Segment"},
                                        },
                                        "rfm": {"type": "object"},
                                    },
                                }
                            }
                        },
                    },
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                },
            }
        },
        "/v1/segments/{segment_id}": {
            "put": {
                "summary": "Create or replace a rule segment (admin)",
                "description": "Visitors enter and leave it on the events that change what "
                "the rule says (a segments message on their WebSocket each time); those seen "
                "before are evaluated in the background right after.",
                "parameters": [_path("segment_id")],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/SegmentRequest"}
                        }
                    },
                },
                "responses": {
                    "200": _json("Segment", "Replaced."),
                    "201": _json("Segment", "Created."),
                    "400": _err("Malformed JSON."),
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                    "413": _err("Body too large."),
                    "415": _err("Not JSON."),
                    "422": _err("A bad field (named in field): a rule outside the language."),
                },
            },
            "get": {
                "summary": "One rule segment, with its size (admin)",
                "parameters": [_path("segment_id")],
                "responses": {
                    "200": _json("Segment", "The segment."),
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                    "404": _err("No such segment."),
                },
            },
            "delete": {
                "summary": "Forget a rule segment (admin); its members leave it",
                "parameters": [_path("segment_id")],
                "responses": {
                    "200": _DELETED,
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                    "404": _err("No such segment."),
                },
            },
        },
        "/v1/segments/{segment_id}/members": {
            "get": {
                "summary": "A page of a segment's members, by id (admin)",
                "parameters": [
                    _path("segment_id"),
                    _query(
                        "after",
                        {"type": "string"},
                        "Members after this id (the next of the page before).",
                    ),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000},
                        "Members per page (default 100).",
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "{segment, members: [id], next: id or null}. Members "
                        "are read from the stored profiles, a bounded number per page: a page "
                        "may be short, even empty, with a next to go on from; null means no "
                        "member after these.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["segment", "members", "next"],
                                    "properties": {
                                        "segment": {"type": "string"},
                                        "members": {"type": "array", "items": {"type": "string"}},
                                        "next": {"type": ["string", "null"]},
                                    },
                                }
                            }
                        },
                    },
                    "400": _err("A bad limit."),
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                    "404": _err("No such segment."),
                },
            }
        },
        "/v1/quality": {
            "get": {
                "summary": "The learned model's state and the engine's measured quality (admin)",
                "responses": {
                    "200": {
                        "description": "model: the learned collaborative model (trained_at "
                        "null until the history holds [model] min_interactions); tuning and "
                        "evaluation: the latest self-tuning and hold-out figures.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Quality"}}
                        },
                    },
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                },
            }
        },
        "/v1/quality/runs": {
            "post": {
                "summary": "Train, tune and evaluate now (admin; what personify evaluate does)",
                "responses": {
                    "202": {
                        "description": "Asked for: the next check of the trainer runs it; "
                        "follow it on GET /v1/quality (tuning.progress, evaluation).",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"requested": {"type": "boolean"}},
                                }
                            }
                        },
                    },
                    "401": _err("No valid API key."),
                    "403": _err("The key lacks the admin scope."),
                    "409": _err("A run is in progress, or the learned model is off."),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "parameters": [
                    {
                        "name": "name[]",
                        "in": "query",
                        "required": False,
                        "description": "Only these samples (repeatable), e.g. "
                        "personify_events_applied_total; default: all.",
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "style": "form",
                        "explode": True,
                    }
                ],
                "responses": {
                    "200": {"description": "Text exposition format.", "content": {"text/plain": {}}}
                },
            }
        },
        "/v1/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI."}}}
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": _ERROR,
            "Event": _EVENT,
            "Profile": _PROFILE,
            "Item": _ITEM,
            "Reason": _REASON,
            "Recommendations": _RECOMMENDATIONS,
            "Quality": _QUALITY,
            "Kpis": _KPIS,
            "Experiment": _EXPERIMENT,
            "ExperimentRequest": _EXPERIMENT_REQUEST,
            "Segment": _SEGMENT,
            "SegmentRequest": _SEGMENT_REQUEST,
            "ItemsAccepted": {
                "type": "object",
                "required": ["accepted", "rejected", "item_ids"],
                "properties": {
                    "accepted": {"type": "integer"},
                    "item_ids": {"type": "array", "items": {"type": "string"}},
                    "rejected": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["index", "error", "field"],
                            "properties": {
                                "index": {"type": "integer"},
                                "error": {"type": "string"},
                                "field": {"type": "string"},
                            },
                        },
                    },
                    "error": {"type": "string"},
                    "field": {"type": "string"},
                    "detail": {"type": "string"},
                },
            },
            "EventsAccepted": {
                "type": "object",
                "required": ["accepted", "rejected"],
                "properties": {
                    "accepted": {"type": "integer"},
                    "event_ids": {"type": "array", "items": {"type": "string"}},
                    "rejected": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["index", "error", "field"],
                            "properties": {
                                "index": {"type": "integer"},
                                "error": {"type": "string"},
                                "field": {"type": "string"},
                            },
                        },
                    },
                    "error": {"type": "string"},
                },
            },
        },
    },
}


def _document_keys(document: dict[str, Any]) -> None:
    """Each operation's scope, and its 401 and 403 answers when API keys are configured."""
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            scope = ROUTE_SCOPES.get((method.upper(), path), "admin")
            if scope is None:
                operation["security"] = []
                continue
            operation["x-scope"] = scope
            responses = operation.setdefault("responses", {})
            responses.setdefault(
                "401", _err("API keys are configured and the request has none that is known.")
            )
            responses.setdefault("403", _err(f"The key lacks the {scope!r} scope (or 'admin')."))


_document_keys(OPENAPI)
