"""The engine's hybrid recommender, run in-process on MovieLens for the quality benchmark.

This is the code the engine runs, not a re-implementation: each interaction becomes a
``product_view`` event folded by `personify.tables.profiles.apply_events`, whose observer
`personify.tables.signals.SignalBatch` derives the co-visitation and trending rows exactly as
the profile agent does (here the rows stay in memory instead of RocksDB), and every list comes
from `personify.agents.recommend.Recommender` with the item vectors in a real FAISS index.
Only the storage differs: dicts instead of tables, so a validation grid runs in minutes.

Configuration: the engine's defaults, with the co-visitation structure and decay set for
MovieLens (users rate in long bursts, days apart) in `MOVIELENS`; the blend weights are tuned
on the validation split by the benchmark.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
from _movielens import Interaction, Item

from personify.agents.recommend import Recommender, Request
from personify.embeddings import Encoder, FaissIndex
from personify.embeddings.collab import AlsSettings, CollabModel, train_als
from personify.engine.config import DEFAULT_BLEND, Config
from personify.tables import profiles, signals
from personify.tables.catalog import Catalog
from personify.tables.reader import MemoryData

__all__ = ["MOVIELENS", "EngineHybrid", "engine_spec"]

#: [recommend] and [profiles] settings for MovieLens (structure found on validation).
MOVIELENS: dict[str, dict[str, Any]] = {
    "recommend": {
        "covisit_window": 50,
        "covisit_distance_power": 0.5,
        "covisit_gap_half_life_s": 168 * 3600.0,
        "covisit_alpha": 0.5,
        "neighbours": 200,
        "signal_half_life_s": 180 * 86400.0,
        "trending_half_life_s": 7 * 86400.0,
        "seeds": 20,
        "seed_half_life": 2.0,
        "candidates": 200,
    },
    "profiles": {"recent_items": 50, "dedup_window": 8},
}


class EngineHybrid:
    """The engine's recommender behind the benchmark's `StreamingRecommender` protocol.

    Args:
        vectors: item id -> unit MiniLM vector of the item text.
        learn: whether ``observe`` folds events (False: the model stays as fitted on train).
        weights: blend weights (the engine's defaults for any not given).
    """

    def __init__(
        self, vectors: dict[str, np.ndarray[Any, Any]], *, learn: bool = True, **weights: float
    ) -> None:
        base = Config()
        self.cfg = base.replace(
            recommend={**MOVIELENS["recommend"], "weights": {**DEFAULT_BLEND, **weights}},
            profiles=MOVIELENS["profiles"],
        )
        self.weights = weights
        self.learn = learn
        self.vectors = vectors
        self.data = MemoryData(self.cfg.recommend)  # rows change as it learns: no cache
        self.catalog = Catalog()
        self.index = FaissIndex(len(next(iter(vectors.values()))))
        self.category: dict[str, str | None] = {}
        self.now_ms = 0
        self._ids = itertools.count()
        self.recommender = Recommender(
            self.cfg.recommend,
            self.data,
            self.catalog,
            self.index,
            self.cfg.profiles.affinity_half_life_s,
        )

    def params(self) -> dict[str, Any]:
        return dict(self.weights)

    def fit(self, train: Sequence[Interaction], items: Sequence[Item]) -> None:
        for item in items:
            category = item.genres[0] if item.genres else None
            self.category[item.item_id] = category
            self.catalog.put({"item_id": item.item_id, "title": item.title, "category": category})
        ids = [i.item_id for i in items if i.item_id in self.vectors]
        self.index.upsert(ids, np.stack([self.vectors[i] for i in ids]))
        for event in train:
            self._fold(event)
        if any(self.cfg.recommend.weights.get(s, 0.0) > 0 for s in ("collab", "popular")):
            self.recommender.model = _train_model(train, self.cfg)

    def _fold(self, e: Interaction, *, learn: bool = True) -> None:
        """Fold one interaction into its visitor's profile (and, when ``learn``, the signals)."""
        ts = int(e.timestamp * 1000)
        self.now_ms = max(self.now_ms, ts)
        event = {
            "event_id": str(next(self._ids)),
            "type": "product_view",
            "user_id": e.user_id,
            "item_id": e.item_id,
            "ts_ms": ts,
            "properties": {"category": self.category.get(e.item_id)},
        }
        p = self.data.profiles.get(e.user_id)
        if p is None:
            p = self.data.profiles[e.user_id] = profiles.new_profile(e.user_id)
        if not learn:
            profiles.apply_events(p, [event], self.cfg.profiles)
            return
        batch = signals.SignalBatch(self.cfg.recommend, self.cfg.profiles)
        profiles.apply_events(p, [event], self.cfg.profiles, observe=batch.observe)
        batch.fold_rows(self.data.rows_by_key)

    def observe(self, event: Interaction) -> None:
        # Without learning the visitor's own history still grows (the profile is live).
        self._fold(event, learn=self.learn)

    def recommend(self, user_id: str, k: int, exclude: Collection[str]) -> list[str]:
        request = Request(k=k, exclude=exclude)
        _rid, items = self.recommender.recommend(user_id, request, self.now_ms)
        return [r.item_id for r in items]


def _train_model(train: Sequence[Interaction], cfg: Config) -> CollabModel:
    """The learned model on the training interactions, with the engine's [model] settings."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    u = [users.setdefault(e.user_id, len(users)) for e in train]
    i = [items.setdefault(e.item_id, len(items)) for e in train]
    m = cfg.model
    settings = AlsSettings(m.factors, m.regularization, m.alpha, m.iterations)
    return train_als(u, i, np.ones(len(u), dtype=np.float32), list(items), settings)


#: Blend weights tried on the validation split.
GRID = {"trending": [0.1, 1.5], "category": [0.1, 1.0], "content": [0.0, 0.3]}
QUICK_GRID = {"trending": [0.1], "category": [0.1, 1.0], "content": [0.1]}


def engine_spec(encoder: Encoder, items: Sequence[Item]) -> Any:
    """The engine hybrid as a `quality.MethodSpec` (static, live and online)."""
    import quality_replay as quality

    vecs = encoder.encode([item.text for item in items])
    vectors = {item.item_id: vecs[i] for i, item in enumerate(items)}
    build = functools.partial(EngineHybrid, vectors)
    return quality.MethodSpec(
        "engine hybrid",
        {
            "static": build,
            "live": functools.partial(EngineHybrid, vectors, learn=False),
            "online": build,
        },
        grid=GRID,
        quick_grid=QUICK_GRID,
    )


def _check_config() -> None:
    """Fail early if the settings above stop matching the engine's config."""
    names = {f.name for f in dataclasses.fields(Config().recommend)}
    unknown = set(MOVIELENS["recommend"]) - names
    if unknown:
        raise ValueError(f"unknown [recommend] settings in MOVIELENS: {sorted(unknown)}")


_check_config()
