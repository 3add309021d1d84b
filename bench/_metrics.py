"""Top-K ranking metrics with binary relevance, per evaluation unit and averaged.

A unit is one user (offline protocol: relevant = every item the user interacts with in the
test period) or one replay step (relevant = the items the user interacts with next, usually
1-4 ratings submitted in the same second). Definitions, for a ranked list ``r`` and relevant
set ``T``:

- NDCG@10 = DCG@10 / IDCG@10, DCG = sum over hits at rank i (1-based) of 1 / log2(i + 1),
  IDCG = the DCG of ``min(|T|, 10)`` hits at the top.
- Recall@20 = |top-20 ∩ T| / |T|.
- MAP@10: AP@10 = sum over hits at rank i of precision@i, divided by ``min(|T|, 10)``;
  MAP is its mean. With one relevant item this is MRR@10.
- HR@10 = 1 if any of the top 10 is relevant.
- Coverage@10 = distinct items in any top-10 list / catalog size (a property of the whole
  run, not averaged).

Every figure is a plain mean over units; ``ndcg10_ci95`` is 1.96 standard errors of it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["CUTOFF", "RECALL_CUTOFF", "MetricAccumulator", "Metrics", "unit_metrics"]

#: The K of NDCG, MAP, HR and coverage.
CUTOFF = 10
#: The K of recall (lists are requested this long).
RECALL_CUTOFF = 20

_DISCOUNT = 1.0 / np.log2(np.arange(2, max(CUTOFF, RECALL_CUTOFF) + 2))


@dataclass(frozen=True, slots=True)
class Metrics:
    """Averaged metrics of one method under one protocol.

    Attributes:
        ndcg10: mean NDCG@10.
        ndcg10_ci95: half-width of a normal 95% interval around ``ndcg10``.
        recall20: mean Recall@20.
        map10: mean AP@10 (MRR@10 when each unit has one relevant item).
        hr10: share of units with a hit in the top 10.
        coverage10: share of the catalog seen in any top-10 list.
        units: users or replay steps averaged over.
    """

    ndcg10: float
    ndcg10_ci95: float
    recall20: float
    map10: float
    hr10: float
    coverage10: float
    units: int

    def as_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict."""
        return asdict(self)


def unit_metrics(ranked: Sequence[str], relevant: Collection[str]) -> tuple[float, ...]:
    """(NDCG@10, Recall@20, AP@10, HR@10) of one ranked list against one relevant set.

    Args:
        ranked: recommended ids, best first (only the first 20 are read).
        relevant: the ids that count as hits; must not be empty.
    """
    if not relevant:
        raise ValueError("relevant: expected at least one item")
    dcg = 0.0
    hits10 = 0
    hits20 = 0
    precision_sum = 0.0
    for rank, item in enumerate(ranked[:RECALL_CUTOFF]):
        if item not in relevant:
            continue
        hits20 += 1
        if rank < CUTOFF:
            hits10 += 1
            dcg += float(_DISCOUNT[rank])
            precision_sum += hits10 / (rank + 1)
    ideal = min(len(relevant), CUTOFF)
    idcg = float(_DISCOUNT[:ideal].sum())
    return (
        dcg / idcg,
        hits20 / len(relevant),
        precision_sum / ideal,
        1.0 if hits10 else 0.0,
    )


class MetricAccumulator:
    """Collects per-unit metrics, each unit tagged with a group, and averages them.

    Args:
        catalog_size: items in the catalog, the denominator of coverage.
    """

    def __init__(self, catalog_size: int) -> None:
        if catalog_size < 1:
            raise ValueError(f"catalog_size: expected >= 1, got {catalog_size!r}")
        self.catalog_size = catalog_size
        self._rows: list[tuple[float, ...]] = []
        self._groups: list[str] = []
        self._top: list[tuple[str, ...]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, ranked: Sequence[str], relevant: Collection[str], group: str = "all") -> None:
        """Score one unit's list (see `unit_metrics`) and remember its top 10 for coverage."""
        self._rows.append(unit_metrics(ranked, relevant))
        self._groups.append(group)
        self._top.append(tuple(ranked[:CUTOFF]))

    def groups(self) -> list[str]:
        """The distinct group tags, in first-seen order."""
        return list(dict.fromkeys(self._groups))

    def summary(self, groups: Iterable[str] | None = None) -> Metrics:
        """Means over the units of ``groups`` (None: every unit).

        Raises:
            ValueError: no unit belongs to those groups.
        """
        wanted = None if groups is None else set(groups)
        keep = [i for i, g in enumerate(self._groups) if wanted is None or g in wanted]
        if not keep:
            raise ValueError(f"no unit in groups {sorted(wanted or ())}")
        rows = np.asarray([self._rows[i] for i in keep], dtype=np.float64)
        ndcg = rows[:, 0]
        spread = float(ndcg.std(ddof=1)) if len(keep) > 1 else 0.0
        shown = {item for i in keep for item in self._top[i]}
        return Metrics(
            ndcg10=float(ndcg.mean()),
            ndcg10_ci95=1.96 * spread / math.sqrt(len(keep)),
            recall20=float(rows[:, 1].mean()),
            map10=float(rows[:, 2].mean()),
            hr10=float(rows[:, 3].mean()),
            coverage10=len(shown) / self.catalog_size,
            units=len(keep),
        )
