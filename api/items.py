"""HTTP handlers: the catalog (items in and out) and recommendations.

Catalog writes go through the items topic (journaled like events) and answer 202 once
durable; the catalog agent applies them. Recommendations are answered here, in the API
process, from the lists kept in memory or ranked from the local tables and the vector index
(`personify.agents.lists`): no round trip through Kafka.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from aiohttp import web

from personify.agents.exposures import recorder
from personify.agents.lists import (
    Served,
    recommender,
    serve_recommendations,
    serve_similar,
    sized,
)
from personify.agents.recommend import Request
from personify.api.routes import not_ready, read_json, to_owner
from personify.api.schemas import Rejection, json_error, json_response
from personify.engine.app import current_config, items_publisher
from personify.engine.errors import ValidationError
from personify.engine.logging import get_logger
from personify.engine.metrics import ITEMS_REJECTED
from personify.engine.models import Item, stored_id, validate_item
from personify.engine.publisher import MAX_EVENTS_PER_MESSAGE, PublishTimeout, partition_for
from personify.tables import catalog as catalog_table
from personify.tables import store

__all__ = ["item_routes"]

item_routes = web.RouteTableDef()
_log = get_logger(__name__)


async def _publish(changes: list[tuple[str, Item | None]]) -> None:
    """Publish catalog changes, one message per partition (journaled when enabled)."""
    pub = items_publisher()
    groups: dict[int, list[tuple[str, Item | None]]] = {}
    for item_id, item in changes:
        groups.setdefault(partition_for(item_id, pub.partitions), []).append((item_id, item))
    records: list[tuple[int, bytes]] = []
    for partition, group in groups.items():
        for i in range(0, len(group), MAX_EVENTS_PER_MESSAGE):
            chunk = group[i : i + MAX_EVENTS_PER_MESSAGE]
            upserts = [item for _id, item in chunk if item is not None]
            deletes = [item_id for item_id, item in chunk if item is None]
            if upserts:
                records.append((partition, orjson.dumps({"items": upserts})))
            if deletes:
                records.append((partition, orjson.dumps({"delete": deletes})))
    await pub.publish_records(records)


async def _accept(entries: list[Any], single: bool) -> web.Response:
    cfg = current_config()
    valid: list[Item] = []
    rejected: list[Rejection] = []
    for i, entry in enumerate(entries):
        try:
            valid.append(validate_item(entry, cfg.events))
        except ValidationError as exc:
            rejected.append({"index": i, "error": exc.reason, "field": exc.field})
    if rejected:
        ITEMS_REJECTED.labels("http").inc(len(rejected))
    if not valid:
        first = rejected[0]
        return json_response(
            {
                "error": first["error"] if single else f"all {len(rejected)} items were rejected",
                "field": first["field"] if single else "items",
                "detail": "see rejected[] for each item's field and reason",
                "accepted": 0,
                "rejected": rejected,
                "item_ids": [],
            },
            422,
        )
    starting = not_ready(items_publisher())
    if starting is not None:
        return starting
    try:
        await _publish([(item["item_id"], item) for item in valid])
    except Exception as exc:
        _log.exception("catalog publish failed")
        return json_error(
            503,
            f"the broker did not acknowledge the items: {exc}",
            "",
            (
                "they may still be applied; retry (an upsert is idempotent)"
                if isinstance(exc, PublishTimeout)
                else "nothing was accepted; retry (an upsert is idempotent)"
            ),
        )
    return json_response(
        {
            "accepted": len(valid),
            "rejected": rejected,
            "item_ids": [item["item_id"] for item in valid],
        },
        202,
    )


@item_routes.post("/v1/items")
async def post_items(request: web.Request) -> web.Response:
    """Add or replace one item or ``{"items": [...]}``; 202 once the changes are durable."""
    doc = await read_json(request, "the items")
    if isinstance(doc, web.Response):
        return doc
    limit = current_config().catalog.max_batch
    if isinstance(doc, dict) and "items" in doc and "item_id" not in doc:
        entries = doc["items"]
        if not isinstance(entries, list):
            return json_error(
                422,
                f"expected a list of items, got {type(entries).__name__}",
                "items",
                'send {"items": [{...}, ...]}',
            )
        if not entries:
            return json_error(
                422,
                "the batch holds no item",
                "items",
                'send {"items": [{...}, ...]} with at least one item',
            )
        if len(entries) > limit:
            return json_error(
                413,
                f"batch of {len(entries)} items exceeds the limit of {limit}",
                "items",
                "split the batch; the limit is [catalog] max_batch",
            )
        if not entries:
            return json_error(422, "expected at least one item", "items", "")
        return await _accept(entries, single=False)
    if isinstance(doc, dict):
        return await _accept([doc], single=True)
    return json_error(
        422,
        f'expected an item object or {{"items": [...]}}, got {type(doc).__name__}',
        "body",
        "see GET /v1/openapi.json",
    )


@item_routes.put("/v1/items/{item_id}")
async def put_item(request: web.Request) -> web.Response:
    """Add or replace the item ``item_id`` (the body's item_id may be omitted)."""
    item_id = request.match_info["item_id"]
    doc = await read_json(request, "the items")
    if isinstance(doc, web.Response):
        return doc
    if not isinstance(doc, dict):
        return json_error(422, f"expected an item object, got {type(doc).__name__}", "body", "")
    if doc.get("item_id", item_id) != item_id:
        return json_error(
            422,
            f"item_id {doc['item_id']!r} differs from the path's {item_id!r}",
            "item_id",
            "omit item_id from the body or make it match the URL",
        )
    return await _accept([{**doc, "item_id": item_id}], single=True)


@item_routes.delete("/v1/items/{item_id}")
async def delete_item(request: web.Request) -> web.Response:
    """Remove the item from the catalog, the index and every future recommendation."""
    item_id = request.match_info["item_id"]
    starting = not_ready(items_publisher())
    if starting is not None:
        return starting
    try:
        await _publish([(item_id, None)])
    except Exception as exc:
        _log.exception("catalog publish failed")
        return json_error(503, f"the broker did not acknowledge the delete: {exc}", "", "retry")
    return json_response({"deleted": item_id}, 202)


@item_routes.get("/v1/items/{item_id}")
async def get_item(request: web.Request) -> web.Response:
    """The stored item."""
    item_id = request.match_info["item_id"]
    tbl = catalog_table.table()
    raw = store.get_any(tbl, item_id.encode())
    if raw is None:
        return json_error(404, f"no item {item_id!r}", "item_id", "add it with PUT /v1/items/{id}")
    return json_response(catalog_table.decode_item(raw))


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValidationError(name, f"expected an integer, got {text!r}") from None
    if not low <= value <= high:
        raise ValidationError(name, f"expected {low}-{high}, got {value}")
    return value


def _request(request: web.Request) -> Request:
    cfg = current_config().recommend
    exclude = [x for x in request.query.get("exclude", "").split(",") if x]
    return Request(
        k=_int_param(request, "k", cfg.default_k, 1, cfg.max_k),
        context_item=request.query.get("context_item") or None,
        category=request.query.get("category") or None,
        exclude=exclude,
        max_per_category=_int_param(
            request, "max_per_category", cfg.max_per_category, 0, cfg.max_k
        ),
    )


@item_routes.get("/v1/users/{user_id}/recommendations")
async def get_recommendations(request: web.Request) -> web.Response:
    """The visitor's next items with reasons (trending items for a visitor never seen)."""
    user_id = request.match_info["user_id"]
    try:
        req = _request(request)
    except ValidationError as exc:
        return json_error(400, exc.reason, exc.field, "see GET /v1/openapi.json")
    key = stored_id(user_id, current_config().events)
    remote = await to_owner(request, key)
    if remote is not None:
        return remote
    served = await serve_recommendations(key, req)
    if "k" not in request.query:  # the variant's list size, where an experiment sets one
        served = dataclasses.replace(served, items=sized(served.items, served.variant))
    recorder().served(key, served.rec_id, served.items, "http", served.variant)
    return _answer("user_id", user_id, served)


def _answer(key: str, value: str, served: Served) -> web.Response:
    """The wire answer, assembled from the list's stored JSON."""
    body = b"".join(
        (
            b'{"recommendation_id":',
            orjson.dumps(served.rec_id),
            b',"' + key.encode() + b'":',
            orjson.dumps(value),
            b',"variant":',
            orjson.dumps(served.variant),
            b',"items":',
            served.items,
            b"}",
        )
    )
    return web.Response(body=body, content_type="application/json")


@item_routes.get("/v1/items/{item_id}/similar")
async def get_similar(request: web.Request) -> web.Response:
    """Items seen or bought together with ``item_id`` and close to it in content."""
    item_id = request.match_info["item_id"]
    try:
        req = _request(request)
    except ValidationError as exc:
        return json_error(400, exc.reason, exc.field, "see GET /v1/openapi.json")
    rec = recommender()
    if item_id not in rec.catalog and rec.catalog.loaded and len(rec.catalog):
        return json_error(
            404, f"no item {item_id!r} in the catalog", "item_id", "add it with PUT /v1/items/{id}"
        )
    return _answer("item_id", item_id, await serve_similar(item_id, req))
