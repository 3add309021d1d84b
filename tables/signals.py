"""Collaborative signals: co-visitation, co-purchase and trending, folded from events.

The profile agent derives these from the events it applies (only from events new to the
profile, so a redelivered or replayed event is never counted twice), keeps its partitions'
rows in memory, compactly (`LiveRows`) and writes the changed ones to the profiles table, under
reserved keys (a visitor id never starts with NUL), every ``signal_flush_interval_s`` and on
stop (less often in a flood of events, see `personify.agents.fold.FLUSH_SHARE`). A crash can
lose at most that interval of signal updates (never a profile change).

Each partition holds the signals of its own visitors, a uniform sample of all of them; a read
sums the partitions it owns. A row maps item ids to decayed scores. Decay is *forward*: a
contribution made at time ``t`` is stored as ``w * 2**((t - ref) / half_life)`` against the row's
reference time ``ref``, so an update touches one entry and never rescales the row (until the
factor grows large, when the row moves its reference), and entries of one row compare directly.

Rows (``s``: neighbour -> pair count; ``n``: the row's own item count; ``m``: each neighbour's
own count, copied when the pair was last updated, so a pair can be normalised without reading
the neighbour's row). A row is stored in binary (`encode_row`): the scores and counts as arrays
of doubles and the neighbours' ids as one JSON list, so writing a row costs little more than
copying it, however full it is; rows stored as JSON by earlier versions are still read.

- ``covisit:A``: items the same visitors interacted with within ``covisit_window`` items of A
  (weighted by distance in their sequence and by the time between the two).
- ``copurchase:A``: items bought in the same order as A, or by the same visitor later.
- ``trending:C``: items by decayed interest (engagement weight) in category ``C`` (and its
  parents); ``C = ""`` is the whole catalog.
"""

from __future__ import annotations

import heapq
import itertools
import math
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson

from personify.engine.config import ProfilesConfig, RecommendConfig

__all__ = [
    "DECAYED",
    "PREFIX",
    "SELF",
    "Held",
    "ItemNumbers",
    "LiveRows",
    "Row",
    "SignalBatch",
    "SignalKind",
    "apply_updates",
    "categories_of",
    "decode_row",
    "encode_row",
    "half_life_of",
    "merge_rows",
    "normalised",
    "refresh_counts",
    "row_key",
    "split_key",
    "stored_arrays",
]

SignalKind = Literal["covisit", "copurchase", "trending"]
#: Keys of signal rows start with this byte; visitor ids cannot.
PREFIX = b"\x00"
_KIND_BYTE: dict[str, bytes] = {"covisit": b"c", "copurchase": b"p", "trending": b"t"}
_KIND_OF: dict[bytes, SignalKind] = {b"c": "covisit", b"p": "copurchase", b"t": "trending"}
#: A row's reference time moves forward once a new contribution would be scaled by more than
#: this (keeps the stored numbers far from float overflow).
_MAX_EXPONENT = 40.0
#: Rows hold up to this factor over their cap before the weakest entries are pruned.
_SLACK = 2.0
#: Event types whose item counts as an interaction (and the weight of its co-visitation).
_INTERACTIONS = {"product_view": 1.0, "click": 1.0, "add_to_cart": 1.0, "purchase": 1.0}

Row = dict[str, Any]
#: A neighbour whose own count was never copied in (``m`` lacks it).
_NO_COUNT = math.nan
#: The pseudo item id under which an update counts towards a row's own item count.
SELF = ""
#: A normalising denominator at or below this (counts that decayed by a factor of 2**-500 or
#: more: a row of long ago, read much later) scores nothing: the pair's count divided by it
#: would overflow.
DECAYED = 1e-150


def row_key(kind: SignalKind, name: str) -> bytes:
    """The table key of the ``kind`` row of item (or category) ``name``."""
    return PREFIX + _KIND_BYTE[kind] + name.encode()


def split_key(key: bytes) -> tuple[SignalKind, str]:
    """The kind and the item (or category) of a signal row's key (see `row_key`)."""
    kind = _KIND_OF[key[1:2]]
    return kind, key[2:].decode()


def categories_of(path: str | None) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b", "a/b/c"]``; nothing for no category."""
    if not path:
        return []
    parts = [p for p in path.strip("/").split("/") if p]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


#: A stored row: a version byte, the reference time, the own count, the number of neighbours
#: and the length of their ids' JSON list; then the scores and the counts (NaN: not known) as
#: little-endian doubles, then the ids. A row stored as JSON starts with ``{``.
_HEADER = struct.Struct("<BqdII")
_BINARY = 1


def _pack(ref: int, own: float, names: list[str], s: np.ndarray, m: np.ndarray) -> bytes:
    ids = orjson.dumps(names)
    return b"".join(
        (
            _HEADER.pack(_BINARY, ref, own, len(names), len(ids)),
            s.astype("<f8", copy=False).tobytes(),
            m.astype("<f8", copy=False).tobytes(),
            ids,
        )
    )


def _unpack(data: bytes) -> tuple[int, float, list[str], np.ndarray, np.ndarray]:
    """``(ref, own, names, scores, counts)`` of a binary row (counts NaN where not known)."""
    version, ref, own, k, size = _HEADER.unpack_from(data)
    if version != _BINARY:
        raise ValueError(f"unknown signal row format {version}")
    start = _HEADER.size
    s = np.frombuffer(data, "<f8", k, start).astype(np.float64)
    m = np.frombuffer(data, "<f8", k, start + 8 * k).astype(np.float64)
    names: list[str] = orjson.loads(memoryview(data)[start + 16 * k : start + 16 * k + size])
    return ref, own, names, s, m


def _arrays_of(row: Row) -> tuple[int, float, list[str], np.ndarray, np.ndarray]:
    """A decoded row as ``(ref, own, names, scores, counts)``, counts NaN where not known."""
    scores: dict[str, float] = row["s"]
    counts: dict[str, float] = row.get("m") or {}
    names = list(scores)
    return (
        int(row.get("r", 0)),
        float(row.get("n", 0.0)),
        names,
        np.fromiter(scores.values(), np.float64, len(names)),
        np.fromiter((counts.get(name, _NO_COUNT) for name in names), np.float64, len(names)),
    )


def stored_arrays(data: bytes) -> tuple[int, float, list[str], np.ndarray, np.ndarray]:
    """A stored row as ``(ref, own, names, scores, counts)``, counts NaN where not known."""
    return _unpack(data) if data[:1] != b"{" else _arrays_of(decode_row(data))


def encode_row(row: Row) -> bytes:
    """Serialise a row for the table (binary, see `_HEADER`)."""
    return _pack(*_arrays_of(row))


def decode_row(data: bytes | None) -> Row:
    """Deserialise a row (an empty one for None); a row stored as JSON is read too."""
    if data is None:
        return {"r": 0, "n": 0.0, "s": {}, "m": {}}
    if data[:1] == b"{":
        row: Row = orjson.loads(data)
        return row
    ref, own, names, s, m = _unpack(data)
    known = ~np.isnan(m)
    return {
        "r": ref,
        "n": own,
        "s": dict(zip(names, s.tolist(), strict=True)),
        "m": dict(zip(itertools.compress(names, known.tolist()), m[known].tolist(), strict=True)),
    }


def _rescale(row: Row, ref: int, half_life_ms: float) -> None:
    factor = math.pow(2.0, (row["r"] - ref) / half_life_ms)
    row["s"] = {k: v * factor for k, v in row["s"].items()}
    if "m" in row:
        row["m"] = {k: v * factor for k, v in row["m"].items()}
    row["n"] = row.get("n", 0.0) * factor
    row["r"] = ref


def _scale(row: Row, ts: int, half_life_ms: float) -> float:
    """The factor a contribution made at ``ts`` is stored with (moving ``ref`` if needed)."""
    if not row["s"] and not row.get("n"):
        row["r"] = ts
    exponent = (ts - row["r"]) / half_life_ms
    if exponent > _MAX_EXPONENT:
        _rescale(row, ts, half_life_ms)
        exponent = 0.0
    return math.pow(2.0, exponent)


def _prune(row: Row, cap: int) -> None:
    scores = row["s"]
    if len(scores) > cap * _SLACK:
        row["s"] = dict(heapq.nlargest(cap, scores.items(), key=lambda kv: kv[1]))
        if "m" in row:
            row["m"] = {k: v for k, v in row["m"].items() if k in row["s"]}


def apply_updates(
    row: Row, updates: Iterable[tuple[str, float, int]], half_life_s: float, cap: int
) -> Row:
    """Add ``(item, weight, ts)`` contributions to ``row`` (in place) and prune it to ``cap``.

    An empty item id (`SELF`) counts towards the row's own item count ``n``.
    """
    half_life_ms = half_life_s * 1000.0
    last_ts: int | None = None
    factor = 1.0
    for item, weight, ts in updates:
        if ts != last_ts:  # an event's contributions share its time
            factor = _scale(row, ts, half_life_ms)
            last_ts = ts
        if item == SELF:
            row["n"] = row.get("n", 0.0) + weight * factor
        else:
            scores = row["s"]
            scores[item] = scores.get(item, 0.0) + weight * factor
    _prune(row, cap)
    return row


def merge_rows(rows: Iterable[Row | None], half_life_s: float, now_ms: int) -> Row:
    """Sum rows (one per partition) into one row, decayed to ``now_ms`` (``r`` = now).

    A single row is returned as it is (not decayed: every score read from it is a ratio of
    two of its entries, or compared with its other entries, which decay alike).
    """
    present = [row for row in rows if row]
    if len(present) == 1:
        return present[0]
    half_life_ms = half_life_s * 1000.0
    scores: dict[str, float] = {}
    others: dict[str, float] = {}
    own = 0.0
    for row in present:
        factor = math.pow(2.0, (row["r"] - now_ms) / half_life_ms)
        own += row.get("n", 0.0) * factor
        for item, score in row["s"].items():
            scores[item] = scores.get(item, 0.0) + score * factor
        for item, count in row.get("m", {}).items():
            others[item] = others.get(item, 0.0) + count * factor
    return {"r": now_ms, "n": own, "s": scores, "m": others}


def normalised(row: Row, alpha: float) -> dict[str, float]:
    """Pair counts of a merged row scored as ``c / (n_self ** alpha * n_other ** (1 - alpha))``.

    A count missing from the row is taken as the pair count. Counts that decayed to nothing
    (a row of long ago, read at a much later time: a denominator at most `DECAYED`) score
    nothing.
    """
    scores: dict[str, float] = row["s"]
    if not scores:
        return {}
    own = row.get("n", 0.0) or max(scores.values())
    others: dict[str, float] = row.get("m", {})
    base = math.pow(own, alpha)
    beta = 1.0 - alpha
    out: dict[str, float] = {}
    for item, count in scores.items():
        other = others.get(item) or count
        denominator = base * math.pow(other, beta)
        if denominator > DECAYED:
            out[item] = count / denominator
    return out


def half_life_of(key: bytes, cfg: RecommendConfig) -> float:
    """The decay half-life (seconds) of the row stored under ``key``."""
    if key[1:2] == _KIND_BYTE["trending"]:
        return cfg.trending_half_life_s
    return cfg.signal_half_life_s


def refresh_counts(
    rows: Mapping[bytes, Row], key: bytes, items: Iterable[str], cfg: RecommendConfig
) -> None:
    """Copy into row ``key`` the own counts of its neighbours ``items`` (from ``rows``)."""
    if key[1:2] == _KIND_BYTE["trending"]:
        return
    row = rows[key]
    m = row.setdefault("m", {})
    scores = row["s"]
    half_life_ms = half_life_of(key, cfg) * 1000.0
    prefix = key[:2]
    for item in items:
        if item == SELF or item not in scores:
            continue
        other = rows.get(prefix + item.encode())
        if other is not None:
            # Both counts in this row's decay frame: only the reference times differ.
            m[item] = other.get("n", 0.0) * math.pow(2.0, (other["r"] - row["r"]) / half_life_ms)


@dataclass(slots=True)
class SignalBatch:
    """The signal contributions of one batch of events, grouped by row.

    The profile fold calls `observe` with each event it applies, before applying it (the
    profile then still shows the visitor's earlier items).

    Args:
        cfg: the [recommend] settings.
        profiles_cfg: the [profiles] settings (session gap, engagement weights).
        category_of: the catalog category of an item id, when the event carries none.
    """

    cfg: RecommendConfig
    profiles_cfg: ProfilesConfig
    category_of: Callable[[str], str | None] = lambda _item: None
    updates: dict[bytes, list[tuple[str, float, int]]] = field(default_factory=dict)
    #: Each co-visitation row's updates, by item (a batch names the same items again and again).
    _covisits: dict[str, list[tuple[str, float, int]]] = field(default_factory=dict)
    #: Co-visitation weight by distance in the window: ``distance ** -covisit_distance_power``.
    _by_distance: list[float] = field(init=False)

    def __post_init__(self) -> None:
        power = self.cfg.covisit_distance_power
        self._by_distance = [math.pow(d, -power) for d in range(1, self.cfg.covisit_window + 1)]

    def _put(self, kind: SignalKind, name: str, item: str, weight: float, ts: int) -> None:
        # Interned: the rows held decoded (`LiveRows`) then share one string per item.
        self.updates.setdefault(row_key(kind, name), []).append((sys.intern(item), weight, ts))

    def _covisit(self, item: str) -> list[tuple[str, float, int]]:
        """The updates of ``item``'s co-visitation row (``item`` interned)."""
        row = self._covisits.get(item)
        if row is None:
            row = self._covisits[item] = self.updates.setdefault(row_key("covisit", item), [])
        return row

    def observe(self, profile: Mapping[str, Any], event: Mapping[str, Any]) -> None:
        """Record what ``event`` contributes, given the visitor's ``profile`` before it."""
        etype: str = event["type"]
        ts: int = event["ts_ms"]
        props: Mapping[str, Any] = event["properties"]
        if etype == "purchase":
            lines = [line["item_id"] for line in props.get("items", ())]
            categories = {line["item_id"]: line.get("category") for line in props["items"]}
        elif etype in _INTERACTIONS and event.get("item_id"):
            lines = [event["item_id"]]
            categories = {event["item_id"]: props.get("category")}
        else:
            return
        cfg = self.cfg
        interest = self.profiles_cfg.engagement_weights.get(etype, 0.0)
        gap_ms = cfg.covisit_gap_half_life_s * 1000.0
        # The visitor's previous items, newest first, read only as far as the window.
        recent = list(
            itertools.islice(
                (r for r in profile["recent_items"] if r["item_id"] not in lines),
                cfg.covisit_window,
            )
        )
        by_distance = self._by_distance
        intern = sys.intern
        for item in lines:
            item = intern(item)
            own = self._covisit(item)
            own.append((SELF, 1.0, ts))
            for near, r in zip(by_distance, recent, strict=False):
                other = intern(r["item_id"])
                weight = near * math.pow(0.5, abs(ts - r["ts"]) / gap_ms)
                self._covisit(other).append((item, weight, ts))
                own.append((other, weight, ts))
            if interest > 0:
                category = categories.get(item) or self.category_of(item)
                for name in ["", *categories_of(category)]:
                    self._put("trending", name, item, interest, ts)
        if etype == "purchase":
            earlier = list(
                itertools.islice(
                    (
                        r["item_id"]
                        for r in profile["recent_items"]
                        if r["type"] == "purchase" and r["item_id"] not in lines
                    ),
                    cfg.covisit_window,
                )
            )
            for item in lines:
                self._put("copurchase", item, SELF, 1.0, ts)
                for other in [*lines, *earlier]:
                    if other != item:
                        self._put("copurchase", item, other, 1.0, ts)
                for other in earlier:
                    self._put("copurchase", other, item, 1.0, ts)

    def cap_of(self, key: bytes) -> int:
        """How many entries the row under ``key`` keeps."""
        return _cap_of(key, self.cfg)

    def fold_rows(self, rows: dict[bytes, Row], *, refresh: bool = True) -> None:
        """Apply the batch to decoded rows (a missing row starts empty), in place.

        With ``refresh``, each updated pair also records the neighbour's own count (from the
        neighbour's row, which the same batch touches), so reads can normalise without reading
        it; `LiveRows` defers that to the flush instead.
        """
        for key, updates in self.updates.items():
            row = rows.get(key)
            if row is None:
                row = rows[key] = decode_row(None)
            apply_updates(row, updates, half_life_of(key, self.cfg), self.cap_of(key))
        if refresh:
            for key, updates in self.updates.items():
                refresh_counts(rows, key, {item for item, _w, _ts in updates}, self.cfg)

    def fold_into(self, stored: Mapping[bytes, bytes | None]) -> list[tuple[bytes, bytes]]:
        """New values of every touched row, given their stored values (see `fold_rows`)."""
        rows = {key: decode_row(stored.get(key)) for key in self.updates}
        self.fold_rows(rows)
        return [(key, encode_row(rows[key])) for key in self.updates]


class ItemNumbers:
    """One number per item id, shared by the rows held compactly (`LiveRows`)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._number: dict[str, int] = {}

    def number(self, name: str) -> int:
        """The number of ``name`` (a new one for an id not seen before)."""
        n = self._number.get(name)
        if n is None:
            n = self._number[name] = len(self.names)
            self.names.append(sys.intern(name))
        return n

    def numbers(self, names: Collection[str]) -> np.ndarray:
        """`number` of each of ``names``, as an int32 array."""
        return np.fromiter((self.number(name) for name in names), np.int32, len(names))

    def names_of(self, numbers: np.ndarray) -> list[str]:
        """The item ids of ``numbers``."""
        names = self.names
        return [names[i] for i in numbers.tolist()]


class Held:
    """A signal row held compactly: neighbours as sorted item numbers and float arrays.

    A decoded row costs about 150 bytes a neighbour (two dict entries and two float objects);
    this one 20, plus the contributions added since it was last merged (``add``: item ->
    amount, in the row's decay frame), which `merge` folds into the arrays.
    """

    __slots__ = ("add", "ids", "m", "n", "r", "s", "touched")

    def __init__(self) -> None:
        self.r = 0
        self.n = 0.0
        self.ids = np.empty(0, np.int32)
        self.s = np.empty(0, np.float64)
        self.m = np.empty(0, np.float64)
        self.add: dict[str, float] = {}
        #: Neighbours merged since the row was last encoded: their counts are due.
        self.touched: set[str] | None = None

    @classmethod
    def of(cls, row: Row, numbers: ItemNumbers) -> Held:
        """The compact form of a decoded row."""
        held = cls()
        held.r = row["r"]
        held.n = row.get("n", 0.0)
        scores: dict[str, float] = row["s"]
        if scores:
            counts: dict[str, float] = row.get("m") or {}
            ids = numbers.numbers(scores)
            order = np.argsort(ids, kind="stable")
            held.ids = ids[order]
            held.s = np.fromiter(scores.values(), np.float64, len(scores))[order]
            held.m = np.fromiter(
                (counts.get(name, _NO_COUNT) for name in scores), np.float64, len(scores)
            )[order]
        return held

    @classmethod
    def stored(cls, raw: bytes | None, numbers: ItemNumbers) -> Held:
        """The compact form of a stored row (see `encode_row`; None: an empty row)."""
        if raw is None or raw[:1] == b"{":
            return cls.of(decode_row(raw), numbers)
        held = cls()
        held.r, held.n, names, s, m = _unpack(raw)
        if names:
            ids = numbers.numbers(names)
            order = np.argsort(ids, kind="stable")
            held.ids, held.s, held.m = ids[order], s[order], m[order]
        return held

    def __len__(self) -> int:
        return len(self.ids) + len(self.add)

    def fold(self, updates: Iterable[tuple[str, float, int]], half_life_ms: float) -> None:
        """`apply_updates` for a held row: new contributions wait in ``add`` for `merge`."""
        last_ts: int | None = None
        factor = 1.0
        add = self.add
        for item, weight, ts in updates:
            if ts != last_ts:
                if self.n == 0.0 and not len(self.ids) and not add:
                    self.r = ts
                exponent = (ts - self.r) / half_life_ms
                if exponent > _MAX_EXPONENT:
                    self._rescale(ts, half_life_ms)
                    exponent = 0.0
                factor = math.pow(2.0, exponent)
                last_ts = ts
            if item == SELF:
                self.n += weight * factor
            else:
                add[item] = add.get(item, 0.0) + weight * factor

    def _rescale(self, ref: int, half_life_ms: float) -> None:
        factor = math.pow(2.0, (self.r - ref) / half_life_ms)
        self.s *= factor
        self.m *= factor
        self.add = {k: v * factor for k, v in self.add.items()}
        self.n *= factor
        self.r = ref

    def merge(self, numbers: ItemNumbers, cap: int) -> None:
        """Fold the waiting contributions into the arrays and prune to ``cap``.

        The neighbours merged are noted in ``touched`` (their counts are due at the flush).
        """
        if self.add:
            self.touched = self.add.keys() | (self.touched or ())
            ids = numbers.numbers(self.add)
            amounts = np.fromiter(self.add.values(), np.float64, len(self.add))
            self.add = {}
            if len(self.ids):
                pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
                found = self.ids[pos] == ids
                self.s[pos[found]] += amounts[found]
                new = ~found
                ids, amounts = ids[new], amounts[new]
            if len(ids):
                all_ids = np.concatenate((self.ids, ids))
                order = np.argsort(all_ids, kind="stable")
                self.ids = all_ids[order]
                self.s = np.concatenate((self.s, amounts))[order]
                self.m = np.concatenate((self.m, np.full(len(ids), _NO_COUNT)))[order]
        if len(self.ids) > cap * _SLACK:
            keep = np.sort(np.argpartition(self.s, len(self.s) - cap)[-cap:])
            self.ids, self.s, self.m = self.ids[keep], self.s[keep], self.m[keep]

    def encode(self, numbers: ItemNumbers) -> bytes:
        """The stored form, as `encode_row` of `row` (merge first)."""
        return _pack(self.r, self.n, numbers.names_of(self.ids), self.s, self.m)

    def row(self, numbers: ItemNumbers) -> Row:
        """The decoded form (merge first: waiting contributions are not in it)."""
        names = numbers.names_of(self.ids)
        known = ~np.isnan(self.m)
        return {
            "r": self.r,
            "n": self.n,
            "s": dict(zip(names, self.s.tolist(), strict=True)),
            "m": dict(
                zip(itertools.compress(names, known.tolist()), self.m[known].tolist(), strict=True)
            ),
        }


class LiveRows:
    """The writer's signal rows of one partition, held compactly, and which changed since the flush.

    Hot rows change in nearly every round; keeping them in memory and writing each changed
    row once per flush interval (instead of once per round) is what keeps ingestion fast.
    Rows are held as `Held` (about 20 bytes a neighbour): a catalog's rows stay in memory
    at full size. Clean rows beyond ``capacity`` are forgotten, least recently used first;
    changed rows never are.

    Args:
        capacity: clean rows kept.
        numbers: the item numbering (shared by every partition's rows).
    """

    def __init__(
        self, cfg: RecommendConfig, capacity: int = 10_000, numbers: ItemNumbers | None = None
    ) -> None:
        self.cfg = cfg
        self.capacity = capacity
        self.numbers = ItemNumbers() if numbers is None else numbers
        self.rows: OrderedDict[bytes, Held] = OrderedDict()
        #: Changed rows (the neighbours whose own counts are to be copied in at the flush
        #: are each row's ``touched`` once merged).
        self.dirty: dict[bytes, None] = {}

    def missing(self, keys: Iterable[bytes]) -> list[bytes]:
        """Those of ``keys`` not held (to be read from the table and given to `load`)."""
        return [key for key in keys if key not in self.rows]

    def load(self, key: bytes, raw: bytes | None) -> None:
        """Hold the stored row of ``key``."""
        self.rows[key] = Held.stored(raw, self.numbers)

    def row(self, key: bytes) -> Row:
        """The held row of ``key``, decoded (its waiting contributions merged first)."""
        held = self.rows[key]
        held.merge(self.numbers, _cap_of(key, self.cfg))
        return held.row(self.numbers)

    def neighbours(self) -> int:
        """Neighbours held, over all rows (plus one per row for itself)."""
        return sum(1 + len(held) for held in self.rows.values())

    def apply(self, batch: SignalBatch) -> None:
        """Fold a batch into the held rows (every row it touches must be held)."""
        cfg, rows, dirty = self.cfg, self.rows, self.dirty
        for key, updates in batch.updates.items():
            held = rows[key]
            held.fold(updates, half_life_of(key, cfg) * 1000.0)
            cap = _cap_of(key, cfg)
            if len(held.add) > cap * _SLACK:  # bounds what waits for the flush
                held.merge(self.numbers, cap)
            rows.move_to_end(key)
            dirty[key] = None

    def take_dirty(self) -> list[tuple[bytes, bytes]]:
        """The changed rows, encoded, to write now; they count as clean from here on."""
        out = self.encode(self.take_dirty_keys())
        self.trim()
        return out

    def take_dirty_keys(self) -> list[bytes]:
        """The changed rows, to `encode` and write now.

        They count as clean from here on: a row changed again before it is encoded is
        encoded with its change, and written again at the next flush.
        """
        out = list(self.dirty)
        self.dirty = {}
        return out

    def encode(self, keys: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
        """Rows from `take_dirty_keys`, with their new neighbours' counts refreshed, encoded."""
        out = []
        numbers = self.numbers
        for key in keys:
            held = self.rows[key]
            held.merge(numbers, _cap_of(key, self.cfg))
            items, held.touched = held.touched or (), None
            if key[1:2] != _KIND_BYTE["trending"]:
                self._refresh(key, held, items)
            out.append((key, held.encode(numbers)))
        return out

    def _refresh(self, key: bytes, held: Held, items: Iterable[str]) -> None:
        """`refresh_counts` for a held row (merged)."""
        if not len(held.ids):
            return
        half_life_ms = half_life_of(key, self.cfg) * 1000.0
        prefix = key[:2]
        rows = self.rows
        number = self.numbers.number
        found: list[int] = []
        counts: list[float] = []
        for item in items:
            other = rows.get(prefix + item.encode()) if item != SELF else None
            if other is not None:
                found.append(number(item))
                counts.append(other.n * math.pow(2.0, (other.r - held.r) / half_life_ms))
        if found:
            ids = np.array(found, np.int32)
            pos = np.minimum(np.searchsorted(held.ids, ids), len(held.ids) - 1)
            present = held.ids[pos] == ids
            held.m[pos[present]] = np.array(counts)[present]

    def trim(self) -> None:
        """Forget the least recently used clean rows beyond the capacity."""
        excess = len(self.rows) - self.capacity
        if excess <= 0:
            return
        for key in list(itertools.islice(self.rows, excess + len(self.dirty))):
            if excess <= 0:
                break
            if key not in self.dirty:
                del self.rows[key]
                excess -= 1


def _cap_of(key: bytes, cfg: RecommendConfig) -> int:
    return cfg.trending_size if key[1:2] == _KIND_BYTE["trending"] else cfg.neighbours
