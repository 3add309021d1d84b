"""What recommendations earn: lists served (exposures) joined to what visitors do next.

Every list served to a visitor is recorded as an exposure: an engine event (`EXPOSURE`) that
the profile agent applies like the visitor's own events. A visitor's newest exposures are kept
in their attribution row beside the profile (`row_key`); their outcome events (`OUTCOMES`) are
joined to one of them:

- an event carrying a ``recommendation_id`` to the exposure of that id, while it is kept (one
  that arrives before the exposure, which is sent on in batches, waits for it);
- else a click, a cart addition and each line of a purchase to the newest exposure that showed
  its item at most ``[attribution] window_s`` before the event (`_SKEW_MS` after it is allowed
  too: the event's time comes from the visitor's device, the exposure's from the server).

Counts go to one KPI row per partition and UTC day (`kpi_key`), written in the same RocksDB
write batch as the profiles and the partition's applied position: a replayed or redelivered
event is skipped by position, so each counts once. KPI rows hold counts only, no visitor ids.
Nothing counts without the visitor's ``analytics`` consent (the caller checks it); withdrawing
it drops the exposures kept.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal

import orjson

from personify.engine.config import AttributionConfig
from personify.engine.models import Event
from personify.tables.signals import PREFIX

__all__ = [
    "DEFAULT_VARIANT",
    "EXPERIMENT_COUNTS",
    "EXPERIMENT_PREFIX",
    "EXPOSURE",
    "KPI_PREFIX",
    "OUTCOMES",
    "SOURCE_COUNTS",
    "VARIANT_COUNTS",
    "Attribution",
    "Grouping",
    "Tally",
    "day_of",
    "experiment_counts",
    "experiment_key",
    "expired_kpi_keys",
    "kpi_key",
    "label",
    "report",
    "row_key",
]

#: The engine's event recording a list served to the visitor (properties: recommendation_id,
#: variant, surface, items, sources).
EXPOSURE: Final = "$exposure"
#: The visitor's events that can be joined to an exposure.
OUTCOMES: Final = frozenset({"impression", "click", "add_to_cart", "purchase"})
#: The variant of a list served outside any experiment.
DEFAULT_VARIANT: Final = "default"
#: A visitor's attribution row: key prefix (then the visitor id).
ROW_PREFIX: Final = PREFIX + b"x"
#: A partition's KPI row of one day: key prefix (then the day, YYYY-MM-DD).
KPI_PREFIX: Final = PREFIX + b"k"
#: A partition's counts of one experiment since it started: key prefix (then its id).
EXPERIMENT_PREFIX: Final = PREFIX + b"e"
#: Experiments a visitor's row remembers their variant in, at most (the oldest go first).
_EXPERIMENTS_KEPT: Final = 20
#: Outcomes naming a list not recorded yet, kept at most (the oldest go first): a click can
#: arrive before the exposure of the list it was on (exposures are sent on in batches).
_WAITING_KEPT: Final = 20
#: How far an outcome's time may precede the exposure it is joined to (device clocks drift).
_SKEW_MS: Final = 300_000
#: In a visitor's days served and converted: the last day they counted for any variant.
_ANY_VARIANT: Final = "*"
_DAY_MS: Final = 86_400_000

#: Counted per variant: lists served, distinct visitors served (per day), outcomes joined,
#: attributed orders and the distinct visitors who placed one (per day), the revenue of the
#: attributed purchase lines and the whole revenue of those orders.
VARIANT_COUNTS: Final = (
    "exposures",
    "visitors",
    "impressions",
    "clicks",
    "add_to_carts",
    "orders",
    "converters",
    "revenue",
    "order_revenue",
)
#: Counted per candidate source (an item's strongest reason): items shown, and the outcomes
#: and revenue of the items it brought.
SOURCE_COUNTS: Final = ("shown", "clicks", "add_to_carts", "orders", "revenue")
#: Counted per variant of an experiment since it started, each visitor in the variant they were
#: first served: visitors, visitors who clicked, visitors who placed an attributed order, and
#: the sum and the sum of squares of each visitor's attributed revenue.
EXPERIMENT_COUNTS: Final = (
    "visitors",
    "exposures",
    "clickers",
    "converters",
    "revenue",
    "revenue_squares",
)

By = Literal["variant", "source", "segment"]
Counts = dict[str, float]


def row_key(visitor: str) -> bytes:
    """The table key of ``visitor``'s attribution row."""
    return ROW_PREFIX + visitor.encode()


def kpi_key(day: str) -> bytes:
    """The table key of a partition's KPI row of ``day`` (YYYY-MM-DD)."""
    return KPI_PREFIX + day.encode()


def experiment_key(experiment: str) -> bytes:
    """The table key of a partition's counts of ``experiment``."""
    return EXPERIMENT_PREFIX + experiment.encode()


def label(experiment: str | None, variant: str) -> str:
    """The name KPIs count a variant under: ``experiment/variant``, or `DEFAULT_VARIANT`."""
    return f"{experiment}/{variant}" if experiment else DEFAULT_VARIANT


def _experiment_of(name: str) -> str | None:
    experiment, slash, _variant = name.partition("/")
    return experiment if slash else None


@functools.lru_cache(maxsize=64)
def _day(number: int) -> str:
    return (date(1970, 1, 1) + timedelta(days=number)).isoformat()


def day_of(ts_ms: int) -> str:
    """The UTC day of ``ts_ms`` as YYYY-MM-DD."""
    return _day(ts_ms // _DAY_MS)


class Tally:
    """The KPI counts a round adds, per day, then per ``variant`` or ``source`` and name."""

    def __init__(self) -> None:
        self.days: dict[str, dict[str, dict[str, Counts]]] = {}
        #: Experiment -> variant -> counts since it started.
        self.experiments: dict[str, dict[str, Counts]] = {}

    def __bool__(self) -> bool:
        return bool(self.days) or bool(self.experiments)

    def add_experiment(
        self, experiment: str, variant: str, count: str, amount: float = 1.0
    ) -> None:
        """Add ``amount`` to ``count`` of ``variant`` of ``experiment``."""
        counts = self.experiments.setdefault(experiment, {}).setdefault(variant, {})
        counts[count] = counts.get(count, 0.0) + amount

    def experiment_added_to(self, experiment: str, raw: bytes | None) -> bytes:
        """The counts of ``experiment`` (stored as ``raw``) with this round's added."""
        row: dict[str, Counts] = orjson.loads(raw) if raw else {}
        for variant, counts in self.experiments.get(experiment, {}).items():
            into = row.setdefault(variant, {})
            for count, amount in counts.items():
                into[count] = into.get(count, 0.0) + amount
        return orjson.dumps(row)

    def add(self, day: str, by: By, name: str, count: str, amount: float = 1.0) -> None:
        """Add ``amount`` to ``count`` of ``name`` (a variant, a source or a segment) on ``day``."""
        counts = self.days.setdefault(day, {}).setdefault(by, {}).setdefault(name, {})
        counts[count] = counts.get(count, 0.0) + amount

    def merge(self, other: Tally) -> None:
        """Add ``other``'s counts."""
        for day, names_by in other.days.items():
            for by, names in names_by.items():
                for name, counts in names.items():
                    for count, amount in counts.items():
                        self.add(day, by, name, count, amount)  # type: ignore[arg-type]
        for experiment, variants in other.experiments.items():
            for variant, counts in variants.items():
                for count, amount in counts.items():
                    self.add_experiment(experiment, variant, count, amount)

    def added_to(self, day: str, raw: bytes | None) -> bytes:
        """The KPI row of ``day`` (stored as ``raw``) with this round's counts added."""
        row: dict[str, dict[str, Counts]] = orjson.loads(raw) if raw else {}
        for by, names in self.days.get(day, {}).items():
            stored = row.setdefault(by, {})
            for name, counts in names.items():
                into = stored.setdefault(name, {})
                for count, amount in counts.items():
                    into[count] = into.get(count, 0.0) + amount
        return orjson.dumps(row)

    def totals(self) -> Iterator[tuple[str, str, str, float]]:
        """Every (by, name, count, amount) added, all days together (for the metrics)."""
        summed: dict[tuple[str, str, str], float] = {}
        for names_by in self.days.values():
            for by, names in names_by.items():
                for name, counts in names.items():
                    for count, amount in counts.items():
                        key = (by, name, count)
                        summed[key] = summed.get(key, 0.0) + amount
        for (by, name, count), amount in summed.items():
            yield by, name, count, amount


def _order_amount(line: Mapping[str, Any]) -> float:
    price = line.get("price")
    return 0.0 if price is None else float(price) * float(line.get("quantity", 1))


class Attribution:
    """One visitor's attribution row while their events are folded.

    The row holds the visitor's newest exposures, oldest first, each
    ``[ts_ms, recommendation_id, variant, items, sources]`` (the variant as `label` names it),
    per variant the last day on which they counted as a visitor served and as a converter (so
    each counts once a day), and per experiment they were served in, their variant, whether
    they clicked and bought, and their attributed revenue: ``{experiment: [variant, clicked,
    bought, revenue]}``; and the outcomes waiting for the exposure of the list they name.

    Args:
        raw: the stored row (None: none yet).
        cfg: the [attribution] settings.
        tally: receives the KPI counts.
        currency: revenue in this currency counts ([events] default_currency); orders in
            another count as orders, without revenue.
    """

    def __init__(
        self, raw: bytes | None, cfg: AttributionConfig, tally: Tally, currency: str
    ) -> None:
        doc: dict[str, Any] = orjson.loads(raw) if raw else {}
        self.exposures: list[list[Any]] = doc.get("e", [])
        self.served_on: dict[str, str] = doc.get("d", {})
        self.converted_on: dict[str, str] = doc.get("c", {})
        self.assigned: dict[str, list[Any]] = doc.get("a", {})
        #: Outcomes whose list is not recorded yet (see `_WAITING_KEPT`), oldest first.
        self.waiting: list[Event] = doc.get("w", [])
        self.changed = False
        #: The rule segments the visitor is in as the event is folded (their KPIs count there).
        self.segments: list[str] = []
        self._cfg = cfg
        self._tally = tally
        self._currency = currency

    def encode(self) -> bytes | None:
        """The row to store; None when nothing is held (the row is deleted)."""
        doc = {
            "e": self.exposures,
            "d": self.served_on,
            "c": self.converted_on,
            "a": self.assigned,
            "w": self.waiting,
        }
        if not any(doc.values()):
            return None
        return orjson.dumps(doc)

    def clear(self) -> None:
        """Forget everything (consent withdrawn, the visitor erased)."""
        if self.exposures or self.served_on or self.converted_on or self.assigned or self.waiting:
            self.exposures, self.served_on, self.converted_on = [], {}, {}
            self.assigned, self.waiting = {}, []
            self.changed = True

    def snapshot(self) -> dict[str, Any]:
        """What a merge into the visitor's other profile takes along (session stitching)."""
        return {"e": self.exposures, "a": self.assigned}

    def variants(self) -> dict[str, str]:
        """Experiment -> the variant the visitor was first served in it."""
        return {experiment: state[0] for experiment, state in self.assigned.items()}

    def merged(self, other: Mapping[str, Any]) -> None:
        """Take the exposures and variants of an anonymous visitor linked to this one.

        In an experiment both were served in, the visitor's own variant stays.
        """
        for experiment, state in (other.get("a") or {}).items():
            if experiment not in self.assigned:
                self.assigned[experiment] = list(state)
                self.changed = True
        theirs = other.get("e") or []
        if not theirs:
            return
        mine = {entry[1] for entry in self.exposures}
        both = self.exposures + [entry for entry in theirs if entry[1] not in mine]
        both.sort(key=lambda entry: entry[0])
        self.exposures = both[-self._cfg.exposures_kept :]
        self.changed = True

    def export(self) -> list[dict[str, Any]]:
        """The exposures held, in the wire form (right of access)."""
        return [
            {
                "recommendation_id": rec_id,
                "shown_at": datetime.fromtimestamp(ts / 1000, UTC).isoformat(),
                "variant": variant,
                "items": items,
                "sources": sources,
            }
            for ts, rec_id, variant, items, sources in self.exposures
        ]

    def _experiment(self, name: str, served: str | None = None) -> tuple[str, list[Any]] | None:
        """The experiment of the variant ``name`` and the visitor's state in it.

        With ``served`` (the variant of a list just served in it), a visitor served in the
        experiment for the first time joins it, in that variant.
        """
        experiment = _experiment_of(name)
        if experiment is None:
            return None
        state = self.assigned.get(experiment)
        if state is None:
            if served is None:
                return None
            state = self.assigned[experiment] = [served, 0, 0, 0.0]
            while len(self.assigned) > _EXPERIMENTS_KEPT:
                del self.assigned[next(iter(self.assigned))]
            self._tally.add_experiment(experiment, served, "visitors")
        return experiment, state

    def observe(self, e: Event) -> None:
        """Record an exposure, or join an outcome to one (the visitor consents to analytics)."""
        etype = e["type"]
        if etype == EXPOSURE:
            self._expose(e)
            self._join_waiting(e["properties"]["recommendation_id"])
        elif etype in OUTCOMES:
            rec_id = e["properties"].get("recommendation_id")
            if rec_id and not any(x[1] == rec_id for x in self.exposures):
                self._wait(e)
            elif self.exposures:
                self._join(e)

    def _join(self, e: Event) -> None:
        if e["type"] == "purchase":
            self._purchase(e)
        else:
            self._outcome(e)

    def _wait(self, e: Event) -> None:
        """Keep an outcome whose list is not recorded yet, to join it when it is."""
        horizon = e["ts_ms"] - self._cfg.window_s * 1000
        kept = [w for w in self.waiting if w["ts_ms"] >= horizon]
        kept.append(
            {k: e[k] for k in ("event_id", "type", "item_id", "ts_ms", "properties") if k in e}
        )
        self.waiting = kept[-_WAITING_KEPT:]
        self.changed = True

    def _join_waiting(self, rec_id: str) -> None:
        """Join the outcomes that waited for the list ``rec_id``, in their order."""
        if not self.waiting:
            return
        ready = [w for w in self.waiting if w["properties"].get("recommendation_id") == rec_id]
        if ready:
            self.waiting = [w for w in self.waiting if w not in ready]
            for w in ready:
                self._join(w)

    def _expose(self, e: Event) -> None:
        props = e["properties"]
        ts: int = e["ts_ms"]
        rec_id: str = props["recommendation_id"]
        variant: str = props.get("variant") or DEFAULT_VARIANT
        items: list[str] = props["items"]
        sources: list[str] = props["sources"]
        horizon = ts - self._cfg.window_s * 1000
        kept = [x for x in self.exposures if x[0] >= horizon and x[1] != rec_id]
        kept.append([ts, rec_id, variant, items, sources])
        self.exposures = kept[-self._cfg.exposures_kept :]
        self.changed = True
        day = day_of(ts)
        tally = self._tally
        joined = self._experiment(variant, variant.partition("/")[2])
        if joined is not None:
            tally.add_experiment(joined[0], joined[1][0], "exposures")
        self._count(day, variant, "exposures")
        first_for_variant, first_today = self._once_a_day(self.served_on, variant, day)
        if first_for_variant:
            tally.add(day, "variant", variant, "visitors")
        if first_today:
            for segment in self.segments:
                tally.add(day, "segment", segment, "visitors")
        for source in sources:
            tally.add(day, "source", source, "shown")

    def _count(self, day: str, variant: str, count: str, amount: float = 1.0) -> None:
        """Add to ``count`` of ``variant`` and of each of the visitor's segments."""
        self._tally.add(day, "variant", variant, count, amount)
        for segment in self.segments:
            self._tally.add(day, "segment", segment, count, amount)

    def _once_a_day(self, seen: dict[str, str], variant: str, day: str) -> tuple[bool, bool]:
        """Whether the visitor counts on ``day`` for ``variant``, and for their segments.

        For segments they count once a day whatever the variant. ``seen`` (variant -> the last
        day counted) is updated.
        """
        first_for_variant = seen.get(variant) != day
        first_today = seen.get(_ANY_VARIANT) != day
        if first_for_variant or first_today:
            kept = {v: d for v, d in seen.items() if d >= day}
            kept[variant] = kept[_ANY_VARIANT] = day
            seen.clear()
            seen.update(kept)
        return first_for_variant, first_today

    def _find(self, rec_id: str | None, item: str | None, ts: int) -> list[Any] | None:
        """The exposure an outcome joins: by recommendation id, else the newest with the item."""
        entry: list[Any]
        if rec_id:
            for entry in reversed(self.exposures):
                if entry[1] == rec_id:
                    return entry
            return None
        if item is None:
            return None
        window_ms = self._cfg.window_s * 1000
        for entry in reversed(self.exposures):
            if entry[0] - _SKEW_MS <= ts <= entry[0] + window_ms and item in entry[3]:
                return entry
        return None

    def _outcome(self, e: Event) -> None:
        etype = e["type"]
        props = e["properties"]
        item: str | None = e.get("item_id")
        entry = self._find(props.get("recommendation_id"), item, e["ts_ms"])
        if entry is None:
            return
        _ts, _rec_id, variant, items, sources = entry
        day = day_of(e["ts_ms"])
        count = {"impression": "impressions", "click": "clicks"}.get(etype, "add_to_carts")
        self._count(day, variant, count)
        if etype == "impression":
            return
        position = props.get("position")
        if item is None and isinstance(position, int) and 0 <= position < len(items):
            item = items[position]
        if item in items:
            self._tally.add(day, "source", sources[items.index(item)], count)
        joined = self._experiment(variant)
        if etype == "click" and joined is not None and not joined[1][1]:
            joined[1][1] = 1
            self.changed = True
            self._tally.add_experiment(joined[0], joined[1][0], "clickers")

    def _purchase(self, e: Event) -> None:
        props = e["properties"]
        ts: int = e["ts_ms"]
        day = day_of(ts)
        counted = props.get("currency") == self._currency
        rec_id = props.get("recommendation_id")
        by_variant: dict[str, float] = {}
        by_source: dict[str, float] = {}
        for line in props["items"]:
            entry = self._find(rec_id, line["item_id"], ts)
            if entry is None or line["item_id"] not in entry[3]:
                continue
            amount = _order_amount(line) if counted else 0.0
            variant = entry[2]
            source = entry[4][entry[3].index(line["item_id"])]
            by_variant[variant] = by_variant.get(variant, 0.0) + amount
            by_source[source] = by_source.get(source, 0.0) + amount
        tally = self._tally
        if by_variant:  # the visitor's segments count the order once, whatever its lists
            for segment in self.segments:
                tally.add(day, "segment", segment, "orders")
                tally.add(day, "segment", segment, "revenue", sum(by_variant.values()))
                if counted:
                    tally.add(day, "segment", segment, "order_revenue", float(props["revenue"]))
        for variant, amount in by_variant.items():
            tally.add(day, "variant", variant, "orders")
            tally.add(day, "variant", variant, "revenue", amount)
            if counted:
                tally.add(day, "variant", variant, "order_revenue", float(props["revenue"]))
            first_for_variant, first_today = self._once_a_day(self.converted_on, variant, day)
            self.changed = self.changed or first_for_variant or first_today
            if first_for_variant:
                tally.add(day, "variant", variant, "converters")
            if first_today:
                for segment in self.segments:
                    tally.add(day, "segment", segment, "converters")
            joined = self._experiment(variant)
            if joined is not None:
                experiment, state = joined
                if not state[2]:
                    state[2] = 1
                    tally.add_experiment(experiment, state[0], "converters")
                before, state[3] = state[3], state[3] + amount
                tally.add_experiment(experiment, state[0], "revenue", amount)
                tally.add_experiment(
                    experiment, state[0], "revenue_squares", state[3] ** 2 - before**2
                )
                self.changed = True
        for source, amount in by_source.items():
            tally.add(day, "source", source, "orders")
            tally.add(day, "source", source, "revenue", amount)


def experiment_counts(partition_dbs: Iterable[Any], experiment: str) -> dict[str, Counts]:
    """``experiment``'s counts per variant, summed over the partitions' databases."""
    key = experiment_key(experiment)
    out: dict[str, Counts] = {}
    for partition_db in partition_dbs:
        raw = partition_db.get(key)
        if raw is None:
            continue
        row: dict[str, Counts] = orjson.loads(raw)
        for variant, counts in row.items():
            into = out.setdefault(variant, {})
            for count, amount in counts.items():
                into[count] = into.get(count, 0.0) + amount
    return out


def kpi_rows(partition_dbs: Iterable[Any], days: list[str]) -> list[tuple[str, bytes]]:
    """(day, row) of each of ``days`` that has a KPI row, over the partitions' databases."""
    keys = [kpi_key(day) for day in days]
    return [
        (day, raw)
        for partition_db in partition_dbs
        for day, raw in zip(days, partition_db.get(keys), strict=True)
        if raw is not None
    ]


def expired_kpi_keys(keys: Iterable[bytes], today: str, days: int) -> list[bytes]:
    """Of the KPI row ``keys``, those of days more than ``days`` before ``today``."""
    cutoff = (date.fromisoformat(today) - timedelta(days=days)).isoformat()
    return [key for key in keys if key[len(KPI_PREFIX) :].decode() < cutoff]


def _rates(counts: Mapping[str, float], names: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {name: _number(counts.get(name, 0.0)) for name in names}

    def ratio(num: str, den: str) -> float | None:
        d = counts.get(den, 0.0)
        return round(counts.get(num, 0.0) / d, 6) if d else None

    if "exposures" in names:
        out["ctr"] = ratio("clicks", "exposures")
        out["add_to_cart_rate"] = ratio("add_to_carts", "exposures")
        out["conversion"] = ratio("converters", "visitors")
        out["revenue_per_visitor"] = ratio("revenue", "visitors")
        out["average_order_value"] = ratio("order_revenue", "orders")
    else:
        out["ctr"] = ratio("clicks", "shown")
        out["add_to_cart_rate"] = ratio("add_to_carts", "shown")
    return out


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 4)


Grouping = Literal["variant", "source", "segment", "day"]


def report(rows: Iterable[tuple[str, bytes]], by: Grouping) -> dict[str, Any]:
    """KPIs from stored KPI rows (``(day, row)``, several partitions' rows of a day included).

    ``by`` groups them: per variant or per source (all days summed), or per day (all variants
    summed). ``totals`` sums every variant and day. ``visitors`` and ``converters`` are distinct
    per day and variant: a sum over days or variants counts a visitor once per day and variant.
    """
    groups: dict[str, Counts] = {}
    totals: Counts = {}
    for day, raw in rows:
        row: dict[str, dict[str, Counts]] = orjson.loads(raw)
        part = row.get(by if by in ("source", "segment") else "variant", {})
        for name, counts in part.items():
            key = day if by == "day" else name
            into = groups.setdefault(key, {})
            for count, amount in counts.items():
                into[count] = into.get(count, 0.0) + amount
        for counts in row.get("variant", {}).values():
            for count, amount in counts.items():
                totals[count] = totals.get(count, 0.0) + amount
    names = SOURCE_COUNTS if by == "source" else VARIANT_COUNTS
    return {
        "rows": [{by: key, **_rates(groups[key], names)} for key in sorted(groups)],
        "totals": _rates(totals, VARIANT_COUNTS),
    }
