"""Offline evaluation on a shop's own history: temporal hold-outs, ranking metrics, baselines.

Pure functions over interaction arrays (`History`), shared by ``personify evaluate``, the tuner
and ``bench/quality.py``, so that all three measure the same way:

- **Splits** (`global_split`, `last_split`): a global temporal cut (train before, every
  visitor's items after it are their targets), and each visitor's last interactions held out
  (their last order where they bought, else their last ``n`` interactions).
- **Metrics** (`Metrics`): NDCG@10, Recall@20, MAP@10, HR@10 per visitor with binary relevance,
  averaged; catalog coverage of the top 10.
- **Methods** (`Method`): popularity, buy-again (the visitor's own most-bought items), item-kNN,
  the learned model alone (ALS), and the engine's whole blend (`EngineMethod`, the code that
  serves lists, replayed over the training events).

A method ranks the whole catalog for a visitor; which items it may repeat is its own choice
(buy-again repeats, item-kNN does not), and targets include items bought before, so repeat
buying is measured where a shop has it.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from personify.agents.ranker import Matrix, Scorer
from personify.agents.recommend import SEEDED, Recommender, Request
from personify.embeddings import VectorIndex
from personify.embeddings.collab import AlsSettings, CollabModel, train_als
from personify.engine.config import DEFAULT_WEIGHTS, Config, RecommendConfig
from personify.tables import profiles, signals
from personify.tables.catalog import Catalog
from personify.tables.history import Interactions, repeat_stats
from personify.tables.reader import MemoryData

__all__ = [
    "CUTOFF",
    "KINDS",
    "RECALL_CUTOFF",
    "AlsMethod",
    "BprMethod",
    "BuyAgain",
    "EngineMethod",
    "History",
    "ItemKNN",
    "Method",
    "Metrics",
    "Popularity",
    "Split",
    "evaluate",
    "global_split",
    "last_split",
    "pair_weights",
    "train_model",
]

#: The K of NDCG, MAP, HR and coverage, and of recall.
CUTOFF = 10
RECALL_CUTOFF = 20
#: Event types of the history, in kind-number order (as `tables.history.Interactions`).
KINDS = Interactions.KINDS
_PURCHASE = KINDS.index("purchase")
_DISCOUNT = 1.0 / np.log2(np.arange(2, max(CUTOFF, RECALL_CUTOFF) + 2))

Ints = npt.NDArray[np.int64]


def pair_weights(
    users: npt.NDArray[np.integer[Any]],
    items: npt.NDArray[np.integer[Any]],
    weights: npt.NDArray[np.floating[Any]],
    n_items: int,
) -> tuple[Ints, Ints, npt.NDArray[np.float32]]:
    """One entry per (visitor, item) pair with the strongest weight of its interactions.

    A purchase outweighs the views before it; ten views of one item weigh as one (the model
    learns what goes with what; how often a visitor comes back to an item is another signal).
    Pairs of weight 0 are left out.
    """
    key = users.astype(np.int64) * n_items + items.astype(np.int64)
    order = np.argsort(key, kind="stable")
    key, w = key[order], weights[order].astype(np.float32)
    if not len(key):
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    best = np.maximum.reduceat(w, starts)
    pairs = key[starts]
    keep = best > 0
    return pairs[keep] // n_items, pairs[keep] % n_items, best[keep]


@dataclass(frozen=True)
class History:
    """Interactions as arrays, one entry each, in time order.

    Attributes:
        users: visitor ids by number.
        items: item ids by number (the catalog to rank).
        user: each interaction's visitor number.
        item: each interaction's item number.
        kind: each interaction's event type (position in `KINDS`).
        ts_ms: each interaction's time.
    """

    users: list[str]
    items: list[str]
    user: Ints
    item: Ints
    kind: npt.NDArray[np.int8]
    ts_ms: Ints

    def __post_init__(self) -> None:
        n = len(self.user)
        if not (len(self.item) == len(self.kind) == len(self.ts_ms) == n):
            raise ValueError("user, item, kind and ts_ms must have the same length")

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def of(
        cls,
        rows: Iterable[tuple[str, str, str, int]],
        items: Sequence[str] = (),
    ) -> History:
        """A history of ``(visitor, item, event type, time ms)`` rows.

        ``items`` is the catalog; items only found in rows are numbered after it.
        """
        users: dict[str, int] = {}
        numbers = {item: i for i, item in enumerate(items)}
        kinds = {k: n for n, k in enumerate(KINDS)}
        u, i, k, t = [], [], [], []
        for user, item, etype, ts in rows:
            if etype not in kinds:
                raise ValueError(f"unknown event type {etype!r}; expected one of {KINDS}")
            u.append(users.setdefault(user, len(users)))
            i.append(numbers.setdefault(item, len(numbers)))
            k.append(kinds[etype])
            t.append(ts)
        return cls._sorted(
            list(users),
            list(numbers),
            np.asarray(u, dtype=np.int64),
            np.asarray(i, dtype=np.int64),
            np.asarray(k, dtype=np.int8),
            np.asarray(t, dtype=np.int64),
        )

    @classmethod
    def from_interactions(cls, rows: Interactions) -> History:
        """The history the engine keeps (`personify.tables.history.scan`)."""
        return cls._sorted(
            list(rows.users),
            list(rows.items),
            rows.user.astype(np.int64),
            rows.item.astype(np.int64),
            rows.kind,
            rows.ts_ms,
        )

    @classmethod
    def _sorted(
        cls,
        users: list[str],
        items: list[str],
        user: Ints,
        item: Ints,
        kind: npt.NDArray[np.int8],
        ts: Ints,
    ) -> History:
        order = np.lexsort((item, user, ts))
        return cls(users, items, user[order], item[order], kind[order], ts[order])

    def without_users(self) -> History:
        """The same interactions without the visitors' names (`with_users` gives them back)."""
        return History([], self.items, self.user, self.item, self.kind, self.ts_ms)

    def with_users(self, users: list[str]) -> History:
        """The same interactions with ``users`` as the visitors' names, by number."""
        return History(users, self.items, self.user, self.item, self.kind, self.ts_ms)

    def take(self, mask: npt.NDArray[np.bool_]) -> History:
        """The interactions where ``mask`` holds (same numbering)."""
        return History(
            self.users,
            self.items,
            self.user[mask],
            self.item[mask],
            self.kind[mask],
            self.ts_ms[mask],
        )

    def by_user(self) -> dict[int, Ints]:
        """Each visitor's interaction positions, in time order."""
        order = np.argsort(self.user, kind="stable")
        users = self.user[order]
        if not len(users):
            return {}
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        bounds = [*starts.tolist(), len(users)]
        return {
            int(users[bounds[j]]): order[bounds[j] : bounds[j + 1]] for j in range(len(bounds) - 1)
        }

    def describe(self) -> dict[str, Any]:
        """Size and shape, as JSON."""
        purchases = self.kind == _PURCHASE
        repeat = 0.0
        if purchases.any():
            pairs = self.user[purchases] * len(self.items) + self.item[purchases]
            repeat = 1.0 - len(np.unique(pairs)) / int(purchases.sum())
        return {
            "interactions": len(self),
            "users": len(np.unique(self.user)),
            "items": len(np.unique(self.item)),
            "catalog": len(self.items),
            "purchases": int(purchases.sum()),
            "repeat_purchase_share": round(repeat, 4),
            "from_ms": int(self.ts_ms.min()) if len(self) else None,
            "to_ms": int(self.ts_ms.max()) if len(self) else None,
        }


@dataclass(frozen=True)
class Split:
    """Training interactions and each evaluated visitor's held-out items.

    Attributes:
        name: the protocol.
        train: what methods learn from.
        targets: visitor number -> the items they interacted with in the held-out part.
        now_ms: when each visitor's list is asked for: the start of their held-out part.
        held: which interactions of the history that was split are held out (not in
            ``train``).
    """

    name: str
    train: History
    targets: dict[int, set[int]]
    now_ms: dict[int, int]
    held: npt.NDArray[np.bool_]


def global_split(history: History, test_fraction: float = 0.2) -> Split:
    """Cut at the time by which ``1 - test_fraction`` of the interactions happened.

    Every visitor with interactions on both sides is evaluated against the items of theirs
    after the cut.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    cut = int(np.quantile(history.ts_ms, 1.0 - test_fraction, method="higher"))
    before = history.ts_ms < cut
    train = history.take(before)
    known = set(np.unique(train.user).tolist())
    targets: dict[int, set[int]] = defaultdict(set)
    for user, item in zip(
        history.user[~before].tolist(), history.item[~before].tolist(), strict=True
    ):
        if user in known:
            targets[user].add(item)
    return Split("global", train, dict(targets), dict.fromkeys(targets, cut), ~before)


def last_split(history: History, n: int = 10) -> Split:
    """Hold out each visitor's last order (if they bought) or else their last ``n`` interactions.

    A visitor is evaluated when something of theirs is left to learn from; their list is asked
    for at the time of their first held-out interaction. Other visitors' later interactions
    stay in training (what others did until the end is known).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    keep = np.ones(len(history), dtype=bool)
    targets: dict[int, set[int]] = {}
    now: dict[int, int] = {}
    for user, rows in history.by_user().items():
        bought = rows[history.kind[rows] == _PURCHASE]
        if len(bought):
            last_ts = history.ts_ms[bought[-1]]
            held = rows[(history.kind[rows] == _PURCHASE) & (history.ts_ms[rows] == last_ts)]
            # The visit of the order (views and cart adds at or after it) goes with it.
            held = np.union1d(held, rows[history.ts_ms[rows] >= last_ts])
        else:
            held = rows[-n:]
        if len(held) >= len(rows):
            continue
        keep[held] = False
        targets[user] = set(history.item[held].tolist())
        now[user] = int(history.ts_ms[held].min())
    return Split(f"last-{n}", history.take(keep), targets, now, ~keep)


@dataclass(frozen=True, slots=True)
class Metrics:
    """Averaged metrics of one method under one protocol.

    Attributes:
        ndcg10: mean NDCG@10; ``ndcg10_ci95`` is 1.96 standard errors of it.
        recall20: mean Recall@20.
        map10: mean AP@10.
        hr10: share of visitors with a hit in the top 10.
        coverage10: share of the catalog in any top-10 list.
        users: visitors averaged over.
        seconds: time to fit and rank.
    """

    ndcg10: float
    ndcg10_ci95: float
    recall20: float
    map10: float
    hr10: float
    coverage10: float
    users: int
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """Rounded, as JSON."""
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in asdict(self).items()}


def unit_metrics(ranked: Sequence[int], relevant: set[int]) -> tuple[float, float, float, float]:
    """NDCG@10, Recall@20, AP@10 and HR@10 of one ranked list against ``relevant``."""
    if not relevant:
        raise ValueError("a visitor with no held-out item cannot be scored")
    hits = np.fromiter((i in relevant for i in ranked[:RECALL_CUTOFF]), dtype=bool)
    top = hits[:CUTOFF]
    ideal = min(len(relevant), CUTOFF)
    dcg = float(_DISCOUNT[: len(top)][top].sum())
    ndcg = dcg / float(_DISCOUNT[:ideal].sum())
    recall = float(hits.sum()) / len(relevant)
    precision_at = np.cumsum(top) / np.arange(1, len(top) + 1)
    ap = float(precision_at[top].sum()) / ideal
    return ndcg, recall, ap, float(top.any())


class Method(Protocol):
    """A way to rank the catalog for a visitor, learned from a training history."""

    name: str

    def fit(self, train: History) -> None:
        """Learn from ``train``."""
        ...

    def recommend(self, user: int, k: int, now_ms: int) -> list[int]:
        """The visitor's top ``k`` item numbers, asked for at ``now_ms``."""
        ...


def _top(scores: npt.NDArray[np.float64], k: int, drop: Iterable[int] = ()) -> list[int]:
    scores = scores.astype(np.float64, copy=True)
    dropped = list(drop)
    if dropped:
        scores[dropped] = -np.inf
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    best = best[np.lexsort((best, -scores[best]))]
    return [int(i) for i in best if scores[i] > -np.inf]


class _Base:
    """History per visitor and training popularity: what every baseline needs."""

    name = "base"
    repeat = False

    def fit(self, train: History) -> None:
        """See `Method.fit`."""
        self.n_items = len(train.items)
        self.seen: dict[int, Ints] = {
            u: np.unique(train.item[rows]) for u, rows in train.by_user().items()
        }
        counts = np.bincount(train.item, minlength=self.n_items).astype(np.float64)
        self.popularity = counts / max(float(counts.max()), 1.0)

    def _drop(self, user: int) -> Iterable[int]:
        return () if self.repeat else self.seen.get(user, np.empty(0, np.int64)).tolist()


class Popularity(_Base):
    """The most interacted-with items of the training period (with or without the visitor's own)."""

    def __init__(self, repeat: bool = False) -> None:
        self.repeat = repeat
        self.name = "popularity" + (" (repeats)" if repeat else "")

    def recommend(self, user: int, k: int, now_ms: int) -> list[int]:
        """See `Method.recommend`."""
        return _top(self.popularity, k, self._drop(user))


class BuyAgain(_Base):
    """The visitor's own most-bought (else most interacted-with) items, then popularity."""

    name = "buy-again"
    repeat = True

    def fit(self, train: History) -> None:
        """See `Method.fit`."""
        super().fit(train)
        bought = train.kind == _PURCHASE
        source = train.take(bought) if bought.any() else train
        self.own: dict[int, Counter[int]] = defaultdict(Counter)
        self.last: dict[tuple[int, int], int] = {}
        for u, i, t in zip(
            source.user.tolist(), source.item.tolist(), source.ts_ms.tolist(), strict=True
        ):
            self.own[u][i] += 1
            self.last[(u, i)] = t

    def recommend(self, user: int, k: int, now_ms: int) -> list[int]:
        """See `Method.recommend`."""
        own = self.own.get(user, Counter())
        mine = sorted(own, key=lambda i: (-own[i], -self.last[(user, i)], i))[:k]
        if len(mine) >= k:
            return mine
        return mine + [i for i in _top(self.popularity, k + len(mine), mine)][: k - len(mine)]


class ItemKNN(_Base):
    """Items co-occurring with the visitor's items (cosine on visitor x item), summed."""

    def __init__(self, neighbours: int = 100, repeat: bool = False) -> None:
        self.neighbours = neighbours
        self.repeat = repeat
        self.name = f"item-kNN {neighbours}" + (" (repeats)" if repeat else "")

    def fit(self, train: History) -> None:
        """See `Method.fit`."""
        from scipy import sparse

        super().fit(train)
        u, i, _w = pair_weights(train.user, train.item, np.ones(len(train)), self.n_items)
        m = sparse.csr_matrix(
            (np.ones(len(u), dtype=np.float32), (u, i)),
            shape=(len(train.users), self.n_items),
        )
        co = (m.T @ m).tocsr().astype(np.float64)
        norms = np.sqrt(np.maximum(co.diagonal(), 1e-12))
        co.setdiag(0)
        co.eliminate_zeros()
        sim = sparse.diags(1.0 / norms) @ co @ sparse.diags(1.0 / norms)
        self.sim = _keep_top_per_row(sim.tocsr(), self.neighbours)

    def recommend(self, user: int, k: int, now_ms: int) -> list[int]:
        """See `Method.recommend`."""
        seen = self.seen.get(user)
        if seen is None or not len(seen):
            return _top(self.popularity, k)
        scores = np.asarray(self.sim[seen].sum(axis=0)).ravel() + 1e-6 * self.popularity
        return _top(scores, k, self._drop(user))


def _keep_top_per_row(matrix: Any, n: int) -> Any:
    """Each row's ``n`` largest entries (a kNN graph)."""
    from scipy import sparse

    rows, cols, vals = [], [], []
    for r in range(matrix.shape[0]):
        start, end = matrix.indptr[r], matrix.indptr[r + 1]
        if end - start > n:
            part = np.argpartition(-matrix.data[start:end], n - 1)[:n] + start
        else:
            part = np.arange(start, end)
        rows.append(np.full(len(part), r))
        cols.append(matrix.indices[part])
        vals.append(matrix.data[part])
    if not rows:
        return matrix
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=matrix.shape
    )


class AlsMethod(_Base):
    """The learned model alone: ALS item vectors, each visitor folded in from their history."""

    def __init__(
        self,
        settings: AlsSettings | None = None,
        weights: Mapping[str, float] | None = None,
        *,
        repeat: bool = False,
    ) -> None:
        self.settings = settings or AlsSettings()
        self.weights = dict(weights or {})
        self.repeat = repeat
        self.name = (
            f"ALS f={self.settings.factors} reg={self.settings.regularization:g} "
            f"alpha={self.settings.alpha:g}" + (" (repeats)" if repeat else "")
        )

    def fit(self, train: History) -> None:
        """See `Method.fit`."""
        super().fit(train)
        self.model = train_model(train, self.settings, self.weights)
        self.kind_weight = _kind_weights(self.weights)
        self.rows = train.by_user()
        self.train = train

    def recommend(self, user: int, k: int, now_ms: int) -> list[int]:
        """See `Method.recommend`."""
        rows = self.rows.get(user)
        if rows is None or self.model is None:
            return _top(self.popularity, k)
        items = [self.train.items[i] for i in self.train.item[rows].tolist()]
        vector = self.model.fold_in(items, self.kind_weight[self.train.kind[rows]].tolist())
        if vector is None:
            return _top(self.popularity, k)
        scores = np.full(self.n_items, -1e9)
        positions = np.asarray([self._number[i] for i in self.model.item_ids], dtype=np.int64)
        scores[positions] = self.model.scores(vector)
        return _top(scores + 1e-9 * self.popularity, k, self._drop(user))

    @property
    def _number(self) -> dict[str, int]:
        cached: dict[str, int] | None = getattr(self, "_numbers", None)
        if cached is None:
            cached = {item: i for i, item in enumerate(self.train.items)}
            self._numbers = cached
        return cached


class BprMethod(_Base):
    """Bayesian personalised ranking (implicit's BPR): pairwise-learned visitor and item vectors.

    Each visitor's vector is learned with the items (not folded in), so only visitors of the
    training history get a personal list; others get popularity.
    """

    def __init__(
        self,
        factors: int = 64,
        learning_rate: float = 0.05,
        regularization: float = 0.01,
        iterations: int = 100,
        *,
        repeat: bool = False,
        seed: int = 7,
    ) -> None:
        self.factors = factors
        self.learning_rate = learning_rate
        self.regularization = regularization
        self.iterations = iterations
        self.repeat = repeat
        self.seed = seed
        self.name = (
            f"BPR f={factors} lr={learning_rate:g} reg={regularization:g} it={iterations}"
            + (" (repeats)" if repeat else "")
        )

    def fit(self, train: History) -> None:
        """See `Method.fit`."""
        from implicit.cpu.bpr import BayesianPersonalizedRanking
        from scipy import sparse
        from threadpoolctl import threadpool_limits

        super().fit(train)
        n_users = int(train.user.max()) + 1 if len(train) else 0
        matrix = sparse.csr_matrix(
            (np.ones(len(train), dtype=np.float32), (train.user, train.item)),
            shape=(n_users, self.n_items),
        )
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
        self.users: npt.NDArray[np.float32] | None = None
        if not matrix.nnz:
            return
        with threadpool_limits(1, "blas"):
            bpr = BayesianPersonalizedRanking(
                factors=self.factors,
                learning_rate=self.learning_rate,
                regularization=self.regularization,
                iterations=self.iterations,
                num_threads=1,
                random_state=self.seed,
            )
            bpr.fit(matrix, show_progress=False)
        self.users = np.asarray(bpr.user_factors, dtype=np.float32)
        self.items = np.asarray(bpr.item_factors, dtype=np.float32)

    def recommend(self, user: int, k: int, now_ms: int) -> list[int]:
        """See `Method.recommend`."""
        if self.users is None or user >= len(self.users) or user not in self.seen:
            return _top(self.popularity, k, self._drop(user))
        scores = (self.items @ self.users[user]).astype(np.float64)
        return _top(scores + 1e-9 * self.popularity, k, self._drop(user))


def _kind_weights(weights: Mapping[str, float]) -> npt.NDArray[np.float64]:
    return np.asarray([weights.get(k, DEFAULT_WEIGHTS[k]) for k in KINDS], dtype=np.float64)


def train_model(
    train: History,
    settings: AlsSettings,
    weights: Mapping[str, float] | None = None,
    *,
    threads: int = 1,
) -> CollabModel | None:
    """The learned model on ``train``, as the engine's trainer trains it (None: nothing to learn).

    Each (visitor, item) pair weighs its strongest interaction (`pair_weights`, with the event
    types weighted by ``weights``); items nobody interacted with are left out of the model.
    """
    w = _kind_weights(weights or {})[train.kind]
    u, i, pw = pair_weights(train.user, train.item, w, len(train.items))
    if not len(u):
        return None
    used = np.unique(i)
    remap = np.full(len(train.items), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return train_als(
        u, remap[i], pw, [train.items[j] for j in used.tolist()], settings, threads=threads
    )


class EngineMethod:
    """The engine's own ranking (`Recommender`, every source blended) over a training history.

    The training interactions are folded in time order into profiles and the collaborative
    signals exactly as the profile agent folds events (item views, clicks, cart adds, and the
    lines of one visitor's purchases at one time as one order); the learned model is trained as
    the trainer trains it; lists come from `Recommender.recommend` at the end of training.

    Args:
        config: the engine's configuration (its [recommend], [profiles] and [model]).
        index: the item text vectors, when there are any (the content and chat sources).
        category_of: each item's category, when known.
        name: the label in reports.
        ranker: the learned ranker that re-orders the blend's best candidates, if any.
    """

    def __init__(
        self,
        config: Config,
        index: VectorIndex | None = None,
        category_of: Mapping[str, str | None] | None = None,
        name: str = "engine",
        ranker: Scorer | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.category_of = dict(category_of or {})
        self.name = name
        self.ranker = ranker

    def fit(self, train: History) -> None:
        """See `Method.fit`."""
        cfg = self.config
        self.train = train
        self.catalog = Catalog()
        for item in train.items:
            self.catalog.put(
                {"item_id": item, "title": item, "category": self.category_of.get(item)}
            )
        self.data = MemoryData(cfg.recommend, frozen=True)
        model = None
        if cfg.model.enabled:  # as the trainer: the model, whatever the weights (tuning may raise)
            m = cfg.model
            settings = AlsSettings(m.factors, m.regularization, m.alpha, m.iterations)
            model = train_model(train, settings, cfg.profiles.engagement_weights)
        self.recommender = Recommender(
            cfg.recommend,
            self.data,
            self.catalog,
            self.index,
            cfg.profiles.affinity_half_life_s,
            model=model,
            interaction_weights=cfg.profiles.engagement_weights,
            repeat=repeat_stats(train.user, train.item, train.kind, train.ts_ms),
            memo={},  # the fold is frozen: settings tried on it share what they do not change
            ranker=self.ranker,
        )
        self._fold(train)
        self._number = {item: i for i, item in enumerate(train.items)}

    def retuned(
        self,
        recommend: RecommendConfig,
        name: str | None = None,
        ranker: Scorer | None = None,
    ) -> EngineMethod:
        """This fitted engine ranking with other [recommend] settings (the fold is shared).

        Only settings that act when a list is ranked take effect (blend weights, seeds);
        those that shape the fold (windows, half-lives of the signals) keep their fitted values.
        With a ``ranker``, it re-orders the blend's best candidates.
        """
        other = copy.copy(self)
        other.name = name or self.name
        other.ranker = ranker
        rec = self.recommender
        memo = rec.memo
        if memo is not None and recommend.seed_half_life != rec.cfg.seed_half_life:
            # Candidates of the seeds under another setting: not asked for again while tuning.
            for key in [k for k in memo if k[1] in SEEDED]:
                del memo[key]
        other.recommender = Recommender(
            recommend,
            self.data,
            self.catalog,
            self.index,
            rec.affinity_half_life_s,
            model=rec.model,
            interaction_weights=rec.interaction_weights,
            repeat=rec.repeat,
            memo=rec.memo,
            ranker=ranker,
        )
        return other

    def candidates(
        self, user: int, now_ms: int, relevant: Collection[int] = ()
    ) -> tuple[Matrix, npt.NDArray[np.float32]]:
        """The blend's best candidates' ranker features, and which are in ``relevant`` (1/0)."""
        names, matrix = self.recommender.candidates(
            self.train.users[user] if user < len(self.train.users) else None, Request(), now_ms
        )
        number = self._number
        labels = np.fromiter(
            (1.0 if number.get(name, -1) in relevant else 0.0 for name in names),
            dtype=np.float32,
            count=len(names),
        )
        return matrix, labels

    def _fold(self, train: History) -> None:
        cfg = self.config
        batch = signals.SignalBatch(cfg.recommend, cfg.profiles, self.category_of.get)
        events = _events(train, self.category_of)
        for n, (user, event) in enumerate(events):
            p = self.data.profiles.get(user)
            if p is None:
                p = self.data.profiles[user] = profiles.new_profile(user)
            profiles.apply_events(p, [event], cfg.profiles, observe=batch.observe)
            if n % 1000 == 999:
                batch.fold_rows(self.data.rows_by_key)
                batch = signals.SignalBatch(cfg.recommend, cfg.profiles, self.category_of.get)
        batch.fold_rows(self.data.rows_by_key)

    def recommend(self, user: int, k: int, now_ms: int) -> list[int]:
        """See `Method.recommend`."""
        _rid, items = self.recommender.recommend(
            self.train.users[user] if user < len(self.train.users) else None,
            Request(k=k),
            now_ms,
            explain=False,
        )
        return [self._number[r.item_id] for r in items if r.item_id in self._number]


def _events(
    train: History, category_of: Mapping[str, str | None]
) -> list[tuple[str, dict[str, Any]]]:
    """The training interactions as the engine's events.

    A visitor's purchases at one time are one order.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    order_at: dict[tuple[int, int], dict[str, Any]] = {}
    for n, (u, i, kind, ts) in enumerate(
        zip(
            train.user.tolist(),
            train.item.tolist(),
            train.kind.tolist(),
            train.ts_ms.tolist(),
            strict=True,
        )
    ):
        user, item, etype = train.users[u], train.items[i], KINDS[kind]
        category = category_of.get(item)
        if etype == "purchase":
            order = order_at.get((u, ts))
            line = {"item_id": item, "quantity": 1, "price": 0.0, "category": category}
            if order is not None:
                order["properties"]["items"].append(line)
                continue
            order = {
                "event_id": f"e{n}",
                "type": "purchase",
                "user_id": user,
                "item_id": None,
                "ts_ms": ts,
                "properties": {"items": [line], "revenue": 0.0, "currency": "USD"},
            }
            order_at[(u, ts)] = order
            out.append((user, order))
            continue
        props: dict[str, Any] = {"category": category}
        if etype == "add_to_cart":
            props.update(quantity=1, price=None)
        out.append(
            (
                user,
                {
                    "event_id": f"e{n}",
                    "type": etype,
                    "user_id": user,
                    "item_id": item,
                    "ts_ms": ts,
                    "properties": props,
                },
            )
        )
    return out


@dataclass
class Result:
    """One method's figures under one split."""

    method: str
    split: str
    metrics: Metrics
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate(
    split: Split,
    methods: Sequence[Method],
    *,
    users: Sequence[int] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    fit: bool = True,
) -> list[Result]:
    """Fit each method on ``split.train`` and score its top lists against the targets.

    Args:
        split: the protocol's training part and targets.
        methods: what to evaluate (fitted here, in order).
        users: evaluate these visitors only (default: every visitor with targets).
        progress: called with (method name, visitors done, visitors in all).
        fit: False when the methods are already fitted on ``split.train``.
    """
    chosen = sorted(split.targets) if users is None else [u for u in users if u in split.targets]
    out: list[Result] = []
    for method in methods:
        started = time.perf_counter()
        if fit:
            method.fit(split.train)
        sums = np.zeros(4)
        squares = 0.0
        shown: set[int] = set()
        for n, user in enumerate(chosen):
            ranked = method.recommend(user, RECALL_CUTOFF, split.now_ms[user])
            shown.update(ranked[:CUTOFF])
            unit = unit_metrics(ranked, split.targets[user])
            sums += unit
            squares += unit[0] ** 2
            if progress is not None and (n % 200 == 199 or n == len(chosen) - 1):
                progress(method.name, n + 1, len(chosen))
        count = max(len(chosen), 1)
        mean = sums / count
        var = max(squares / count - mean[0] ** 2, 0.0)
        metrics = Metrics(
            ndcg10=float(mean[0]),
            ndcg10_ci95=1.96 * math.sqrt(var / count),
            recall20=float(mean[1]),
            map10=float(mean[2]),
            hr10=float(mean[3]),
            coverage10=len(shown) / max(len(split.train.items), 1),
            users=len(chosen),
            seconds=time.perf_counter() - started,
        )
        out.append(Result(method.name, split.name, metrics))
    return out
