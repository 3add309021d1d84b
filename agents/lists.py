"""Each visitor's recommendations, computed ahead and served from memory.

When a visitor's profile changes, the profile agent marks their list stale and queues them; a
background builder recomputes queued lists, one at a time, in short slices of the event loop.
A request for the default list (``k`` up to ``[recommend] list_size`` and no other parameter)
is then answered from memory without touching the tables or the index:

- while the visitor's profile is unchanged since the list was computed, and
- the list is younger than ``list_max_age_s``; one older than ``list_refresh_s`` is served once
  more and recomputed behind the answer (collaborative signals and trending move slowly).

Every other request, and a miss, is computed on request (and a default one is stored). Items
deleted from the catalog or out of stock since a list was computed are filtered out when it is
served. "Similar items" lists are kept the same way, per item, refreshed by age.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import mode
import orjson

from personify.agents.catalog import embeddings, on_index_ready
from personify.agents.experiments import Variant, experiments
from personify.agents.exposures import recorder
from personify.agents.model import (
    current_model,
    current_ranker,
    current_recommend,
    current_repeat,
    model_changing,
    on_swap,
    shop_clock,
)
from personify.agents.push import hub, recommendations_message
from personify.agents.recommend import Recommendation, Recommender, Request
from personify.agents.segments import registry as segment_registry
from personify.agents.tuning import apply_setting
from personify.engine.app import app, current_config
from personify.engine.config import ProfilesConfig
from personify.engine.jsonbytes import dumps_kept, trimmed
from personify.engine.logging import get_logger
from personify.engine.metrics import (
    AHEAD_SHARE,
    LISTS_AHEAD_READ,
    LISTS_CACHED,
    LISTS_COMPUTED,
    LISTS_PENDING,
    LISTS_REFRESHING,
    LISTS_SERVED,
    LISTS_UNASKED,
    PUSH_STAGE,
    REFRESH_SHARE,
)
from personify.engine.models import new_id
from personify.plugins.manager import FAILED, plugins
from personify.tables import attribution, profiles, signals
from personify.tables import catalog as catalog_table
from personify.tables.reader import TableData

__all__ = [
    "Entry",
    "ListCache",
    "Served",
    "burst_hold",
    "list_cache",
    "profiles_changed",
    "push_list",
    "recommender",
    "run_ranking",
    "serve_recommendations",
    "serve_similar",
    "signals_changed",
    "similar_cache",
    "sized",
]

_log = get_logger(__name__)

#: Rankings a request waits for run on one thread beside the event loop, one at a time.
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="recommend")
#: The background builder ranks one list at a time, for at most this long before the event
#: loop serves its other work: each slice delays every other step of the loop (an event's way
#: from POST to push takes several), so slices are short.
_BUILD_SLICE_S = 0.001
#: How long a slice on the ranking thread goes on (while a catalog write holds the index).
_THREAD_SLICE_S = 0.02
#: Aged lists refreshed per turn (on the event loop, as the slices), and the share of the
#: loop's time they may take at most: after a turn that took t seconds, the next waits
#: t * (1 / share - 1), and at least `_REFRESH_PAUSE_S`, however often lists change meanwhile.
#: (After a new model every stored list ages at once: refreshed as fast as they can be, they
#: kept the loop busy enough to triple the answers' p99 at 1,000 requests a second.)
_REFRESH_BATCH = 1
_REFRESH_SHARE = 0.15
_REFRESH_PAUSE_S = 0.002
#: The refresh gives way to the loop's other work: its share shrinks as that work grows, so
#: the two together stay under `_LOOP_ROOM` of the loop's time, down to `_REFRESH_FLOOR` (aged
#: lists still reach the new model under a steady 1,000 requests a second, more slowly).
_LOOP_ROOM = 0.5
_REFRESH_FLOOR = 0.02
#: A loop with less other work than this is all but idle: the refresh may take up to
#: `_IDLE_ROOM` of it, less that work (after a new model in a quiet hour, 100,000 lists take
#: minutes instead of half an hour); a request that comes meanwhile waits for one list at
#: most. (The share once rose from `_REFRESH_SHARE` to `_LOOP_ROOM` only as that work fell to
#: nothing; the few percent an idle engine spends on its timers and metrics kept it near a
#: quarter: after a backfill, 100,000 lists took 25 minutes.)
_LOOP_IDLE = 0.1
_IDLE_ROOM = 0.8
#: How long a time the loop's load is averaged over (seconds).
_LOAD_WINDOW_S = 1.0
#: Once more than `_AHEAD_BACKLOG` lists computed ahead (visitors with no socket open, whose
#: list no one waits for) are queued, they may take this share of the loop's time while it is
#: busy, as the refresh above: during a backfill or a flood of events they gave way to nothing,
#: and a quarter of the loop went to lists no one read (a list not computed yet is computed
#: when asked for). With fewer queued, the builder keeps up and they go at once: answered from
#: memory, reads stay fast.
_AHEAD_SHARE = 0.25
_AHEAD_BACKLOG = 1_000
#: How often a busy loop is looked at again before the lists of visitors who never asked are
#: computed (only while its other work is under `_LOOP_IDLE`), in seconds.
_IDLE_CHECK_S = 1.0


class RefreshBudget:
    """The share of the event loop's time the refresh of aged lists may take now.

    The loop's other work is measured as the CPU time of the loop's thread (`time.thread_time`,
    called on the loop), less the refresh's own, averaged over about `_LOAD_WINDOW_S`. The
    share is at most ``most`` while that work passes ``idle``, less as the work grows (the two
    together under ``room``), and at least ``least``; on a loop all but idle (that work under
    ``idle``), ``idle_room`` less that work.
    """

    def __init__(
        self,
        most: float = _REFRESH_SHARE,
        least: float = _REFRESH_FLOOR,
        room: float = _LOOP_ROOM,
        window_s: float = _LOAD_WINDOW_S,
        idle: float = _LOOP_IDLE,
        *,
        idle_room: float = _IDLE_ROOM,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.most, self.least, self.room, self.window_s = most, least, room, window_s
        self.idle, self.idle_room = idle, idle_room
        self._clock, self._cpu_clock = clock, cpu_clock
        #: The loop's other work, as a share of its time (averaged).
        self.load = 0.0
        self._wall = clock()
        self._cpu = cpu_clock()

    def share(self, spent: float) -> float:
        """The share allowed after a refresh that took ``spent`` seconds of the loop's time."""
        wall, cpu = self._clock(), self._cpu_clock()
        elapsed = wall - self._wall
        if elapsed > 0:
            other = max(0.0, min(1.0, (cpu - self._cpu - spent) / elapsed))
            weight = min(1.0, elapsed / self.window_s)
            self.load += weight * (other - self.load)
        self._wall, self._cpu = wall, cpu
        if self.load < self.idle:
            return max(self.least, self.idle_room - self.load)
        return max(self.least, min(self.most, self.room - self.load))


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
        variant: the experiment's variant it was ranked for (`attribution.label`).
        trial: the experiments' version then (`Registry.version`).
    """

    computed_ms: int
    owners: tuple[str, ...]
    gens: tuple[int, ...]
    removals: int
    version: int
    rec_id: str
    items: bytes
    size: int
    variant: str = attribution.DEFAULT_VARIANT
    trial: int = 0


class ListCache:
    """Computed lists by key, valid while their owner's generation is unchanged (thread-safe).

    Args:
        capacity: lists kept; the least recently used go first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        #: The bytes of the lists' JSON bodies kept.
        self.body_bytes = 0
        self._gen: dict[str, int] = {}
        self._counter = itertools.count(1)
        self._floor = 0
        #: Owners whose lists are to be recomputed, oldest first ...
        self.pending: dict[str, None] = {}
        #: ... after these, which someone is waiting for (a socket is open) ...
        self.urgent: dict[str, None] = {}
        #: ... and, only when nothing else waits, lists not stored that are computed ahead
        #: (`queue_ahead`) ...
        self.ahead: dict[str, None] = {}
        #: ... and lists that merely aged; then, only while the loop is all but idle, the
        #: lists of visitors who changed and never asked (`idle`: the newest `capacity`).
        self.stale: dict[str, None] = {}
        self.unasked: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def generation(self, owner: str) -> int:
        """A number that changes whenever ``owner`` changes (read it before reading them).

        Only the owners whose generation was read are followed: a change of any other (a
        visitor whose list was never computed) leaves nothing behind, so a backfill of a
        million visitors no one asks for costs the cache nothing.
        """
        gen = self._gen.get(owner)
        if gen is None:
            with self._lock:
                if len(self._gen) >= 4 * self.capacity:
                    self._reset()
                gen = self._gen.setdefault(owner, self._floor)
        return gen

    def changed(
        self, owners: Iterable[str], *, queue: bool, urgent: bool = False, idle: bool = False
    ) -> None:
        """``owners`` changed: their lists are stale; ``queue`` them (``urgent``: first).

        The stored list of an owner not queued is dropped: it can no longer be served, and is
        computed when asked for (an aged list of theirs waiting for a refresh is dropped too);
        with ``idle``, also while the loop is all but idle (`take_unasked`, the newest
        ``capacity`` owners so queued).
        """
        with self._lock:
            gens, entries, unasked = self._gen, self._entries, self.unasked
            for owner in owners:
                if owner in gens:  # else no list of theirs was computed, or is being computed
                    gens[owner] = next(self._counter)
                if urgent:
                    self.urgent[owner] = None
                elif queue:
                    self.pending[owner] = None
                else:
                    old = entries.pop(owner, None)
                    if old is not None:
                        self.body_bytes -= len(old.items)
                        self.stale.pop(owner, None)
                    if idle:
                        unasked[owner] = None
                        unasked.move_to_end(owner)
            while len(unasked) > self.capacity:
                unasked.popitem(last=False)

    def _reset(self) -> None:
        # Forgetting generations would make old lists look current: forget the lists too.
        self._gen.clear()
        self._entries.clear()
        self.body_bytes = 0
        self._floor = next(self._counter)

    def clear(self) -> None:
        """Forget every list (the worker's partitions moved)."""
        with self._lock:
            self._reset()
            self.pending.clear()
            self.urgent.clear()
            self.ahead.clear()
            self.stale.clear()
            self.unasked.clear()

    def age_all(self) -> None:
        """Queue every stored list to be computed again when nothing else waits.

        The ranking changed (a new model or setting); each list stays servable meanwhile. The
        most recently used are computed first.
        """
        with self._lock:
            for key in reversed(self._entries):
                self._age(key)

    def take(self, n: int) -> list[str]:
        """Up to ``n`` queued owners: the urgent ones first, each kind oldest first."""
        with self._lock:
            out = list(itertools.islice(self.urgent, n))
            for key in out:
                del self.urgent[key]
                self.pending.pop(key, None)
                self.unasked.pop(key, None)
            more = list(itertools.islice(self.pending, n - len(out)))
            for key in more:
                del self.pending[key]
                self.ahead.pop(key, None)
                self.stale.pop(key, None)
                self.unasked.pop(key, None)
            return out + more

    def take_stale(self, n: int) -> list[str]:
        """Up to ``n`` lists to compute when nothing else waits: those queued ahead first."""
        with self._lock:
            out = list(itertools.islice(self.ahead, n))
            for key in out:
                del self.ahead[key]
            more = list(itertools.islice(self.stale, n - len(out)))
            for key in more:
                del self.stale[key]
            return out + more

    def refreshing(self) -> int:
        """How many lists wait to be computed when nothing else waits (see `take_stale`)."""
        return len(self.ahead) + len(self.stale)

    def take_unasked(self, n: int) -> list[str]:
        """Up to ``n`` owners queued by `changed` with ``idle``, the most recent first."""
        with self._lock:
            out: list[str] = []
            while self.unasked and len(out) < n:
                out.append(self.unasked.popitem()[0])
            return out

    def first_queued(self, n: int) -> list[str]:
        """Up to ``n`` owners of each kind of changed list queued, in the order `take` goes."""
        with self._lock:
            return [*itertools.islice(self.urgent, n), *itertools.islice(self.pending, n)]

    def queued(self) -> bool:
        """Whether changed lists wait (not counting those that merely aged)."""
        return bool(self.urgent or self.pending)

    def urgent_queued(self) -> bool:
        """Whether changed lists someone waits for (a socket is open) are queued."""
        return bool(self.urgent)

    def backlog(self) -> int:
        """How many lists are queued."""
        return len(self.pending) + len(self.urgent) + self.refreshing()

    def changed_backlog(self) -> int:
        """How many lists are queued because what they rank changed."""
        return len(self.pending) + len(self.urgent)

    def _current(self, entry: Entry) -> bool:
        gen, floor = self._gen, self._floor
        return all(gen.get(o, floor) == g for o, g in zip(entry.owners, entry.gens, strict=True))

    def queue_ahead(self, keys: Iterable[str]) -> int:
        """Queue the lists of ``keys`` not stored to be computed when nothing else waits.

        They go before the lists that only aged, in the order given; returns how many were
        queued (not stored, and not queued already).
        """
        with self._lock:
            queued = 0
            for key in keys:
                if any(key in q for q in (self._entries, self.ahead, self.pending, self.urgent)):
                    continue
                self.ahead[key] = None
                queued += 1
            return queued

    def queue(self, key: str) -> None:
        """Queue ``key``'s list for a refresh when nothing else waits (it only aged)."""
        with self._lock:
            self._age(key)

    def _age(self, key: str) -> None:
        """Queue ``key`` as aged, unless it is queued as changed already; lock held."""
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
        """Keep ``entry`` unless an owner changed since ``entry.gens`` were read.

        A list kept is current: if it was queued to be computed ahead (not for a socket, which
        waits for its push), it is not computed a second time.
        """
        with self._lock:
            if not self._current(entry):
                return False
            self.pending.pop(key, None)
            self.ahead.pop(key, None)
            self.unasked.pop(key, None)
            old = self._entries.get(key)
            if old is not None:
                self.body_bytes -= len(old.items)
            self._entries[key] = entry
            self.body_bytes += len(entry.items)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self.body_bytes -= len(self._entries.popitem(last=False)[1].items)
            return True


async def run_ranking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on the ranking thread."""
    return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, fn, *args)


@functools.cache
def list_cache() -> ListCache:
    """The visitors' lists of this worker."""
    return ListCache(current_config().recommend.list_cache_size)


@functools.cache
def similar_cache() -> ListCache:
    """The items' "similar items" lists of this worker."""
    return ListCache(current_config().recommend.list_cache_size)


@functools.cache
def _table_data() -> TableData:
    cfg = current_config()
    # Standby partitions are written by the changelog reader, unseen: compare bytes then.
    track = cfg.worker.standby_replicas == 0
    return TableData(profiles.table(), cfg.recommend, track_writes=track)


def recommender(variant: Variant | None = None) -> Recommender:
    """A recommender over this worker's tables and index (cheap to build per request).

    With ``variant``, an experiment's: its settings over the current ones, and the learned
    ranker only if it keeps it.
    """
    cfg = current_config()
    service = embeddings()
    setting = current_recommend()
    if variant is not None and variant.setting:
        setting = apply_setting(setting, variant.setting)
    return Recommender(
        setting,
        _table_data(),
        catalog_table.catalog(),
        service.index if service.index_ready.is_set() else None,
        cfg.profiles.affinity_half_life_s,
        functools.partial(_personal, cfg.profiles),
        current_model(),
        cfg.profiles.engagement_weights,
        current_repeat(),
        ranker=current_ranker() if variant is None or variant.ranker else None,
    )


def _variant_of(
    rec: Recommender, visitor: str, now_ms: int, profile: profiles.Profile | None = None
) -> tuple[Recommender, str, bool]:
    """The recommender of ``visitor``'s experiment variant, its name, and whether plugins re-rank.

    A visitor in no running experiment gets ``rec``, `attribution.DEFAULT_VARIANT` and True.
    ``profile``: the visitor's, where it was read (for the segments experiments target).
    """
    data = rec.data
    assert isinstance(data, TableData)
    registry = experiments()
    ranked = segment_registry()
    running, ranks = registry.running(now_ms), ranked.ranks()
    if not running and not ranks:
        return rec, attribution.DEFAULT_VARIANT, True
    segments: list[str] = []
    if ranks or registry.targeted(now_ms):
        if profile is None:
            profile = data.profile_of(visitor)
        segments = (profile or {}).get("segments", [])
    chosen = None
    if running:
        chosen = registry.assign(visitor, data.variants(visitor), now_ms, segments)
    if chosen is None:
        own = ranked.ranking_of(segments) if ranks else None
        if own is None:
            return rec, attribution.DEFAULT_VARIANT, True
        # The segment's own ranking: a variant of one, outside any experiment.
        name = f"segment:{own.id}"
        return recommender(Variant(name, 1.0, own.ranking)), name, True
    experiment, variant = chosen
    return recommender(variant), attribution.label(experiment.id, variant.name), variant.rerank


def _personal(cfg: ProfilesConfig, profile: profiles.Profile) -> bool:
    return profiles.consents(profile, "personalization", cfg)


def _wider(req: Request) -> Request:
    """``req`` with room for the re-ranking plugins to drop items (when there are any)."""
    if not plugins().has("personify_rerank"):
        return req
    return dataclasses.replace(req, k=min(2 * req.k, current_config().recommend.max_k))


def _finish(
    items: list[Recommendation],
    k: int,
    user_id: str | None,
    context: dict[str, Any],
    *,
    rerank: bool = True,
) -> tuple[bytes, int]:
    """The JSON array of the list's first ``k`` items, after the re-ranking plugins; its size."""
    rows = [r.as_json() for r in items]
    gates = plugins()
    if rerank and gates.has("personify_rerank"):
        for name, order in gates.call_sync(
            "personify_rerank", user_id=user_id, items=rows, context=context
        ):
            if order is FAILED or order is None:
                continue
            if not isinstance(order, list):
                _log.warning("re-ranker returned no list; ignored", plugin=name)
                continue
            by_id = {r["item_id"]: r for r in rows}
            rows = [by_id[i] for i in dict.fromkeys(order) if isinstance(i, str) and i in by_id]
    rows = rows[:k]
    return dumps_kept(rows), len(rows)  # kept for as long as the list is stored


def _rank_user(
    rec: Recommender,
    user_id: str | None,
    req: Request,
    now_ms: int,
    profile: profiles.Profile | None = None,
    *,
    rerank: bool = True,
) -> tuple[str, bytes, int]:
    """Rank ``user_id``'s list for ``req`` (None: a visitor never seen): (id, JSON, size)."""
    rec_id, items = rec.recommend(user_id, _wider(req), shop_clock(now_ms), profile=profile)
    kind = "user" if user_id is not None else "new_visitor"
    data, size = _finish(items, req.k, user_id, {"kind": kind}, rerank=rerank)
    return rec_id, data, size


def _rank_similar(rec: Recommender, item_id: str, req: Request, now_ms: int) -> tuple[bytes, int]:
    items = rec.similar(item_id, _wider(req), shop_clock(now_ms))
    return _finish(items, req.k, None, {"kind": "similar", "item_id": item_id})


def _keep(rec: Recommender, cache: ListCache, key: str, entry: Entry) -> None:
    # While the index loads, lists go without content: they are not kept.
    if rec.index is not None:
        cache.put(key, entry)


def _compute_user(rec: Recommender, cache: ListCache, user_id: str, size: int) -> Entry | None:
    """Rank the default list of ``user_id`` and keep it; None for a visitor never seen.

    A visitor without personalization consent gets the shared list of visitors never seen.
    """
    data = rec.data
    assert isinstance(data, TableData)
    # Generations are read before the profiles: a change meanwhile leaves the list stale.
    owners, gens = [user_id], [cache.generation(user_id)]
    fresh = _just_written.pop(user_id, None)
    profile = data.profile_of(user_id) if fresh is None else profiles.decode(fresh)
    if profile is None:
        return None
    alias = profile.get("alias_of")
    if alias is not None:  # an anonymous visitor linked to a user: the user's profile counts
        owners.append(alias)
        gens.append(cache.generation(alias))
        profile = data.profile_of(alias) or profile
    if rec.personal is not None and not rec.personal(profile):
        # No consent to personalise: the list every visitor never seen shares, by construction.
        shared = cache.get("")
        if shared is not None and _fresh(shared, int(time.time() * 1000))[0]:
            return shared
        return _compute_new_visitor(rec, cache, size)
    now_ms = int(time.time() * 1000)
    removals, version, trial = rec.catalog.removals, rec.catalog.version, experiments().version
    rec, variant, rerank = _variant_of(rec, alias or user_id, now_ms, profile)
    rec_id, body, n = _rank_user(rec, user_id, Request(k=size), now_ms, profile, rerank=rerank)
    entry = Entry(
        now_ms, tuple(owners), tuple(gens), removals, version, rec_id, body, n, variant, trial
    )
    _keep(rec, cache, user_id, entry)
    LISTS_COMPUTED.labels("user").inc()
    return entry


def _shared_key(variant: str) -> str:
    """The key of the list visitors never seen share in ``variant`` (no visitor id is it)."""
    return "" if variant == attribution.DEFAULT_VARIANT else "\x00" + variant


def _compute_new_visitor(
    rec: Recommender,
    cache: ListCache,
    size: int,
    variant: str = attribution.DEFAULT_VARIANT,
    rerank: bool = True,
) -> Entry:
    """The list of every visitor never seen (trending items), kept under `_shared_key`.

    It changes with the trending counts: whatever its variant, it depends on the key ``""``.
    """
    gen = cache.generation("")
    now_ms = int(time.time() * 1000)
    removals, version = rec.catalog.removals, rec.catalog.version
    rec_id, data, n = _rank_user(rec, None, Request(k=size), now_ms, rerank=rerank)
    trial = experiments().version
    entry = Entry(now_ms, ("",), (gen,), removals, version, rec_id, data, n, variant, trial)
    _keep(rec, cache, _shared_key(variant), entry)
    LISTS_COMPUTED.labels("new_visitor").inc()
    return entry


def _compute_similar(rec: Recommender, cache: ListCache, item_id: str, size: int) -> Entry:
    gen = cache.generation(item_id)
    now_ms = int(time.time() * 1000)
    removals, version = rec.catalog.removals, rec.catalog.version
    data, n = _rank_similar(rec, item_id, Request(k=size), now_ms)
    rec_id = new_id()
    entry = Entry(now_ms, (item_id,), (gen,), removals, version, rec_id, data, n)
    _keep(rec, cache, item_id, entry)
    LISTS_COMPUTED.labels("similar").inc()
    return entry


@dataclass(frozen=True, slots=True)
class Served:
    """An answer: its recommendation id, the JSON array of its items, and its variant."""

    rec_id: str
    items: bytes
    variant: str = attribution.DEFAULT_VARIANT


def _from_entry(entry: Entry, k: int, rec: Recommender) -> Served | None:
    """``entry`` cut to ``k`` items, without the items removed since; None if too few remain."""
    if entry.removals == rec.catalog.removals:
        if k >= entry.size:
            return Served(entry.rec_id, entry.items, entry.variant)
        return Served(entry.rec_id, orjson.dumps(orjson.loads(entry.items)[:k]), entry.variant)
    cat = rec.catalog
    kept = []
    for item in orjson.loads(entry.items):
        info = cat.get(item["item_id"])
        if item["item_id"] in cat.deleted or (info is not None and not info.in_stock):
            continue
        kept.append(item)
    if len(kept) < min(k, entry.size):
        return None
    return Served(entry.rec_id, orjson.dumps(kept[:k]), entry.variant)


def _is_default(req: Request) -> bool:
    return (
        req.context_item is None
        and req.category is None
        and not req.exclude
        and req.max_per_category == current_config().recommend.max_per_category
    )


def _fresh(entry: Entry, now_ms: int) -> tuple[bool, bool]:
    """(still servable, due for a refresh)."""
    cfg = current_config().recommend
    age_ms = now_ms - entry.computed_ms
    return age_ms < cfg.list_max_age_s * 1000, age_ms >= cfg.list_refresh_s * 1000


def _from_memory(
    cache: ListCache, key: str, entry: Entry, k: int, rec: Recommender, now_ms: int
) -> Served | None:
    """``key``'s stored ``entry`` cut to ``k`` if still servable (refreshed behind when due)."""
    servable, due = _fresh(entry, now_ms)
    servable = servable and entry.trial == experiments().version  # experiments changed since
    served = _from_entry(entry, k, rec) if servable else None
    if served is not None:
        if due:
            _queue_refresh(cache, key)
        LISTS_SERVED.labels("memory").inc()
    return served


async def serve_recommendations(user_id: str, req: Request) -> Served:
    """The visitor's list for ``req``: from memory when it can be, else ranked now."""
    cfg = current_config().recommend
    rec = recommender()
    if not _is_default(req) or req.k > cfg.list_size:
        now_ms = int(time.time() * 1000)
        rec, variant, rerank = _variant_of(rec, user_id, now_ms)
        rec_id, data, _n = await run_ranking(
            functools.partial(_rank_user, rerank=rerank), rec, user_id, req, now_ms
        )
        LISTS_SERVED.labels("computed").inc()
        return Served(rec_id, data, variant)
    cache = list_cache()
    now_ms = int(time.time() * 1000)
    readers().note(user_id, time.monotonic())
    entry = cache.get(user_id)
    key = user_id
    shared: tuple[Recommender, str, bool] | None = None
    if entry is None and not _table_data().known(user_id):
        # A visitor never seen: the list they all share (one per experiment variant).
        shared = _variant_of(rec, user_id, now_ms)
        key = _shared_key(shared[1])
        entry = cache.get(key)
    served = None if entry is None else _from_memory(cache, key, entry, req.k, rec, now_ms)
    if served is not None:
        return served
    # Ranked on the event loop, as the list builder ranks (on the ranking thread only while
    # ranking may wait): it takes the place of the list the builder would have computed ahead,
    # and on a thread beside the loop every push and answer would wait for the interpreter
    # lock while it ranks.
    if shared is not None:
        variant_rec, variant, rerank = shared
        entry = await _rank_unless_waiting(
            variant_rec, _compute_new_visitor, variant_rec, cache, cfg.list_size, variant, rerank
        )
    else:
        entry = await _rank_unless_waiting(rec, _compute_user, rec, cache, user_id, cfg.list_size)
        if entry is None:  # never seen after all
            entry = await _rank_unless_waiting(rec, _compute_new_visitor, rec, cache, cfg.list_size)
    LISTS_SERVED.labels("computed").inc()
    served = _from_entry(entry, req.k, rec)
    if served is None:  # removed items everywhere: rank with the catalog as it is now
        rec, variant, rerank = _variant_of(rec, user_id, now_ms)
        rec_id, data, _n = await run_ranking(
            functools.partial(_rank_user, rerank=rerank), rec, user_id, req, now_ms
        )
        return Served(rec_id, data, variant)
    return served


async def serve_similar(item_id: str, req: Request) -> Served:
    """Items like ``item_id`` for ``req``: from memory when it can be, else ranked now."""
    cfg = current_config().recommend
    rec = recommender()
    now_ms = int(time.time() * 1000)
    if _is_default(req) and req.k <= cfg.list_size:
        cache = similar_cache()
        entry = cache.get(item_id)
        if entry is not None and entry.version == rec.catalog.version:
            served = _from_memory(cache, item_id, entry, req.k, rec, now_ms)
            if served is not None:
                return served
        # On the loop (about 2 ms at 100,000 items): on the ranking thread it waited for the
        # interpreter lock behind the loop's other work, four times as long.
        entry = await _rank_unless_waiting(
            rec, _compute_similar, rec, cache, item_id, cfg.list_size
        )
        served = _from_entry(entry, req.k, rec)
        if served is not None:
            LISTS_SERVED.labels("computed").inc()
            return served
    data, _n = await run_ranking(_rank_similar, rec, item_id, req, now_ms)
    LISTS_SERVED.labels("computed").inc()
    return Served(new_id(), data)


def _queue_refresh(cache: ListCache, key: str) -> None:
    """Recompute ``key``'s list behind the answer (it stays servable meanwhile)."""
    cache.queue(key)
    _builder_wake().set()


@functools.cache
def _builder_wake() -> asyncio.Event:
    return asyncio.Event()


#: Lists computed ahead are worth it while at least this share of them is read before the
#: visitor changes again (averaged over about `_AHEAD_OUTCOMES` of them). Below it, a visitor
#: has one computed ahead only if their last one was read, and one try in `_AHEAD_PROBE` still
#: measures the share. (Where reads come between a visitor's changes, as page views do, most
#: are read; where a visitor asks now and then while sending many events, most were dropped
#: at the next change unread: the work ahead doubled the ranking for few answers from memory.)
_AHEAD_WORTH = 0.5
_AHEAD_OUTCOMES = 200
_AHEAD_PROBE = 8


class Readers:
    """The visitors who asked for their list (over HTTP) since it was last computed ahead.

    Their lists are worth computing ahead when their profiles change: they are likely to ask
    again. Each read earns at most one list computed ahead (`take` forgets the visitor until
    they ask again), so the work done ahead never exceeds the reads: a visitor who reads
    after each page view has every list ready, one who sends many events between reads (a
    burst, a bot, a backfill) has one computed ahead and the rest when they ask. A visitor
    who never asks (the shop shows their list on some pages only, or not at all) has theirs
    computed when they ask, or while the loop is all but idle. At most ``capacity`` are
    remembered, each for ``window_s``, the least recent forgotten first.

    Whether a list computed ahead was read before the visitor changed again is measured
    (`read_share`): while under `_AHEAD_WORTH` are, only visitors whose last list computed
    ahead was read, and one try in `_AHEAD_PROBE`, have theirs computed ahead.
    """

    def __init__(self, capacity: int, window_s: float) -> None:
        self.capacity, self.window_s = capacity, window_s
        self._at: OrderedDict[str, float] = OrderedDict()
        #: Visitors whose list was computed ahead, not read since ...
        self._ahead: OrderedDict[str, None] = OrderedDict()
        #: ... and those whose last list computed ahead was read.
        self._proven: OrderedDict[str, None] = OrderedDict()
        #: Of the lists computed ahead, the share read before the visitor changed again.
        self.read_share = 1.0
        self._tries = 0
        LISTS_AHEAD_READ.set(self.read_share)

    def __len__(self) -> int:
        return len(self._at)

    def note(self, user_id: str, now: float) -> None:
        """``user_id`` asked for their list at ``now`` (`time.monotonic`)."""
        if user_id in self._ahead:
            del self._ahead[user_id]
            self._outcome(user_id, read=True)
        self._at.pop(user_id, None)
        self._at[user_id] = now
        _bound(self._at, self.capacity)

    def take(self, user_id: str, now: float) -> bool:
        """Whether ``user_id``'s list is to be computed ahead, as they change at ``now``.

        Only if they asked within ``window_s`` since the last `take`, and lists computed ahead
        are read (see the class). They are forgotten until they ask again: their next list is
        the one computed ahead.
        """
        if user_id in self._ahead:  # changed again, unread
            del self._ahead[user_id]
            self._outcome(user_id, read=False)
        at = self._at.pop(user_id, None)
        if at is None or now - at > self.window_s:
            return False
        self._tries += 1
        worth = self.read_share >= _AHEAD_WORTH or user_id in self._proven
        if not worth and self._tries % _AHEAD_PROBE:
            return False
        self._ahead[user_id] = None
        _bound(self._ahead, self.capacity)
        return True

    def _outcome(self, user_id: str, *, read: bool) -> None:
        self.read_share += (float(read) - self.read_share) / _AHEAD_OUTCOMES
        LISTS_AHEAD_READ.set(self.read_share)
        if read:
            self._proven.pop(user_id, None)
            self._proven[user_id] = None
            _bound(self._proven, self.capacity)
        else:
            self._proven.pop(user_id, None)


def _bound(keys: OrderedDict[str, Any], capacity: int) -> None:
    while len(keys) > capacity:
        keys.popitem(last=False)


@functools.cache
def readers() -> Readers:
    """This worker's `Readers` (made on first use from ``[recommend]``)."""
    cfg = current_config().recommend
    return Readers(cfg.list_cache_size, cfg.list_max_age_s)


#: Profiles just written by this worker's profile agent and queued to be ranked, as stored:
#: the builder decodes them instead of reading them back. Only those queued are kept, and at
#: most `_JUST_WRITTEN_MAX`, the oldest dropped first (read back when ranked). Bytes, not
#: decoded profiles: thousands of decoded profiles kept alive here were rescanned by every
#: garbage collection, more as profiles grew.
_just_written: OrderedDict[str, bytes] = OrderedDict()
#: When each visitor with a socket open changed and has not been pushed since (perf_counter):
#: the start of the queue stage of `PUSH_STAGE`.
_changed_at: dict[str, float] = {}
#: When the builder last ranked each visitor's list (perf_counter), oldest first, for no
#: longer than `[push] debounce_ms`: a visitor changed again within that time is held until it
#: ends, so that a burst of events makes at most two lists and two pushes (see `burst_hold`).
_ranked_at: OrderedDict[str, float] = OrderedDict()
#: Queued visitors looked at for a burst (after a wake, the queue holds a handful).
_BURST_LOOK = 256
#: Fresh profiles kept at most (a backfill writes profiles far faster than lists are ranked).
_JUST_WRITTEN_MAX = 4_096


def profiles_changed(
    user_ids: Iterable[str],
    *,
    done: bool = True,
    states: Mapping[str, bytes] | None = None,
) -> None:
    """The profiles of ``user_ids`` change: their lists are stale.

    Called before the new profiles are written (no list computed from the old ones is served
    once they can be read) and again once written (``done``: nothing computed during the write
    counts, and the lists are queued to be computed ahead: at once for a visitor with a socket
    open; with ``[recommend] precompute``, in the background for one who asked for their list
    since it was last computed ahead, within `list_max_age_s` (`Readers`: one list ahead per
    read); any other's stored list is dropped, and computed when asked for, or with
    ``precompute`` while the loop is all but idle). ``states`` are the profiles just written,
    as stored, which the list builder then ranks without reading them back.
    """
    cache = list_cache()
    if not done:
        users = list(user_ids)
        for user in users:
            _just_written.pop(user, None)
        cache.changed(users, queue=False)
        return
    users = list(user_ids)
    live = hub()
    watched = [u for u in users if live.followed(u)]  # pushed first, with or without precompute
    seen = set(watched)
    others = [u for u in users if u not in seen] if watched else users
    precompute = current_config().recommend.precompute
    ahead: list[str] = []  # of visitors who asked lately: computed in the background
    rest = others  # any other's: when asked for, or while the loop is all but idle
    if precompute and others:
        asked, now = readers(), time.monotonic()
        rest = []
        for user in others:
            (ahead if asked.take(user, now) else rest).append(user)
    if states:
        _keep_written({u: states[u] for u in itertools.chain(watched, ahead) if u in states})
    if watched:
        now = time.perf_counter()
        for user in watched:
            _changed_at.setdefault(user, now)
        cache.changed(watched, queue=True, urgent=True)
    if ahead:
        cache.changed(ahead, queue=True)
    if rest:  # dropped: computed when asked for, or while the loop is all but idle
        cache.changed(rest, queue=False, idle=precompute)
    if watched or (others and precompute):  # the builder may be waiting for nothing
        _gauge()
        _builder_wake().set()


def _keep_written(states: Mapping[str, bytes]) -> None:
    """Keep the profiles about to be ranked (see `_just_written`)."""
    for user, state in states.items():
        _just_written.pop(user, None)  # set again: the newest go last
        _just_written[user] = trimmed(state)
    while len(_just_written) > _JUST_WRITTEN_MAX:
        with contextlib.suppress(KeyError):  # the builder took it meanwhile
            _just_written.popitem(last=False)


def signals_changed(keys: Iterable[bytes]) -> None:
    """These signal rows were written: the lists that read them are stale.

    Those are the similar-items lists of their items and, for a trending row, the list of
    visitors never seen.
    """
    keys = list(keys)
    _table_data().written(keys)
    rows = [signals.split_key(key) for key in keys]
    items = {name for kind, name in rows if kind != "trending"}
    trending = any(kind == "trending" for kind, _name in rows)
    similar_cache().changed(items, queue=False)
    if trending:
        list_cache().changed([""], queue=False)


def _build(
    rec: Recommender, size: int, users: list[str], items: list[str]
) -> list[tuple[str, Entry]]:
    """Compute the lists of ``users`` and ``items``; return the users' (to push)."""
    users_cache, items_cache = list_cache(), similar_cache()
    out: list[tuple[str, Entry]] = []
    for key in users:
        if key == "":
            _compute_new_visitor(rec, users_cache, size)
        elif key.startswith("\x00"):
            continue  # a variant's shared list: ranked again when next asked for
        else:
            entry = _compute_user(rec, users_cache, key, size)
            if entry is not None:
                out.append((key, entry))
    for key in items:
        _compute_similar(rec, items_cache, key, size)
    return out


def sized(items: bytes, variant: str) -> bytes:
    """A list's items cut to its experiment variant's list size, where it sets one."""
    size = experiments().size_of(variant) if variant != attribution.DEFAULT_VARIANT else None
    if size is None:
        return items
    listed = orjson.loads(items)
    return items if len(listed) <= size else orjson.dumps(listed[:size])


def push_list(
    user_id: str,
    rec_id: str,
    items: bytes,
    *,
    here_only: bool = False,
    variant: str = attribution.DEFAULT_VARIANT,
) -> int:
    """Push a ``recommendations`` message to the visitor's sockets; its seq here (0: none).

    The message also goes to the visitor's sockets on other workers unless ``here_only``.
    ``variant``: the experiment variant the list was ranked for (recorded with it).
    """
    items = sized(items, variant)
    recorder().served(user_id, rec_id, items, "ws", variant)
    body = recommendations_message(rec_id, items, variant)
    if here_only:
        return hub().publish(user_id, "recommendations", body)
    return hub().send(user_id, "recommendations", body)


def _build_slice(
    rec: Recommender, size: int, slice_s: float, push: Callable[[list[tuple[str, Entry]]], None]
) -> int:
    """Compute queued lists, one at a time, for up to ``slice_s``; return how many.

    Each visitor's list goes to ``push`` as soon as it is ready. Stops early when nothing is
    queued.
    """
    users_cache, items_cache = list_cache(), similar_cache()
    ends = time.monotonic() + slice_s
    done = 0
    while True:
        users = users_cache.take(1)
        items = [] if users else items_cache.take(1)
        if not users and not items:
            return done
        started = time.perf_counter()
        _note_ranked(users, started)
        try:
            built = _build(rec, size, users, items)
            for user in users:
                changed = _changed_at.get(user)
                if changed is not None:
                    PUSH_STAGE.labels("queue").observe(max(0.0, started - changed))
                    PUSH_STAGE.labels("rank").observe(time.perf_counter() - started)
        except Exception:
            _log.exception("list builder failed; the lists are computed on request")
            built = []
        if built:
            push(built)
        done += len(users) + len(items)
        if time.monotonic() >= ends:
            return done


def _note_ranked(users: Iterable[str], now: float) -> None:
    """``users``' lists are ranked at ``now``: each change within `[push] debounce_ms` waits."""
    window = current_config().push.debounce_ms / 1000.0
    if window <= 0:
        return
    for user in users:
        _ranked_at.pop(user, None)
        _ranked_at[user] = now
    while _ranked_at:
        oldest = next(iter(_ranked_at.values()))
        if oldest > now - window:
            break
        _ranked_at.popitem(last=False)


def burst_hold(
    queued: Iterable[str], ranked_at: Mapping[str, float], now: float, window_s: float
) -> float:
    """How long to wait before ranking ``queued`` lists, so that a burst gathers (seconds).

    A visitor's first change is ranked and pushed at once; a change of a visitor ranked less
    than ``window_s`` ago waits until that much time has passed since, gathering whatever
    else the burst brings into one more list and push. ``ranked_at``: when each visitor was
    last ranked (perf_counter).
    """
    if window_s <= 0:
        return 0.0
    last = max((ranked_at.get(user, -math.inf) for user in queued), default=-math.inf)
    return max(0.0, min(window_s, last + window_s - now))


async def _gather_burst(window_s: float) -> None:
    """Wait while a visitor just ranked changes again (`burst_hold`); else go on at once.

    Only the first `_BURST_LOOK` lists of each queue are looked at.
    """
    if window_s <= 0 or not _ranked_at:
        return
    queued = list_cache().first_queued(_BURST_LOOK)
    hold = burst_hold(queued, _ranked_at, time.perf_counter(), window_s)
    if hold > 0:
        await asyncio.sleep(hold)


def _must_wait(rec: Recommender) -> bool:
    """Whether ranking now may wait on something else: it then runs on the ranking thread.

    That is while a catalog write holds the index (a batch of new items, a rebuild), and
    whenever re-ranking plugins are installed (each call may take up to the plugin time
    limit): the event loop never blocks on either.
    """
    index_busy = rec.index is not None and rec.index.busy()
    return index_busy or plugins().has("personify_rerank")


async def _rank_unless_waiting(rec: Recommender, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on the event loop, or on the ranking thread while ranking may wait."""
    if _must_wait(rec):
        return await run_ranking(fn, *args)
    return fn(*args)


@app.service
class ListBuilder(mode.Service):  # type: ignore[misc] # mode is untyped
    """Recomputes queued lists in the background, and pushes each visitor's new list.

    It ranks on the event loop itself, in short slices between which the loop serves
    everything else. (On a thread beside the loop, each system call of the loop, a
    socket read or write, waited up to Python's GIL switch interval for the ranking thread:
    five times fewer lists per second.) Visitors with a socket open go first.
    """

    @mode.Service.task  # type: ignore[untyped-decorator]
    async def _run(self) -> None:
        wake = _builder_wake()
        users_cache, items_cache = list_cache(), similar_cache()
        size = current_config().recommend.list_size
        debounce_s = current_config().push.debounce_ms / 1000.0
        loop = asyncio.get_running_loop()

        def push_from_thread(built: list[tuple[str, Entry]]) -> None:
            loop.call_soon_threadsafe(self._push, built)

        refresh_at = 0.0  # perf_counter() before which no aged list is refreshed
        budget = RefreshBudget()
        ahead_at = 0.0  # perf_counter() before which no list is computed ahead
        ahead = RefreshBudget(_AHEAD_SHARE)
        while not self.should_stop:
            urgent = users_cache.urgent_queued()
            if urgent or users_cache.queued() or items_cache.queued():
                started = time.perf_counter()
                flood = users_cache.changed_backlog() > _AHEAD_BACKLOG
                if not urgent and flood and started < ahead_at:
                    # Only lists computed ahead wait, within their share of the loop: a
                    # visitor with a socket open ends the wait.
                    wake.clear()
                    if not users_cache.urgent_queued():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), ahead_at - started)
                    continue
                rec = recommender()
                if _must_wait(rec):
                    await run_ranking(_build_slice, rec, size, _THREAD_SLICE_S, push_from_thread)
                else:
                    _build_slice(rec, size, _BUILD_SLICE_S, self._push)
                if not urgent and flood:
                    spent = time.perf_counter() - started
                    share = ahead.share(spent)
                    AHEAD_SHARE.set(share)
                    ahead_at = started + spent / share
                _gauge()
                await asyncio.sleep(0)  # the loop's other work runs between slices
                continue
            # Nothing changed waits: refresh an aged list, within its share of the loop.
            started = time.perf_counter()
            if started >= refresh_at:
                # Lists not stored (popular items' similar items) before those only aged.
                items = items_cache.take_stale(_REFRESH_BATCH) if items_cache.ahead else []
                users = users_cache.take_stale(_REFRESH_BATCH - len(items))
                items += items_cache.take_stale(_REFRESH_BATCH - len(items) - len(users))
                if not users and not items and users_cache.unasked:
                    # Visitors who changed and never asked: only while the loop is all but
                    # idle (after a backfill, say), never beside steady traffic, and not while
                    # a training runs (its model would have them all ranked again).
                    budget.share(0.0)  # the loop's own work since the last refresh
                    if budget.load < budget.idle and not model_changing():
                        users = users_cache.take_unasked(_REFRESH_BATCH)
                    else:
                        refresh_at = started + _IDLE_CHECK_S
                if users or items:
                    rec = recommender()
                    try:
                        # On the loop, as the slices above: no wait for the interpreter lock.
                        await _rank_unless_waiting(rec, _build, rec, size, users, items)
                    except Exception:
                        _log.exception("list refresh failed; the lists are computed on request")
                    spent = time.perf_counter() - started
                    share = budget.share(spent)
                    REFRESH_SHARE.set(share)
                    refresh_at = started + spent + max(_REFRESH_PAUSE_S, spent * (1 / share - 1))
                    _gauge()
                    continue
            _gauge()
            wake.clear()
            if users_cache.refreshing() or items_cache.refreshing() or users_cache.unasked:
                # Aged lists wait for their turn; a changed list ends the wait early (its
                # visitor waits for no refresh).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(0.0, refresh_at - started))
                    await _gather_burst(debounce_s)
                continue
            await wake.wait()
            await _gather_burst(debounce_s)

    @staticmethod
    def _push(built: list[tuple[str, Entry]]) -> None:
        live = hub()
        for user_id, entry in built:
            changed = _changed_at.pop(user_id, None)
            if live.followed(user_id):
                started = time.perf_counter()
                push_list(user_id, entry.rec_id, entry.items, variant=entry.variant)
                if changed is not None:
                    PUSH_STAGE.labels("send").observe(time.perf_counter() - started)


def _gauge() -> None:
    users, items = list_cache(), similar_cache()
    for kind, cache in (("user", users), ("similar", items)):
        LISTS_CACHED.labels(kind, "lists").set(len(cache))
        LISTS_CACHED.labels(kind, "body_bytes").set(cache.body_bytes)
    LISTS_PENDING.set(users.changed_backlog() + items.changed_backlog())
    LISTS_REFRESHING.set(users.refreshing() + items.refreshing())
    LISTS_UNASKED.set(len(users.unasked))


def _model_swapped(model: Any) -> None:
    """A new model (or setting) is in use: lists ranked before are computed again.

    Behind the answers, a few at a time: until its turn comes, a visitor keeps the list of the
    model before, which is still a good one, rather than waiting for a list ranked on request
    while every other visitor does the same.
    """
    list_cache().age_all()
    similar_cache().age_all()
    ahead = current_config().recommend.similar_ahead
    model = model if model is not None else current_model()
    if model is not None and ahead > 0:
        # The items most visitors interacted with are the ones most often asked for: their
        # similar-items lists are ready before the first request.
        popular, _counts = model.popular(ahead)
        similar_cache().queue_ahead(popular)
    _gauge()
    _builder_wake().set()


on_swap(_model_swapped)
# Lists ranked while the text model loaded had no content source: ranked again once it is in.
on_index_ready(lambda: _model_swapped(None))


async def _on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
    """Partitions moved: lists computed from profiles this worker no longer holds go."""
    list_cache().clear()
    _just_written.clear()
    _table_data().reset()


async def _on_restored(sender: Any, **kwargs: Any) -> None:
    """The tables were restored from their changelogs: rows read meanwhile may be old."""
    _table_data().reset()


app.on_partitions_assigned.connect(_on_assigned)
app.on_rebalance_complete.connect(_on_restored)
