"""Learned collaborative item vectors: implicit-feedback matrix factorisation (ALS).

`train_als` fits ``implicit``'s alternating least squares on a visitor x item matrix of
interaction weights and returns a `CollabModel`: one vector per item, learned from who
interacted with what. The visitor side is never stored: a visitor's vector is solved from
their live history when their list is ranked (`CollabModel.fold_in`, the same least-squares
step ALS takes for each visitor while training), so one new event changes the list at once,
and a visitor the model has never seen gets a vector from their first item on.

The model also keeps how many visitors interacted with each item (`CollabModel.popular`): the
shop's all-time best sellers over the history it learned from, a steadier list than trending.

The model is immutable once built; a new training run builds a new one, swapped in whole.
`save` writes it atomically (vectors, then the manifest, each by rename); `load` reads it back.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from personify.embeddings.errors import SnapshotError

__all__ = ["ANN_THRESHOLD", "AlsSettings", "CollabModel", "train_als"]

Matrix = npt.NDArray[np.float32]
_FORMAT = "personify-collab-model"
_FORMAT_VERSION = 1
_MANIFEST = "model.json"
_VECTORS = "factors.npy"
#: From this many items on, `CollabModel.top` searches an inverted-file index instead of
#: scoring every item (at 100k items x 64 factors: 5.6 ms per list scored in full).
ANN_THRESHOLD = 20_000
#: Lists an approximate search scores.
_PROBES = 64


@dataclass(frozen=True, slots=True)
class AlsSettings:
    """How the model is fitted.

    Attributes:
        factors: length of each item's vector.
        regularization: L2 penalty on the vectors.
        alpha: confidence given to an observed interaction (times its weight).
        iterations: ALS sweeps.
        seed: random start of the vectors.
    """

    factors: int = 64
    regularization: float = 0.05
    alpha: float = 2.0
    iterations: int = 15
    seed: int = 7

    def __post_init__(self) -> None:
        if self.factors < 1 or self.iterations < 1:
            raise ValueError("factors and iterations must be at least 1")
        if self.regularization < 0 or self.alpha <= 0:
            raise ValueError("regularization must be >= 0 and alpha > 0")


@dataclass(frozen=True)
class CollabModel:
    """Item vectors learned from interactions.

    Attributes:
        item_ids: the items the model knows, in row order of ``factors``.
        factors: one float32 row per item.
        settings: how it was fitted (fold-in uses the same regularization and alpha).
        trained_at_ms: when it was fitted (epoch ms).
        interactions: the distinct (visitor, item) pairs it was fitted on.
        users: the visitors it was fitted on.
        training_s: how long fitting took.
        popularity: per item (row order), how many visitors interacted with it (empty: unknown,
            a model saved before it was kept).
    """

    item_ids: tuple[str, ...]
    factors: Matrix
    settings: AlsSettings
    trained_at_ms: int
    interactions: int
    users: int
    training_s: float = 0.0
    popularity: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    _position: dict[str, int] = field(init=False, repr=False, compare=False)
    #: YᵀY + λI: the part of every fold-in's system that does not depend on the visitor.
    _gram: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)
    _ann: Any = field(init=False, repr=False, compare=False)
    _by_popularity: npt.NDArray[np.int64] = field(init=False, repr=False, compare=False)
    _unit: Matrix = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.factors.ndim != 2 or self.factors.shape[0] != len(self.item_ids):
            raise ValueError(
                f"factors must have one row per item: {self.factors.shape} for "
                f"{len(self.item_ids)} items"
            )
        object.__setattr__(self, "_position", {item: i for i, item in enumerate(self.item_ids)})
        y = self.factors.astype(np.float64)
        gram = y.T @ y
        gram[np.diag_indices_from(gram)] += self.settings.regularization
        object.__setattr__(self, "_gram", gram)
        norms = np.linalg.norm(self.factors, axis=1, keepdims=True)
        object.__setattr__(self, "_unit", self.factors / np.maximum(norms, 1e-12))
        object.__setattr__(self, "_ann", _ann_index(self.factors))
        if len(self.popularity) not in (0, len(self.item_ids)):
            raise ValueError(
                f"popularity must have one count per item: {len(self.popularity)} for "
                f"{len(self.item_ids)} items"
            )
        order = np.argsort(-self.popularity, kind="stable")
        object.__setattr__(self, "_by_popularity", order[self.popularity[order] > 0])

    def __len__(self) -> int:
        return len(self.item_ids)

    def __reduce__(self) -> tuple[type[CollabModel], tuple[Any, ...]]:
        """Pickled as its fields: the index and the derived arrays are built again."""
        return (
            CollabModel,
            (
                self.item_ids,
                self.factors,
                self.settings,
                self.trained_at_ms,
                self.interactions,
                self.users,
                self.training_s,
                self.popularity,
            ),
        )

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._position

    @property
    def dim(self) -> int:
        """Length of each vector."""
        return int(self.factors.shape[1])

    def positions(self, item_ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """Each item's row, or -1 for an item the model does not know."""
        get = self._position.get
        return np.fromiter((get(i, -1) for i in item_ids), np.int64, count=len(item_ids))

    def fold_in(self, item_ids: Sequence[str], weights: Sequence[float]) -> Matrix | None:
        """The vector of a visitor with these interactions (weights as in training), or None.

        Solves the visitor's step of ALS with the item vectors fixed:
        ``(YᵀY + Yᵤᵀ(Cᵤ - I)Yᵤ + λI) x = YᵤᵀCᵤ1`` with confidence ``c = alpha * weight``.
        Items the model does not know are left out; None when none is known. An item given
        twice counts with its stronger weight, as a visitor's pair does in training.
        """
        # A visitor's few items: a dict beats numpy's set operations at this size.
        strongest: dict[int, float] = {}
        get = self._position.get
        alpha = self.settings.alpha
        for item, weight in zip(item_ids, weights, strict=True):
            row = get(item)
            if row is not None and alpha * weight > strongest.get(row, -math.inf):
                strongest[row] = alpha * weight  # the same item twice: the stronger counts
        if not strongest:
            return None
        order = sorted(strongest)  # in row order, as numpy's unique gave them
        rows = np.fromiter(order, np.int64, count=len(order))
        conf = np.fromiter((strongest[r] for r in order), np.float64, count=len(order))
        y = self.factors[rows].astype(np.float64)
        a = self._gram + (y.T * (conf - 1.0)) @ y
        b = y.T @ conf
        try:
            x = np.linalg.solve(a, b)
        except np.linalg.LinAlgError:
            x = np.linalg.lstsq(a, b, rcond=None)[0]
        return x.astype(np.float32)

    def scores(self, vector: Matrix) -> Matrix:
        """The visitor's predicted preference for every item, in row order."""
        out: Matrix = self.factors @ vector
        return out

    def top(
        self, vector: Matrix, n: int, exclude: Collection[str] = ()
    ) -> tuple[list[str], Matrix]:
        """The ``n`` items of highest predicted preference (not in ``exclude``), best first."""
        drop = [self._position[i] for i in exclude if i in self._position]
        if self._ann is not None:
            return self._top_ann(vector, n, set(drop))
        scores = self.scores(vector)
        if drop:
            scores = scores.copy()
            scores[drop] = -np.inf
        n = min(n, len(scores) - len(drop))
        if n <= 0:
            return [], np.empty(0, dtype=np.float32)
        best = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
        best = best[np.argsort(-scores[best], kind="stable")]
        return [self.item_ids[i] for i in best.tolist()], scores[best]

    def _top_ann(self, vector: Matrix, n: int, drop: set[int]) -> tuple[list[str], Matrix]:
        """`top` through the inverted-file index (large catalogs): approximate, much cheaper."""
        want = min(n + len(drop), len(self.item_ids))
        scores, rows = self._ann.search(vector.reshape(1, -1).astype(np.float32), want)
        keep = [(int(r), float(sc)) for r, sc in zip(rows[0], scores[0], strict=True)]
        keep = [(r, sc) for r, sc in keep if r >= 0 and r not in drop][:n]
        return [self.item_ids[r] for r, _sc in keep], np.asarray(
            [sc for _r, sc in keep], dtype=np.float32
        )

    def popular(
        self, n: int, exclude: Collection[str] = ()
    ) -> tuple[list[str], npt.NDArray[np.float64]]:
        """The ``n`` items most visitors interacted with (not in ``exclude``), and their counts."""
        drop = {self._position[i] for i in exclude if i in self._position}
        rows = self._by_popularity[: n + len(drop)].tolist()
        if drop:
            rows = [r for r in rows if r not in drop]
        rows = rows[:n]
        return [self.item_ids[r] for r in rows], self.popularity[rows].astype(np.float64)

    def closest(self, item_id: str, among: Sequence[str]) -> str | None:
        """Which of ``among`` (a visitor's items) is most like ``item_id`` in the model."""
        return self.nearest(among)(item_id)

    def nearest(self, among: Sequence[str]) -> Callable[[str], str | None]:
        """A function: which of ``among`` is most like a given item (None: none is known).

        For explaining several items by the same visitor's items: ``among``'s vectors are
        looked up once (on the first call), each item then costs one small product.
        """
        which: npt.NDArray[np.int64] | None = None
        vecs: Matrix | None = None

        def most_like(item_id: str) -> str | None:
            nonlocal which, vecs
            if which is None or vecs is None:
                rows = self.positions(among)
                which = np.flatnonzero(rows >= 0)
                vecs = self._unit[rows[which]]
            pos = self._position.get(item_id)
            if pos is None or not len(which):
                return None
            return among[int(which[int(np.argmax(vecs @ self._unit[pos]))])]

        return most_like

    def describe(self) -> dict[str, Any]:
        """What the model is, as JSON."""
        return {
            "kind": "als",
            "items": len(self.item_ids),
            "users": self.users,
            "interactions": self.interactions,
            "factors": self.dim,
            "trained_at_ms": self.trained_at_ms,
            "training_s": round(self.training_s, 3),
            "settings": {
                "factors": self.settings.factors,
                "regularization": self.settings.regularization,
                "alpha": self.settings.alpha,
                "iterations": self.settings.iterations,
            },
        }

    # -- persistence -----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the model to ``directory`` (created); a crash leaves the previous one whole."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        stamp = f"{self.trained_at_ms}-{os.getpid()}"
        vectors = f"factors-{stamp}.npy"
        tmp = path / f".{vectors}.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, self.factors, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path / vectors)
        manifest = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "vectors": vectors,
            "item_ids": list(self.item_ids),
            "popularity": self.popularity.tolist(),
            **{k: v for k, v in self.describe().items() if k != "settings"},
            "settings": {
                "factors": self.settings.factors,
                "regularization": self.settings.regularization,
                "alpha": self.settings.alpha,
                "iterations": self.settings.iterations,
                "seed": self.settings.seed,
            },
        }
        tmp = path / f".{_MANIFEST}.tmp"
        tmp.write_bytes(json.dumps(manifest).encode())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path / _MANIFEST)
        for old in path.glob("factors-*.npy"):  # earlier models' vectors
            if old.name != vectors:
                old.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CollabModel | None:
        """The model saved in ``directory``, or None when there is none.

        Raises:
            SnapshotError: the files are there but unreadable or inconsistent.
        """
        path = Path(directory)
        manifest_path = path / _MANIFEST
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_bytes())
            if manifest.get("format") != _FORMAT or manifest.get("version") != _FORMAT_VERSION:
                raise SnapshotError(f"{manifest_path}: not a model of this version")
            factors = np.load(path / manifest["vectors"], allow_pickle=False)
            return cls(
                item_ids=tuple(manifest["item_ids"]),
                factors=np.ascontiguousarray(factors, dtype=np.float32),
                settings=AlsSettings(**manifest["settings"]),
                trained_at_ms=int(manifest["trained_at_ms"]),
                interactions=int(manifest["interactions"]),
                users=int(manifest["users"]),
                training_s=float(manifest.get("training_s", 0.0)),
                popularity=np.asarray(manifest.get("popularity", []), dtype=np.int64),
            )
        except SnapshotError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(f"{path}: cannot read the model: {exc}") from exc


def _ann_index(factors: Matrix) -> Any:
    """An inverted-file inner-product index over the vectors of a large catalog.

    None below `ANN_THRESHOLD` items, where scoring every item costs less. The items are
    clustered (k-means, 4·√n lists of at least 39 items, seeded) and a search scores the
    `_PROBES` lists closest to the visitor's vector: built in seconds, searched in a fraction
    of a millisecond.
    """
    if len(factors) < ANN_THRESHOLD:
        return None
    import faiss

    data = np.ascontiguousarray(factors, dtype=np.float32)
    lists = max(1, min(int(4 * np.sqrt(len(data))), len(data) // 39))  # 39+ points per list
    index = faiss.IndexIVFFlat(
        faiss.IndexFlatIP(data.shape[1]), data.shape[1], lists, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.seed = 7
    index.train(data)
    index.add(data)
    index.nprobe = _PROBES
    return index


def train_als(
    users: npt.ArrayLike,
    items: npt.ArrayLike,
    weights: npt.ArrayLike,
    item_ids: Sequence[str],
    settings: AlsSettings | None = None,
    *,
    threads: int = 1,
) -> CollabModel:
    """Fit ALS on interactions ``(users[j], items[j], weights[j])`` (row numbers).

    ``items`` index ``item_ids``; ``users`` number visitors 0..U-1. Repeated pairs add up.
    Runs on ``threads`` threads (the caller's thread blocks; implicit releases the GIL).

    Raises:
        ValueError: no interaction, or arrays of different lengths.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy import sparse
    from threadpoolctl import threadpool_limits

    settings = settings or AlsSettings()
    u = np.asarray(users, dtype=np.int64)
    i = np.asarray(items, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    if not (len(u) == len(i) == len(w)):
        raise ValueError("users, items and weights must have the same length")
    if not len(u):
        raise ValueError("no interaction to train on")
    started = time.perf_counter()
    n_users = int(u.max()) + 1
    matrix = sparse.csr_matrix((w, (u, i)), shape=(n_users, len(item_ids)), dtype=np.float32)
    matrix.sum_duplicates()
    # implicit warns unless BLAS runs on one thread (its own threads do the work).
    with threadpool_limits(1, "blas"):
        als = AlternatingLeastSquares(
            factors=settings.factors,
            regularization=settings.regularization,
            alpha=settings.alpha,
            iterations=settings.iterations,
            random_state=settings.seed,
            num_threads=threads,
            calculate_training_loss=False,
        )
        als.fit(matrix, show_progress=False)
    factors = np.ascontiguousarray(als.item_factors, dtype=np.float32)
    return CollabModel(
        item_ids=tuple(item_ids),
        factors=factors,
        settings=settings,
        trained_at_ms=int(time.time() * 1000),
        interactions=int(matrix.nnz),
        users=int(np.count_nonzero(np.diff(matrix.indptr))),
        training_s=time.perf_counter() - started,
        popularity=np.diff(matrix.tocsc().indptr).astype(np.int64),
    )
