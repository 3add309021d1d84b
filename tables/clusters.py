"""Behavioural clusters: k-means over the visitors' standardized profile features.

Each visitor is the same few numbers the propensity scores read (`personify.tables.propensity`
`FEATURES`: days since last seen and last ordered, days since they first came, views, clicks,
cart additions, orders, days active in the last 30; each log1p), standardized over all
visitors. `fit` runs k-means (`faiss.Kmeans`) for each k from 2 to ``max_k`` on a sample and
keeps the k with the best mean silhouette on it (how much closer each visitor is to their own
cluster than to the next one: -1 to 1), then fits that k on every visitor. Each cluster is
described by its size and the features where its centre differs most from the average visitor
(in standard deviations), with its typical values. A visitor's cluster is the nearest centre,
computed live from their profile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from personify.tables.propensity import FEATURES, profile_features

__all__ = ["Clusters", "fit", "silhouette"]

#: Visitors the silhouette of each k is measured on (a seeded sample).
_SAMPLE: Final = 4000
#: Visitors needed before clusters are fitted.
MIN_VISITORS: Final = 50
#: Features named in a cluster's description.
_DESCRIBED: Final = 3

Matrix = npt.NDArray[np.float64]


def silhouette(x: Matrix, labels: npt.NDArray[np.int64]) -> float:
    """The mean silhouette of ``labels`` over the rows of ``x`` (Euclidean)."""
    from sklearn.metrics import silhouette_score

    if len(set(labels.tolist())) < 2:
        return -1.0
    return float(silhouette_score(x, labels))


def _kmeans(x: Matrix, k: int, seed: int) -> npt.NDArray[np.float32]:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, nredo=2, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    centroids = km.centroids
    assert centroids is not None
    return np.asarray(centroids, dtype=np.float32)


def _assign(x: Matrix, centroids: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    distances = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    out: npt.NDArray[np.int64] = distances.argmin(axis=1)
    return out


@dataclass(frozen=True, slots=True)
class Clusters:
    """Fitted clusters (see the module).

    Attributes:
        mean: each feature's mean over the visitors (log1p units).
        scale: each feature's standard deviation.
        centroids: the cluster centres, standardized.
        described: per cluster: its number, size, share, silhouette and its most distinctive
            features (name, standard deviations from the average, typical value).
        silhouette: the mean silhouette of the k kept, per k tried.
        fitted_at_ms: when the features were computed.
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    centroids: tuple[tuple[float, ...], ...]
    described: tuple[dict[str, Any], ...]
    silhouette: dict[str, float]
    fitted_at_ms: int

    def of(self, p: Mapping[str, Any], now_ms: int) -> int:
        """The cluster of the visitor of profile ``p`` (at ``now_ms``)."""
        x = (profile_features(p, now_ms) - np.array(self.mean)) / np.array(self.scale)
        return int(_assign(x, np.array(self.centroids))[0])

    def as_json(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "mean": list(self.mean),
            "scale": list(self.scale),
            "centroids": [list(c) for c in self.centroids],
            "clusters": list(self.described),
            "silhouette": self.silhouette,
            "fitted_at_ms": self.fitted_at_ms,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Clusters:
        """From `as_json`'s form."""
        return cls(
            tuple(doc["mean"]),
            tuple(doc["scale"]),
            tuple(tuple(c) for c in doc["centroids"]),
            tuple(doc.get("clusters", ())),
            dict(doc.get("silhouette", {})),
            int(doc.get("fitted_at_ms", 0)),
        )


def _describe(
    x: Matrix, raw: Matrix, labels: npt.NDArray[np.int64], centroids: npt.NDArray[Any]
) -> tuple[dict[str, Any], ...]:
    out = []
    n = len(labels)
    for number, centre in enumerate(centroids):
        members = labels == number
        size = int(members.sum())
        order = np.argsort(-np.abs(centre))[:_DESCRIBED]
        typical = np.expm1(np.median(raw[members], axis=0)) if size else np.zeros(len(FEATURES))
        overall = np.expm1(np.median(raw, axis=0))
        out.append(
            {
                "cluster": number,
                "size": size,
                "share": round(size / n, 4) if n else 0.0,
                "distinctive": [
                    {
                        "feature": FEATURES[i],
                        "sd_from_average": round(float(centre[i]), 2),
                        "typical": round(float(typical[i]), 2),
                        "overall": round(float(overall[i]), 2),
                    }
                    for i in order.tolist()
                ],
            }
        )
    return tuple(out)


def fit(raw: Matrix, now_ms: int, *, max_k: int = 8, seed: int = 0) -> Clusters | None:
    """Clusters of the visitors whose `FEATURES` are the rows of ``raw`` (None: too few)."""
    if len(raw) < MIN_VISITORS:
        return None
    mean = raw.mean(axis=0)
    scale = raw.std(axis=0)
    scale[scale == 0] = 1.0
    x = (raw - mean) / scale
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(len(x), min(_SAMPLE, len(x)), replace=False)]
    scores: dict[str, float] = {}
    for k in range(2, max(2, max_k) + 1):
        if k >= len(sample):
            break
        centroids = _kmeans(sample, k, seed)
        scores[str(k)] = round(silhouette(sample, _assign(sample, centroids)), 4)
    if not scores:
        return None
    best = int(max(scores, key=lambda k: scores[k]))
    centroids = _kmeans(x, best, seed)
    labels = np.concatenate(
        [_assign(x[i : i + 100_000], centroids) for i in range(0, len(x), 100_000)]
    )
    return Clusters(
        tuple(mean.tolist()),
        tuple(scale.tolist()),
        tuple(tuple(float(v) for v in c) for c in centroids),
        _describe(x, raw, labels, centroids),
        scores,
        now_ms,
    )
