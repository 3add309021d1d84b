"""A/B/n experiments on the ranking settings, with results a shop can look at every hour.

An experiment splits a share of the visitors (``traffic``) between named variants, each a set
of overrides of the ranking settings (blend weights and ``seed_half_life`` as the self-tuning
names them, the learned ranker on or off, the re-ranking plugins on or off). Experiments
never share a visitor: each holds its own slice of one hash of the visitor id, so their
traffic adds up to at most 1 and two experiments never mix their effects. Within its slice a
second hash, of the experiment and the visitor, picks the variant by the variants' shares.
Both are the same on every worker and after a restart. The variant a visitor is first served
in is kept with their exposures (`personify.tables.attribution`) and wins from then on: an
anonymous visitor who logs in keeps their variant.

An experiment can instead allocate its visitors by Thompson sampling (``allocation =
"thompson"``): each visitor new to it goes to the variant that wins a draw from each variant's
Beta posterior of its ``goal`` (the share of its visitors who clicked, or who bought), the
counts read live (at most a second old), except that a ``floor`` share of the visitors is dealt
evenly, so every variant keeps learning. A visitor keeps the variant drawn.

Results per variant count each visitor once, in the variant they were first served: visitors,
visitors who clicked a list's item, visitors who bought one, and their attributed revenue.
Confidence intervals and the test against the control are *always valid* (a mixture
sequential probability ratio test, Johari et al., "Always valid inference", 2017): the
false-positive rate stays at most ``alpha`` however often the results are looked at, so a
shop can check every hour and stop as soon as a difference is significant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import blake2b
from pathlib import Path
from typing import Any, Final

import orjson

from personify.agents.tuning import SPACE
from personify.engine.app import current_config
from personify.engine.errors import ValidationError
from personify.engine.files import write_json
from personify.engine.logging import get_logger
from personify.tables import attribution

__all__ = [
    "Experiment",
    "Registry",
    "Variant",
    "bucket",
    "experiments",
    "results",
]

_log = get_logger(__name__)

_ID: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Thompson sampling reads the counts again once they are this old.
_COUNTS_MAX_AGE_MS: Final = 1000
#: Variants drawn and remembered at most (their exposures keep them once applied).
_DRAWN_KEPT: Final = 100_000
_MAX_VARIANTS: Final = 10
#: The largest list size a variant may ask for.
_MAX_SIZE: Final = 100
#: The hash that gives each visitor their place among the experiments' slices.
_SLICE_SALT: Final = "personify-experiments"


def bucket(salt: str, visitor: str) -> float:
    """A number in [0, 1) fixed by ``salt`` and ``visitor`` (uniform over visitors)."""
    digest = blake2b(f"{salt}\0{visitor}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True, slots=True)
class Variant:
    """One arm of an experiment.

    Attributes:
        name: its name (the control's is the experiment's ``control``).
        share: its share of the experiment's visitors.
        setting: ranking settings it overrides (names as the self-tuning's, e.g.
            ``weights.collab`` or ``seed_half_life``).
        ranker: whether the learned ranker re-orders its lists (where there is one).
        rerank: whether the re-ranking plugins re-order its lists.
        size: how many items its lists show where the request names no ``k``, and on the
            WebSocket (None: as configured; at most ``[recommend] list_size``).
    """

    name: str
    share: float
    setting: dict[str, float] = field(default_factory=dict)
    ranker: bool = True
    rerank: bool = True
    size: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "name": self.name,
            "share": self.share,
            "setting": self.setting,
            "ranker": self.ranker,
            "rerank": self.rerank,
            "size": self.size,
        }


@dataclass(frozen=True, slots=True)
class Experiment:
    """An experiment (see the module).

    Attributes:
        id: its id.
        variants: its arms.
        control: the name of the arm the others are compared with.
        traffic: the share of all visitors in it.
        offset: where its slice of the visitors starts.
        start_ms: when it starts (epoch ms; None: at once).
        stop_ms: when it stops (None: when deleted or promoted).
        created: when it was first put (ISO 8601).
        promoted: the variant promoted to the default setting, if any (it stopped then).
        segment: only visitors in this rule segment enter it (None: everyone in its slice).
    """

    id: str
    variants: tuple[Variant, ...]
    control: str
    traffic: float
    offset: float
    start_ms: int | None
    stop_ms: int | None
    created: str
    promoted: str | None = None
    allocation: str = "split"
    goal: str = "conversion"
    floor: float = 0.05
    segment: str | None = None

    def running(self, now_ms: int) -> bool:
        """Whether visitors are served its variants at ``now_ms``."""
        if self.start_ms is not None and now_ms < self.start_ms:
            return False
        return self.stop_ms is None or now_ms < self.stop_ms

    def variant(self, name: str) -> Variant | None:
        """The variant called ``name``."""
        return next((v for v in self.variants if v.name == name), None)

    def pick(self, visitor: str) -> Variant:
        """The variant ``visitor`` falls in by the variants' shares."""
        point = bucket(self.id, visitor) * sum(v.share for v in self.variants)
        for v in self.variants:
            point -= v.share
            if point < 0:
                return v
        return self.variants[-1]

    def draw(self, visitor: str, counts: Mapping[str, Mapping[str, float]], now_ms: int) -> Variant:
        """A Thompson draw for ``visitor`` new to the experiment (see the module)."""
        digest = blake2b(f"{self.id}\0{visitor}\0{now_ms}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "big"))
        arms = len(self.variants)
        if rng.random() < self.floor * arms:
            return self.variants[rng.randrange(arms)]
        success = "clickers" if self.goal == "click" else "converters"
        best, best_draw = self.variants[0], -1.0
        for v in self.variants:
            mine = counts.get(v.name, {})
            wins = mine.get(success, 0.0)
            losses = max(mine.get("visitors", 0.0) - wins, 0.0)
            value = rng.betavariate(1.0 + wins, 1.0 + losses)
            if value > best_draw:
                best, best_draw = v, value
        return best

    def as_json(self, now_ms: int | None = None) -> dict[str, Any]:
        """The wire form."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return {
            "id": self.id,
            "variants": [v.as_json() for v in self.variants],
            "control": self.control,
            "traffic": self.traffic,
            "offset": self.offset,
            "start": _iso(self.start_ms),
            "stop": _iso(self.stop_ms),
            "created": self.created,
            "promoted": self.promoted,
            "running": self.running(now_ms),
            "allocation": self.allocation,
            "goal": self.goal,
            "floor": self.floor,
            "segment": self.segment,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Experiment:
        """Read back `as_json`'s form."""
        return cls(
            id=doc["id"],
            variants=tuple(
                Variant(
                    v["name"],
                    v["share"],
                    dict(v["setting"]),
                    v["ranker"],
                    v["rerank"],
                    v.get("size"),
                )
                for v in doc["variants"]
            ),
            control=doc["control"],
            traffic=doc["traffic"],
            offset=doc["offset"],
            start_ms=_ms(doc["start"]),
            stop_ms=_ms(doc["stop"]),
            created=doc["created"],
            promoted=doc.get("promoted"),
            allocation=doc.get("allocation", "split"),
            goal=doc.get("goal", "conversion"),
            floor=doc.get("floor", 0.05),
            segment=doc.get("segment"),
        )


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _ms(text: str | None) -> int | None:
    return None if text is None else int(_parse_time(text, "start") or 0)


def _parse_time(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(where, f"expected an ISO 8601 time or null, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(where, f"expected an ISO 8601 time, got {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(where, f"expected a number, got {value!r}")
    if not low <= value <= high:
        raise ValidationError(where, f"expected {low:g} to {high:g}, got {value!r}")
    return float(value)


def _flag(doc: Mapping[str, Any], name: str, where: str) -> bool:
    value = doc.get(name, True)
    if not isinstance(value, bool):
        raise ValidationError(f"{where}.{name}", f"expected true or false, got {value!r}")
    return value


def _variant(doc: Any, where: str) -> Variant:
    if not isinstance(doc, dict):
        raise ValidationError(where, f"expected an object, got {doc!r}")
    unknown = set(doc) - {"name", "share", "setting", "ranker", "rerank", "size"}
    if unknown:
        raise ValidationError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    name = doc.get("name")
    if not isinstance(name, str) or not _ID.match(name):
        raise ValidationError(f"{where}.name", "expected 1-64 letters, digits, '_', '.' or '-'")
    share = _number(doc.get("share", 1.0), f"{where}.share", 0.0, 1e6)
    setting_doc = doc.get("setting", {})
    if not isinstance(setting_doc, dict):
        raise ValidationError(f"{where}.setting", f"expected an object, got {setting_doc!r}")
    setting: dict[str, float] = {}
    for key, value in setting_doc.items():
        if key not in SPACE:
            raise ValidationError(
                f"{where}.setting.{key}", f"unknown setting; known: {', '.join(SPACE)}"
            )
        _low, high, _log_scale = SPACE[key]
        setting[key] = _number(value, f"{where}.setting.{key}", 0.0, high)
    size = doc.get("size")
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= _MAX_SIZE
    ):
        raise ValidationError(f"{where}.size", f"expected an integer 1-{_MAX_SIZE}, got {size!r}")
    return Variant(
        name, share, setting, _flag(doc, "ranker", where), _flag(doc, "rerank", where), size
    )


class Registry:
    """The experiments, kept in one file (``DATA_DIR/experiments.json``) and in memory.

    Args:
        path: the file (read at once if it exists).
        counts: an experiment's counts per variant (for Thompson sampling; None: none yet).
    """

    def __init__(
        self,
        path: Path,
        counts: Callable[[str], Mapping[str, Mapping[str, float]]] | None = None,
    ) -> None:
        self.path = path
        self._counts = counts
        #: Counts read for Thompson sampling: experiment -> (when, in ms; counts).
        self._read: dict[str, tuple[int, Mapping[str, Mapping[str, float]]]] = {}
        #: Variants drawn lately, until the exposure that keeps them is applied.
        self._drawn: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._all: dict[str, Experiment] = {}
        #: Goes up with every change: lists ranked before one are ranked again.
        self.version = 0
        try:
            doc = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return
        for raw in doc.get("experiments", []):
            experiment = Experiment.from_json(raw)
            self._all[experiment.id] = experiment

    def __len__(self) -> int:
        return len(self._all)

    def get(self, experiment_id: str) -> Experiment | None:
        """The experiment of this id."""
        return self._all.get(experiment_id)

    def all(self) -> list[Experiment]:
        """Every experiment, oldest first."""
        return sorted(self._all.values(), key=lambda e: (e.created, e.id))

    def _save(self) -> None:
        write_json(self.path, {"experiments": [e.as_json() for e in self.all()]})
        self.version += 1

    def _slice(self, experiment_id: str, traffic: float, now_ms: int) -> float:
        """Where a slice of ``traffic`` fits among the other experiments still running."""
        taken = sorted(
            (e.offset, e.offset + e.traffic)
            for e in self._all.values()
            if e.id != experiment_id and (e.stop_ms is None or e.stop_ms > now_ms)
        )
        start = 0.0
        for low, high in taken:
            if low - start >= traffic - 1e-12:
                return start
            start = max(start, high)
        if 1.0 - start >= traffic - 1e-12:
            return start
        free = 1.0 - sum(high - low for low, high in taken)
        raise ValidationError(
            "traffic",
            f"only {free:.4g} of the visitors are not in another experiment (experiments never "
            "share a visitor); stop or delete one, or ask for less",
        )

    def put(self, experiment_id: str, doc: Any, now_ms: int) -> Experiment:
        """Create or replace the experiment ``experiment_id`` from its wire form."""
        if not _ID.match(experiment_id):
            raise ValidationError("id", "expected 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(doc, dict):
            raise ValidationError("body", f"expected an object, got {type(doc).__name__}")
        unknown = set(doc) - {
            "variants",
            "control",
            "traffic",
            "start",
            "stop",
            "allocation",
            "goal",
            "floor",
            "segment",
        }
        if unknown:
            raise ValidationError(sorted(unknown)[0], "unknown field")
        raw_variants = doc.get("variants")
        if not isinstance(raw_variants, list) or not 2 <= len(raw_variants) <= _MAX_VARIANTS:
            raise ValidationError("variants", f"expected a list of 2-{_MAX_VARIANTS} variants")
        variants = tuple(_variant(v, f"variants[{i}]") for i, v in enumerate(raw_variants))
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValidationError("variants", "variant names must differ")
        if sum(v.share for v in variants) <= 0:
            raise ValidationError("variants", "expected at least one share above 0")
        control = doc.get("control", names[0])
        if control not in names:
            raise ValidationError("control", f"expected one of {', '.join(names)}, got {control!r}")
        traffic = _number(doc.get("traffic", 1.0), "traffic", 0.0, 1.0)
        start_ms = _parse_time(doc.get("start"), "start")
        stop_ms = _parse_time(doc.get("stop"), "stop")
        if start_ms is not None and stop_ms is not None and stop_ms <= start_ms:
            raise ValidationError("stop", "expected a time after start")
        allocation = doc.get("allocation", "split")
        if allocation not in ("split", "thompson"):
            raise ValidationError("allocation", f"expected split or thompson, got {allocation!r}")
        goal = doc.get("goal", "conversion")
        if goal not in ("click", "conversion"):
            raise ValidationError("goal", f"expected click or conversion, got {goal!r}")
        floor = _number(doc.get("floor", 0.05), "floor", 0.0, 1.0 / len(variants))
        segment = doc.get("segment")
        if segment is not None and (not isinstance(segment, str) or not _ID.match(segment)):
            raise ValidationError("segment", "expected a segment id (PUT /v1/segments/{id})")
        old = self._all.get(experiment_id)
        experiment = Experiment(
            id=experiment_id,
            variants=variants,
            control=control,
            traffic=traffic,
            offset=self._slice(experiment_id, traffic, now_ms),
            start_ms=start_ms,
            stop_ms=stop_ms,
            created=old.created if old is not None else str(_iso(now_ms)),
            allocation=allocation,
            goal=goal,
            floor=floor,
            segment=segment,
        )
        self._all[experiment_id] = experiment
        self._save()
        return experiment

    def delete(self, experiment_id: str) -> bool:
        """Forget the experiment (its counts stay in the tables); whether there was one."""
        if self._all.pop(experiment_id, None) is None:
            return False
        self._save()
        return True

    def stop(self, experiment_id: str, now_ms: int, promoted: str | None = None) -> Experiment:
        """Stop the experiment now (``promoted``: the variant that became the default)."""
        experiment = self._all[experiment_id]
        stop_ms = now_ms if experiment.stop_ms is None else min(experiment.stop_ms, now_ms)
        stopped = dataclasses.replace(experiment, stop_ms=stop_ms, promoted=promoted)
        self._all[experiment_id] = stopped
        self._save()
        return stopped

    def size_of(self, variant: str) -> int | None:
        """The list size of the variant named ``variant`` (`attribution.label`), if it sets one."""
        experiment_id, _, name = variant.partition("/")
        experiment = self._all.get(experiment_id) if name else None
        chosen = None if experiment is None else experiment.variant(name)
        return None if chosen is None else chosen.size

    def running(self, now_ms: int) -> list[Experiment]:
        """The experiments running at ``now_ms``."""
        return [e for e in self._all.values() if e.running(now_ms)]

    def targeted(self, now_ms: int) -> bool:
        """Whether a running experiment takes only the visitors of a segment."""
        return any(e.segment is not None for e in self.running(now_ms))

    def assign(
        self,
        visitor: str,
        kept: Mapping[str, str],
        now_ms: int,
        segments: Collection[str] = (),
    ) -> tuple[Experiment, Variant] | None:
        """The running experiment and variant ``visitor`` is in, or None.

        ``kept``: the variants the visitor was served before (experiment -> variant): where
        one of them is running, it wins over the hashes (a visitor who has left the segment of
        an experiment they were served in keeps their variant). ``segments``: the rule
        segments the visitor is in: an experiment with a segment takes only its visitors.
        """
        running = self.running(now_ms)
        if not running:
            return None
        for experiment in running:
            name = kept.get(experiment.id)
            chosen = None if name is None else experiment.variant(name)
            if chosen is not None:
                return experiment, chosen
        point = bucket(_SLICE_SALT, visitor)
        for experiment in running:
            if experiment.segment is not None and experiment.segment not in segments:
                continue
            if experiment.offset <= point < experiment.offset + experiment.traffic:
                if experiment.allocation == "thompson":
                    return experiment, self._thompson(experiment, visitor, now_ms)
                return experiment, experiment.pick(visitor)
        return None

    def _thompson(self, experiment: Experiment, visitor: str, now_ms: int) -> Variant:
        key = (experiment.id, visitor)
        drawn = self._drawn.get(key)
        chosen = None if drawn is None else experiment.variant(drawn)
        if chosen is not None:
            return chosen
        read = self._read.get(experiment.id)
        if read is None or now_ms - read[0] >= _COUNTS_MAX_AGE_MS:
            counts = {} if self._counts is None else self._counts(experiment.id)
            read = self._read[experiment.id] = (now_ms, counts)
        chosen = experiment.draw(visitor, read[1], now_ms)
        self._drawn[key] = chosen.name
        while len(self._drawn) > _DRAWN_KEPT:
            self._drawn.popitem(last=False)
        return chosen


@functools.cache
def experiments() -> Registry:
    """This worker's experiments."""
    # Imported here: the recorder's module starts a timer of the app (the engine's, not a test's).
    from personify.agents.exposures import experiment_counts

    return Registry(current_config().data_path / "experiments.json", experiment_counts)


# -- results ------------------------------------------------------------------------------


def _mixture_p(theta: float, variance: float, tau2: float) -> float:
    """The always-valid p-value of a difference ``theta`` of estimated ``variance``."""
    if variance <= 0:
        return 1.0 if theta == 0 else 0.0
    log_lr = 0.5 * math.log(variance / (variance + tau2)) + (
        tau2 * theta * theta / (2 * variance * (variance + tau2))
    )
    return 1.0 if log_lr <= 0 else min(1.0, math.exp(-log_lr))


def _half_width(variance: float, tau2: float, alpha: float) -> float:
    """The half-width of the always-valid interval for a mean of estimated ``variance``."""
    if variance <= 0:
        return 0.0
    spread = variance + tau2
    bound = 0.5 * math.log(spread / variance) + math.log(1 / alpha)
    return math.sqrt(2 * variance * spread / tau2 * bound)


def _estimate(total: float, squares: float, n: float) -> tuple[float, float]:
    """Mean and variance of the mean, from a sum and a sum of squares over ``n`` visitors."""
    mean = total / n
    return mean, max(squares / n - mean * mean, 0.0) / n


def _interval(mean: float, variance: float, tau2: float, alpha: float) -> list[float]:
    width = _half_width(variance, tau2, alpha)
    return [round(mean - width, 6), round(mean + width, 6)]


_METRICS: Final = {
    # metric -> (count summed, its squares: for 0/1 per visitor the same count)
    "click_rate": ("clickers", "clickers"),
    "conversion": ("converters", "converters"),
    "revenue_per_visitor": ("revenue", "revenue_squares"),
}


def results(
    experiment: Experiment,
    counts: Mapping[str, Mapping[str, float]],
    *,
    alpha: float,
    effect: float,
) -> dict[str, Any]:
    """Per-variant figures with always-valid intervals, and each variant against the control.

    Args:
        experiment: the experiment.
        counts: per variant, its counts since it started (`attribution.EXPERIMENT_COUNTS`).
        alpha: the error rate the intervals and tests keep, however often they are looked at.
        effect: the relative difference the test is most sensitive to (the mixture's spread is
            this share of the control's mean).
    """
    out_variants: list[dict[str, Any]] = []
    control = counts.get(experiment.control, {})
    n_control = control.get("visitors", 0.0)
    for variant in experiment.variants:
        mine = counts.get(variant.name, {})
        n = mine.get("visitors", 0.0)
        row: dict[str, Any] = {
            "name": variant.name,
            "control": variant.name == experiment.control,
            **{c: _round(mine.get(c, 0.0)) for c in attribution.EXPERIMENT_COUNTS},
        }
        del row["revenue_squares"]
        for metric, (total, squares) in _METRICS.items():
            if n < 2:
                row[metric] = {"value": None, "interval": None}
                continue
            mean, variance = _estimate(mine.get(total, 0.0), mine.get(squares, 0.0), n)
            base = control.get(total, 0.0) / n_control if n_control else mean
            tau2 = (effect * max(base, 1e-9)) ** 2
            entry: dict[str, Any] = {
                "value": round(mean, 6),
                "interval": _interval(mean, variance, tau2, alpha),
            }
            if variant.name != experiment.control and n_control >= 2:
                c_mean, c_var = _estimate(
                    control.get(total, 0.0), control.get(squares, 0.0), n_control
                )
                theta, both = mean - c_mean, variance + c_var
                p_value = _mixture_p(theta, both, tau2)
                entry["lift"] = {
                    "absolute": round(theta, 6),
                    "relative": round(theta / c_mean, 6) if c_mean else None,
                    "interval": _interval(theta, both, tau2, alpha),
                    "p_value": round(p_value, 6),
                    "significant": p_value < alpha,
                }
            row[metric] = entry
        out_variants.append(row)
    return {
        "experiment": experiment.as_json(),
        "alpha": alpha,
        "variants": out_variants,
        "test": "mixture sequential probability ratio test (always valid: look at any time)",
    }


def _round(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 4)
