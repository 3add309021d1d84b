"""Reading the tables for ranking: profiles and signal rows, ranked and numbered.

A `personify.agents.recommend.Recommender` reads through a `DataSource`: `TableData` over the
worker's RocksDB profiles table (the engine), or `MemoryData` over dicts (offline evaluation and
tests). Item ids are numbered (`ItemIds`) so that candidates travel as numpy arrays; a signal
row's best entries come as a `Top`, a list and the same as arrays.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from personify.engine.config import RecommendConfig
from personify.tables import attribution, profiles, signals, store

__all__ = [
    "DataSource",
    "ItemIds",
    "MemoryData",
    "TableData",
    "Top",
    "ranked",
    "ranked_stored",
    "ranked_top",
]

Numbers = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float64]
#: `TableData` starts a new `ItemIds` once the one in use numbers this many items.
_MAX_ITEM_NUMBERS = 1_000_000


class ItemIds:
    """Item ids numbered 0, 1, 2, ... so that candidates can be numpy arrays; and back.

    Numbers are only ever added (a reader never sees one change); thread-safe.
    """

    __slots__ = ("_lock", "names", "number")

    def __init__(self) -> None:
        self.number: dict[str, int] = {}
        #: The id of each number.
        self.names: list[str] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.names)

    def of(self, items: Sequence[str]) -> Numbers:
        """The numbers of ``items`` (numbering those new to it)."""
        get = self.number.get
        out = np.fromiter((get(i, -1) for i in items), dtype=np.int64, count=len(items))
        if len(out) and out.min() < 0:
            with self._lock:
                for j in np.flatnonzero(out < 0).tolist():
                    n = self.number.get(items[j])
                    if n is None:
                        n = len(self.names)
                        self.names.append(items[j])  # before `number`: readers index names
                        self.number[items[j]] = n
                    out[j] = n
        return out


_EMPTY_NUMBERS: Numbers = np.empty(0, dtype=np.int64)
_EMPTY_SCORES: Scores = np.empty(0, dtype=np.float64)


@dataclass(slots=True)
class Top:
    """A row's best entries (see `ranked`), as a list and as arrays numbered by ``ids``."""

    pairs: list[tuple[str, float]]
    ids: ItemIds
    numbers: Numbers
    scores: Scores
    lookup: dict[str, float] | None = None

    @classmethod
    def of(cls, pairs: list[tuple[str, float]], ids: ItemIds) -> Top:
        """The top of ``pairs`` (best first), numbered by ``ids``."""
        if not pairs:
            return cls(pairs, ids, _EMPTY_NUMBERS, _EMPTY_SCORES)
        numbers = ids.of([item for item, _score in pairs])
        scores = np.fromiter((score for _item, score in pairs), np.float64, count=len(pairs))
        return cls(pairs, ids, numbers, scores)

    def score_of(self, item: str) -> float | None:
        """The item's score in this row, or None."""
        if self.lookup is None:
            self.lookup = dict(self.pairs)
        return self.lookup.get(item)


class DataSource(Protocol):
    """Where a `Recommender` reads profiles and signal rows."""

    def profile(self, user_id: str) -> profiles.Profile | None:
        """The visitor's profile (following an identified anonymous id), or None."""
        ...

    def rows(self, keys: Sequence[bytes], now_ms: int) -> list[signals.Row]:
        """Each signal row of ``keys``, summed over partitions and decayed to ``now_ms``."""
        ...

    def tops(
        self, keys: Sequence[bytes], now_ms: int, alpha: float | None, n: int, ids: ItemIds
    ) -> list[Top]:
        """Each row's top ``n`` (`ranked`), numbered by ``ids`` (a source may cache them)."""
        ...

    def item_ids(self) -> ItemIds:
        """The item numbering of one ranking (the source's, whose tops it caches)."""
        ...


def ranked(row: signals.Row, alpha: float | None, n: int) -> list[tuple[str, float]]:
    """A row's top ``n`` entries: pair scores normalised with ``alpha``, or raw (None)."""
    scores = row["s"] if alpha is None else signals.normalised(row, alpha)
    if len(scores) <= n:
        return sorted(scores.items(), key=lambda kv: -kv[1])
    return heapq.nlargest(n, scores.items(), key=lambda kv: kv[1])


def ranked_stored(
    raws: Sequence[bytes], half_life_s: float, now_ms: int, alpha: float | None, n: int
) -> list[tuple[str, float]]:
    """`ranked` of the row stored as ``raws`` (one per partition), summed as `merge_rows` does.

    The same entries and scores as decoding, merging and ranking the rows, with the arithmetic
    on arrays: a row of hundreds of neighbours in each of several partitions is summed and
    ranked without a dict entry per neighbour.
    """
    parts = [signals.stored_arrays(raw) for raw in raws]
    if len(parts) == 1:  # as `merge_rows`: a single row is not decayed
        _ref, own, names, s, m = parts[0]
    else:
        half_life_ms = half_life_s * 1000.0
        index: dict[str, int] = {}
        codes = np.fromiter(
            (index.setdefault(name, len(index)) for part in parts for name in part[2]),
            np.int64,
            sum(len(part[2]) for part in parts),
        )
        factors = [math.pow(2.0, (part[0] - now_ms) / half_life_ms) for part in parts]
        own = 0.0
        for part, factor in zip(parts, factors, strict=True):
            own += part[1] * factor
        s = np.bincount(
            codes,
            np.concatenate([p[3] * f for p, f in zip(parts, factors, strict=True)]),
            len(index),
        )
        counts = np.concatenate([p[4] * f for p, f in zip(parts, factors, strict=True)])
        m = np.bincount(codes, np.nan_to_num(counts, nan=0.0), len(index))
        names = list(index)
    if not len(s):
        return []
    if alpha is None:
        scores = s
    else:  # as `signals.normalised`
        own = own or float(s.max())
        other = np.where(np.isnan(m) | (m == 0.0), s, m)
        denominator = math.pow(own, alpha) * np.power(other, 1.0 - alpha)
        keep = np.flatnonzero(denominator > signals.DECAYED)
        if len(keep) < len(s):
            names = [names[i] for i in keep.tolist()]
            s, denominator = s[keep], denominator[keep]
        scores = s / denominator
    best = np.argsort(-scores, kind="stable")[:n]
    return list(zip([names[i] for i in best.tolist()], scores[best].tolist(), strict=True))


def ranked_top(row: signals.Row, alpha: float | None, n: int, ids: ItemIds) -> Top:
    """`ranked`, with the entries also as arrays numbered by ``ids`` (a data source's tops)."""
    return Top.of(ranked(row, alpha, n), ids)


class TableData:
    """`DataSource` over the profiles table of this worker (every partition it holds).

    Ranked rows are cached per key. With ``track_writes``, every write of a signal row on this
    worker is reported through `written` (and a move of partitions through `reset`), so a row
    that has not changed since is served without reading, decoding, merging or ranking it
    again; without it, the stored bytes are read and compared.

    Args:
        tbl: the profiles table.
        cfg: the [recommend] settings (decay of the signal rows).
        cache_size: ranked rows kept.
        track_writes: whether `written` hears of every write of a signal row.
    """

    def __init__(
        self, tbl: Any, cfg: RecommendConfig, cache_size: int = 50_000, track_writes: bool = False
    ) -> None:
        self.table = tbl
        self.cfg = cfg
        self.cache_size = cache_size
        self.track_writes = track_writes
        self._cache: dict[tuple[bytes, float | None, int], _Cached] = {}
        #: Writes of each signal row since the last `reset`, and how many resets there were.
        self._writes: dict[bytes, int] = {}
        self._epoch = 0
        self._ids = ItemIds()
        self._lock = threading.Lock()

    def written(self, keys: Iterable[bytes]) -> None:
        """These signal rows were just written: their ranked forms are stale."""
        with self._lock:
            writes = self._writes
            for key in keys:
                writes[key] = writes.get(key, 0) + 1
            if len(writes) > 4 * self.cache_size:
                self._reset()

    def reset(self) -> None:
        """Rows may have changed unseen (partitions moved, tables restored): forget them all."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._writes.clear()
        self._epoch += 1
        self._cache.clear()

    def _stamp(self, key: bytes) -> tuple[int, int] | None:
        if not self.track_writes:
            return None
        return self._epoch, self._writes.get(key, 0)

    def _dbs(self) -> list[Any]:
        return store.open_dbs(self.table)

    def _get(self, key: bytes) -> bytes | None:
        for db in self._dbs():
            value: bytes | None = db.get(key)
            if value is not None:
                return value
        return None

    def known(self, user_id: str) -> bool:
        """Whether this worker holds a profile of ``user_id``."""
        return self._get(user_id.encode()) is not None

    def variants(self, user_id: str) -> dict[str, str]:
        """Experiment -> the variant ``user_id`` was first served in it (none: never served)."""
        raw = self._get(attribution.row_key(user_id))
        if raw is None:
            return {}
        return {e: state[0] for e, state in orjson.loads(raw).get("a", {}).items()}

    def profile_of(self, user_id: str) -> profiles.Profile | None:
        """The stored profile of ``user_id`` itself (an alias is not followed), or None."""
        raw = self._get(user_id.encode())
        return None if raw is None else profiles.decode(raw)

    def profile(self, user_id: str) -> profiles.Profile | None:
        """The visitor's profile, or the user's when the visitor has been identified."""
        raw = self._get(user_id.encode())
        if raw is None:
            return None
        state = profiles.decode(raw)
        alias = state.get("alias_of")
        if alias is not None:
            linked = self._get(alias.encode())
            if linked is not None:
                return profiles.decode(linked)
        return state

    def _raw(self, keys: Sequence[bytes]) -> list[tuple[bytes | None, ...]]:
        per_db = [db.get(list(keys)) for db in self._dbs()]
        return [tuple(values[i] for values in per_db) for i in range(len(keys))]

    def _merge(self, key: bytes, raws: tuple[bytes | None, ...], now_ms: int) -> signals.Row:
        parts = [signals.decode_row(raw) for raw in raws if raw is not None]
        return signals.merge_rows(parts, signals.half_life_of(key, self.cfg), now_ms)

    def rows(self, keys: Sequence[bytes], now_ms: int) -> list[signals.Row]:
        """Signal rows summed over this worker's partitions, decayed to ``now_ms``."""
        return [
            self._merge(key, raws, now_ms) for key, raws in zip(keys, self._raw(keys), strict=True)
        ]

    def item_ids(self) -> ItemIds:
        """The item numbering of the cached rows (a fresh one once it has grown very large)."""
        if len(self._ids) > _MAX_ITEM_NUMBERS:
            with self._lock:
                if len(self._ids) > _MAX_ITEM_NUMBERS:
                    self._ids = ItemIds()
        return self._ids

    def ranked(
        self, keys: Sequence[bytes], now_ms: int, alpha: float | None, n: int
    ) -> list[list[tuple[str, float]]]:
        """Each row's top ``n`` (see `ranked`), from the cache while the row is unchanged."""
        return [top.pairs for top in self.tops(keys, now_ms, alpha, n, self.item_ids())]

    def tops(
        self, keys: Sequence[bytes], now_ms: int, alpha: float | None, n: int, ids: ItemIds
    ) -> list[Top]:
        """`ranked`, with the entries also as arrays numbered by ``ids``."""
        out: list[Top | None] = [None] * len(keys)
        todo: list[int] = []
        cache = self._cache
        for i, key in enumerate(keys):
            hit = cache.get((key, alpha, n))
            if hit is not None and hit.stamp is not None and hit.stamp == self._stamp(key):
                out[i] = self._numbered(hit, ids)
            else:
                todo.append(i)
        if todo:
            wanted = [keys[i] for i in todo]
            stamps = [self._stamp(key) for key in wanted]  # read before the rows
            for i, key, stamp, raws in zip(todo, wanted, stamps, self._raw(wanted), strict=True):
                slot = (key, alpha, n)
                hit = cache.get(slot)
                digest = hash(raws)
                if hit is not None and hit.digest == digest:
                    hit.stamp = stamp
                    out[i] = self._numbered(hit, ids)
                    continue
                present = [raw for raw in raws if raw is not None]
                pairs = (
                    ranked_stored(present, signals.half_life_of(key, self.cfg), now_ms, alpha, n)
                    if present
                    else []
                )
                top = Top.of(pairs, ids)
                with self._lock:
                    if len(cache) >= self.cache_size:
                        cache.clear()  # simple and rare: hot rows come back at once
                    cache[slot] = _Cached(stamp, digest, top)
                out[i] = top
        return [top for top in out if top is not None]

    @staticmethod
    def _numbered(hit: _Cached, ids: ItemIds) -> Top:
        if hit.top.ids is not ids:  # numbered by an earlier `ItemIds`
            hit.top = Top.of(hit.top.pairs, ids)
        return hit.top


@dataclass(slots=True)
class _Cached:
    """A ranked row, a digest of the stored bytes it came from, and the write stamp then.

    A digest, not the bytes: full rows of every partition, held for each cached row, came to
    hundreds of megabytes once the rows filled.
    """

    stamp: tuple[int, int] | None
    digest: int
    top: Top


class MemoryData:
    """`DataSource` over dicts: profiles by id and signal rows by key, without RocksDB.

    With ``frozen`` (the rows no longer change: an offline evaluation), ranked rows are cached
    per hour of the time asked for (an hour moves a decayed score by well under 0.1%), so
    ranking many visitors, or many settings, ranks each row about once.

    Args:
        cfg: the [recommend] settings (decay of the signal rows).
        frozen: whether the rows stay as they are once read.
    """

    def __init__(self, cfg: RecommendConfig, *, frozen: bool = False) -> None:
        self.cfg = cfg
        self.frozen = frozen
        self.profiles: dict[str, profiles.Profile] = {}
        self.rows_by_key: dict[bytes, signals.Row] = {}
        self._ids = ItemIds()
        self._tops: dict[tuple[bytes, float | None, int, int], Top] = {}

    def profile(self, user_id: str) -> profiles.Profile | None:
        """See `DataSource.profile` (no alias is followed)."""
        return self.profiles.get(user_id)

    def rows(self, keys: Sequence[bytes], now_ms: int) -> list[signals.Row]:
        """See `DataSource.rows`."""
        return [
            signals.merge_rows(
                [self.rows_by_key.get(key)], signals.half_life_of(key, self.cfg), now_ms
            )
            for key in keys
        ]

    def item_ids(self) -> ItemIds:
        """See `DataSource.item_ids`."""
        return self._ids

    def tops(
        self, keys: Sequence[bytes], now_ms: int, alpha: float | None, n: int, ids: ItemIds
    ) -> list[Top]:
        """See `DataSource.tops`; cached per hour when ``frozen``."""
        if not self.frozen:
            return [ranked_top(row, alpha, n, ids) for row in self.rows(keys, now_ms)]
        hour = now_ms // 3_600_000
        out = []
        for key in keys:
            slot = (key, alpha, n, hour)
            top = self._tops.get(slot)
            if top is None or top.ids is not ids:
                row = self.rows([key], hour * 3_600_000)[0]
                top = self._tops[slot] = ranked_top(row, alpha, n, ids)
            out.append(top)
        return out
