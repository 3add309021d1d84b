"""HTTP handlers of rule segments: define them, list them with their sizes, page through members."""

from __future__ import annotations

import time

from aiohttp import web

from personify.agents.segments import registry
from personify.api.routes import read_json
from personify.api.schemas import json_error, json_response
from personify.engine.errors import ValidationError
from personify.engine.logging import get_logger
from personify.engine.models import format_ts
from personify.tables import profiles, store
from personify.tables import segments as rules

__all__ = ["segment_routes"]

_log = get_logger(__name__)

segment_routes = web.RouteTableDef()

_MAX_PAGE = 1000


def _missing(segment_id: str) -> web.Response:
    return json_error(
        404, f"no segment {segment_id!r}", "id", "create it with PUT /v1/segments/{id}"
    )


def _dbs() -> list[object]:
    return list(store.TableStore(profiles.table()).dbs().values())


def _clusters() -> dict[str, object] | None:
    fitted = registry().clusters
    if fitted is None:
        return None
    return {
        "fitted_at": format_ts(fitted.fitted_at_ms),
        "silhouette": fitted.silhouette,
        "clusters": list(fitted.described),
    }


@segment_routes.get("/v1/segments")
async def list_segments(request: web.Request) -> web.Response:
    """Every segment with its size, by id, and the RFM cut points in use."""
    segments = registry().all()
    sizes = rules.sizes(_dbs(), [s.id for s in segments])
    return json_response(
        {
            "segments": [s.as_json(sizes[s.id]) for s in segments],
            "rfm": registry().cuts.as_json(),
            "clusters": _clusters(),
        }
    )


@segment_routes.put("/v1/segments/{segment_id}")
async def put_segment(request: web.Request) -> web.Response:
    """Create or replace a segment; visitors seen before are evaluated in the background."""
    segment_id = request.match_info["segment_id"]
    doc = await read_json(request, "the segment")
    if isinstance(doc, web.Response):
        return doc
    try:
        segment, created = registry().put(segment_id, doc, int(time.time() * 1000))
    except ValidationError as exc:
        hint = "see the rule language in the README" if exc.field == "rule" else ""
        return json_error(422, exc.reason, exc.field, hint or "see GET /v1/openapi.json")
    _log.info("segment put", segment=segment_id, rule=segment.rule)
    size = rules.sizes(_dbs(), [segment.id])[segment.id]
    return json_response(segment.as_json(size), 201 if created else 200)


@segment_routes.get("/v1/segments/{segment_id}")
async def get_segment(request: web.Request) -> web.Response:
    """One segment, with its size."""
    segment = registry().get(request.match_info["segment_id"])
    if segment is None:
        return _missing(request.match_info["segment_id"])
    return json_response(segment.as_json(rules.sizes(_dbs(), [segment.id])[segment.id]))


@segment_routes.delete("/v1/segments/{segment_id}")
async def delete_segment(request: web.Request) -> web.Response:
    """Forget a segment; its members leave it (a ``segments`` message each) in the background."""
    segment_id = request.match_info["segment_id"]
    if not registry().delete(segment_id):
        return _missing(segment_id)
    _log.info("segment deleted", segment=segment_id)
    return json_response({"id": segment_id, "deleted": True})


@segment_routes.get("/v1/segments/{segment_id}/members")
async def segment_members(request: web.Request) -> web.Response:
    """A page of the segment's members, by id: ``limit`` of them after ``after``."""
    segment_id = request.match_info["segment_id"]
    if registry().get(segment_id) is None:
        return _missing(segment_id)
    after = request.query.get("after", "")
    raw_limit = request.query.get("limit", "100")
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= _MAX_PAGE:
        return json_error(
            400, f"expected a whole number from 1 to {_MAX_PAGE}, got {raw_limit!r}", "limit", ""
        )
    page, following = rules.members(_dbs(), segment_id, after, limit)
    return json_response({"segment": segment_id, "members": page, "next": following})
