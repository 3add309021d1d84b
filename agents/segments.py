"""Rule segments: defined over HTTP, kept live by the profile agent, swept on a schedule.

A segment is a rule over the visitor's profile (the language and the registry:
`personify.tables.segments`). The profile agent evaluates the rules for each visitor whose
profile it writes, in the same fold (after the visitor's events, only the rules those events
may change): a visitor enters or leaves a segment on the event that puts them there, and the
change is written in the same batch as the profile (their ``segments``, and the segment's
count). Each change is pushed once to the visitor's sockets as a ``segments``
message, and handed to the ``personify_action`` hooks (and so the webhook) for visitors who
consent to marketing.

Some rules change without an event (``days_since_order > 30``), and a new or changed rule
applies to visitors seen before. So every ``[segments] sweep_interval_s``, right after a
segment is created, changed or deleted, and after the propensity scores are learned again
(where a rule names them), a sweep reads every profile of the partitions this worker holds,
computes the RFM cut points and the behavioural clusters again, and sends a ``$segments``
event to each visitor whose membership differs: the profile agent (the only writer) evaluates
them again.

The registry is this worker's (``DATA_DIR/segments.json``); with several workers, define a
segment on each. ``[triggers] high_value_spend`` sets up the ``high_value`` segment.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from array import array
from collections.abc import AsyncIterator
from typing import Any, Final

import mode
import numpy as np
import numpy.typing as npt

from personify.agents.model import current_propensity, shop_clock
from personify.engine.app import app, current_config, publisher
from personify.engine.config import ProfilesConfig
from personify.engine.logging import get_logger
from personify.engine.metrics import SEGMENT_SIZE
from personify.engine.models import internal_event, new_id
from personify.engine.retry import until_done
from personify.tables import clusters, profiles, propensity, store
from personify.tables import segments as rules
from personify.tables.clusters import Clusters
from personify.tables.propensity import Propensity
from personify.tables.segments import RESEGMENT, Registry, profile_rows, rfm_values

__all__ = [
    "HIGH_VALUE",
    "RESEGMENT",
    "differing",
    "registry",
    "scores_of",
    "sweep",
]

_log = get_logger(__name__)

#: The segment ``[triggers] high_value_spend`` sets up.
HIGH_VALUE: Final = "high_value"
#: Fields refitted by a sweep (rules naming them are evaluated after the refit).
_REFITTED: Final = frozenset({"recency", "frequency", "monetary", "cluster"})
_SCORE_FIELDS: Final = frozenset({"purchase_propensity", "churn_propensity"})


def differing(
    registry: Registry,
    profile: dict[str, Any],
    cfg: ProfilesConfig,
    now_ms: int,
    scores: Propensity | None,
    score_ms: int,
) -> bool:
    """Whether the visitor's stored membership differs from what the rules say now.

    ``scores``: the propensity scores in use, computed at ``score_ms`` (the shop's clock).
    """
    stored: list[str] = profile.get("segments", [])
    return registry.members(profile, cfg, now_ms, scores, score_ms) != stored


def scores_of(profile: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """The visitor's RFM scores and learned propensities (None before the first training)."""
    cfg = current_config().profiles
    scores = current_propensity()
    reg = registry()
    facts = rules.Facts(profile, cfg, now_ms, reg.cuts, scores, shop_clock(now_ms), reg.clusters)
    names = ("recency", "frequency", "monetary", "cluster")
    out: dict[str, Any] = {name: facts[name] for name in names}
    for name in ("purchase_propensity", "churn_propensity"):
        value = facts[name]
        out[name] = None if math.isnan(value) else round(value, 4)
    return out


@functools.cache
def registry() -> Registry:
    """This worker's segments."""
    cfg = current_config()
    found = Registry(cfg.data_path / "segments.json", cfg.segments.max_segments)
    threshold = cfg.triggers.high_value_spend
    if threshold > 0:  # the built-in segment is an ordinary one, kept to the configured spend
        rule = f"spend >= {threshold!r}"
        held = found.get(HIGH_VALUE)
        if held is None or held.rule != rule:
            reached = "lifetime spend reached [triggers] high_value_spend"
            doc = {"rule": rule, "description": reached}
            found.put(HIGH_VALUE, doc, int(time.time() * 1000))
    return found


#: Profiles read per turn of the event loop in a sweep.
_SWEEP_SLICE: Final = 200
#: Visitors evaluated again per `RESEGMENT` publish.
_PUBLISH_CHUNK: Final = 500


async def _each_profile() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Every profile of the partitions held, a slice per turn of the event loop."""
    for partition_db in store.TableStore(profiles.table()).dbs().values():
        for n, row in enumerate(profile_rows(partition_db), 1):
            yield row
            if n % _SWEEP_SLICE == 0:
                await asyncio.sleep(0)


async def sweep() -> dict[str, Any]:
    """Compute the RFM cut points again and send `RESEGMENT` to each visitor out of date.

    Returns what it did: profiles read, visitors sent to be evaluated again, seconds.
    """
    started = time.perf_counter()
    reg, cfg = registry(), current_config().profiles
    dbs = store.TableStore(profiles.table()).dbs().values()
    for segment, size in rules.sizes(dbs, [s.id for s in reg.all()]).items():
        SEGMENT_SIZE.labels(segment).set(size)
    now = int(time.time() * 1000)
    values = array("d")
    features: list[npt.NDArray[np.float64]] = []
    stale: list[str] = []
    read = 0
    refit_first = reg.uses(_REFITTED)
    scores, score_ms = current_propensity(), shop_clock(now)
    async for visitor, profile in _each_profile():
        read += 1
        found = rfm_values(profile, now)
        if found is not None:
            values.extend(found)
        if profile.get("last_seen") is not None and not profile.get("alias_of"):
            features.append(propensity.profile_features(profile, score_ms))
        if not refit_first and differing(reg, profile, cfg, now, scores, score_ms):
            stale.append(visitor)
    fitted = await asyncio.to_thread(_fit_clusters, features, now)
    reg.set_cuts(rules.rfm_cuts(values, now), fitted)
    if refit_first:  # the scores and clusters the rules compare are the new ones
        async for visitor, profile in _each_profile():
            if differing(reg, profile, cfg, now, scores, score_ms):
                stale.append(visitor)
    for i in range(0, len(stale), _PUBLISH_CHUNK):
        events = [
            internal_event(
                RESEGMENT, f"{RESEGMENT}:{new_id()}", user_id=v, ts_ms=now, properties={}
            )
            for v in stale[i : i + _PUBLISH_CHUNK]
        ]
        await until_done("segments publish", functools.partial(publisher().publish, events))
    done = {
        "profiles": read,
        "evaluated_again": len(stale),
        "buyers": len(values) // 3,
        "clusters": None if fitted is None else len(fitted.centroids),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _log.info("segments swept", **done)
    return done


def _fit_clusters(features: list[npt.NDArray[np.float64]], now_ms: int) -> Clusters | None:
    """The clusters of the visitors whose feature rows are ``features`` (on a thread)."""
    if len(features) < clusters.MIN_VISITORS:
        return None
    return clusters.fit(np.vstack(features), now_ms)


@app.service
class _Sweeper(mode.Service):  # type: ignore[misc] # mode is untyped
    """Sweeps every ``[segments] sweep_interval_s``, and soon after the rules change.

    Also after the propensity scores are learned again, where a rule names them.
    """

    @mode.Service.task  # type: ignore[untyped-decorator]
    async def _run(self) -> None:
        interval = current_config().segments.sweep_interval_s
        swept_version, swept_at = registry().version, time.monotonic()
        swept_scores = current_propensity()
        while not self.should_stop:
            await self.sleep(1.0)
            changed = registry().version != swept_version
            scores = current_propensity()
            changed = changed or (scores is not swept_scores and registry().uses(_SCORE_FIELDS))
            if not changed and time.monotonic() - swept_at < interval:
                continue
            swept_version, swept_at, swept_scores = registry().version, time.monotonic(), scores
            try:
                await sweep()
            except Exception:  # never stop sweeping: the next one reads everything again
                _log.exception("segments sweep failed; the next one reads every profile again")
