"""Propensity scores: will the visitor buy in the next 7 days, will they be gone for 30.

Two logistic regressions over the same few features of a visitor (`FEATURES`): how long since
they were last seen and last ordered, how long they have been a visitor, how much they viewed,
clicked, added and ordered, and how many days they were active in the last 30. The features
are computed the same way from the interaction history at a past moment (to learn) and from
the live profile (to score), so what is learned is what is scored.

`fit` learns on the shop's own history (the rows the learned model keeps: views, clicks, cart
additions, purchase lines), at weekly cuts whose outcome is known, and measures itself on a
temporal hold-out: the last cut whose 30 days are known, never learned on. It reports ROC-AUC,
the Brier score and a calibration table (predicted against observed, by tenth of the scores),
beside a recency-frequency baseline scored on the same visitors (the sum of the visitor's
recency and frequency quintiles, as RFM scores them).

Scoring a visitor is a dot product: the fold evaluates it live for the rules that name it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "FEATURES",
    "TARGETS",
    "Model",
    "Propensity",
    "features_at",
    "fit",
    "profile_features",
    "roc_auc",
]

DAY_MS: Final = 86_400_000
#: What each score predicts, and over how many days after the moment it is computed.
TARGETS: Final = {"purchase_7d": 7, "churn_30d": 30}
#: The features, each log1p of a count or a number of days.
FEATURES: Final = (
    "days_since_seen",
    "days_since_order",
    "tenure_days",
    "views",
    "clicks",
    "cart_adds",
    "orders",
    "active_days_30",
)
#: Days since an order for a visitor who never ordered (a long time: ten years).
_NEVER_DAYS: Final = 3650.0
#: Kind numbers, as `personify.tables.history.Interactions.KINDS` orders them.
_VIEW, _CLICK, _CART, _PURCHASE = range(4)
#: Weekly cuts learned on (each with its outcome known before the hold-out cut).
_TRAIN_CUTS: Final = 4
#: Visitors learned on at most (a sample beyond: the fit stays fast on big shops).
_MAX_ROWS: Final = 400_000
_MIN_ROWS: Final = 50

Matrix = npt.NDArray[np.float64]


def _log_features(raw: Matrix) -> Matrix:
    return np.log1p(np.maximum(raw, 0.0))


def features_at(
    user: npt.NDArray[np.integer[Any]],
    kind: npt.NDArray[np.integer[Any]],
    ts_ms: npt.NDArray[np.int64],
    cut_ms: int,
) -> tuple[npt.NDArray[np.int64], Matrix]:
    """Each visitor's `FEATURES` at ``cut_ms``, from their interactions before it.

    Returns the visitor numbers (those with an interaction before the cut) and their rows.
    """
    before = ts_ms < cut_ms
    u, k, t = user[before].astype(np.int64), kind[before], ts_ms[before]
    if not len(u):
        return np.empty(0, dtype=np.int64), np.empty((0, len(FEATURES)))
    users, inverse = np.unique(u, return_inverse=True)
    n = len(users)
    last = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last, inverse, t)
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, inverse, t)
    bought = k == _PURCHASE
    last_order = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last_order, inverse[bought], t[bought])
    counts = np.zeros((n, 4))
    np.add.at(counts, (inverse, k.astype(np.int64)), 1.0)
    # An order's lines share their time: orders are the distinct purchase times.
    order_keys = np.unique(np.stack([inverse[bought], t[bought]]), axis=1)
    orders = np.bincount(order_keys[0], minlength=n).astype(np.float64)
    recent = t >= cut_ms - 30 * DAY_MS
    day_keys = np.unique(np.stack([inverse[recent], t[recent] // DAY_MS]), axis=1)
    active = np.bincount(day_keys[0], minlength=n).astype(np.float64)
    since_order = np.where(
        last_order > np.iinfo(np.int64).min, (cut_ms - last_order) / DAY_MS, _NEVER_DAYS
    )
    raw = np.column_stack(
        [
            (cut_ms - last) / DAY_MS,
            since_order,
            (cut_ms - first) / DAY_MS,
            counts[:, _VIEW],
            counts[:, _CLICK],
            counts[:, _CART],
            orders,
            active,
        ]
    )
    return users, _log_features(raw)


def profile_features(p: Mapping[str, Any], now_ms: int) -> Matrix:
    """The visitor's `FEATURES` now, from their live profile (one row)."""
    counts = p.get("counts", {})
    last, first, last_order = p.get("last_seen"), p.get("first_seen"), p.get("last_order")
    since = 30 * DAY_MS
    active = {
        start // DAY_MS for start, _end, _n in p.get("session_list", ()) if start >= now_ms - since
    }
    raw = np.array(
        [
            [
                0.0 if last is None else (now_ms - last) / DAY_MS,
                _NEVER_DAYS if last_order is None else (now_ms - last_order) / DAY_MS,
                0.0 if first is None else (now_ms - first) / DAY_MS,
                counts.get("product_view", 0),
                counts.get("click", 0),
                counts.get("add_to_cart", 0),
                p.get("orders", 0),
                len(active),
            ]
        ],
        dtype=np.float64,
    )
    return _log_features(raw)


def _labels(
    users: npt.NDArray[np.int64],
    user: npt.NDArray[np.integer[Any]],
    kind: npt.NDArray[np.integer[Any]],
    ts_ms: npt.NDArray[np.int64],
    cut_ms: int,
) -> dict[str, npt.NDArray[np.bool_]]:
    """Each target's outcome for ``users`` after ``cut_ms``."""
    out = {}
    for target, days in TARGETS.items():
        after = (ts_ms >= cut_ms) & (ts_ms < cut_ms + days * DAY_MS)
        if target == "purchase_7d":
            after &= kind == _PURCHASE
        seen = np.isin(users, np.unique(user[after]))
        out[target] = seen if target == "purchase_7d" else ~seen
    return out


def roc_auc(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.bool_]) -> float | None:
    """The area under the ROC curve (ties count half); None without both outcomes."""
    from sklearn.metrics import roc_auc_score

    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, scores))


@dataclass(frozen=True, slots=True)
class Model:
    """One target's logistic regression over standardized `FEATURES`."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    def scores(self, x: Matrix) -> npt.NDArray[np.float64]:
        """The probability of the target for each row of ``x``."""
        z = ((x - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.weights)
        out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-(z + self.bias)))
        return out

    def score(self, x: Matrix) -> float:
        """The probability for one row (a profile's)."""
        z = self.bias
        for value, mean, scale, weight in zip(
            x[0], self.mean, self.scale, self.weights, strict=True
        ):
            z += (value - mean) / scale * weight
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def as_json(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "bias": self.bias,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Model:
        """From `as_json`'s form."""
        return cls(
            tuple(doc["mean"]), tuple(doc["scale"]), tuple(doc["weights"]), float(doc["bias"])
        )


def _learn(x: Matrix, y: npt.NDArray[np.bool_]) -> Model | None:
    from sklearn.linear_model import LogisticRegression

    if len(y) < _MIN_ROWS or y.all() or not y.any():
        return None
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    fitted = LogisticRegression(C=1.0, max_iter=500).fit((x - mean) / scale, y)
    return Model(
        tuple(mean.tolist()),
        tuple(scale.tolist()),
        tuple(fitted.coef_[0].tolist()),
        float(fitted.intercept_[0]),
    )


def _quintiles(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """1-5 by quintile of ``values`` (higher values, higher scores)."""
    cuts = np.quantile(values, (0.2, 0.4, 0.6, 0.8))
    out: npt.NDArray[np.float64] = 1.0 + (values[:, None] > cuts[None, :]).sum(axis=1)
    return out


def _baseline(x: Matrix, target: str) -> npt.NDArray[np.float64]:
    """Recency-frequency scores: the sum of the recency and frequency quintiles.

    For churn the other way round: the least recent, least frequent visitors first.
    """
    recency = _quintiles(-x[:, FEATURES.index("days_since_seen")])
    frequency = _quintiles(x[:, FEATURES.index("active_days_30")] + x[:, FEATURES.index("orders")])
    score = recency + frequency
    return -score if target == "churn_30d" else score


def _calibration(
    scores: npt.NDArray[np.float64], labels: npt.NDArray[np.bool_]
) -> list[dict[str, float]]:
    """Mean predicted and observed rate per tenth of the scores."""
    order = np.argsort(scores, kind="stable")
    out = []
    for part in np.array_split(order, 10):
        if len(part):
            out.append(
                {
                    "predicted": round(float(scores[part].mean()), 4),
                    "observed": round(float(labels[part].mean()), 4),
                    "visitors": len(part),
                }
            )
    return out


@dataclass(frozen=True, slots=True)
class Propensity:
    """The learned scores (a target without enough of both outcomes has none).

    Attributes:
        models: target -> its model.
        evaluation: target -> hold-out figures (ROC-AUC, Brier score, calibration, the
            baseline's ROC-AUC, visitors and the share with the outcome).
        trained_to_ms: the newest interaction learned from.
    """

    models: dict[str, Model]
    evaluation: dict[str, dict[str, Any]]
    trained_to_ms: int

    def score(self, target: str, p: Mapping[str, Any], now_ms: int) -> float | None:
        """The visitor's probability of ``target`` (None without a model for it)."""
        model = self.models.get(target)
        return None if model is None else model.score(profile_features(p, now_ms))

    def as_json(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "models": {t: m.as_json() for t, m in self.models.items()},
            "evaluation": self.evaluation,
            "trained_to_ms": self.trained_to_ms,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Propensity:
        """From `as_json`'s form."""
        return cls(
            {t: Model.from_json(m) for t, m in doc.get("models", {}).items()},
            dict(doc.get("evaluation", {})),
            int(doc.get("trained_to_ms", 0)),
        )


def _rows_at(
    user: npt.NDArray[np.integer[Any]],
    kind: npt.NDArray[np.integer[Any]],
    ts_ms: npt.NDArray[np.int64],
    cuts: list[int],
    seed: int,
) -> tuple[Matrix, dict[str, npt.NDArray[np.bool_]]]:
    xs: list[Matrix] = []
    ys: dict[str, list[npt.NDArray[np.bool_]]] = {t: [] for t in TARGETS}
    for cut in cuts:
        users, x = features_at(user, kind, ts_ms, cut)
        labels = _labels(users, user, kind, ts_ms, cut)
        xs.append(x)
        for target, outcome in labels.items():
            ys[target].append(outcome)
    x = np.concatenate(xs) if xs else np.empty((0, len(FEATURES)))
    y: dict[str, npt.NDArray[np.bool_]] = {
        t: np.concatenate(v) if v else np.empty(0, dtype=bool) for t, v in ys.items()
    }
    if len(x) > _MAX_ROWS:
        keep = np.random.default_rng(seed).choice(len(x), _MAX_ROWS, replace=False)
        x, y = x[keep], {t: v[keep] for t, v in y.items()}
    return x, y


def fit(
    user: npt.NDArray[np.integer[Any]],
    kind: npt.NDArray[np.integer[Any]],
    ts_ms: npt.NDArray[np.int64],
    *,
    seed: int = 0,
) -> Propensity | None:
    """Learn both scores on a history, and measure them on its temporal hold-out.

    The hold-out cut is 30 days before the newest interaction (so both outcomes after it are
    known); the models measured learn at weekly cuts before it whose 30 days end by it. The
    models kept learn again at those cuts moved up to the hold-out (on everything known). None
    when the history is too short (under about two months) or too small.
    """
    if not len(ts_ms):
        return None
    end = int(ts_ms.max())
    holdout = end - 30 * DAY_MS
    learn_cuts = [holdout - 30 * DAY_MS - 7 * DAY_MS * k for k in range(_TRAIN_CUTS)]
    learn_cuts = [c for c in learn_cuts if c > int(ts_ms.min()) + 7 * DAY_MS]
    if not learn_cuts:
        return None
    x, y = _rows_at(user, kind, ts_ms, learn_cuts, seed)
    test_users, test_x = features_at(user, kind, ts_ms, holdout)
    test_y = _labels(test_users, user, kind, ts_ms, holdout)
    final_x, final_y = _rows_at(user, kind, ts_ms, [c + 30 * DAY_MS for c in learn_cuts], seed)
    models: dict[str, Model] = {}
    evaluation: dict[str, dict[str, Any]] = {}
    for target in TARGETS:
        measured = _learn(x, y[target])
        if measured is None or not len(test_x):
            continue
        scores = measured.scores(test_x)
        labels = test_y[target]
        auc = roc_auc(scores, labels)
        if auc is None:
            continue
        kept = _learn(final_x, final_y[target]) or measured
        models[target] = kept
        baseline = roc_auc(_baseline(test_x, target), labels)
        evaluation[target] = {
            "roc_auc": round(auc, 4),
            "baseline_roc_auc": None if baseline is None else round(baseline, 4),
            "brier": round(float(np.mean((scores - labels) ** 2)), 4),
            "calibration": _calibration(scores, labels),
            "visitors": len(labels),
            "rate": round(float(labels.mean()), 4),
            "learned_on": len(y[target]),
        }
    if not models:
        return None
    return Propensity(models, evaluation, end)
