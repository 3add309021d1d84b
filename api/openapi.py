"""The OpenAPI 3.1 document of the HTTP API, served at GET /v1/openapi.json."""

from __future__ import annotations

from typing import Any

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
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Personify",
        "version": "1",
        "description": "Real-time personalization engine: events in, live profiles out.",
    },
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
                    "422": {
                        "description": "No event was valid (or the body has the wrong shape).",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/EventsAccepted"}
                            }
                        },
                    },
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
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
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
        "schemas": {
            "Error": _ERROR,
            "Event": _EVENT,
            "Profile": _PROFILE,
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
        }
    },
}
