"""HTTP handlers of experiments: define them, read their results, promote a winner."""

from __future__ import annotations

import time

from aiohttp import web

from personify.agents.experiments import experiments, results
from personify.agents.exposures import experiment_counts
from personify.agents.model import promote
from personify.api.routes import read_json
from personify.api.schemas import json_error, json_response
from personify.engine.app import current_config
from personify.engine.errors import ValidationError
from personify.engine.logging import get_logger

__all__ = ["experiment_routes"]

_log = get_logger(__name__)

experiment_routes = web.RouteTableDef()


def _missing(experiment_id: str) -> web.Response:
    return json_error(
        404, f"no experiment {experiment_id!r}", "id", "create it with PUT /v1/experiments/{id}"
    )


@experiment_routes.get("/v1/experiments")
async def list_experiments(request: web.Request) -> web.Response:
    """Every experiment, oldest first."""
    now_ms = int(time.time() * 1000)
    return json_response({"experiments": [e.as_json(now_ms) for e in experiments().all()]})


@experiment_routes.put("/v1/experiments/{experiment_id}")
async def put_experiment(request: web.Request) -> web.Response:
    """Create or replace an experiment; it applies to the next list ranked."""
    experiment_id = request.match_info["experiment_id"]
    doc = await read_json(request, "the experiment")
    if isinstance(doc, web.Response):
        return doc
    now_ms = int(time.time() * 1000)
    registry = experiments()
    existed = registry.get(experiment_id) is not None
    try:
        experiment = registry.put(experiment_id, doc, now_ms)
    except ValidationError as exc:
        return json_error(422, exc.reason, exc.field, "see GET /v1/openapi.json")
    _log.info("experiment put", experiment=experiment_id, running=experiment.running(now_ms))
    return json_response(experiment.as_json(now_ms), 200 if existed else 201)


@experiment_routes.get("/v1/experiments/{experiment_id}")
async def get_experiment(request: web.Request) -> web.Response:
    """One experiment."""
    experiment = experiments().get(request.match_info["experiment_id"])
    if experiment is None:
        return _missing(request.match_info["experiment_id"])
    return json_response(experiment.as_json())


@experiment_routes.delete("/v1/experiments/{experiment_id}")
async def delete_experiment(request: web.Request) -> web.Response:
    """Forget an experiment: its visitors get the default setting again."""
    experiment_id = request.match_info["experiment_id"]
    if not experiments().delete(experiment_id):
        return _missing(experiment_id)
    return json_response({"id": experiment_id, "deleted": True})


@experiment_routes.get("/v1/experiments/{experiment_id}/results")
async def experiment_results(request: web.Request) -> web.Response:
    """Per-variant figures with always-valid intervals, and each variant against the control."""
    experiment = experiments().get(request.match_info["experiment_id"])
    if experiment is None:
        return _missing(request.match_info["experiment_id"])
    cfg = current_config().experiments
    counts = experiment_counts(experiment.id)
    return json_response(results(experiment, counts, alpha=cfg.alpha, effect=cfg.effect))


@experiment_routes.post("/v1/experiments/{experiment_id}/promote")
async def promote_variant(request: web.Request) -> web.Response:
    """Make a variant's setting the default now (no restart); the experiment stops."""
    experiment_id = request.match_info["experiment_id"]
    registry = experiments()
    experiment = registry.get(experiment_id)
    if experiment is None:
        return _missing(experiment_id)
    doc = await read_json(request, "the promotion")
    if isinstance(doc, web.Response):
        return doc
    name = doc.get("variant") if isinstance(doc, dict) else None
    variant = experiment.variant(name) if isinstance(name, str) else None
    if variant is None:
        names = ", ".join(v.name for v in experiment.variants)
        return json_error(
            422, f"expected one of {names}, got {name!r}", "variant", '{"variant": "NAME"}'
        )
    if not variant.rerank or variant.size is not None:
        return json_error(
            422,
            "a variant without the re-ranking plugins, or with its own list size, cannot "
            "become the default here",
            "variant",
            "leave the plugins out with [plugins] deny, or set [recommend] default_k, in "
            "config.toml instead",
        )
    promote(variant.setting, ranker=variant.ranker)
    stopped = registry.stop(experiment_id, int(time.time() * 1000), promoted=variant.name)
    _log.info("variant promoted", experiment=experiment_id, variant=variant.name)
    return json_response(stopped.as_json())
