"""Self-tuning: the blend weights and seed settings chosen on the shop's own history.

`tune` searches the settings in `SPACE` (optuna's TPE sampler, seeded) to maximise the
engine's NDCG@10 on validation splits cut from a training history: both protocols of
`personify.agents.evaluation` (a global temporal cut, and each visitor's last order or last
interactions), averaged, so that a setting has to be good at both. The history is folded into
profiles and signals once per split; each trial only re-ranks. The current setting is trial 0,
and a setting that does not beat it on validation is not proposed.

`holdout` scores settings and baselines on a hold-out the tuning never saw (the end of the
history), for the record. The trainer (`personify.agents.model`) runs both on a schedule and
applies a better setting live; ``bench/quality.py`` calls `tune` on its own training split.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
import traceback
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from personify.agents.evaluation import (
    AlsMethod,
    BuyAgain,
    EngineMethod,
    History,
    Method,
    Popularity,
    Split,
    evaluate,
    global_split,
    last_split,
)
from personify.agents.ranker import Ranker, Scorer, fit_bagged
from personify.embeddings import VectorIndex
from personify.embeddings.collab import AlsSettings
from personify.engine.config import TUNABLE, Config, RecommendConfig
from personify.engine.models import format_ts
from personify.engine.priority import to_background

__all__ = [
    "GROWING",
    "SPACE",
    "TUNE_WAIT_MAX_S",
    "Tuned",
    "apply_setting",
    "holdout",
    "learn_ranker",
    "setting_of",
    "settled",
    "tune",
    "tune_and_score",
    "tune_in_child",
]

#: What the tuner may change: name -> (low, high, log scale). ``weights.X`` is the blend
#: weight of source X; the others are [recommend] settings.
#: Weights act by their ratios, so they are searched on a log scale: a source at 0.01 next to
#: one at 10 is as good as off, and one source can lead the others by any factor.
SPACE: dict[str, tuple[float, float, bool]] = {
    "weights.covisit": (0.01, 10.0, True),
    "weights.copurchase": (0.01, 10.0, True),
    "weights.content": (0.01, 10.0, True),
    "weights.category": (0.01, 10.0, True),
    "weights.trending": (0.01, 10.0, True),
    "weights.collab": (0.01, 10.0, True),
    "weights.repeat": (0.01, 100.0, True),
    "weights.popular": (0.01, 30.0, True),
    "seed_half_life": (0.5, 50.0, True),
}
if tuple(SPACE) != TUNABLE:  # the config checks [tune] pinned against TUNABLE
    raise RuntimeError("tuning.SPACE and config.TUNABLE name different settings")
#: The history "grows" (a backfill): more than this share of it arrived in one training or
#: check interval. Tuning waits for it to settle.
GROWING = 0.05
#: A tuning waits at most this long for the history to settle (a shop that never pauses).
TUNE_WAIT_MAX_S = 600.0


def settled(grown: int, interactions: int, waited_s: float | None) -> bool:
    """Whether a due tuning may run now, the history having settled.

    It has when it grew by at most `GROWING` of its ``interactions`` (``grown`` arrived in the
    last training or check interval), or when the tuning waited (``waited_s``)
    `TUNE_WAIT_MAX_S` already.
    """
    if waited_s is not None and waited_s >= TUNE_WAIT_MAX_S:
        return True
    return grown <= GROWING * interactions


#: Validation protocols, each cut from the history given to `tune`.
PROTOCOLS: dict[str, Callable[[History], Split]] = {
    "global": lambda h: global_split(h, 0.2),
    "last": lambda h: last_split(h, 10),
}


def setting_of(cfg: RecommendConfig, names: Collection[str] = tuple(SPACE)) -> dict[str, float]:
    """The values of ``names`` in ``cfg``."""
    out: dict[str, float] = {}
    for name in names:
        if name.startswith("weights."):
            out[name] = float(cfg.weights.get(name.removeprefix("weights."), 0.0))
        else:
            out[name] = float(getattr(cfg, name))
    return out


def apply_setting(cfg: RecommendConfig, setting: Mapping[str, float]) -> RecommendConfig:
    """``cfg`` with ``setting`` (names as in `SPACE`) applied."""
    weights = dict(cfg.weights)
    fields: dict[str, Any] = {}
    for name, value in setting.items():
        if name.startswith("weights."):
            weights[name.removeprefix("weights.")] = float(value)
        elif name not in SPACE:
            raise ValueError(f"unknown tuned setting {name!r}; known: {', '.join(SPACE)}")
        else:
            fields[name] = type(getattr(cfg, name))(value)
    return dataclasses.replace(cfg, weights=weights, **fields)


@dataclass
class Tuned:
    """One tuning run.

    Attributes:
        setting: the best setting found (names as in `SPACE`).
        current: the setting it started from.
        validation: NDCG@10 on validation per protocol and their mean, of ``setting`` and of
            ``current``.
        improved: whether ``setting`` beats ``current`` on validation (else it is
            ``current``).
        trials: settings tried.
        seconds: how long it took.
        users: visitors scored per validation split.
    """

    setting: dict[str, float]
    current: dict[str, float]
    validation: dict[str, dict[str, float]]
    improved: bool
    trials: int
    seconds: float
    users: dict[str, int] = field(default_factory=dict)
    #: The ranker to use with ``setting`` (None: the blend's order).
    ranker: Ranker | None = None
    #: Which ranker won ("learned", "current" or "blend"), its trees and feature importance;
    #: None where no ranker was learned.
    ranker_report: dict[str, Any] | None = None
    #: Each contender's NDCG@10 on the selection visitors, and which won (``"choice"``).
    selection: dict[str, Any] = field(default_factory=dict)
    #: The best setting's and the current one's NDCG@10 on the search visitors.
    search: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """As JSON (the ranker's report, not the ranker)."""
        return {
            "ranker": self.ranker_report,
            "selection": {
                k: v if isinstance(v, str) else {p: round(x, 5) for p, x in v.items()}
                for k, v in self.selection.items()
            },
            "search": {k: {p: round(x, 5) for p, x in v.items()} for k, v in self.search.items()},
            "setting": {k: round(v, 4) for k, v in self.setting.items()},
            "current": {k: round(v, 4) for k, v in self.current.items()},
            "validation": {
                name: {k: round(v, 5) for k, v in scores.items()}
                for name, scores in self.validation.items()
            },
            "improved": self.improved,
            "trials": self.trials,
            "seconds": round(self.seconds, 2),
            "users": self.users,
        }


def _sample(split: Split, max_users: int, seed: int) -> list[int]:
    users = sorted(split.targets)
    if len(users) <= max_users:
        return users
    return sorted(random.Random(seed).sample(users, max_users))


def tune(
    history: History,
    config: Config,
    *,
    trials: int = 40,
    max_users: int = 1500,
    pinned: Collection[str] = (),
    index: VectorIndex | None = None,
    category_of: Mapping[str, str | None] | None = None,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    ranker: bool = False,
    current_ranker: Ranker | None = None,
) -> Tuned:
    """Choose the setting (and ranker) with the best NDCG@10 on validation visitors.

    Each validation split's visitors are dealt into a search part (two thirds) and a
    selection part (one third). `SPACE` (less ``pinned``) is searched on the search part;
    with ``ranker``, a ranker (`learn_ranker`) is learned there for the best setting found.
    Then the current setting, the best one found, that one re-ordered by the new ranker, and
    the current setting with ``current_ranker`` are scored on the selection part, which
    none of them was chosen or learned on; the best mean over the protocols wins (the
    current one where none beats it). So a setting that won the search by chance, on
    those visitors only, is not applied.

    Args:
        history: what to learn and validate on (never the hold-out a caller reports).
        config: the engine's configuration; its [recommend] values are the current setting.
        trials: settings tried, the current one first.
        max_users: visitors scored per validation split (a seeded sample beyond).
        pinned: names of `SPACE` the operator fixed: never changed.
        index: item text vectors, if any (the content source).
        category_of: each item's category.
        seed: the sampler's and the visitor sample's seed.
        progress: called with (trials done, trials, best mean NDCG@10 so far).
        ranker: also learn a ranker for the best setting found.
        current_ranker: the ranker in use, which a learned one must beat.

    Raises:
        ValueError: a pinned name is not in `SPACE`, or the history is too small to validate.
    """
    import optuna

    unknown = set(pinned) - set(SPACE)
    if unknown:
        raise ValueError(
            f"unknown pinned setting {sorted(unknown)[0]!r}; known: {', '.join(SPACE)}"
        )
    started = time.perf_counter()
    free = [name for name in SPACE if name not in pinned]
    current = setting_of(config.recommend)
    splits: dict[str, tuple[Split, EngineMethod]] = {}
    search: dict[str, list[int]] = {}
    select: dict[str, list[int]] = {}
    deal = random.Random(seed)
    for name, cut in PROTOCOLS.items():
        split = cut(history)
        if not split.targets:
            continue
        engine = EngineMethod(config, index=index, category_of=category_of)
        engine.fit(split.train)
        splits[name] = (split, engine)
        users = _sample(split, max_users, seed)
        deal.shuffle(users)
        cut_at = len(users) // _SELECT_EVERY
        select[name], search[name] = sorted(users[:cut_at]), sorted(users[cut_at:])
    if not splits:
        raise ValueError("the history is too small to validate on: no visitor to score")
    if not any(select.values()):  # too few visitors to keep some aside: select in-sample
        select = search

    def score(
        setting: Mapping[str, float], users: Mapping[str, list[int]], scorer: Scorer | None = None
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, (split, engine) in splits.items():
            if not users[name]:
                continue
            method = engine.retuned(apply_setting(config.recommend, setting), ranker=scorer)
            [result] = evaluate(split, [method], users=users[name], fit=False)
            out[name] = result.metrics.ndcg10
        out["mean"] = sum(out.values()) / max(len(out), 1)
        return out

    baseline = score(current, search)
    best_setting, best_scores = dict(current), baseline
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial(
        {name: min(max(current[name], SPACE[name][0]), SPACE[name][1]) for name in free}
    )
    for n in range(trials):
        trial = study.ask()
        setting = dict(current)
        for name in free:
            low, high, log = SPACE[name]
            setting[name] = trial.suggest_float(name, low, high, log=log)
        if n == 0:
            setting = dict(current)  # the enqueued trial: the current setting itself
        scores = baseline if n == 0 else score(setting, search)
        study.tell(trial, scores["mean"])
        if scores["mean"] > best_scores["mean"]:
            best_setting, best_scores = setting, scores
        if progress is not None:
            progress(n + 1, trials, best_scores["mean"])
    found = _beats(best_scores["mean"], baseline["mean"])
    if not found:
        best_setting = current
    # The contenders, scored on the selection visitors: (setting, ranker).
    contenders: dict[str, tuple[dict[str, float], Ranker | None]] = {"current": (current, None)}
    if current_ranker is not None:
        contenders["current, ranker in use"] = (current, current_ranker)
    if found:
        contenders["tuned"] = (best_setting, None)
    learned: Ranker | None = None
    ranker_seconds = 0.0
    if ranker:
        ranker_started = time.perf_counter()
        learned = learn_ranker(_retuned(splits, config, best_setting), search, seed=seed)
        ranker_seconds = time.perf_counter() - ranker_started
        if learned is not None:
            contenders["tuned, new ranker" if found else "current, new ranker"] = (
                best_setting,
                learned,
            )
    selection = {
        label: score(setting, select, scorer) for label, (setting, scorer) in contenders.items()
    }
    choice = "current"  # the first of equals, in the order above, wins
    for label in selection:
        if _beats(selection[label]["mean"], selection[choice]["mean"]):
            choice = label
    chosen, chosen_ranker = contenders[choice]
    if chosen_ranker is learned and learned is not None:  # trained again on every visitor
        every = {name: sorted(set(search[name]) | set(select[name])) for name in splits}
        learned = learn_ranker(_retuned(splits, config, chosen), every, seed=seed)
        chosen_ranker = learned
    improved = chosen is not current
    report: dict[str, Any] | None = None
    if ranker:
        report = {
            "choice": "learned"
            if chosen_ranker is not None and chosen_ranker is not current_ranker
            else "current"
            if chosen_ranker is not None
            else "blend",
            "seconds": round(ranker_seconds, 2),
        }
        if chosen_ranker is not None and chosen_ranker is not current_ranker:
            report |= {"trees": chosen_ranker.trees, "importance": chosen_ranker.importance()}
    return Tuned(
        setting=dict(chosen),
        current=current,
        validation={"best": selection[choice], "current": selection["current"]},
        improved=improved,
        trials=trials,
        seconds=time.perf_counter() - started,
        users={name: len(set(search[name]) | set(select[name])) for name in splits},
        ranker=chosen_ranker,
        ranker_report=report,
        selection={"choice": choice, **selection},
        search={"best": best_scores, "current": baseline},
    )


def _retuned(
    splits: Mapping[str, tuple[Split, EngineMethod]], config: Config, setting: Mapping[str, float]
) -> dict[str, tuple[Split, EngineMethod]]:
    """The splits' engines ranking with ``setting``."""
    return {
        name: (split, engine.retuned(apply_setting(config.recommend, setting)))
        for name, (split, engine) in splits.items()
    }


#: One in this many validation visitors is kept aside to choose between the contenders.
_SELECT_EVERY = 3
#: A ranker is this many models, each stopped early on its own share of the visitors.
_FOLDS = 5


def learn_ranker(
    splits: Mapping[str, tuple[Split, EngineMethod]],
    users: Mapping[str, list[int]],
    *,
    seed: int = 0,
) -> Ranker | None:
    """A ranker learned on validation splits, for the engines' setting.

    Each split (protocol -> split, engine fitted on its training part) gives, for each of its
    ``users``, the blend's best candidates (`personify.agents.ranker.DEPTH`) with their
    features, labelled by the visitor's held-out items; the ranker is `_FOLDS` models, each
    stopped early on its own share of them (`fit_bagged`). None when no visitor's candidates
    hold a held-out item.
    """
    groups = []
    for name, (split, engine) in splits.items():
        for user in users.get(name, ()):
            groups.append(engine.candidates(user, split.now_ms[user], split.targets[user]))
    return fit_bagged(groups, folds=_FOLDS, seed=seed)


def _beats(score: float, other: float) -> bool:
    return score > other and not math.isclose(score, other, rel_tol=1e-9)


def holdout(
    history: History,
    config: Config,
    settings: Mapping[str, Mapping[str, float]],
    *,
    max_users: int = 1500,
    index: VectorIndex | None = None,
    category_of: Mapping[str, str | None] | None = None,
    baselines: bool = True,
    sources_of: str | None = None,
    seed: int = 0,
    rankers: Mapping[str, Scorer] | None = None,
    fitted: dict[str, tuple[Split, EngineMethod, list[int]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score named settings of the engine, and baselines, on the end of ``history``.

    Each protocol of `PROTOCOLS` cuts ``history``; every method learns from what is before the
    cut and is scored on what is after it. With ``sources_of`` (a label of ``settings``), each
    candidate source of that setting is also scored alone (``"source X"``; chat has no history
    to learn from and is left out). ``rankers``: the ranker of a setting that has one (by its
    label). Each protocol's split, fitted engine and visitors scored are put in ``fitted``,
    where given. Returns protocol -> method -> metrics (as JSON).
    """
    rankers = rankers or {}
    out: dict[str, dict[str, Any]] = {}
    for name, cut in PROTOCOLS.items():
        split = cut(history)
        if not split.targets:
            continue
        users = _sample(split, max_users, seed)
        engine = EngineMethod(config, index=index, category_of=category_of)
        engine.fit(split.train)
        if fitted is not None:
            fitted[name] = (split, engine, users)
        engines: list[Method] = [
            engine.retuned(
                apply_setting(config.recommend, setting), name=label, ranker=rankers.get(label)
            )
            for label, setting in settings.items()
        ]
        if sources_of is not None:
            base = apply_setting(config.recommend, settings[sources_of])
            for source in base.weights:
                if source == "chat":
                    continue
                alone = {other: 0.0 for other in base.weights} | {source: 1.0}
                engines.append(
                    engine.retuned(
                        dataclasses.replace(base, weights=alone), name=f"source {source}"
                    )
                )
        results = evaluate(split, engines, users=users, fit=False)
        if baselines:
            m = config.model
            methods: list[Method] = [
                Popularity(repeat=True),
                BuyAgain(),
                AlsMethod(
                    AlsSettings(m.factors, m.regularization, m.alpha, m.iterations),
                    config.profiles.engagement_weights,
                    repeat=True,
                ),
            ]
            results += evaluate(split, methods, users=users)
        out[name] = {r.method: r.metrics.as_json() for r in results}
    return out


def tune_and_score(
    rows: History,
    cfg: Config,
    setting: Mapping[str, float],
    index: VectorIndex | None,
    category_of: Mapping[str, str | None],
    progress: Callable[[int, int, float], None] | None = None,
    ranker: Ranker | None = None,
) -> dict[str, Any]:
    """One self-tuning run of the engine, as the run's record.

    `tune` on ``rows`` less both hold-outs, then `holdout` of the current and the tuned
    setting (with baselines).

    ``cfg`` is the engine's configuration ([tune] says how); ``setting`` the tuned values in
    use (trial 0), and ``ranker`` the ranker in use. Where a ranker was learned and won, the
    record's ``"ranker_model"`` is it as text (`Ranker.to_text`).
    """
    started = time.time()
    current = dataclasses.replace(cfg, recommend=apply_setting(cfg.recommend, setting))
    held = np.zeros(len(rows), dtype=bool)
    for cut in PROTOCOLS.values():
        held |= cut(rows).held
    t = cfg.tune
    tuned = tune(
        rows.take(~held),
        current,
        trials=t.trials,
        max_users=t.max_users,
        pinned=t.pinned,
        index=index,
        category_of=category_of,
        progress=progress,
        ranker=t.ranker,
        current_ranker=ranker,
    )
    rankers: dict[str, Scorer] = {}
    if ranker is not None:
        rankers["current"] = ranker
    if tuned.ranker is not None:
        rankers["tuned"] = tuned.ranker
    fitted: dict[str, tuple[Split, EngineMethod, list[int]]] = {}
    evaluation = holdout(
        rows,
        current,
        {"current": tuned.current, "tuned": tuned.setting},
        max_users=t.max_users,
        sources_of="tuned",
        index=index,
        category_of=category_of,
        rankers=rankers,
        fitted=fitted,
    )
    deployed = tuned.ranker
    if tuned.ranker is not None and tuned.ranker is not ranker and fitted:
        # Chosen on validation and scored on the hold-outs above; what ranks from now on is
        # the same recipe learned on the newest history (the hold-outs' splits).
        retrained = learn_ranker(
            _retuned({n: (sp, e) for n, (sp, e, _u) in fitted.items()}, current, tuned.setting),
            {n: users for n, (_sp, _e, users) in fitted.items()},
        )
        if retrained is not None and tuned.ranker_report is not None:
            deployed = retrained
            tuned.ranker_report |= {
                "trees": retrained.trees,
                "importance": retrained.importance(),
                "learned_on": "the newest history (the hold-outs)",
            }
    return {
        "tuned_at": format_ts(int(started * 1000)),
        "interactions": len(rows),
        **tuned.as_json(),
        "holdout": evaluation,
        "seconds": round(time.time() - started, 2),
        **(
            {"ranker_model": deployed.to_text()}
            if deployed is not None and deployed is not ranker
            else {}
        ),
    }


def tune_in_child(
    conn: Any,
    rows: History,
    cfg: Config,
    setting: Mapping[str, float],
    vectors: tuple[list[str], npt.NDArray[np.float32]] | None,
    category_of: Mapping[str, str | None],
    ranker: str | None = None,
) -> None:
    """`tune_and_score` in a child process: messages on ``conn`` (a pipe's sending end).

    ``("progress", done, trials, best)`` as trials finish, then one of ``("done", record)``,
    ``("too little history", reason)`` or ``("error", reason)``. The item text vectors come
    as ``(ids, matrix)`` and are indexed here; ``ranker`` is the ranker in use, as text.
    Runs at background priority (`to_background`) on one thread.
    """
    from threadpoolctl import threadpool_limits

    to_background()  # where it was not started at that priority already
    try:
        with threadpool_limits(1):
            index = None
            if vectors is not None and len(vectors[0]):
                from personify.embeddings import FaissIndex

                ids, matrix = vectors
                index = FaissIndex(int(matrix.shape[1]))
                index.upsert(ids, matrix)

            def progress(done: int, trials: int, best: float) -> None:
                conn.send(("progress", done, trials, best))

            current = None if ranker is None else Ranker.from_text(ranker)
            record = tune_and_score(
                rows, cfg, setting, index, category_of, progress, ranker=current
            )
        conn.send(("done", record))
    except ValueError as exc:
        conn.send(("too little history", str(exc)))
    except Exception:  # reported to the parent, which logs it, with where it happened
        conn.send(("error", traceback.format_exc(limit=-8)))
    finally:
        conn.close()
