"""Recommendation quality on MovieLens 100k: offline baselines and online replay in one run.

Usage (from the repository root)::

    .venv/bin/python bench/quality_replay.py            # full run, ~2.5 min on one core
    .venv/bin/python bench/quality_replay.py --quick    # smoke run (users sampled, small grids)
    .venv/bin/python bench/quality_replay.py --json quality.json

Needs, besides the project: ``pip install --no-deps recbole==1.2.1`` (only for its bundled
ml-100k files; recbole is never imported) and ``pip install implicit==0.7.3``.

Protocol (details in ``_harness``, ``_metrics`` and ``_baselines``):

- Every rating is an implicit interaction (``--min-rating 4`` keeps only ratings >= 4).
- Split by global time at the 80% quantile of interaction timestamps: train before, test
  after. Validation repeats the split inside train (its last 20% by timestamp quantile).
- Candidates: the whole catalog (also items first seen in the test period); items the user
  has already interacted with are excluded for every method.
- Offline: one top-20 list per test user with training history, scored against every
  test-period item not seen in training. Replay: the test period in time order, one step (a
  user's events of one second) at a time, each predicted before it is revealed.
- Variants of a method: ``static`` (fitted on train, nothing changes afterwards; evaluated
  offline and in replay), ``live`` (fitted on train; in replay each revealed event extends the
  user's history, the model stays as fitted) and ``online`` (in replay the model learns from
  each revealed event too). Static and live are "offline baselines": models fitted once.
- Hyperparameters are tuned on validation only (NDCG@10; offline protocol for ``static``,
  replay for ``live``/``online``), then refitted on all of train and evaluated once on test.

Another method (e.g. the engine's hybrid) joins the same run as one more `MethodSpec`::

    import quality
    quality.main(sys.argv[1:], extra=[quality.MethodSpec("engine", {"online": make_engine})])
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from _baselines import ContentSimilarity, ImplicitMF, ItemKNN, Popularity, RandomRanking
from _engine import engine_spec
from _harness import (
    Evaluation,
    Recommender,
    evaluate_offline,
    evaluate_replay,
    offline_targets,
    replay_targets,
)
from _metrics import Metrics
from _movielens import DATASET_PACKAGE, Interaction, Item, load_movielens, temporal_split
from threadpoolctl import threadpool_limits

from personify.embeddings import CachedEncoder, Encoder, SentenceEncoder

Params = dict[str, Any]
Grid = Mapping[str, Sequence[Any]]
Builder = Callable[..., Recommender]

#: Install lines for a clean machine, beyond the project's own dependencies.
REQUIREMENTS = (f"pip install --no-deps {DATASET_PACKAGE}", "pip install implicit==0.7.3")
#: Variants in evaluation order (a fitted static model is reused by a later variant).
VARIANTS = ("static", "live", "online")
#: Variants whose model is fitted once on train: the "offline baselines" of the ratio.
OFFLINE_VARIANTS = ("static", "live")

_SECTIONS = {
    "offline": "Offline: one list per test user with training history, vs all their new "
    "test-period items",
    "replay:all": "Replay: each test step (a user's events in one second) of a user with an "
    "earlier interaction, predicted before it is revealed",
    "replay:warm": "Replay, steps of users with training history only",
}


@dataclass(frozen=True)
class MethodSpec:
    """A method to evaluate: how to build each variant, and which hyperparameters to tune.

    Attributes:
        name: its label in the table.
        variants: ``static``, ``live`` and/or ``online`` -> a function that returns a fresh,
            unfitted recommender from one grid point (keyword arguments). ``live`` and
            ``online`` recommenders must have ``observe``. Variants given the same function
            share a fit (the static evaluation does not change the recommender).
        grid: values of each hyperparameter tried on validation (their product); an empty
            mapping, or one value each, means nothing is tuned.
        quick_grid: the grid under ``--quick`` (None: ``grid``).
        baseline: counts for the "÷best" ratio (the built-in methods).
    """

    name: str
    variants: Mapping[str, Builder]
    grid: Grid = field(default_factory=dict)
    quick_grid: Grid | None = None
    baseline: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(VARIANTS)
        if unknown or not self.variants:
            raise ValueError(
                f"{self.name}: variants must be some of {VARIANTS}, got {sorted(self.variants)}"
            )


@dataclass
class Tuning:
    """Validation results of one variant of one method.

    Attributes:
        trials: every grid point with its validation NDCG@10 (None when nothing was tuned).
        best: the chosen point.
    """

    trials: list[tuple[Params, float | None]]
    best: Params

    @property
    def best_ndcg(self) -> float | None:
        """The chosen point's validation NDCG@10."""
        return next((score for params, score in self.trials if params == self.best), None)


@dataclass
class Row:
    """One line of the results table.

    Attributes:
        section: ``offline``, ``replay:all`` or ``replay:warm``.
        method: the label (with the variant in replay sections).
        spec: the method's name.
        variant: ``static``, ``live`` or ``online``.
        baseline: whether it counts for the ratio.
        params: the hyperparameters used.
        metrics: the test figures.
        recommend_us: mean microseconds per ``recommend`` call.
        fit_s: seconds to fit on train.
        ratio: NDCG@10 / the best offline baseline's NDCG@10 in the same section.
    """

    section: str
    method: str
    spec: str
    variant: str
    baseline: bool
    params: Params
    metrics: Metrics
    recommend_us: float
    fit_s: float
    ratio: float | None = None


@dataclass
class Context:
    """Everything a run shares: data, splits, user samples, options, timings."""

    items: list[Item]
    train: list[Interaction]
    test: list[Interaction]
    val_train: list[Interaction]
    val_test: list[Interaction]
    users: set[str] | None
    tune_sample: float
    seed: int
    quick: bool
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def catalog_size(self) -> int:
        """Items in the catalog."""
        return len(self.items)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def grid_points(grid: Grid) -> list[Params]:
    """Every combination of a grid's values, in order (one empty point for an empty grid)."""
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*grid.values())]


def builtin_methods(encoder: Encoder, *, threads: int, seed: int) -> list[MethodSpec]:
    """The baselines, their variants and validation grids."""
    als = functools.partial(ImplicitMF, "als", threads=threads, seed=seed)
    bpr = functools.partial(ImplicitMF, "bpr", threads=threads, seed=seed)
    content = functools.partial(ContentSimilarity, encoder)
    return [
        MethodSpec("random", {"static": functools.partial(RandomRanking, seed=seed)}),
        MethodSpec(
            "popularity",
            {"static": Popularity, "online": Popularity},
            grid={"half_life_days": [None, 1, 3, 7, 14, 30, 90]},
            quick_grid={"half_life_days": [None, 1, 7]},
            baseline=True,
        ),
        MethodSpec(
            "item-kNN",
            {
                "static": ItemKNN,
                "live": functools.partial(ItemKNN, learn=False),
                "online": ItemKNN,
            },
            grid={"neighbours": [20, 100, None], "window": [5, 20, None], "history": [10, 50]},
            quick_grid={"neighbours": [100], "window": [20, None], "history": [10, 50]},
            baseline=True,
        ),
        MethodSpec(
            "content",
            {"static": content, "live": content},
            grid={"half_life": [None, 3, 10, 30], "history": [10, 50, None]},
            quick_grid={"half_life": [None, 10], "history": [50]},
            baseline=True,
        ),
        MethodSpec(
            "ALS",
            {"static": als, "live": als},
            grid={
                "factors": [32, 64, 128],
                "regularization": [0.01, 0.1, 1.0],
                "alpha": [1.0, 10.0, 40.0],
                "iterations": [15, 30],
            },
            quick_grid={
                "factors": [64],
                "regularization": [0.1],
                "alpha": [1.0, 10.0],
                "iterations": [15],
            },
            baseline=True,
        ),
        MethodSpec(
            "BPR",
            {"static": bpr},
            grid={
                "factors": [32, 64, 128],
                "learning_rate": [0.01, 0.05],
                "regularization": [0.001, 0.01],
                "iterations": [100, 300],
            },
            quick_grid={
                "factors": [64],
                "learning_rate": [0.05],
                "regularization": [0.01],
                "iterations": [100],
            },
            baseline=True,
        ),
    ]


def _variants(spec: MethodSpec) -> list[str]:
    return [v for v in VARIANTS if v in spec.variants]


def tune(spec: MethodSpec, ctx: Context) -> dict[str, Tuning]:
    """Per variant, the grid point with the best validation NDCG@10 (the first one on ties).

    The static variant is scored with the offline protocol on the validation users, the
    others by replaying the validation period (predicting a ``ctx.tune_sample`` share of
    its steps, drawn at random).
    """
    grid = spec.quick_grid if ctx.quick and spec.quick_grid is not None else spec.grid
    points = grid_points(grid)
    variants = _variants(spec)
    if len(points) == 1:
        return {v: Tuning([(points[0], None)], points[0]) for v in variants}
    trials: dict[str, list[tuple[Params, float | None]]] = {v: [] for v in variants}
    for params in points:
        unobserved: dict[int, Recommender] = {}  # fitted and not yet changed, by builder
        for variant in variants:
            build = spec.variants[variant]
            recommender = unobserved.pop(id(build), None)
            if recommender is None:
                recommender = build(**params)
                recommender.fit(ctx.val_train, ctx.items)
            result: Evaluation
            if variant == "static":
                result = evaluate_offline(
                    recommender,
                    ctx.val_train,
                    ctx.val_test,
                    ctx.catalog_size,
                    users=ctx.users,
                    name=spec.name,
                )
                unobserved[id(build)] = recommender
            else:
                result = evaluate_replay(
                    recommender,
                    ctx.val_train,
                    ctx.val_test,
                    ctx.catalog_size,
                    update=True,
                    users=ctx.users,
                    sample=ctx.tune_sample,
                    seed=ctx.seed,
                    name=spec.name,
                )
            trials[variant].append((params, result.metrics.summary().ndcg10))
    return {
        v: Tuning(runs, max(runs, key=lambda trial: trial[1] or 0.0)[0])
        for v, runs in trials.items()
    }


def _replay_rows(
    spec: MethodSpec, variant: str, params: Params, fit_s: float, replay: Evaluation
) -> list[Row]:
    rows = []
    for section, groups in (("replay:all", None), ("replay:warm", ["warm"])):
        if groups is not None and "warm" not in replay.metrics.groups():
            continue
        rows.append(
            Row(
                section,
                f"{spec.name} ({variant})",
                spec.name,
                variant,
                spec.baseline,
                params,
                replay.metrics.summary(groups),
                replay.recommend_us,
                fit_s,
            )
        )
    return rows


def run_method(spec: MethodSpec, ctx: Context) -> tuple[list[Row], dict[str, Tuning]]:
    """Tune, refit on train and evaluate every variant of one method."""
    started = time.perf_counter()
    tunings = tune(spec, ctx)
    ctx.phases[f"{spec.name} tuning"] = time.perf_counter() - started
    started = time.perf_counter()
    rows: list[Row] = []
    unobserved: dict[tuple[int, str], tuple[Recommender, float]] = {}
    for variant in _variants(spec):
        build = spec.variants[variant]
        params = tunings[variant].best
        key = (id(build), repr(sorted(params.items())))
        entry = unobserved.pop(key, None)
        if entry is None:
            recommender = build(**params)
            t0 = time.perf_counter()
            recommender.fit(ctx.train, ctx.items)
            entry = (recommender, time.perf_counter() - t0)
        recommender, fit_s = entry
        if variant == "static":
            offline = evaluate_offline(
                recommender,
                ctx.train,
                ctx.test,
                ctx.catalog_size,
                users=ctx.users,
                name=spec.name,
            )
            rows.append(
                Row(
                    "offline",
                    spec.name,
                    spec.name,
                    variant,
                    spec.baseline,
                    params,
                    offline.metrics.summary(),
                    offline.recommend_us,
                    fit_s,
                )
            )
            replay = evaluate_replay(
                recommender,
                ctx.train,
                ctx.test,
                ctx.catalog_size,
                update=False,
                users=ctx.users,
                name=spec.name,
            )
            unobserved[key] = entry
        else:
            replay = evaluate_replay(
                recommender,
                ctx.train,
                ctx.test,
                ctx.catalog_size,
                update=True,
                users=ctx.users,
                name=spec.name,
            )
        rows += _replay_rows(spec, variant, params, fit_s, replay)
    ctx.phases[f"{spec.name} test"] = time.perf_counter() - started
    return rows, tunings


def set_ratios(rows: list[Row]) -> dict[str, str]:
    """Fill ``Row.ratio`` against the best offline baseline of each section; name them."""
    best: dict[str, str] = {}
    for section in _SECTIONS:
        pool = [
            r for r in rows if r.section == section and r.baseline and r.variant in OFFLINE_VARIANTS
        ]
        if not pool:
            continue
        top = max(pool, key=lambda r: r.metrics.ndcg10)
        best[section] = f"{top.method}, NDCG@10 {top.metrics.ndcg10:.4f}"
        for row in rows:
            if row.section == section and top.metrics.ndcg10 > 0:
                row.ratio = row.metrics.ndcg10 / top.metrics.ndcg10
    return best


def _sample_users(users: Sequence[str], fraction: float, seed: int) -> set[str]:
    ordered = sorted(users)
    return set(random.Random(seed).sample(ordered, max(1, round(fraction * len(ordered)))))


def _fmt_params(params: Params) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


def format_table(rows: list[Row], best: dict[str, str]) -> str:
    """The results as text: one block per section, method x metrics."""
    header = (
        f"{'method':<22} {'NDCG@10':>8} {'±95%':>6} {'Recall@20':>9} {'MAP@10':>7} "
        f"{'HR@10':>6} {'Cov@10':>6} {'÷best':>6} {'µs/rec':>7}"
    )
    lines = []
    for section, title in _SECTIONS.items():
        block = [r for r in rows if r.section == section]
        if not block:
            continue
        unit = "users" if section == "offline" else "steps"
        lines += ["", f"{title} ({block[0].metrics.units:,} {unit})", header, "-" * len(header)]
        for r in block:
            m = r.metrics
            ratio = f"{r.ratio:6.2f}" if r.ratio is not None else f"{'-':>6}"
            lines.append(
                f"{r.method:<22} {m.ndcg10:8.4f} {m.ndcg10_ci95:6.4f} {m.recall20:9.4f} "
                f"{m.map10:7.4f} {m.hr10:6.3f} {m.coverage10:6.3f} {ratio} {r.recommend_us:7.0f}"
            )
        if section in best:
            lines.append(f"÷best: NDCG@10 / best offline baseline here ({best[section]})")
        if section == "replay:all":
            warm = next((r for r in rows if r.section == "replay:warm"), None)
            cold = block[0].metrics.units - (warm.metrics.units if warm else 0)
            lines.append(
                f"{cold / block[0].metrics.units:.0%} of these steps are of users first seen in "
                "the test period: static rows answer them with the training popularity ranking"
            )
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "implicit", "torch", "sentence-transformers", "recbole"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Recommendation quality on MovieLens 100k (see the module docstring)."
    )
    parser.add_argument("--quick", action="store_true", help="sample users, small grids")
    parser.add_argument(
        "--no-engine", action="store_true", help="baselines only (skip the engine's hybrid)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    parser.add_argument(
        "--min-rating", type=float, default=None, help="keep ratings >= this (default: all)"
    )
    parser.add_argument("--test-fraction", type=float, default=0.2, help="default 0.2")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of train; default 0.2"
    )
    parser.add_argument(
        "--user-fraction",
        type=float,
        default=None,
        help="evaluate this share of users (default 1, or 0.3 with --quick)",
    )
    parser.add_argument(
        "--tune-steps",
        type=int,
        default=None,
        help="steps predicted (at random) per validation replay (default 2000, 500 --quick)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="user samples, factor init")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, extra: Sequence[MethodSpec] = ()) -> dict[str, Any]:
    """Run the benchmark; print the table; return (and optionally write) the JSON report.

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``).
        extra: more methods to evaluate in the same run, after the baselines.
    """
    args = parse_args(argv)
    started = time.perf_counter()
    with threadpool_limits(limits=args.threads):
        report = _run(args, extra, started)
    print(report.pop("table"))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        _log(f"wrote {args.json}")
    return report


def _context(args: argparse.Namespace) -> tuple[Context, dict[str, Any]]:
    ml = load_movielens(args.min_rating)
    split = temporal_split(ml.interactions, 1.0 - args.test_fraction)
    val = temporal_split(split.before, 1.0 - args.val_fraction)
    fraction = args.user_fraction
    if fraction is None:
        fraction = 0.3 if args.quick else 1.0
    all_users = sorted({e.user_id for e in ml.interactions})
    users = None if fraction >= 1.0 else _sample_users(all_users, fraction, args.seed)
    tune_steps = args.tune_steps or (500 if args.quick else 2000)
    eligible = replay_targets(val.before, val.after, users)
    ctx = Context(
        items=ml.items,
        train=split.before,
        test=split.after,
        val_train=val.before,
        val_test=val.after,
        users=users,
        tune_sample=min(1.0, tune_steps / max(eligible, 1)),
        seed=args.seed,
        quick=args.quick,
    )
    data = {
        "source": str(ml.source),
        "interactions": len(ml.interactions),
        "interaction": "every rating"
        if args.min_rating is None
        else f"ratings >= {args.min_rating:g}",
        "items": len(ml.items),
        "users": len(all_users),
        "train": len(ctx.train),
        "test": len(ctx.test),
        "cut": _iso(split.cut),
        "val_train": len(ctx.val_train),
        "val_test": len(ctx.val_test),
        "val_cut": _iso(val.cut),
        "offline_test_users": len(offline_targets(ctx.train, ctx.test)),
        "offline_val_users": len(offline_targets(ctx.val_train, ctx.val_test)),
        "sampled_users": None if users is None else len(users),
        "val_replay_steps": eligible,
        "val_replay_sample": ctx.tune_sample,
    }
    return ctx, data


def _run(args: argparse.Namespace, extra: Sequence[MethodSpec], started: float) -> dict[str, Any]:
    ctx, data = _context(args)
    ctx.phases["data"] = time.perf_counter() - started
    _log(
        f"MovieLens 100k from {data['source']}: {data['interactions']:,} interactions, "
        f"{data['items']:,} items; train {data['train']:,} / test {data['test']:,} "
        f"(cut {data['cut']}); validation {data['val_train']:,} / {data['val_test']:,} "
        f"(cut {data['val_cut']})"
    )

    t0 = time.perf_counter()
    model = SentenceEncoder.load(device="cpu")
    import torch  # imported by the load above; only its thread count is set here

    torch.set_num_threads(args.threads)
    encoder = CachedEncoder(model, capacity=max(4 * len(ctx.items), 1000))
    ctx.phases["model load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder.encode([item.text for item in ctx.items])
    ctx.phases["encode catalog"] = time.perf_counter() - t0
    _log(
        f"encoder loaded in {ctx.phases['model load']:.1f} s; {len(ctx.items):,} item texts "
        f"encoded in {ctx.phases['encode catalog']:.1f} s"
    )

    specs = [*builtin_methods(encoder, threads=args.threads, seed=args.seed)]
    if not args.no_engine:
        specs.append(engine_spec(encoder, ctx.items))
    specs += extra
    rows: list[Row] = []
    tunings: dict[str, dict[str, Tuning]] = {}
    chosen: list[str] = []
    for spec in specs:
        spec_rows, tunings[spec.name] = run_method(spec, ctx)
        rows += spec_rows
        for variant, t in tunings[spec.name].items():
            score = "" if t.best_ndcg is None else f"  (val NDCG@10 {t.best_ndcg:.4f}"
            score += "" if t.best_ndcg is None else f", best of {len(t.trials)})"
            chosen.append(f"  {spec.name} [{variant}]: {_fmt_params(t.best)}{score}")
            _log(chosen[-1].strip())
    best = set_ratios(rows)
    ctx.phases["total"] = time.perf_counter() - started

    sampled = "" if ctx.users is None else f"; users sampled ({len(ctx.users)} of {data['users']})"
    table = "\n".join(
        [
            f"MovieLens 100k, {data['interaction']} as an interaction; train < {data['cut']}"
            f" <= test; {data['offline_test_users']} offline test users{sampled}",
            format_table(rows, best),
            "",
            "Chosen hyperparameters (tuned on validation only):",
            *chosen,
            "",
            "Wall time (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in ctx.phases.items())
            + f"; {args.threads} thread(s)",
        ]
    )
    return {
        "table": table,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": _versions(),
        "install": list(REQUIREMENTS),
        "data": data,
        "results": [
            {
                "section": r.section,
                "method": r.method,
                "spec": r.spec,
                "variant": r.variant,
                "baseline": r.baseline,
                "params": r.params,
                **r.metrics.as_dict(),
                "ndcg10_vs_best_offline_baseline": r.ratio,
                "recommend_us": r.recommend_us,
                "fit_s": r.fit_s,
            }
            for r in rows
        ],
        "best_offline_baseline": best,
        "tuning": {
            name: {
                variant: {
                    "chosen": t.best,
                    "val_ndcg10": t.best_ndcg,
                    "trials": [{"params": p, "val_ndcg10": s} for p, s in t.trials],
                }
                for variant, t in per.items()
            }
            for name, per in tunings.items()
        },
        "wall_s": ctx.phases,
    }


if __name__ == "__main__":
    main()
