"""Recommendations: candidates from each source, blended, filtered, diversified, explained.

Sources, each scaled to 0-1 by its best candidate before blending with ``[recommend.weights]``:

- ``covisit``: items seen together (same session) with the visitor's recent items, each seed
  weighted by recency; reason ``similar_to`` the seed that contributed most.
- ``copurchase``: items bought together with what the visitor bought or put in the cart;
  reason ``bought_together``.
- ``content``: nearest items (FAISS) to the recency-weighted mean vector of the recent items;
  reason ``similar_to`` the closest seed.
- ``chat``: nearest items to the visitor's decayed chat vector; reason ``matches_chat``.
- ``category``: trending items of the visitor's favourite categories; reason ``trending``
  with the category.
- ``trending``: trending items overall (what a new visitor gets); reason ``trending``.

`Recommender` holds the logic and reads its data through `DataSource`, so the API (RocksDB
tables, the live index) and the offline evaluation (in-memory state) run the same code.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from personify.embeddings import VectorIndex
from personify.engine.config import RecommendConfig
from personify.tables import profiles, signals
from personify.tables.catalog import Catalog

__all__ = [
    "DataSource",
    "Entry",
    "ListCache",
    "Recommendation",
    "Recommender",
    "Request",
    "TableData",
    "blend",
    "ranked",
]

Reason = dict[str, Any]
#: Per source: item id -> (raw score, reason or a function that builds it when needed).
Candidates = dict[str, tuple[float, Reason | Callable[[], Reason]]]
Vector = npt.NDArray[np.float32]
#: A source's reason is given when it makes at least this share of an item's score.
_REASON_SHARE = 0.2


class DataSource(Protocol):
    """Where a `Recommender` reads profiles and signal rows."""

    def profile(self, user_id: str) -> profiles.Profile | None:
        """The visitor's profile (following an identified anonymous id), or None."""
        ...

    def rows(self, keys: Sequence[bytes], now_ms: int) -> list[signals.Row]:
        """Each signal row of ``keys``, summed over partitions and decayed to ``now_ms``."""
        ...


def ranked(row: signals.Row, alpha: float | None, n: int) -> list[tuple[str, float]]:
    """A row's top ``n`` entries: pair scores normalised with ``alpha``, or raw (None)."""
    scores = row["s"] if alpha is None else signals.normalised(row, alpha)
    if len(scores) <= n:
        return sorted(scores.items(), key=lambda kv: -kv[1])
    return heapq.nlargest(n, scores.items(), key=lambda kv: kv[1])


def _ranked_rows(
    data: DataSource, keys: Sequence[bytes], now_ms: int, alpha: float | None, n: int
) -> list[list[tuple[str, float]]]:
    fast = getattr(data, "ranked", None)
    if fast is not None:
        out: list[list[tuple[str, float]]] = fast(keys, now_ms, alpha, n)
        return out
    return [ranked(row, alpha, n) for row in data.rows(keys, now_ms)]


@dataclass(frozen=True, slots=True)
class Request:
    """What a caller asks for.

    Attributes:
        k: how many items.
        context_item: the item on screen (seeds first).
        category: only items in this category path (or below it).
        exclude: item ids never to return.
        max_per_category: at most this many from one category (0: no limit).
    """

    k: int = 10
    context_item: str | None = None
    category: str | None = None
    exclude: Collection[str] = ()
    max_per_category: int = 0


@dataclass(slots=True)
class Recommendation:
    """One recommended item, its blended score and why."""

    item_id: str
    score: float
    reasons: list[Reason] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The wire form."""
        return {"item_id": self.item_id, "score": round(self.score, 4), "reasons": self.reasons}


def _resolve(reason: Reason | Callable[[], Reason]) -> Reason:
    return reason() if callable(reason) else reason


def blend(
    sources: Mapping[str, Candidates],
    weights: Mapping[str, float],
    k: int,
    allowed: Callable[[str], bool],
    category_of: Callable[[str], str | None],
    max_per_category: int = 0,
    strength: Mapping[str, float] | None = None,
) -> list[Recommendation]:
    """Blend per-source candidates into the top ``k``.

    Each source is scaled so its best candidate scores 1 (times its ``strength``, default 1),
    multiplied by its weight and summed
    per item; an item's reasons are its sources' reasons, strongest first (a source that adds
    little to an item's score does not explain it). At most ``max_per_category`` items of one
    category are kept (0: no limit).
    """
    total: dict[str, float] = {}
    scales: dict[str, float] = {}
    for name, cands in sources.items():
        weight = weights.get(name, 0.0)
        if weight <= 0 or not cands:
            continue
        top = max(score for score, _reason in cands.values())
        if top <= 0:
            continue
        scale = scales[name] = weight * (strength or {}).get(name, 1.0) / top
        get = total.get
        for item, (score, _reason) in cands.items():
            total[item] = get(item, 0.0) + score * scale
    out: list[Recommendation] = []
    per_category: dict[str | None, int] = {}
    for item, score in sorted(total.items(), key=lambda kv: (-kv[1], kv[0])):
        if not allowed(item):
            continue
        if max_per_category > 0:
            cat = category_of(item)
            if cat is not None:
                if per_category.get(cat, 0) >= max_per_category:
                    continue
                per_category[cat] = per_category.get(cat, 0) + 1
        parts = sorted(
            (
                (sources[name][item][0] * scale, name)
                for name, scale in scales.items()
                if item in sources[name]
            ),
            reverse=True,
        )
        reasons: list[Reason] = []
        for part, name in parts:
            if reasons and part < _REASON_SHARE * score:
                break
            reason = _resolve(sources[name][item][1])
            if reason not in reasons:
                reasons.append(reason)
        out.append(Recommendation(item, score, reasons))
        if len(out) >= k:
            break
    return out


def _seeds(profile: profiles.Profile | None, request: Request, limit: int) -> list[str]:
    seeds: list[str] = []
    if request.context_item:
        seeds.append(request.context_item)
    for r in (profile or {}).get("recent_items", ()):
        if len(seeds) >= limit:
            break
        if r["item_id"] not in seeds:
            seeds.append(r["item_id"])
    return seeds


class Recommender:
    """Answers "what should this visitor see next, and why".

    Args:
        cfg: the [recommend] settings.
        data: profiles and signal rows.
        catalog: the catalog view (filters, categories); an empty catalog filters nothing.
        index: the item vector index, or None while it is not ready.
        affinity_half_life_s: how fast category affinity fades ([profiles]).
        personal: whether a profile may personalise its visitor's list (their consent);
            when not, they get the list of a visitor never seen.
    """

    def __init__(
        self,
        cfg: RecommendConfig,
        data: DataSource,
        catalog: Catalog,
        index: VectorIndex | None,
        affinity_half_life_s: float = 7 * 86400.0,
        personal: Callable[[profiles.Profile], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.catalog = catalog
        self.index = index
        self.affinity_half_life_s = affinity_half_life_s
        self.personal = personal

    # -- sources ---------------------------------------------------------------------------
    def _from_rows(
        self, kind: signals.SignalKind, seeds: list[str], now_ms: int, reason_kind: str
    ) -> Candidates:
        """Neighbours of the seeds, each pair normalised, summed with recency-weighted seeds."""
        if not seeds:
            return {}
        keys = [signals.row_key(kind, s) for s in seeds]
        lists = _ranked_rows(self.data, keys, now_ms, self.cfg.covisit_alpha, self.cfg.candidates)
        out: dict[str, float] = {}
        best: dict[str, tuple[float, str]] = {}
        for rank, (seed, top) in enumerate(zip(seeds, lists, strict=True)):
            seed_weight = math.pow(0.5, rank / self.cfg.seed_half_life)
            for item, score in top:
                part = seed_weight * score
                out[item] = out.get(item, 0.0) + part
                if part > best.get(item, (0.0, ""))[0]:
                    best[item] = (part, seed)
        return {
            item: (score, {"kind": reason_kind, "item_id": best[item][1]})
            for item, score in out.items()
        }

    def _trending(self, categories: list[tuple[str, float]], now_ms: int) -> Candidates:
        if not categories:
            return {}
        keys = [signals.row_key("trending", c) for c, _w in categories]
        lists = _ranked_rows(self.data, keys, now_ms, None, self.cfg.candidates)
        out: Candidates = {}
        for (cat, weight), top in zip(categories, lists, strict=True):
            if not top or top[0][1] <= 0:
                continue
            best = top[0][1]
            reason: Reason = {"kind": "trending", "category": cat or None}
            for item, score in top:
                part = weight * score / best
                if part > out.get(item, (0.0, reason))[0]:
                    out[item] = (part, reason)
        return out

    def _vector_of(self, seeds: list[str]) -> tuple[Vector | None, list[str], Vector]:
        index = self.index
        if index is None or not seeds:
            return None, [], np.empty((0, 0), dtype=np.float32)
        found, vecs = index.vectors(seeds)
        if not found:
            return None, [], vecs
        rank = {s: i for i, s in enumerate(seeds)}
        weights = np.array(
            [math.pow(0.5, rank[s] / self.cfg.seed_half_life) for s in found], dtype=np.float32
        )
        mean = (vecs * weights[:, None]).sum(axis=0)
        return mean.astype(np.float32), found, vecs

    def _content(self, seeds: list[str], exclude: Collection[str]) -> Candidates:
        query, found, vecs = self._vector_of(seeds)
        index = self.index
        if query is None or index is None:
            return {}
        hits = index.search(query, self.cfg.candidates, exclude=exclude)
        seed_matrix = vecs

        def closest(item_id: str) -> Callable[[], Reason]:
            def reason() -> Reason:
                vec = index.vector(item_id)
                j = 0 if vec is None else int((seed_matrix @ vec).argmax())
                return {"kind": "similar_to", "item_id": found[j]}

            return reason

        return {h.id: (max(h.score, 0.0), closest(h.id)) for h in hits}

    def _chat(
        self, profile: profiles.Profile | None, now_ms: int, exclude: Collection[str]
    ) -> tuple[Candidates, float]:
        """Items close to the chat vector, and the source's strength (how recent the chat is)."""
        if profile is None or self.index is None:
            return {}, 0.0
        vec = profiles.chat_vector(profile, now_ms, self.cfg.chat_half_life_s)
        if vec is None:
            return {}, 0.0
        strength = float(np.linalg.norm(vec))
        if strength < 1e-3:
            return {}, 0.0
        hits = self.index.search(vec, self.cfg.candidates, exclude=exclude)
        cands: Candidates = {h.id: (h.score, {"kind": "matches_chat"}) for h in hits if h.score > 0}
        return cands, min(strength, 1.0)

    # -- the answer ------------------------------------------------------------------------
    def sources(
        self,
        profile: profiles.Profile | None,
        request: Request,
        now_ms: int,
        exclude: Collection[str],
    ) -> tuple[dict[str, Candidates], dict[str, float]]:
        """Candidates of every source for this visitor, and each source's strength (0-1)."""
        seeds = _seeds(profile, request, self.cfg.seeds)
        bought = [
            r["item_id"]
            for r in (profile or {}).get("recent_items", ())
            if r["type"] in ("purchase", "add_to_cart")
        ][: self.cfg.seeds]
        bought += [i for i in (profile or {}).get("cart", {}) if i not in bought]
        affinity = self._categories(profile, request, now_ms)
        chat, chat_strength = self._chat(profile, now_ms, exclude)
        out = {
            "covisit": self._from_rows("covisit", seeds, now_ms, "similar_to"),
            "copurchase": self._from_rows("copurchase", bought, now_ms, "bought_together"),
            "content": self._content(seeds, exclude),
            "chat": chat,
            "category": self._trending(affinity, now_ms),
            "trending": self._trending([(request.category or "", 1.0)], now_ms),
        }
        # A chat that has faded counts less however well its best item matches.
        return out, {"chat": chat_strength}

    def _categories(
        self, profile: profiles.Profile | None, request: Request, now_ms: int
    ) -> list[tuple[str, float]]:
        if request.category:
            return [(request.category, 1.0)]
        if profile is None or not profile.get("affinity"):
            return []
        half = self.affinity_half_life_s
        scores = {
            cat: score * math.pow(0.5, max(now_ms - ref, 0) / (half * 1000.0))
            for cat, (score, ref) in profile["affinity"].items()
        }
        top = sorted(scores.items(), key=lambda kv: -kv[1])[:3]
        best = top[0][1] if top else 0.0
        return [(cat, score / best) for cat, score in top if best > 0]

    def recommend(
        self,
        user_id: str | None,
        request: Request,
        now_ms: int,
        profile: profiles.Profile | None = None,
    ) -> tuple[str, list[Recommendation]]:
        """(recommendation id, the visitor's top items); a new visitor gets trending items."""
        if profile is None and user_id is not None:
            profile = self.data.profile(user_id)
        if profile is not None and self.personal is not None and not self.personal(profile):
            profile = None  # no consent to personalise: what a visitor never seen gets
        history = {r["item_id"] for r in (profile or {}).get("recent_items", ())}
        history.update((profile or {}).get("cart", {}))
        exclude = set(request.exclude) | history
        if request.context_item:
            exclude.add(request.context_item)
        sources, strength = self.sources(profile, request, now_ms, exclude)
        items = blend(
            sources,
            self.cfg.weights,
            request.k,
            self._allowed(exclude, request.category),
            self.catalog.category_of,
            request.max_per_category,
            strength,
        )
        if len(items) < request.k:
            items += self._fill(request, exclude, items)
        return uuid.uuid4().hex, items

    def similar(self, item_id: str, request: Request, now_ms: int) -> list[Recommendation]:
        """Items like ``item_id``: seen together with it, and close to it in content."""
        req = Request(
            k=request.k,
            context_item=item_id,
            category=request.category,
            exclude=request.exclude,
            max_per_category=request.max_per_category,
        )
        exclude = set(request.exclude) | {item_id}
        sources = {
            "covisit": self._from_rows("covisit", [item_id], now_ms, "similar_to"),
            "copurchase": self._from_rows("copurchase", [item_id], now_ms, "bought_together"),
            "content": self._content([item_id], exclude),
        }
        return blend(
            sources,
            self.cfg.weights,
            req.k,
            self._allowed(exclude, req.category),
            self.catalog.category_of,
            req.max_per_category,
        )

    def _allowed(self, exclude: Collection[str], category: str | None) -> Callable[[str], bool]:
        cat = self.catalog
        check_catalog = len(cat) > 0
        prefix = category.strip("/") if category else None

        def allowed(item: str) -> bool:
            if item in exclude or item in cat.deleted:
                return False
            if not check_catalog:
                return prefix is None
            info = cat.get(item)
            if info is None or not info.in_stock:
                return False
            if prefix is not None:
                c = info.category or ""
                return c == prefix or c.startswith(prefix + "/")
            return True

        return allowed

    def _fill(
        self, request: Request, exclude: Collection[str], chosen: list[Recommendation]
    ) -> list[Recommendation]:
        """Catalog items to fill a list that the signals cannot (a shop with no events yet)."""
        allowed = self._allowed(exclude, request.category)
        taken = {r.item_id for r in chosen}
        per_category: dict[str | None, int] = {}
        for r in chosen:
            cat = self.catalog.category_of(r.item_id)
            per_category[cat] = per_category.get(cat, 0) + 1
        out: list[Recommendation] = []
        for item in self.catalog.ids():
            if len(chosen) + len(out) >= request.k:
                break
            if item in taken or not allowed(item):
                continue
            if request.max_per_category > 0:
                cat = self.catalog.category_of(item)
                if cat is not None and per_category.get(cat, 0) >= request.max_per_category:
                    continue
                per_category[cat] = per_category.get(cat, 0) + 1
            out.append(Recommendation(item, 0.0, [{"kind": "popular"}]))
        return out


@dataclass(frozen=True, slots=True)
class Entry:
    """A computed list.

    Attributes:
        computed_ms: when it was computed.
        owners: what it was computed from: the visitor, and whom they were linked to.
        gens: each owner's generation then (see `ListCache.generation`).
        removals: the catalog's removal count then (`Catalog.removals`).
        version: the catalog's version then (`Catalog.version`).
        rec_id: its recommendation id.
        items: the JSON array of its items, in the wire form.
        size: how many items.
    """

    computed_ms: int
    owners: tuple[str, ...]
    gens: tuple[int, ...]
    removals: int
    version: int
    rec_id: str
    items: bytes
    size: int


class ListCache:
    """Computed lists by key, valid while their owner's generation is unchanged (thread-safe).

    Args:
        capacity: lists kept; the least recently used go first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._gen: dict[str, int] = {}
        self._counter = itertools.count(1)
        self._floor = 0
        #: Owners whose lists are to be recomputed, oldest first ...
        self.pending: dict[str, None] = {}
        #: ... after these, which someone is waiting for (a socket is open) ...
        self.urgent: dict[str, None] = {}
        #: ... and, only when nothing else waits, lists that merely aged.
        self.stale: dict[str, None] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def generation(self, owner: str) -> int:
        """A number that changes whenever ``owner`` changes (read it before reading them)."""
        return self._gen.get(owner, self._floor)

    def changed(self, owners: Iterable[str], *, queue: bool, urgent: bool = False) -> None:
        """``owners`` changed: their lists are stale; ``queue`` them (``urgent``: first)."""
        with self._lock:
            for owner in owners:
                self._gen[owner] = next(self._counter)
                if urgent:
                    self.urgent[owner] = None
                elif queue:
                    self.pending[owner] = None
            if len(self._gen) > 4 * self.capacity:
                self._reset()

    def _reset(self) -> None:
        # Forgetting generations would make old lists look current: forget the lists too.
        self._gen.clear()
        self._entries.clear()
        self._floor = next(self._counter)

    def clear(self) -> None:
        """Forget every list (the worker's partitions moved)."""
        with self._lock:
            self._reset()
            self.pending.clear()
            self.urgent.clear()
            self.stale.clear()

    def take(self, n: int) -> list[str]:
        """Up to ``n`` queued owners: the urgent ones first, each kind oldest first."""
        with self._lock:
            out = list(itertools.islice(self.urgent, n))
            for key in out:
                del self.urgent[key]
                self.pending.pop(key, None)
            more = list(itertools.islice(self.pending, n - len(out)))
            for key in more:
                del self.pending[key]
                self.stale.pop(key, None)
            return out + more

    def take_stale(self, n: int) -> list[str]:
        """Up to ``n`` lists that only aged, oldest first."""
        with self._lock:
            out = list(itertools.islice(self.stale, n))
            for key in out:
                del self.stale[key]
            return out

    def backlog(self) -> int:
        """How many lists are queued."""
        return len(self.pending) + len(self.urgent) + len(self.stale)

    def _current(self, entry: Entry) -> bool:
        gen, floor = self._gen, self._floor
        return all(gen.get(o, floor) == g for o, g in zip(entry.owners, entry.gens, strict=True))

    def queue(self, key: str) -> None:
        """Queue ``key``'s list for a refresh when nothing else waits (it only aged)."""
        with self._lock:
            if key not in self.pending and key not in self.urgent:
                self.stale[key] = None

    def get(self, key: str) -> Entry | None:
        """The list of ``key`` while its owners are unchanged, else None."""
        entry = self._entries.get(key)
        if entry is None or not self._current(entry):
            return None
        with contextlib.suppress(KeyError):  # evicted meanwhile
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> bool:
        """Keep ``entry`` unless an owner changed since ``entry.gens`` were read."""
        with self._lock:
            if not self._current(entry):
                return False
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return True


class TableData:
    """`DataSource` over the profiles table of this worker (every partition it holds).

    Ranked rows are cached per key together with the stored bytes they came from: a row that
    has not changed since is served without decoding, merging or ranking it again.

    Args:
        tbl: the profiles table.
        cfg: the [recommend] settings (decay of the signal rows).
        cache_size: ranked rows kept.
    """

    def __init__(self, tbl: Any, cfg: RecommendConfig, cache_size: int = 50_000) -> None:
        self.table = tbl
        self.cfg = cfg
        self.cache_size = cache_size
        self._cache: dict[
            tuple[bytes, float | None, int],
            tuple[tuple[bytes | None, ...], list[tuple[str, float]]],
        ] = {}
        self._lock = threading.Lock()

    def _dbs(self) -> list[Any]:
        return list(self.table.data._dbs.values())

    def _get(self, key: bytes) -> bytes | None:
        for db in self._dbs():
            value: bytes | None = db.get(key)
            if value is not None:
                return value
        return None

    def known(self, user_id: str) -> bool:
        """Whether this worker holds a profile of ``user_id``."""
        return self._get(user_id.encode()) is not None

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

    def ranked(
        self, keys: Sequence[bytes], now_ms: int, alpha: float | None, n: int
    ) -> list[list[tuple[str, float]]]:
        """Each row's top ``n`` (see `ranked`), from the cache while the row is unchanged."""
        out = []
        for key, raws in zip(keys, self._raw(keys), strict=True):
            slot = (key, alpha, n)
            hit = self._cache.get(slot)
            if hit is not None and hit[0] == raws:
                out.append(hit[1])
                continue
            top = ranked(self._merge(key, raws, now_ms), alpha, n) if any(raws) else []
            with self._lock:
                if len(self._cache) >= self.cache_size:
                    self._cache.clear()  # simple and rare: hot rows come back at once
                self._cache[slot] = (raws, top)
            out.append(top)
        return out
