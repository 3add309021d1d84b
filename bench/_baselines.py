"""Baselines for the quality benchmark, each a `Recommender` (see ``_harness``).

- `RandomRanking`: a fixed random order of the catalog per user (the floor).
- `Popularity`: train interaction counts, optionally time-decayed (exponential half-life).
  ``observe`` updates (and decays) the counts: trending.
- `ItemKNN`: item-item co-visitation: two items co-occur when one user interacted with both
  within ``window`` positions of each other in their time-ordered history (None: anywhere in
  it); similarity = co-occurrences / sqrt(count_i * count_j) (cosine on binary vectors), each
  item keeping only its ``neighbours`` most similar items; a user's score for a candidate is
  the sum of its similarities to the user's ``history`` most recent items. ``observe``
  extends the user's history and, with ``learn=True``, also updates co-occurrences and counts.
- `ContentSimilarity`: cosine between an item's text vector (all-MiniLM-L6-v2 through any
  `personify.embeddings.Encoder`) and the user's profile, the normalised mean of the vectors of
  their ``history`` most recent items weighted by ``0.5 ** (age / half_life)`` (age 0 = most
  recent). ``observe`` extends the user's history (the vectors never change).
- `ImplicitMF`: ``implicit``'s ALS or BPR on the binary user x item training matrix. For ALS,
  ``observe`` extends the user's history and the user's factors are recomputed from it with
  the item factors fixed (implicit's ``recalculate_user``, "fold-in"); BPR has no ``observe``
  that works.

Shared rules: the candidate set is the whole catalog given to ``fit``; every method ranks by a
dense score over it with the excluded items removed, and ties break by catalog order. A user a
method knows nothing about gets the training popularity ranking. `ItemKNN` adds
``1e-6 * count / max(count)`` to its scores so that candidates no neighbour reaches are ranked
by popularity (the smallest real similarity is about 1/500, far above that).
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from _movielens import Interaction, Item
from scipy import sparse
from threadpoolctl import threadpool_limits

from personify.embeddings import Encoder

__all__ = ["ContentSimilarity", "ImplicitMF", "ItemKNN", "Popularity", "RandomRanking"]

Scores = npt.NDArray[np.float64]
_DAY = 86_400.0
_TIE = 1e-6


class _CatalogScorer:
    """Plumbing shared by the baselines: the catalog index and top-k with exclusions."""

    _ids: list[str]
    _pos: dict[str, int]
    _counts: Scores

    def _index(self, train: Sequence[Interaction], items: Sequence[Item]) -> npt.NDArray[np.intp]:
        """Index the catalog (items, then any unknown item of ``train``); train item positions."""
        ids = list(dict.fromkeys([it.item_id for it in items] + [e.item_id for e in train]))
        self._ids = ids
        self._pos = {item: i for i, item in enumerate(ids)}
        positions = np.fromiter(
            (self._pos[e.item_id] for e in train), dtype=np.intp, count=len(train)
        )
        self._counts = np.bincount(positions, minlength=len(ids)).astype(np.float64)
        return positions

    def _scores(self, user_id: str) -> Scores:
        """Dense scores over the catalog for one user (higher is better)."""
        raise NotImplementedError

    def recommend(self, user_id: str, k: int, exclude: Collection[str]) -> list[str]:
        """The user's top-``k`` catalog ids, best first, none of them in ``exclude``."""
        scores = np.array(self._scores(user_id), dtype=np.float64)  # a copy we may edit
        if exclude:
            drop = [p for p in map(self._pos.get, exclude) if p is not None]
            scores[drop] = -np.inf
        k = min(k, len(self._ids))
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]
        return [self._ids[i] for i in top if scores[i] != -np.inf]


class RandomRanking(_CatalogScorer):
    """A random ranking of the catalog, the same for a user on every call (a sanity floor).

    Args:
        seed: mixed with a CRC-32 of the user id to seed the user's order.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def params(self) -> dict[str, Any]:
        """The hyperparameters, for reports."""
        return {}

    def fit(self, train: Sequence[Interaction], items: Sequence[Item]) -> None:
        """Index the catalog (nothing is learnt)."""
        self._index(train, items)

    def _scores(self, user_id: str) -> Scores:
        rng = np.random.default_rng([self.seed, zlib.crc32(user_id.encode())])
        return rng.random(len(self._ids))


class Popularity(_CatalogScorer):
    """Most interacted-with items, each interaction weighted ``0.5 ** (age / half-life)``.

    Args:
        half_life_days: half-life of an interaction's weight, in days (None: no decay).
    """

    def __init__(self, half_life_days: float | None = None) -> None:
        self.half_life_days = half_life_days
        self._score: Scores = np.zeros(0)
        self._now = 0.0

    def params(self) -> dict[str, Any]:
        """The hyperparameters, for reports."""
        return {"half_life_days": self.half_life_days}

    def fit(self, train: Sequence[Interaction], items: Sequence[Item]) -> None:
        """Count (and decay to the last training timestamp) every training interaction."""
        positions = self._index(train, items)
        self._now = max((e.timestamp for e in train), default=0.0)
        if self.half_life_days is None:
            self._score = self._counts.copy()
            return
        ages = self._now - np.fromiter((e.timestamp for e in train), np.float64, len(train))
        weights = 0.5 ** (ages / (self.half_life_days * _DAY))
        self._score = np.bincount(positions, weights=weights, minlength=len(self._ids)).astype(
            np.float64
        )

    def observe(self, event: Interaction) -> None:
        """Count one more interaction, decaying the others to its timestamp first."""
        pos = self._pos.get(event.item_id)
        if pos is None:
            return
        if self.half_life_days is not None and event.timestamp > self._now:
            self._score *= 0.5 ** ((event.timestamp - self._now) / (self.half_life_days * _DAY))
            self._now = event.timestamp
        self._score[pos] += 1.0

    def _scores(self, user_id: str) -> Scores:
        return self._score


class ItemKNN(_CatalogScorer):
    """Item-item co-visitation with cosine normalisation (see the module doc).

    Args:
        neighbours: similar items kept per item (None: all).
        window: co-occurrence window in positions of a user's history (None: whole history).
        history: the user's most recent items scored from (None: all of them).
        learn: whether ``observe`` also updates co-occurrences and counts (False: it only
            extends the user's history, the similarities stay as fitted).
    """

    def __init__(
        self,
        neighbours: int | None = 100,
        window: int | None = None,
        history: int | None = 20,
        *,
        learn: bool = True,
    ) -> None:
        self.neighbours = neighbours
        self.window = window
        self.history = history
        self.learn = learn
        self._co: npt.NDArray[np.float64] = np.zeros((0, 0))
        self._similar: npt.NDArray[np.float64] | None = None
        self._hist: dict[str, list[int]] = {}

    def params(self) -> dict[str, Any]:
        """The hyperparameters, for reports."""
        return {"neighbours": self.neighbours, "window": self.window, "history": self.history}

    def fit(self, train: Sequence[Interaction], items: Sequence[Item]) -> None:
        """Count co-occurrences in every user's time-ordered training history."""
        positions = self._index(train, items)
        n = len(self._ids)
        self._hist = {}
        for event, pos in zip(train, positions.tolist(), strict=True):
            self._hist.setdefault(event.user_id, []).append(pos)
        if self.window is None:
            users = {u: i for i, u in enumerate(self._hist)}
            rows = np.fromiter((users[e.user_id] for e in train), np.intp, len(train))
            matrix = sparse.csr_matrix(
                (np.ones(len(train)), (rows, positions)), shape=(len(users), n)
            )
            matrix.sum_duplicates()
            matrix.data[:] = 1.0
            co = np.asarray((matrix.T @ matrix).toarray(), dtype=np.float64)
        else:
            firsts: list[npt.NDArray[np.intp]] = []
            seconds: list[npt.NDArray[np.intp]] = []
            for seq_list in self._hist.values():
                seq = np.asarray(seq_list, dtype=np.intp)
                for gap in range(1, min(self.window, len(seq) - 1) + 1):
                    firsts.append(seq[:-gap])
                    seconds.append(seq[gap:])
            if firsts:
                a = np.concatenate(firsts)
                b = np.concatenate(seconds)
                flat = np.concatenate([a * n + b, b * n + a])
                co = np.bincount(flat, minlength=n * n).astype(np.float64).reshape(n, n)
            else:
                co = np.zeros((n, n))
        np.fill_diagonal(co, 0.0)
        self._co = co
        self._similar = self._similarity(np.arange(n))

    def _similarity(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
        """Pruned cosine similarity rows for the given items."""
        counts = self._counts
        norm = np.sqrt(counts[rows, None] * counts[None, :])
        sim = np.divide(
            self._co[rows], norm, out=np.zeros((len(rows), len(counts))), where=norm > 0
        )
        n = len(counts)
        if self.neighbours is not None and self.neighbours < n:
            kth = np.partition(sim, n - self.neighbours, axis=1)[:, n - self.neighbours]
            sim[sim < kth[:, None]] = 0.0
        return sim

    def observe(self, event: Interaction) -> None:
        """Extend the user's history; with ``learn``, also add the event's co-occurrences."""
        pos = self._pos.get(event.item_id)
        if pos is None:
            return
        hist = self._hist.setdefault(event.user_id, [])
        if not self.learn:
            hist.append(pos)
            return
        recent = hist if self.window is None else hist[-self.window :]
        partners = np.asarray([p for p in recent if p != pos], dtype=np.intp)
        if len(partners):
            np.add.at(self._co, (np.full_like(partners, pos), partners), 1.0)
            np.add.at(self._co, (partners, np.full_like(partners, pos)), 1.0)
        self._counts[pos] += 1.0
        hist.append(pos)
        self._similar = None  # every row's normalisation changed: computed per query from now

    def _scores(self, user_id: str) -> Scores:
        prior = _TIE * self._counts / max(float(self._counts.max()), 1.0)
        hist = self._hist.get(user_id)
        if not hist:
            return prior
        recent = hist if self.history is None else hist[-self.history :]
        rows = np.unique(np.asarray(recent, dtype=np.intp))
        sim = self._similar[rows] if self._similar is not None else self._similarity(rows)
        scores: Scores = sim.sum(axis=0) + prior
        return scores


class ContentSimilarity(_CatalogScorer):
    """Cosine between item text vectors and a recency-weighted user profile (module doc).

    Args:
        encoder: encodes ``Item.text`` (unit-length rows); wrap it in a ``CachedEncoder`` when
            fitting many times.
        half_life: weight half-life in items of the user's history (None: plain mean).
        history: the user's most recent items in the profile (None: all of them).
    """

    def __init__(
        self, encoder: Encoder, half_life: float | None = None, history: int | None = None
    ) -> None:
        self.encoder = encoder
        self.half_life = half_life
        self.history = history
        self._vectors: npt.NDArray[np.float32] = np.zeros((0, encoder.dim), dtype=np.float32)
        self._hist: dict[str, list[int]] = {}

    def params(self) -> dict[str, Any]:
        """The hyperparameters, for reports."""
        return {"half_life": self.half_life, "history": self.history}

    def fit(self, train: Sequence[Interaction], items: Sequence[Item]) -> None:
        """Encode the catalog's texts and record each user's training history."""
        positions = self._index(train, items)
        vectors = np.zeros((len(self._ids), self.encoder.dim), dtype=np.float32)
        if items:
            vectors[: len(items)] = self.encoder.encode([it.text for it in items])
        self._vectors = vectors
        self._hist = {}
        for event, pos in zip(train, positions.tolist(), strict=True):
            self._hist.setdefault(event.user_id, []).append(pos)

    def observe(self, event: Interaction) -> None:
        """Append the event's item to the user's history (their profile moves with it)."""
        pos = self._pos.get(event.item_id)
        if pos is not None:
            self._hist.setdefault(event.user_id, []).append(pos)

    def _scores(self, user_id: str) -> Scores:
        hist = self._hist.get(user_id)
        if not hist:
            return self._counts
        recent = hist if self.history is None else hist[-self.history :]
        if self.half_life is None:
            weights = np.ones(len(recent), dtype=np.float32)
        else:
            ages = np.arange(len(recent) - 1, -1, -1, dtype=np.float32)
            weights = (0.5 ** (ages / self.half_life)).astype(np.float32)
        profile = weights @ self._vectors[recent]
        length = float(np.linalg.norm(profile))
        if length == 0.0:
            return self._counts
        return (self._vectors @ (profile / length)).astype(np.float64)


class ImplicitMF(_CatalogScorer):
    """Matrix factorisation from the ``implicit`` package (CPU), ALS or BPR.

    Args:
        algorithm: ``"als"`` (weighted ALS, conjugate gradient) or ``"bpr"``.
        factors: latent dimensions.
        regularization: L2 weight.
        iterations: ALS sweeps or BPR epochs.
        alpha: ALS confidence of an observed interaction (ignored by BPR).
        learning_rate: BPR step size (ignored by ALS).
        threads: threads for fitting (BLAS is held to one thread, as implicit advises).
        seed: random state of the initial factors (BPR is reproducible with one thread).
    """

    def __init__(
        self,
        algorithm: Literal["als", "bpr"],
        *,
        factors: int = 64,
        regularization: float = 0.01,
        iterations: int = 15,
        alpha: float = 1.0,
        learning_rate: float = 0.01,
        threads: int = 1,
        seed: int = 0,
    ) -> None:
        self.algorithm = algorithm
        self.factors = factors
        self.regularization = regularization
        self.iterations = iterations
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.threads = threads
        self.seed = seed
        self._users: dict[str, int] = {}
        self._user_factors: npt.NDArray[np.float32] = np.zeros((0, 0), dtype=np.float32)
        self._item_factors: npt.NDArray[np.float32] = np.zeros((0, 0), dtype=np.float32)
        self._model: Any = None
        self._hist: dict[str, set[int]] = {}
        self._folded: dict[str, npt.NDArray[np.float32] | None] = {}

    def params(self) -> dict[str, Any]:
        """The hyperparameters, for reports."""
        out: dict[str, Any] = {
            "factors": self.factors,
            "regularization": self.regularization,
            "iterations": self.iterations,
        }
        if self.algorithm == "als":
            out["alpha"] = self.alpha
        else:
            out["learning_rate"] = self.learning_rate
        return out

    def fit(self, train: Sequence[Interaction], items: Sequence[Item]) -> None:
        """Fit the factors on the binary user x item matrix of the training interactions."""
        try:
            from implicit.cpu.als import AlternatingLeastSquares
            from implicit.cpu.bpr import BayesianPersonalizedRanking
        except ImportError as exc:
            raise ImportError(
                f"the implicit package is not importable ({exc}); "
                "install it with: .venv/bin/pip install implicit==0.7.3"
            ) from exc
        positions = self._index(train, items)
        self._users = {}
        for event in train:
            self._users.setdefault(event.user_id, len(self._users))
        rows = np.fromiter((self._users[e.user_id] for e in train), np.intp, len(train))
        matrix = sparse.csr_matrix(
            (np.ones(len(train), dtype=np.float32), (rows, positions)),
            shape=(len(self._users), len(self._ids)),
        )
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
        model: Any
        # implicit wants BLAS single-threaded (it checks when the model is built).
        with threadpool_limits(limits=1, user_api="blas"):
            if self.algorithm == "als":
                model = AlternatingLeastSquares(
                    factors=self.factors,
                    regularization=self.regularization,
                    alpha=self.alpha,
                    iterations=self.iterations,
                    num_threads=self.threads,
                    random_state=self.seed,
                )
            else:
                model = BayesianPersonalizedRanking(
                    factors=self.factors,
                    learning_rate=self.learning_rate,
                    regularization=self.regularization,
                    iterations=self.iterations,
                    num_threads=self.threads,
                    random_state=self.seed,
                )
            model.fit(matrix, show_progress=False)
        self._model = model
        self._user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self._item_factors = np.asarray(model.item_factors, dtype=np.float32)
        self._hist = {}
        for event, pos in zip(train, positions.tolist(), strict=True):
            self._hist.setdefault(event.user_id, set()).add(pos)
        self._folded = {}

    def observe(self, event: Interaction) -> None:
        """ALS only: add the item to the user's history (their factors follow it).

        The user's factors are recomputed from the whole history, item factors fixed
        ("fold-in"), at their next ``recommend``.

        Raises:
            TypeError: the model is BPR (implicit cannot fold a user into it).
        """
        if self.algorithm != "als":
            raise TypeError("BPR cannot fold in new interactions; evaluate it static only")
        pos = self._pos.get(event.item_id)
        if pos is not None:
            self._hist.setdefault(event.user_id, set()).add(pos)
            self._folded[event.user_id] = None

    def _fold_in(self, user_id: str) -> npt.NDArray[np.float32]:
        items = np.fromiter(sorted(self._hist[user_id]), dtype=np.int32)
        row = sparse.csr_matrix(
            (np.ones(len(items), dtype=np.float32), items, np.array([0, len(items)])),
            shape=(1, len(self._ids)),
        )
        return np.asarray(self._model.recalculate_user(0, row), dtype=np.float32)

    def _scores(self, user_id: str) -> Scores:
        if user_id in self._folded:
            vector = self._folded[user_id]
            if vector is None:
                vector = self._folded[user_id] = self._fold_in(user_id)
        else:
            row = self._users.get(user_id)
            if row is None:
                return self._counts
            vector = self._user_factors[row]
        return np.asarray(self._item_factors @ vector, dtype=np.float64)
