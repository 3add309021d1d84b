"""The learned ranker: LambdaMART (LightGBM's ``lambdarank``) over each candidate's features.

The blend (`personify.agents.recommend.blend`) adds the sources' scores with one set of
weights for every visitor. The ranker re-orders the blend's best candidates (`DEPTH` of them)
by a model learned on the shop's own history, so that how much "buy again", "bought together",
"your taste" and the trends count depends on the candidate and the visitor: a product bought
ten times, a visitor with a long history, an item several sources agree on.

Each candidate is described by `FEATURES` (`candidate_features`): every source's score of it,
scaled so the source's best candidate for this visitor scores 1 (0 where the source does not
propose it); buy-again's raw score (how often and how recently the visitor bought it) and the
best sellers' (how many visitors interacted with it), on a log scale; its blend score; how many
sources propose it; the visitor's history length and how long since they were last seen
(`Visitor`): a visitor back after months wants other things than one in the middle of a visit.

The tuner (`personify.agents.tuning`) trains a ranker on its validation splits and keeps it only
where it wins on validation visitors it was not trained on.
"""

from __future__ import annotations

import ctypes
import math
import random
import re
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from personify.agents.recommend import Pool

__all__ = [
    "DEPTH",
    "FEATURES",
    "SOURCE_ORDER",
    "Ranker",
    "Recorder",
    "Scorer",
    "Visitor",
    "candidate_features",
    "fit_bagged",
    "fit_ranker",
]

#: Candidates of the blend re-ordered by the ranker (the best this many by blend score).
DEPTH = 100
#: The sources, in the order of their features.
SOURCE_ORDER = (
    "covisit",
    "copurchase",
    "content",
    "chat",
    "category",
    "trending",
    "collab",
    "popular",
    "repeat",
)
#: What the ranker sees of each candidate.
FEATURES = (
    *SOURCE_ORDER,
    "repeat_raw",
    "popular_raw",
    "blend",
    "sources",
    "history",
    "idle",
)
Matrix = npt.NDArray[np.float32]
Numbers = npt.NDArray[np.int64]
_SCALED = {name: i for i, name in enumerate(SOURCE_ORDER)}
_REPEAT_RAW = FEATURES.index("repeat_raw")
_POPULAR_RAW = FEATURES.index("popular_raw")
_BLEND = FEATURES.index("blend")
_SOURCES = FEATURES.index("sources")
_HISTORY = FEATURES.index("history")
_IDLE = FEATURES.index("idle")


@dataclass(frozen=True, slots=True)
class Visitor:
    """What the ranker sees of the visitor (the same for each of their candidates).

    Attributes:
        history: their interactions on record.
        idle_h: hours since their last event, when their list is ranked.
    """

    history: float = 0.0
    idle_h: float = 0.0


#: Per thread: a slot for each item number, -1 where it is not a candidate (see `_slots`).
_SLOTS = threading.local()


def _slots(size: int) -> npt.NDArray[np.intp]:
    """This thread's slots, at least ``size`` long, all -1.

    Given back clean by their user, so that finding a source's candidates among a list's
    costs one indexing of the source's numbers instead of a search.
    """
    slots: npt.NDArray[np.intp] | None = getattr(_SLOTS, "slots", None)
    if slots is None or len(slots) < size:
        slots = np.full(max(size, 2 * (0 if slots is None else len(slots)), 1024), -1, np.intp)
        _SLOTS.slots = slots
    return slots


def candidate_features(
    pools: Mapping[str, Pool],
    strength: Mapping[str, float],
    numbers: Numbers,
    totals: npt.NDArray[np.float64],
    visitor: Visitor,
) -> Matrix:
    """`FEATURES` of the candidates ``numbers`` (item numbers, with their blend ``totals``).

    ``pools``: each source's candidates (numbered alike, as `blend` needs them); ``strength``:
    a source's strength where it has one (chat fading, re-buying in the shop); ``visitor``:
    what is known of the visitor.
    """
    out = np.zeros((len(numbers), len(FEATURES)), dtype=np.float32)
    size = max((int(pool.numbers.max()) + 1 for pool in pools.values() if len(pool)), default=0)
    if len(numbers):
        size = max(size, int(numbers.max()) + 1)
    slots = _slots(size)
    slots[numbers] = np.arange(len(numbers))
    try:
        for name, pool in pools.items():
            column = _SCALED.get(name)
            if column is None or not len(pool):
                continue
            top = float(pool.scores.max())
            if not top > 0 or not len(numbers):
                continue
            at = slots[pool.numbers]
            hit = at >= 0
            if not hit.any():
                continue
            rows = at[hit]
            scores = pool.scores[hit]
            out[rows, column] = scores / top * strength.get(name, 1.0)
            out[rows, _SOURCES] += 1
            if name == "repeat":
                out[rows, _REPEAT_RAW] = np.log1p(np.maximum(scores, 0.0))
            elif name == "popular":
                out[rows, _POPULAR_RAW] = np.log1p(np.maximum(scores, 0.0))
    finally:
        slots[numbers] = -1
    best = float(totals.max()) if len(totals) else 0.0
    if best > 0:
        out[:, _BLEND] = totals / best
    out[:, _HISTORY] = math.log1p(max(visitor.history, 0.0))
    out[:, _IDLE] = math.log1p(max(visitor.idle_h, 0.0))
    return out


class Scorer(Protocol):
    """What `personify.agents.recommend.blend` re-orders candidates with."""

    def predict(self, matrix: Matrix) -> npt.NDArray[np.float64]:
        """Each candidate's score (higher first)."""
        ...


class Recorder:
    """A scorer that keeps the blend's order and records the candidates' features.

    What a ranker is trained on: ``matrix`` after one list is ranked with it.
    """

    def __init__(self) -> None:
        self.matrix: Matrix = np.empty((0, len(FEATURES)), dtype=np.float32)

    def predict(self, matrix: Matrix) -> npt.NDArray[np.float64]:
        """The blend's order (the candidates come best first)."""
        self.matrix = matrix
        return -np.arange(len(matrix), dtype=np.float64)


#: Between the models of a `Ranker` saved as text.
_SEPARATOR = "\n=== personify ranker model ===\n"


class _Compiled:
    """One LightGBM model, scored through LightGBM's C API (``LGBM_BoosterPredictForMat``).

    ``lightgbm.Booster.predict`` builds a predictor object on every call: about 0.3 ms, and a
    few objects in reference cycles that only the garbage collector frees. Ranking hundreds of
    lists a second with a ranker of five models left some 5,000 such objects a second, and
    each collection of them held the engine for about 60 ms. Here a call allocates only its
    output array. The model is loaded from its text into a handle of its own, freed with it.
    """

    _PREDICT_NORMAL = 0  # C_API_PREDICT_NORMAL
    _FLOAT32 = 0  # C_API_DTYPE_FLOAT32
    _FLOAT64 = 1  # C_API_DTYPE_FLOAT64

    def __init__(self, lib: Any, text: str) -> None:
        self._lib = lib
        handle = ctypes.c_void_p()
        rounds = ctypes.c_int(0)
        self._check(
            lib.LGBM_BoosterLoadModelFromString(
                ctypes.c_char_p(text.encode()), ctypes.byref(rounds), ctypes.byref(handle)
            )
        )
        self._handle = handle
        self._params = ctypes.c_char_p(b"num_threads=1")
        weakref.finalize(self, lib.LGBM_BoosterFree, handle)

    def _check(self, code: int) -> None:
        if code != 0:
            message = self._lib.LGBM_GetLastError()  # restype c_char_p: bytes
            raise RuntimeError(f"LightGBM: {(message or b'unknown error').decode()}")

    def predict(self, matrix: Matrix) -> npt.NDArray[np.float64]:
        rows = np.ascontiguousarray(matrix)
        if rows.dtype != np.float32 and rows.dtype != np.float64:
            rows = rows.astype(np.float64)
        out = np.empty(rows.shape[0], dtype=np.float64)
        written = ctypes.c_int64(0)
        self._check(
            self._lib.LGBM_BoosterPredictForMat(
                self._handle,
                ctypes.c_void_p(rows.ctypes.data),
                ctypes.c_int(self._FLOAT32 if rows.dtype == np.float32 else self._FLOAT64),
                ctypes.c_int32(rows.shape[0]),
                ctypes.c_int32(rows.shape[1]),
                ctypes.c_int(1),  # row-major
                ctypes.c_int(self._PREDICT_NORMAL),
                ctypes.c_int(0),  # from the first round ...
                ctypes.c_int(-1),  # ... to the last
                self._params,
                ctypes.byref(written),
                ctypes.c_void_p(out.ctypes.data),
            )
        )
        if written.value != len(out):
            raise RuntimeError(f"LightGBM scored {written.value} of {len(out)} rows")
        return out


def _merged(texts: Sequence[str]) -> str:
    """One LightGBM model (as text) that scores the mean of the models ``texts``.

    Every tree of every model, numbered again, its leaf values divided by the number of
    models: a candidate's score is the sum of its leaves over the trees. Each call into
    LightGBM builds a predictor and parses its parameters: for 100 candidates and 20 trees in
    all, five calls took 117 us and one call of the merged model 34 us.
    """
    scale = 1.0 / len(texts)
    head = texts[0].partition("\nTree=")[0]
    # Without the trees' sizes LightGBM reads the trees one after the other.
    lines = [line for line in head.split("\n") if not line.startswith("tree_sizes=")]
    trees: list[str] = []
    for text in texts:
        body = text.partition("\nend of trees")[0]
        for block in re.split(r"\n(?=Tree=\d+\n)", body)[1:]:
            rows = block.strip("\n").split("\n")
            rows[0] = f"Tree={len(trees)}"
            for i, row in enumerate(rows):
                if row.startswith("leaf_value="):
                    values = (repr(float(v) * scale) for v in row[len("leaf_value=") :].split())
                    rows[i] = "leaf_value=" + " ".join(values)
            trees.append("\n".join(rows))
    tail = texts[0].partition("\nend of trees")[2]
    return "\n".join(lines) + "\n\n" + "\n\n\n".join(trees) + "\n\n\nend of trees" + tail


def _compiled(boosters: Sequence[Any]) -> _Compiled | None:
    """``boosters``, as one model of their mean behind the C API (None: not exposed here).

    The library is called holding the interpreter lock (`ctypes.PyDLL`): a call scores a
    list's candidates in tens of microseconds, and a call that let go of the lock waited to
    take it back behind any other thread of the engine, up to the 5 ms switch interval.
    """
    import lightgbm.basic

    lib = getattr(lightgbm.basic, "_LIB", None)
    if lib is None or not hasattr(lib, "LGBM_BoosterPredictForMat"):
        return None
    name = getattr(lib, "_name", None)
    held = ctypes.PyDLL(name) if name else lib  # the same library, called without letting go
    held.LGBM_GetLastError.restype = ctypes.c_char_p
    return _Compiled(held, _merged([str(b.model_to_string()) for b in boosters]))


@dataclass
class Ranker:
    """Trained LambdaMART models over `FEATURES`; a candidate's score is their mean."""

    boosters: tuple[Any, ...]  # lightgbm.Booster (untyped)
    features: tuple[str, ...] = FEATURES
    _compiled: _Compiled | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._compiled = _compiled(self.boosters)

    def predict(self, matrix: Matrix) -> npt.NDArray[np.float64]:
        """Each candidate's score (higher first)."""
        if not len(matrix):
            return np.empty(0, dtype=np.float64)
        if self._compiled is not None:
            return self._compiled.predict(matrix)  # the models' mean, in one call
        total = np.zeros(len(matrix), dtype=np.float64)
        for booster in self.boosters:
            total += np.asarray(booster.predict(matrix, num_threads=1), dtype=np.float64)
        return total / len(self.boosters)

    @property
    def trees(self) -> int:
        """Boosting rounds in all the models."""
        return sum(int(b.num_trees()) for b in self.boosters)

    def importance(self) -> dict[str, float]:
        """Each feature's share of the models' total gain."""
        gain = sum(
            (np.asarray(b.feature_importance("gain"), dtype=np.float64) for b in self.boosters),
            np.zeros(len(self.features)),
        )
        total = float(gain.sum()) or 1.0
        return {
            name: round(float(g) / total, 4) for name, g in zip(self.features, gain, strict=True)
        }

    def to_text(self) -> str:
        """The models as text (`from_text` reads them back)."""
        return _SEPARATOR.join(str(b.model_to_string()) for b in self.boosters)

    @classmethod
    def from_text(cls, text: str) -> Ranker:
        """A ranker saved with `to_text`."""
        import lightgbm

        boosters = tuple(lightgbm.Booster(model_str=part) for part in text.split(_SEPARATOR))
        for booster in boosters:
            names = tuple(booster.feature_name())
            if names != FEATURES:
                raise ValueError(f"the ranker's features {names} are not this version's {FEATURES}")
        return cls(boosters)


#: LambdaMART's settings: small trees, many examples per leaf, one thread (the tuner's core).
PARAMS: dict[str, Any] = {
    "objective": "lambdarank",
    "metric": "ndcg",
    "eval_at": [10],
    "lambdarank_truncation_level": 20,
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
}


def fit_bagged(
    groups: Sequence[tuple[Matrix, npt.NDArray[np.float32]]], *, folds: int = 5, seed: int = 0
) -> Ranker | None:
    """``folds`` rankers, each stopped early on its own fold of ``groups``, as one.

    How many rounds help is measured on a few hundred visitors' candidates, and from one draw
    of them to the next it varies from a handful to over a hundred: a single model is as good
    as the draw. The mean of one model per fold (each trained on the other folds) keeps what
    they agree on. None when no group has a relevant candidate.
    """
    shuffled = list(groups)
    random.Random(seed).shuffle(shuffled)
    models: list[Any] = []
    for k in range(folds):
        early = shuffled[k::folds]
        main = [g for n, g in enumerate(shuffled) if n % folds != k]
        ranker = fit_ranker(main, early=early, seed=seed + k)
        if ranker is not None:
            models.extend(ranker.boosters)
    return Ranker(tuple(models)) if models else None


def fit_ranker(
    groups: Sequence[tuple[Matrix, npt.NDArray[np.float32]]],
    *,
    seed: int = 0,
    rounds: int = 400,
    early: Sequence[tuple[Matrix, npt.NDArray[np.float32]]] = (),
) -> Ranker | None:
    """A ranker trained on ``groups`` (one visitor's candidates and their labels each).

    Groups without a relevant candidate teach nothing and are left out. With ``early`` groups,
    training stops once their NDCG@10 has not improved for 30 rounds. None when no group has a
    relevant candidate.
    """
    import lightgbm

    def dataset(
        parts: Sequence[tuple[Matrix, npt.NDArray[np.float32]]],
        reference: Any = None,
    ) -> Any | None:
        kept = [(x, y) for x, y in parts if len(y) and y.max() > 0]
        if not kept:
            return None
        return lightgbm.Dataset(
            np.concatenate([x for x, _y in kept]),
            np.concatenate([y for _x, y in kept]),
            group=[len(y) for _x, y in kept],
            feature_name=list(FEATURES),
            reference=reference,
            free_raw_data=True,
        )

    train = dataset(groups)
    if train is None:
        return None
    params = PARAMS | {"seed": seed}
    valid = dataset(early, train) if early else None
    callbacks: list[Callable[..., Any]] = []
    if valid is not None:
        callbacks.append(lightgbm.early_stopping(30, verbose=False))
    booster = lightgbm.train(
        params,
        train,
        num_boost_round=rounds,
        valid_sets=[valid] if valid is not None else None,
        callbacks=callbacks,
    )
    if valid is not None and booster.best_iteration > 0:
        booster = lightgbm.Booster(
            model_str=booster.model_to_string(num_iteration=booster.best_iteration)
        )
    return Ranker((booster,))
