"""HTTP handlers: events in, profiles out, health and metrics."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from personify.agents.exposures import kpis, recorder
from personify.agents.model import quality_status, request_run
from personify.agents.segments import scores_of
from personify.api.openapi import OPENAPI
from personify.api.schemas import EventsAccepted, Rejection, json_error, json_response
from personify.engine.app import app as faust_app
from personify.engine.app import current_config, items_publisher, publisher
from personify.engine.errors import ValidationError
from personify.engine.logging import get_logger
from personify.engine.metrics import EVENTS_ACCEPTED, EVENTS_REJECTED, REGISTRY, rejection_reason
from personify.engine.models import (
    Event,
    format_ts,
    internal_event,
    new_id,
    stored_id,
    validate_event,
)
from personify.engine.publisher import Publisher, PublishTimeout
from personify.tables import attribution, profiles, store
from personify.tables.attribution import Grouping

__all__ = [
    "FORWARDED",
    "HTTP_CLIENT",
    "forward",
    "not_ready",
    "owner_url",
    "read_json",
    "routes",
    "to_owner",
]

routes = web.RouteTableDef()
#: The client session used to forward requests to other workers.
HTTP_CLIENT = web.AppKey("http_client", aiohttp.ClientSession)
_log = get_logger(__name__)


def not_ready(pub: Publisher | None = None) -> web.Response | None:
    """A 503 while ``pub`` (default: the events publisher) has not replayed its journal yet."""
    if not (pub or publisher()).ready.is_set():
        return json_error(503, "the engine is starting", "", "retry in a moment; see GET /healthz")
    return None


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it grows past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, what: str) -> Any:
    """The request's JSON body, or the 4xx response that says why there is none.

    Args:
        request: the request.
        what: what the body should hold, for the error's hint ("the events").
    """
    limit = current_config().events.max_body_bytes
    ctype = request.content_type
    if ctype != "application/json":
        return json_error(
            415,
            f"expected Content-Type application/json, got {ctype or 'none'}",
            "Content-Type",
            f"send {what} as a JSON body",
        )
    if request.content_length is not None and request.content_length > limit:
        return json_error(
            413,
            f"body of {request.content_length} bytes exceeds the limit of {limit}",
            "body",
            "split the batch; the limit is [events] max_body_bytes",
        )
    body = await _read_body(request, limit)
    if body is None:
        return json_error(
            413,
            f"body exceeds the limit of {limit} bytes",
            "body",
            "split the batch; the limit is [events] max_body_bytes",
        )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return json_error(400, f"malformed JSON: {exc}", "body", "send one JSON object")


@routes.post("/v1/events")
async def post_events(request: web.Request) -> web.Response:
    """Accept one event or ``{"events": [...]}``; 202 once the broker has the valid ones."""
    cfg = current_config().events
    doc = await read_json(request, "the events")
    if isinstance(doc, web.Response):
        return doc
    if isinstance(doc, dict) and "events" in doc and "type" not in doc:
        items = doc["events"]
        if not isinstance(items, list):
            return json_error(
                422,
                f"expected a list of events, got {type(items).__name__}",
                "events",
                'send {"events": [{...}, ...]}',
            )
        if not items:
            return json_error(
                422,
                "the batch holds no event",
                "events",
                'send {"events": [{...}, ...]} with at least one event',
            )
        if len(items) > cfg.max_batch:
            return json_error(
                413,
                f"batch of {len(items)} events exceeds the limit of {cfg.max_batch}",
                "events",
                "split the batch; the limit is [events] max_batch",
            )
        single = False
    elif isinstance(doc, dict):
        items, single = [doc], True
    else:
        return json_error(
            422,
            f'expected an event object or {{"events": [...]}}, got {type(doc).__name__}',
            "body",
            "see GET /v1/openapi.json",
        )
    starting = not_ready()
    if starting is not None:
        return starting

    now_ms = int(time.time() * 1000)
    valid: list[Event] = []
    rejected: list[Rejection] = []
    for i, item in enumerate(items):
        try:
            valid.append(validate_event(item, cfg, now_ms))
        except ValidationError as exc:
            rejected.append({"index": i, "error": exc.reason, "field": exc.field})
            EVENTS_REJECTED.labels("http", rejection_reason(exc.field)).inc()
    if not valid:
        first = rejected[0]
        answer: dict[str, Any] = {
            "error": first["error"] if single else f"all {len(rejected)} events were rejected",
            "field": first["field"] if single else "events",
            "detail": "see rejected[] for each event's field and reason",
            "accepted": 0,
            "rejected": rejected,
            "event_ids": [],
        }
        return json_response(answer, 422)
    try:
        await publisher().publish(valid)
    except Exception as exc:
        _log.exception("publish failed")
        return json_error(
            503,
            f"the broker did not acknowledge the events: {exc}",
            "",
            (
                "they may still be applied; retry with the same event ids (never counted twice)"
                if isinstance(exc, PublishTimeout)
                else "nothing was accepted; retry with the same event ids"
            ),
        )
    EVENTS_ACCEPTED.labels("http").inc(len(valid))
    result: EventsAccepted = {
        "accepted": len(valid),
        "rejected": rejected,
        "event_ids": [e["event_id"] for e in valid],
    }
    return json_response(result, 202)


FORWARDED = "X-Personify-Forwarded"


#: The workers' assignment last seen (the assignor's map of hosts to their partitions, a new
#: object after each rebalance), and whether it names no worker but this one.
_assignment_seen: tuple[object, bool] = (None, False)


def _alone() -> bool:
    """Whether no other worker owns any partition (then every key is ours: no lookup)."""
    global _assignment_seen
    hosts = faust_app.router.tables_metadata()
    if hosts is not _assignment_seen[0]:
        own = str(faust_app.conf.canonical_url).rstrip("/")
        _assignment_seen = (hosts, all(str(host).rstrip("/") == own for host in hosts))
    return _assignment_seen[1]


def owner_url(key: str) -> str | None:
    """The API URL of the worker that owns ``key``'s partition, or None when it is us."""
    try:
        if _alone():
            return None
        url = str(faust_app.router.key_store("profiles", key.encode())).rstrip("/")
    except Exception:  # no assignment metadata yet (one worker, or a rebalance): read locally
        return None
    own = str(faust_app.conf.canonical_url).rstrip("/")
    return None if url == own else url


async def forward(request: web.Request, owner: str) -> web.Response:
    """Answer ``request`` with what the worker at ``owner`` answers to it."""
    session: aiohttp.ClientSession = request.app[HTTP_CLIENT]
    try:
        headers = {FORWARDED: "1"}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        async with session.get(owner + request.rel_url.path_qs, headers=headers) as resp:
            body = await resp.read()
            return web.Response(body=body, status=resp.status, content_type="application/json")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return json_error(
            503,
            f"the worker owning this visitor ({owner}) did not answer: {exc}",
            "user_id",
            "retry; after a rebalance another worker takes over",
        )


async def to_owner(request: web.Request, key: str) -> web.Response | None:
    """The owning worker's answer when another worker owns ``key``; None to answer here."""
    if FORWARDED in request.headers:
        return None
    owner = owner_url(key)
    return None if owner is None else await forward(request, owner)


async def _stored_profile(request: web.Request) -> tuple[str, bytes | None] | web.Response:
    """The id asked for and its stored profile here, or the owning worker's whole answer."""
    user_id = request.match_info["user_id"]
    key = stored_id(user_id, current_config().events)
    remote = await to_owner(request, key)
    if remote is not None:
        return remote
    return user_id, profiles.table().get(key.encode())


@routes.get("/v1/users/{user_id}")
async def get_user(request: web.Request) -> web.Response:
    """The visitor's live profile (forwarded to the worker that owns it, with several)."""
    found = await _stored_profile(request)
    if isinstance(found, web.Response):
        return found
    user_id, raw = found
    if raw is None:
        return json_error(
            404,
            f"no profile for user {user_id!r}",
            "user_id",
            "the visitor has sent no events yet (or they are still in flight)",
        )
    state = profiles.decode(raw)
    alias = state.get("alias_of")
    if alias is not None:  # an anonymous visitor since identified: answer with the user's profile
        linked = profiles.table().get(alias.encode())
        if linked is not None:
            state = profiles.decode(linked)
    now_ms = int(time.time() * 1000)
    shown = profiles.view(state, current_config().profiles, now_ms)
    shown["scores"] = scores_of(state, now_ms)
    if alias is None:
        shown["user_id"] = user_id  # the id asked for, also when it is stored as a pseudonym
    return json_response(shown)


@routes.get("/v1/users/{user_id}/export")
async def export_user(request: web.Request) -> web.Response:
    """Everything held about the visitor (right of access and portability)."""
    found = await _stored_profile(request)
    if isinstance(found, web.Response):
        return found
    user_id, raw = found
    cfg = current_config()
    key = stored_id(user_id, cfg.events)
    attr_raw = store.get_any(profiles.table(), attribution.row_key(key))
    if raw is None and attr_raw is None:
        return json_error(404, f"nothing held about {user_id!r}", "user_id", "")
    state = profiles.decode(raw) if raw is not None else profiles.new_profile(key)
    now_ms = int(time.time() * 1000)
    exposures = attribution.Attribution(
        attr_raw, cfg.attribution, attribution.Tally(), cfg.events.default_currency
    ).export()
    return json_response(
        {
            "user_id": user_id,
            "exported_at": format_ts(now_ms),
            "profile": profiles.view(state, cfg.profiles, now_ms),
            "stored": state,
            "exposures": exposures,
        }
    )


@routes.delete("/v1/users/{user_id}")
async def erase_user(request: web.Request) -> web.Response:
    """Erase the visitor (and the anonymous ids linked to them); 202 once durable."""
    user_id = request.match_info["user_id"]
    starting = not_ready()
    if starting is not None:
        return starting
    now_ms = int(time.time() * 1000)
    request_id = new_id()
    key = stored_id(user_id, current_config().events)
    recorder().forget(key)  # lists served before and not yet recorded are never recorded
    event = internal_event(
        profiles.ERASE,
        f"$erase:{request_id}",
        user_id=key,
        ts_ms=now_ms,
        properties={"request_id": request_id},
    )
    try:
        await publisher().publish([event])
    except Exception as exc:
        _log.exception("publish failed")
        return json_error(503, f"the broker did not acknowledge the erasure: {exc}", "", "retry")
    return json_response({"user_id": user_id, "request_id": request_id}, 202)


@routes.put("/v1/users/{user_id}/consent")
async def put_consent(request: web.Request) -> web.Response:
    """Set the visitor's consent per purpose; 202 once durable (applied like any event)."""
    user_id = request.match_info["user_id"]
    doc = await read_json(request, "the consent")
    if isinstance(doc, web.Response):
        return doc
    starting = not_ready()
    if starting is not None:
        return starting
    cfg = current_config().events
    wire = {"type": "consent", "user_id": user_id, "properties": doc}
    try:
        event = validate_event(wire, cfg, int(time.time() * 1000))
    except ValidationError as exc:
        return json_error(422, exc.reason, exc.field, 'e.g. {"personalization": false}')
    try:
        await publisher().publish([event])
    except Exception as exc:
        _log.exception("publish failed")
        return json_error(503, f"the broker did not acknowledge the consent: {exc}", "", "retry")
    EVENTS_ACCEPTED.labels("http").inc()
    return json_response({"user_id": user_id, "consent": doc, "event_id": event["event_id"]}, 202)


async def _broker_reachable() -> bool:
    host, _, port = str(faust_app.conf.broker[0]).split("://", 1)[-1].partition(":")
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port or 9092)), 1.0)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """200 when the broker answers, the worker has partitions and the tables are recovered."""
    consumer = faust_app.consumer if faust_app.started else None
    assigned = bool(consumer is not None and consumer.assignment())
    recovered = bool(
        faust_app.started
        and faust_app.tables.recovery.completed.is_set()
        and not faust_app.rebalancing
    )
    checks = {
        "broker": await _broker_reachable(),
        "assigned": assigned,
        "tables_recovered": recovered,
        "journal_replayed": publisher().caught_up and items_publisher().caught_up,
    }
    ok = all(checks.values())
    assignment: dict[str, list[int]] = {}
    for tp in consumer.assignment() if consumer is not None else ():
        assignment.setdefault(tp.topic, []).append(tp.partition)
    body = {
        "status": "ok" if ok else "starting",
        "checks": checks,
        "partitions": {t: sorted(ps) for t, ps in sorted(assignment.items())},
    }
    return json_response(body, 200 if ok else 503)


def _day_param(request: web.Request, name: str) -> date | None:
    text = request.query.get(name)
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValidationError(name, f"expected a day as YYYY-MM-DD, got {text!r}") from None


@routes.get("/v1/kpis")
async def get_kpis(request: web.Request) -> web.Response:
    """What recommendations earn, per variant, candidate source or day (attribution)."""
    by = request.query.get("by", "variant")
    try:
        first, last = _day_param(request, "from"), _day_param(request, "to")
        if by not in ("variant", "source", "segment", "day"):
            raise ValidationError("by", f"expected variant, source, segment or day, got {by!r}")
        today = datetime.now(UTC).date()
        last = last or (max(today, first) if first is not None else today)
        if first is None:
            first = last - timedelta(days=6) if last > date.min + timedelta(days=6) else date.min
        if first > last:
            raise ValidationError("from", f"{first} is after to={last}")
        limit = current_config().attribution.kpi_days
        if (last - first).days >= limit:
            raise ValidationError(
                "from", f"expected a span of at most {limit} days ([attribution] kpi_days)"
            )
    except ValidationError as exc:
        return json_error(400, exc.reason, exc.field, "see GET /v1/openapi.json")
    grouping: Grouping = by  # type: ignore[assignment] # checked above
    return json_response(kpis(first, last, grouping))


@routes.get("/v1/quality")
async def quality(request: web.Request) -> web.Response:
    """How the engine's lists are made and how good they are on the shop's own history."""
    return json_response(quality_status())


@routes.post("/v1/quality/runs")
async def start_quality_run(request: web.Request) -> web.Response:
    """Train, tune and evaluate now (``personify evaluate``); follow it on GET /v1/quality."""
    if not current_config().model.enabled:
        return json_error(409, "the learned model is off", "model.enabled", "[model] enabled")
    if not request_run():
        return json_error(409, "a run is in progress", "", "follow it on GET /v1/quality")
    return json_response({"requested": True}, 202)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics: all of them, or only the samples ``name[]`` names (repeatable)."""
    names = request.query.getall("name[]", [])
    source = REGISTRY.restricted_registry(names) if names else REGISTRY
    return web.Response(body=generate_latest(source), headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API."""
    return json_response(OPENAPI)
