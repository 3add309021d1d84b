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
- ``repeat``: buy-again: products the visitor bought before, by how often and how recently,
  where the shop's history shows re-buying (`RepeatStats`); reason ``buy_again``. A bought
  product comes back only there (other sources may add to its score, never bring it alone).
- ``collab``: the learned model (`CollabModel`): the items of highest predicted preference for
  the visitor's vector, folded in from their recent items; reason ``taste`` with the visitor's
  item most like it in the model.
- ``popular``: the items most visitors interacted with over the history the model learned
  from (steadier than trending, which follows the last days); reason ``popular``.

`Recommender` holds the logic and reads its data through a `personify.tables.reader.DataSource`,
so the API (RocksDB tables, the live index) and the offline evaluation (in-memory state) run the
same code. This module ranks only: the lists kept ahead are `personify.agents.lists`.

Candidates travel as numpy arrays of item numbers (`ItemIds`) and scores (`Pool`), so scaling,
summing and choosing the top of several hundred candidates per list costs a few array
operations instead of a Python step per candidate. Each step adds in the same order as a
Python loop would, so the scores are the same to the last bit; reasons are worked out only
for the items that make the list.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from personify.agents.ranker import (
    DEPTH,
    Matrix,
    Recorder,
    Scorer,
    Visitor,
    candidate_features,
)
from personify.embeddings import VectorIndex
from personify.embeddings.collab import CollabModel
from personify.engine.config import DEFAULT_WEIGHTS, RecommendConfig
from personify.engine.models import new_id
from personify.tables import profiles, signals
from personify.tables.catalog import Catalog
from personify.tables.history import RepeatStats
from personify.tables.reader import DataSource, ItemIds, Top

__all__ = [
    "SEEDED",
    "Pool",
    "Recommendation",
    "Recommender",
    "Request",
    "blend",
]

Reason = dict[str, Any]
#: Per source: item id -> (raw score, reason or a function that builds it when needed).
Candidates = dict[str, tuple[float, Reason | Callable[[], Reason]]]
Numbers = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float64]
#: A source's reason is given when it makes at least this share of an item's score.
_REASON_SHARE = 0.2
_EMPTY_NUMBERS: Numbers = np.empty(0, dtype=np.int64)
_EMPTY_SCORES: Scores = np.empty(0, dtype=np.float64)
_NO_VISITOR = Visitor()


@dataclass(frozen=True, slots=True)
class Pool:
    """One source's candidates.

    Attributes:
        ids: the numbering of ``numbers``.
        numbers: the candidates' item numbers, each once.
        scores: their raw scores (the source's own scale).
        reason: why the source proposes an item (called only for items that make a list).
    """

    ids: ItemIds
    numbers: Numbers
    scores: Scores
    reason: Callable[[str], Reason]

    @classmethod
    def empty(cls, ids: ItemIds) -> Pool:
        """A source with no candidate."""
        return cls(ids, _EMPTY_NUMBERS, _EMPTY_SCORES, _no_reason)

    @classmethod
    def of(cls, cands: Candidates, ids: ItemIds) -> Pool:
        """The pool of per-item candidates (``{item: (score, reason)}``)."""
        numbers = ids.of(list(cands))
        scores = np.fromiter((v[0] for v in cands.values()), np.float64, count=len(cands))
        return cls(ids, numbers, scores, lambda item: _resolve(cands[item][1]))

    def __len__(self) -> int:
        return len(self.numbers)


def _no_reason(item: str) -> Reason:
    raise KeyError(item)


def _sum_by_item(numbers: list[Numbers], parts: list[Scores]) -> tuple[Numbers, Numbers, Scores]:
    """Each distinct number, where each given one went, and the sum of its parts.

    The parts are added in the order given, as ``total[i] += part`` in a loop would.
    """
    if len(numbers) == 1:  # a source's own candidates are distinct
        return numbers[0], np.arange(len(numbers[0])), parts[0]
    unique, where = np.unique(np.concatenate(numbers), return_inverse=True)
    # bincount adds each weight in input order: the same sums as `total[i] += part`.
    sums = np.bincount(where, weights=np.concatenate(parts), minlength=len(unique))
    return unique, where, sums.astype(np.float64, copy=False)


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
    sources: Mapping[str, Candidates | Pool],
    weights: Mapping[str, float],
    k: int,
    allowed: Callable[[str], bool],
    category_of: Callable[[str], str | None],
    max_per_category: int = 0,
    strength: Mapping[str, float] | None = None,
    *,
    explain: bool = True,
    ranker: Scorer | None = None,
    visitor: Visitor = _NO_VISITOR,
) -> list[Recommendation]:
    """Blend per-source candidates into the top ``k``.

    Each source is scaled so its best candidate scores 1 (times its ``strength``, default 1),
    multiplied by its weight and summed
    per item; an item's reasons are its sources' reasons, strongest first (a source that adds
    little to an item's score does not explain it). At most ``max_per_category`` items of one
    category are kept (0: no limit). Equal scores go in item id order. Without ``explain`` the
    items come without reasons (an offline evaluation needs only the order).

    With a ``ranker`` (`personify.agents.ranker`), the best `DEPTH` allowed candidates by
    blend score are re-ordered by the ranker's score, which is then each item's score;
    ``visitor`` is what the ranker sees of the visitor.
    """
    pools = _pools(sources)
    used: list[tuple[str, Pool, float]] = []
    for name, pool in pools.items():
        weight = weights.get(name, 0.0)
        if weight <= 0 or not len(pool):
            continue
        top = float(pool.scores.max())
        scale = weight * (strength or {}).get(name, 1.0) / top if top > 0 else 0.0
        if not 0.0 < scale < math.inf:  # nothing positive, or too faint to scale
            continue
        used.append((name, pool, scale))
    if not used:
        return []
    names = used[0][1].ids.names
    every = [pool.numbers for _n, pool, _s in used]
    numbers, where, totals = _sum_by_item(every, [pool.scores * scale for _n, pool, scale in used])
    number_of = numbers.tolist()
    total_of = totals.tolist()
    best_first = _best_first(totals, lambda j: names[number_of[j]])
    order: Iterator[int] = iter(best_first)
    score_of: Callable[[int], float] = total_of.__getitem__
    if ranker is not None:

        def features(at: Numbers, scores: Scores) -> Matrix:
            return candidate_features(pools, strength or {}, at, scores, visitor)

        ranked, score_of, rest = _reranked(
            best_first, names, number_of, allowed, ranker, features, numbers, totals, max(DEPTH, k)
        )
        order = itertools.chain(ranked, itertools.islice(best_first, rest, None))
    chosen: list[int] = []  # positions in `numbers`
    per_category: dict[str | None, int] = {}
    for j in order:
        item = names[number_of[j]]
        if not allowed(item):
            continue
        if max_per_category > 0:
            cat = category_of(item)
            if cat is not None:
                if per_category.get(cat, 0) >= max_per_category:
                    continue
                per_category[cat] = per_category.get(cat, 0) + 1
        chosen.append(j)
        if len(chosen) >= k:
            break
    if not explain:
        return [Recommendation(names[number_of[j]], score_of(j), []) for j in chosen]
    # Each chosen item's part from each source: the candidates of the chosen, in source order.
    slot = np.full(len(number_of), -1, dtype=np.int64)
    slot[chosen] = np.arange(len(chosen))
    source_of = np.repeat(np.arange(len(used)), [len(n) for n in every])
    raw = np.concatenate([pool.scores for _n, pool, _s in used])
    hits = np.flatnonzero(slot[where] >= 0)
    parts: list[list[tuple[float, str]]] = [[] for _ in chosen]
    for c, src, score in zip(
        slot[where[hits]].tolist(), source_of[hits].tolist(), raw[hits].tolist(), strict=True
    ):
        name, _pool, scale = used[src]
        parts[c].append((score * scale, name))
    out: list[Recommendation] = []
    for j, item_parts in zip(chosen, parts, strict=True):
        item, score = names[number_of[j]], total_of[j]
        reasons: list[Reason] = []
        for part, name in sorted(item_parts, reverse=True):
            if reasons and part < _REASON_SHARE * score:
                break
            reason = pools[name].reason(item)
            if reason not in reasons:
                reasons.append(reason)
        out.append(Recommendation(item, score_of(j), reasons))
    return out


def _reranked(
    order: list[int],
    names: list[str],
    number_of: list[int],
    allowed: Callable[[str], bool],
    ranker: Scorer,
    features: Callable[[Numbers, Scores], Matrix],
    numbers: Numbers,
    totals: Scores,
    depth: int,
) -> tuple[list[int], Callable[[int], float], int]:
    """The first ``depth`` allowed positions of ``order``, best by ``ranker`` first.

    Also each position's score: the ranker's for those; below the lowest of them for the rest
    (which follow in blend order, from the returned index of ``order`` on).
    """
    top: list[int] = []
    rest = len(order)
    for at_order, j in enumerate(order):
        if allowed(names[number_of[j]]):
            top.append(j)
            if len(top) >= depth:
                rest = at_order + 1
                break
    if not top:
        return [], lambda j: 0.0, rest
    at = np.asarray(top, dtype=np.int64)
    predicted = ranker.predict(features(numbers[at], totals[at]))
    ranked = np.argsort(-predicted, kind="stable").tolist()
    scores = dict(zip(top, predicted.tolist(), strict=True))
    below = float(predicted.min()) - 1.0
    return [top[i] for i in ranked], lambda j: scores.get(j, below), rest


def _best_first(totals: Scores, name_of: Callable[[int], str]) -> list[int]:
    """Positions of ``totals``, highest first and equal ones by name."""
    order = np.argsort(-totals, kind="stable")
    out: list[int] = order.tolist()
    ranked = totals[order]
    ties = np.flatnonzero(ranked[1:] == ranked[:-1])
    if not len(ties):
        return out
    # Runs of equal totals: [start, end) of each, sorted by name in place.
    starts = ties[np.r_[True, ties[1:] != ties[:-1] + 1]]
    ends = ties[np.r_[ties[1:] != ties[:-1] + 1, True]] + 2
    for i, j in zip(starts.tolist(), ends.tolist(), strict=True):
        out[i:j] = sorted(out[i:j], key=name_of)
    return out


def _pools(sources: Mapping[str, Candidates | Pool]) -> dict[str, Pool]:
    """Every source as a `Pool` (per-item candidates numbered like the pools given)."""
    ids = next((c.ids for c in sources.values() if isinstance(c, Pool)), None)
    if ids is None:
        ids = ItemIds()
    return {name: c if isinstance(c, Pool) else Pool.of(c, ids) for name, c in sources.items()}


def _visitor(profile: profiles.Profile | None, now_ms: int) -> Visitor:
    """What the ranker sees of the visitor whose list is ranked at ``now_ms``."""
    if not profile:
        return Visitor()
    last = profile.get("last_seen")
    return Visitor(
        history=float(sum(profile.get("counts", {}).values())),
        idle_h=0.0 if last is None else max(now_ms - last, 0) / 3_600_000.0,
    )


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


#: Sources whose candidates depend on how the visitor's recent items are weighted (the seeds).
SEEDED = frozenset({"covisit", "copurchase", "content"})
#: The reason of an item of the ``popular`` source.
_POPULAR: Reason = {"kind": "popular"}


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
        model: the learned collaborative model, or None while there is none.
        interaction_weights: weight of each event type in the model's fold-in (the
            ``[profiles.engagement_weights]`` it was trained with).
        repeat: how the shop's visitors re-buy (None or no re-buying: bought products stay
            out of lists).
        memo: where to keep each source's candidates per visitor and time (those of `SEEDED`
            sources per seed setting), for an offline evaluation that ranks the same frozen
            data under many blend settings; None, the default, keeps nothing.
        ranker: the learned ranker (`personify.agents.ranker`) that re-orders the blend's
            best candidates, or None: the blend's order.
    """

    def __init__(
        self,
        cfg: RecommendConfig,
        data: DataSource,
        catalog: Catalog,
        index: VectorIndex | None,
        affinity_half_life_s: float = 7 * 86400.0,
        personal: Callable[[profiles.Profile], bool] | None = None,
        model: CollabModel | None = None,
        interaction_weights: Mapping[str, float] = DEFAULT_WEIGHTS,
        repeat: RepeatStats | None = None,
        memo: dict[Any, tuple[Pool, float | None]] | None = None,
        ranker: Scorer | None = None,
    ) -> None:
        self.memo = memo
        self.ranker = ranker
        self.cfg = cfg
        #: What the `SEEDED` sources' candidates depend on besides the visitor.
        self._seeding = (cfg.seed_half_life, cfg.seeds, cfg.covisit_alpha)
        self.data = data
        self.catalog = catalog
        self.index = index
        self.affinity_half_life_s = affinity_half_life_s
        self.personal = personal
        self.model = model
        self.interaction_weights = interaction_weights
        self.repeat = repeat

    # -- sources ---------------------------------------------------------------------------
    def item_ids(self) -> ItemIds:
        """The item numbering for one ranking (the data source's, whose rows it caches)."""
        return self.data.item_ids()

    def _from_rows(
        self,
        kind: signals.SignalKind,
        seeds: list[str],
        now_ms: int,
        reason_kind: str,
        ids: ItemIds,
    ) -> Pool:
        """Neighbours of the seeds, each pair normalised, summed with recency-weighted seeds."""
        if not seeds:
            return Pool.empty(ids)
        keys = [signals.row_key(kind, s) for s in seeds]
        tops = self.data.tops(keys, now_ms, self.cfg.covisit_alpha, self.cfg.candidates, ids)
        weights = [math.pow(0.5, rank / self.cfg.seed_half_life) for rank in range(len(seeds))]
        present = [(w, top) for w, top in zip(weights, tops, strict=True) if top.pairs]
        if not present:
            return Pool.empty(ids)
        numbers, _where, scores = _sum_by_item(
            [top.numbers for _w, top in present], [w * top.scores for w, top in present]
        )

        def reason(item: str) -> Reason:
            # The seed that contributed most (the first of equals), as the sum was made.
            best, seed = 0.0, seeds[0]
            for s, w, top in zip(seeds, weights, tops, strict=True):
                if top.pairs:
                    score = top.score_of(item)
                    if score is not None and w * score > best:
                        best, seed = w * score, s
            return {"kind": reason_kind, "item_id": seed}

        return Pool(ids, numbers, scores, reason)

    def _trending(self, categories: list[tuple[str, float]], now_ms: int, ids: ItemIds) -> Pool:
        if not categories:
            return Pool.empty(ids)
        keys = [signals.row_key("trending", c) for c, _w in categories]
        tops = self.data.tops(keys, now_ms, None, self.cfg.candidates, ids)
        rows: list[tuple[float, float, Top, Reason]] = []
        for (cat, weight), top in zip(categories, tops, strict=True):
            if not top.pairs or top.pairs[0][1] <= 0:
                continue
            rows.append(
                (weight, top.pairs[0][1], top, {"kind": "trending", "category": cat or None})
            )
        if not rows:
            return Pool.empty(ids)
        # Each item scores its best part (weight * score / best of its row), if positive.
        parts = [weight * top.scores / best for weight, best, top, _r in rows]
        if len(rows) == 1:
            numbers, scores = rows[0][2].numbers, parts[0]
        else:
            numbers, where = np.unique(
                np.concatenate([top.numbers for _w, _b, top, _r in rows]), return_inverse=True
            )
            scores = np.zeros(len(numbers), dtype=np.float64)
            np.maximum.at(scores, where, np.concatenate(parts))
        keep = scores > 0
        if not keep.all():
            numbers, scores = numbers[keep], scores[keep]

        def reason(item: str) -> Reason:
            best_part, out = 0.0, rows[0][3]
            for weight, best, top, why in rows:
                score = top.score_of(item)
                if score is not None and weight * score / best > best_part:
                    best_part, out = weight * score / best, why
            return out

        return Pool(ids, numbers, scores, reason)

    def _content(self, seeds: list[str], exclude: Collection[str], ids: ItemIds) -> Pool:
        """Items close to the seeds' vectors weighted by recency (as in `_from_rows`).

        An item's reason is the seed closest to it.
        """
        index = self.index
        if index is None or not seeds:
            return Pool.empty(ids)
        weights = [math.pow(0.5, rank / self.cfg.seed_half_life) for rank in range(len(seeds))]
        match = index.search_items(seeds, weights, self.cfg.candidates, exclude=exclude)
        if match is None or not match.ids:
            return Pool.empty(ids)
        first, closest = match.seeds[0], match.closest

        def reason(item_id: str) -> Reason:
            return {"kind": "similar_to", "item_id": closest(item_id) or first}

        return Pool(ids, ids.of(match.ids), np.maximum(match.scores, 0.0), reason)

    def _chat(
        self, profile: profiles.Profile | None, now_ms: int, exclude: Collection[str], ids: ItemIds
    ) -> tuple[Pool, float]:
        """Items close to the chat vector, and the source's strength (how recent the chat is)."""
        if profile is None or self.index is None:
            return Pool.empty(ids), 0.0
        vec = profiles.chat_vector(profile, now_ms, self.cfg.chat_half_life_s)
        if vec is None:
            return Pool.empty(ids), 0.0
        strength = float(np.linalg.norm(vec))
        if strength < 1e-3:
            return Pool.empty(ids), 0.0
        found_ids, scores = self.index.search_ids(vec, self.cfg.candidates, exclude=exclude)
        positive = np.flatnonzero(scores > 0)
        if len(positive) < len(scores):
            found_ids = [found_ids[j] for j in positive.tolist()]
            scores = scores[positive]
        reason: Reason = {"kind": "matches_chat"}
        return Pool(ids, ids.of(found_ids), scores, lambda _item: reason), min(strength, 1.0)

    def _collab(
        self, profile: profiles.Profile | None, exclude: Collection[str], ids: ItemIds
    ) -> Pool:
        """The model's best items for the visitor's vector, folded in from their recent items.

        An item's reason is the visitor's item most like it in the model.
        """
        model = self.model
        if model is None or profile is None:
            return Pool.empty(ids)
        weights = self.interaction_weights
        history = [
            (r["item_id"], weights.get(r["type"], 0.0)) for r in profile.get("recent_items", ())
        ]
        history += [(item, weights.get("add_to_cart", 0.0)) for item in profile.get("cart", {})]
        history = [(item, w) for item, w in history if w > 0]
        if not history:
            return Pool.empty(ids)
        seeds = [item for item, _w in history]
        vector = model.fold_in(seeds, [w for _item, w in history])
        if vector is None:
            return Pool.empty(ids)
        found, scores = model.top(vector, self.cfg.candidates, exclude)
        positive = np.flatnonzero(scores > 0)
        if not len(positive):
            return Pool.empty(ids)
        found = [found[j] for j in positive.tolist()]

        most_like = model.nearest(seeds)

        def reason(item: str) -> Reason:
            return {"kind": "taste", "item_id": most_like(item) or seeds[0]}

        return Pool(ids, ids.of(found), scores[positive].astype(np.float64), reason)

    def _popular(self, exclude: Collection[str], ids: ItemIds) -> Pool:
        """The items most visitors interacted with over the history the model learned from."""
        if self.model is None:
            return Pool.empty(ids)
        found, counts = self.model.popular(self.cfg.candidates, exclude)
        if not found:
            return Pool.empty(ids)
        return Pool(ids, ids.of(found), counts, lambda _item: _POPULAR)

    def _rebuy(self, profile: profiles.Profile | None) -> dict[str, list[int]]:
        """The visitor's bought products that may come back (none where nobody re-buys)."""
        if profile is None or self.repeat is None or self.repeat.strength <= 0:
            return {}
        if self.cfg.weights.get("repeat", 0.0) <= 0:  # off: bought products stay out
            return {}
        bought: dict[str, list[int]] = profile.get("bought", {})
        return bought

    def _repeat(self, bought: dict[str, list[int]], now_ms: int, ids: ItemIds) -> Pool:
        """Bought products scored by how often, fading with time since the last purchase."""
        if not bought or self.repeat is None:
            return Pool.empty(ids)
        half_life_ms = self.repeat.half_life_s * 1000.0
        items = list(bought)
        times = np.fromiter((bought[i][0] for i in items), np.float64, count=len(items))
        last = np.fromiter((bought[i][1] for i in items), np.float64, count=len(items))
        # Faded from the latest purchase: the same order (the blend scales a source by its
        # best), without vanishing to denormal numbers for a visitor who bought long ago.
        age = np.maximum(now_ms - last, 0.0)
        scores = times * np.power(0.5, (age - age.min()) / half_life_ms)

        def reason(item: str) -> Reason:
            return {"kind": "buy_again", "item_id": item, "times": bought[item][0]}

        return Pool(ids, ids.of(items), scores, reason)

    # -- the answer ------------------------------------------------------------------------
    def sources(
        self,
        profile: profiles.Profile | None,
        request: Request,
        now_ms: int,
        exclude: Collection[str],
        ids: ItemIds | None = None,
        rebuy: dict[str, list[int]] | None = None,
    ) -> tuple[dict[str, Pool], dict[str, float]]:
        """Candidates of every source for this visitor, and each source's strength (0-1).

        ``rebuy``: the bought products buy-again may bring back (`_rebuy`); only with it may
        other sources score them (``exclude`` leaves them out).
        """
        ids = self.item_ids() if ids is None else ids
        seeds = _seeds(profile, request, self.cfg.seeds)
        bought = [
            r["item_id"]
            for r in (profile or {}).get("recent_items", ())
            if r["type"] in ("purchase", "add_to_cart")
        ][: self.cfg.seeds]
        bought += [i for i in (profile or {}).get("cart", {}) if i not in bought]
        memo = self.memo
        visitor = (
            None
            if memo is None or profile is None
            else (
                profile["user_id"],
                now_ms,
                request.category,
                request.context_item,
                tuple(request.exclude),
                bool(rebuy),
                self.cfg.candidates,
                self.cfg.chat_half_life_s,
            )
        )

        def fixed(name: str, make: Callable[[], tuple[Pool, float | None]]) -> Pool:
            """A source's candidates, from the memo where there is one (per seed setting)."""
            if memo is None or visitor is None:
                pool, power = make()
            else:
                key = (visitor, name, self._seeding if name in SEEDED else None)
                kept = memo.get(key)
                if kept is None:
                    kept = memo[key] = make()
                pool, power = kept
            if power is not None:
                strength[name] = power
            return pool

        strength: dict[str, float] = {}
        out = {
            "covisit": fixed(
                "covisit",
                lambda: (self._from_rows("covisit", seeds, now_ms, "similar_to", ids), None),
            ),
            "copurchase": fixed(
                "copurchase",
                lambda: (
                    self._from_rows("copurchase", bought, now_ms, "bought_together", ids),
                    None,
                ),
            ),
            "content": fixed("content", lambda: (self._content(seeds, exclude, ids), None)),
            # A faded chat counts less however well it matches: its strength.
            "chat": fixed("chat", lambda: self._chat(profile, now_ms, exclude, ids)),
            "category": fixed(
                "category",
                lambda: (
                    self._trending(self._categories(profile, request, now_ms), now_ms, ids),
                    None,
                ),
            ),
            "trending": fixed(
                "trending",
                lambda: (self._trending([(request.category or "", 1.0)], now_ms, ids), None),
            ),
            "collab": fixed("collab", lambda: (self._collab(profile, exclude, ids), None)),
            "popular": fixed("popular", lambda: (self._popular(exclude, ids), None)),
        }
        if rebuy:
            repeat = self.repeat.strength if self.repeat is not None else 0.0
            out["repeat"] = fixed("repeat", lambda: (self._repeat(rebuy, now_ms, ids), repeat))
        return out, strength

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
        *,
        explain: bool = True,
        ranker: Scorer | None = None,
    ) -> tuple[str, list[Recommendation]]:
        """(recommendation id, the visitor's top items); a new visitor gets trending items.

        Without ``explain`` the items come without reasons (`blend`). ``ranker`` stands in
        for the recommender's own.
        """
        if profile is None and user_id is not None:
            profile = self.data.profile(user_id)
        if profile is not None and self.personal is not None and not self.personal(profile):
            profile = None  # no consent to personalise: what a visitor never seen gets
        history = {r["item_id"] for r in (profile or {}).get("recent_items", ())}
        history.update((profile or {}).get("cart", {}))
        exclude = set(request.exclude) | history
        if request.context_item:
            exclude.add(request.context_item)
        rebuy = {
            item: entry
            for item, entry in self._rebuy(profile).items()
            if item not in request.exclude and item not in (profile or {}).get("cart", {})
        }
        sources, strength = self.sources(
            profile, request, now_ms, exclude - rebuy.keys(), rebuy=rebuy
        )
        scorer = self.ranker if ranker is None else ranker
        items = blend(
            sources,
            self.cfg.weights,
            request.k,
            self._allowed(exclude - rebuy.keys(), request.category),
            self.catalog.category_of,
            request.max_per_category,
            strength,
            explain=explain,
            ranker=scorer,
            visitor=_NO_VISITOR if scorer is None else _visitor(profile, now_ms),
        )
        if len(items) < request.k:
            items += self._fill(request, exclude, items)
        return new_id(), items

    def candidates(
        self, user_id: str | None, request: Request, now_ms: int
    ) -> tuple[list[str], Matrix]:
        """The blend's best `DEPTH` candidates for the visitor, and their ranker features."""
        recorder = Recorder()
        _rid, items = self.recommend(
            user_id, dataclasses.replace(request, k=DEPTH), now_ms, explain=False, ranker=recorder
        )
        return [r.item_id for r in items[: len(recorder.matrix)]], recorder.matrix

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
        ids = self.item_ids()
        sources = {
            "covisit": self._from_rows("covisit", [item_id], now_ms, "similar_to", ids),
            "copurchase": self._from_rows("copurchase", [item_id], now_ms, "bought_together", ids),
            "content": self._content([item_id], exclude, ids),
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
