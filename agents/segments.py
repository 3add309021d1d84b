"""Rule segments: defined over HTTP, kept live by the profile agent, swept on a schedule.

A segment is a rule over the visitor's profile (the language: `personify.tables.segments`).
The profile agent evaluates every rule for each visitor whose profile it writes, in the same
fold: a visitor enters or leaves a segment on the event that puts them there, and the change
is written in the same batch as the profile (their ``segments``, a member row, the segment's
count). Each change is pushed once to the visitor's sockets as a ``segments`` message and
handed to the ``personify_action`` hooks (and so the webhook).

Some rules change without an event (``days_since_order > 30``), and a new or changed rule
applies to visitors seen before. So every ``[segments] sweep_interval_s``, and right after a
segment is created, changed or deleted, a sweep reads every profile of the partitions this
worker holds, computes the RFM cut points again, and sends a ``$segments`` event to each
visitor whose membership differs: the profile agent (the only writer) evaluates them again.

The registry is this worker's (``DATA_DIR/segments.json``); with several workers, define a
segment on each.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from array import array
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import mode
import orjson

from personify.agents.model import current_propensity, shop_clock
from personify.engine.app import app, current_config, publisher
from personify.engine.config import ProfilesConfig
from personify.engine.errors import ValidationError
from personify.engine.files import write_json
from personify.engine.logging import get_logger
from personify.engine.metrics import SEGMENT_SIZE
from personify.engine.models import format_ts, internal_event, new_id
from personify.engine.retry import until_done
from personify.tables import profiles, store
from personify.tables import segments as rules
from personify.tables.propensity import Propensity
from personify.tables.signals import PREFIX

__all__ = [
    "HIGH_VALUE",
    "RESEGMENT",
    "Registry",
    "Segment",
    "differing",
    "profile_rows",
    "registry",
    "rfm_values",
    "scores_of",
    "sweep",
]

_log = get_logger(__name__)

_ID: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: The segment ``[triggers] high_value_spend`` sets up.
HIGH_VALUE: Final = "high_value"
#: An internal event: evaluate the visitor's segments again (a sweep found them out of date).
RESEGMENT: Final = "$segments"
_RFM_FIELDS: Final = frozenset({"recency", "frequency", "monetary"})
_SCORE_FIELDS: Final = frozenset({"purchase_propensity", "churn_propensity"})
#: Rows of a profiles database that are not profiles: the engine's own, and Faust's.
_NOT_PROFILES: Final = (PREFIX, b"__faust")


@dataclass(frozen=True, slots=True)
class Segment:
    """A rule segment.

    Attributes:
        id: its id.
        rule: its rule (`personify.tables.segments`).
        description: what it is for, in words.
        created: when it was first defined (ISO-8601).
        updated: when its rule last changed (ISO-8601).
    """

    id: str
    rule: str
    description: str
    created: str
    updated: str

    def as_json(self, size: int | None = None) -> dict[str, Any]:
        """The wire form (with its size where known)."""
        out: dict[str, Any] = {
            "id": self.id,
            "rule": self.rule,
            "description": self.description,
            "created": self.created,
            "updated": self.updated,
        }
        if size is not None:
            out["size"] = size
        return out


class Registry:
    """The segments defined here, their compiled rules and the RFM cut points (saved)."""

    def __init__(self, path: Path, max_segments: int = 100) -> None:
        self.path = path
        self.max_segments = max_segments
        self._all: dict[str, Segment] = {}
        self.cuts = rules.Cuts()
        #: Bumped on every change of the rules (a sweep is due).
        self.version = 0
        self._rules = rules.Rules({})
        if path.exists():
            doc = orjson.loads(path.read_bytes())
            for raw in doc.get("segments", []):
                segment = Segment(**raw)
                self._all[segment.id] = segment
            self.cuts = rules.Cuts.from_json(doc.get("cuts", {}))
            self._compile()

    def _compile(self) -> None:
        self._rules = rules.Rules({s.id: s.rule for s in self._all.values()})
        self.version += 1

    def _save(self) -> None:
        write_json(
            self.path,
            {
                "segments": [s.as_json() for s in self._all.values()],
                "cuts": self.cuts.as_json(),
            },
        )

    @property
    def compiled(self) -> rules.Rules:
        """Every segment's rule, compiled together."""
        return self._rules

    def uses(self, fields: frozenset[str]) -> bool:
        """Whether a rule names one of ``fields``."""
        return any(fields & set(re.findall(r"[a-z_]+", s.rule)) for s in self._all.values())

    def uses_rfm(self) -> bool:
        """Whether a rule names an RFM score."""
        return self.uses(_RFM_FIELDS)

    def all(self) -> list[Segment]:
        """Every segment, by id."""
        return sorted(self._all.values(), key=lambda s: s.id)

    def get(self, segment_id: str) -> Segment | None:
        """The segment ``segment_id``, if there is one."""
        return self._all.get(segment_id)

    def put(self, segment_id: str, doc: Any, now_ms: int) -> tuple[Segment, bool]:
        """Create or replace a segment from its wire form; (the segment, whether it is new)."""
        if not _ID.match(segment_id):
            raise ValidationError("id", "expected 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(doc, dict):
            raise ValidationError("body", f"expected an object, got {type(doc).__name__}")
        unknown = set(doc) - {"rule", "description"}
        if unknown:
            raise ValidationError(sorted(unknown)[0], "unknown field")
        rule = rules.check_rule(doc.get("rule"))
        description = doc.get("description", "")
        if not isinstance(description, str) or len(description) > 500:
            raise ValidationError("description", "expected a string of at most 500 characters")
        old = self._all.get(segment_id)
        if old is None and len(self._all) >= self.max_segments:
            raise ValidationError(
                "id",
                f"at most {self.max_segments} segments ([segments] max_segments); delete one",
            )
        now = format_ts(now_ms)
        segment = Segment(
            id=segment_id,
            rule=rule,
            description=description,
            created=now if old is None else old.created,
            updated=now if old is None or old.rule != rule else old.updated,
        )
        self._all[segment_id] = segment
        self._compile()
        self._save()
        return segment, old is None

    def delete(self, segment_id: str) -> bool:
        """Forget the segment (its members leave it on the next sweep); whether there was one."""
        if self._all.pop(segment_id, None) is None:
            return False
        self._compile()
        self._save()
        return True

    def set_cuts(self, cuts: rules.Cuts) -> None:
        """New RFM cut points (saved)."""
        self.cuts = cuts
        self._save()

    def members(
        self,
        profile: dict[str, Any],
        cfg: ProfilesConfig,
        now_ms: int,
        scores: Propensity | None = None,
        score_ms: int | None = None,
    ) -> list[str]:
        """The segments the visitor of ``profile`` is in at ``now_ms``.

        None for a visitor linked to a user (their profile moved to the user's). ``scores``:
        the learned propensity scores, computed at ``score_ms`` (default ``now_ms``).
        """
        if profile.get("alias_of") or not len(self._rules):
            return []
        facts = rules.Facts(profile, cfg, now_ms, self.cuts, scores, score_ms)
        return list(self._rules.members(facts))


def rfm_values(profile: dict[str, Any], now_ms: int) -> tuple[float, float, float] | None:
    """(days since the last order, orders, spend) of a visitor who ordered, else None."""
    last = profile.get("last_order")
    if not profile.get("orders") or last is None or profile.get("alias_of"):
        return None
    return (max(now_ms - last, 0) / 86_400_000, float(profile["orders"]), float(profile["spend"]))


def profile_rows(partition_db: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(visitor, profile) of every profile in a partition's database."""
    it = partition_db.iter()
    it.seek_to_first()
    while it.valid():
        key: bytes = it.key()
        if not key.startswith(_NOT_PROFILES):
            value = it.value()
            if value:
                yield key.decode(), orjson.loads(value)
        it.next()


def differing(
    registry: Registry, profile: dict[str, Any], cfg: ProfilesConfig, now_ms: int
) -> bool:
    """Whether the visitor's stored membership differs from what the rules say now."""
    stored: list[str] = profile.get("segments", [])
    return (
        registry.members(profile, cfg, now_ms, current_propensity(), shop_clock(now_ms)) != stored
    )


def scores_of(profile: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """The visitor's RFM scores and learned propensities (None before the first training)."""
    cfg = current_config().profiles
    scores = current_propensity()
    facts = rules.Facts(profile, cfg, now_ms, registry().cuts, scores, shop_clock(now_ms))
    out: dict[str, Any] = {name: facts[name] for name in ("recency", "frequency", "monetary")}
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
    stale: list[str] = []
    read = 0
    rfm_first = reg.uses_rfm()
    async for visitor, profile in _each_profile():
        read += 1
        found = rfm_values(profile, now)
        if found is not None:
            values.extend(found)
        if not rfm_first and differing(reg, profile, cfg, now):
            stale.append(visitor)
    reg.set_cuts(rules.rfm_cuts(values, now))
    if rfm_first:  # the scores the rules compare are the new ones
        async for visitor, profile in _each_profile():
            if differing(reg, profile, cfg, now):
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
        "seconds": round(time.perf_counter() - started, 3),
    }
    _log.info("segments swept", **done)
    return done


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
