"""Recommendation quality on several public data sets, with baselines, in one run.

Usage (from the repository root; ``make quality`` installs the data set wheels first)::

    .venv/bin/python bench/quality.py                       # every data set, both protocols
    .venv/bin/python bench/quality.py --datasets ml-100k --protocols global
    .venv/bin/python bench/quality.py --quick               # smaller samples and grids
    .venv/bin/python bench/quality.py --json quality.json

For each data set (`_datasets`: MovieLens 100k, The Complete Journey, Ta Feng, each at its
real timestamps) and each protocol (`personify.agents.evaluation`):

- ``global``: a temporal cut at the 80% quantile of interaction times; each visitor with
  history before it is scored against their items after it;
- ``last``: each visitor's last order (where they bought) or last 10 interactions held out.

Baselines are tuned on a validation split cut the same way from the training part only, then
fitted on all of it and scored once: popularity, buy-again (the visitor's own most-bought
items; the strong baseline where people re-buy), item-kNN, implicit ALS and BPR (each with and
without the visitor's own items allowed back). The engine runs with its default configuration
(`personify.engine.config.Config()`): nothing in it is chosen for any data set. ``÷best`` is
the engine's NDCG@10 over the best baseline's; ``÷buy-again`` over buy-again's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _datasets import DATASETS, WHEELS, Dataset, load
from threadpoolctl import threadpool_limits

from personify.agents.evaluation import (
    AlsMethod,
    BprMethod,
    BuyAgain,
    EngineMethod,
    ItemKNN,
    Method,
    Popularity,
    Result,
    Split,
    evaluate,
    global_split,
    last_split,
)
from personify.agents.tuning import apply_setting, tune
from personify.embeddings import FaissIndex, SentenceEncoder
from personify.embeddings.collab import AlsSettings
from personify.engine.config import Config

#: Baseline families and their grids (tried on validation; the best is scored on test).
GRID: dict[str, list[Callable[[], Method]]] = {
    "popularity": [lambda: Popularity(False), lambda: Popularity(True)],
    "buy-again": [BuyAgain],
    "item-kNN": [
        lambda: ItemKNN(50),
        lambda: ItemKNN(200),
        lambda: ItemKNN(200, repeat=True),
    ],
    "ALS": [
        (
            lambda r=r, a=a, rep=rep: AlsMethod(
                AlsSettings(factors=64, regularization=r, alpha=a), repeat=rep
            )
        )
        for r, a, rep in itertools.product((0.05, 1.0), (1.0, 10.0), (False, True))
    ],
    "BPR": [
        (lambda f=f, lr=lr, it=it, rep=rep: BprMethod(f, lr, 0.01, it, repeat=rep))
        for (f, lr, it), rep in itertools.product(
            ((32, 0.01, 100), (64, 0.003, 300)), (False, True)
        )
    ],
}
QUICK_GRID: dict[str, list[Callable[[], Method]]] = {
    "popularity": GRID["popularity"],
    "buy-again": [BuyAgain],
    "item-kNN": [lambda: ItemKNN(100)],
    "ALS": [
        lambda: AlsMethod(AlsSettings(factors=64, regularization=0.05, alpha=2.0)),
        lambda: AlsMethod(AlsSettings(factors=64, regularization=0.05, alpha=2.0), repeat=True),
    ],
    "BPR": [lambda: BprMethod(32, 0.01, 0.01, 100)],
}
PROTOCOLS: dict[str, Callable[..., Split]] = {
    "global": lambda h: global_split(h, 0.2),
    "last": lambda h: last_split(h, 10),
}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _progress(name: str, done: int, total: int) -> None:
    if done == total or done % 1000 == 0:
        _log(f"    {name}: {done}/{total} visitors")


def _index(data: Dataset) -> FaissIndex | None:
    """The item text vectors (all-MiniLM-L6-v2) of a data set that has item text."""
    if not data.text:
        return None
    started = time.perf_counter()
    encoder = SentenceEncoder.load(device="cpu")
    ids = list(data.text)
    vectors = encoder.encode([data.text[i] for i in ids])
    index = FaissIndex(vectors.shape[1])
    index.upsert(ids, vectors)
    _log(f"  {len(ids):,} item texts embedded in {time.perf_counter() - started:.1f} s")
    return index


def _tune(
    family: str, makers: list[Callable[[], Method]], validation: Split
) -> tuple[Callable[[], Method], float]:
    """The grid point of ``family`` with the best validation NDCG@10."""
    best: tuple[Callable[[], Method], float] | None = None
    for make in makers:
        [result] = evaluate(validation, [make()])
        _log(f"    {result.method}: validation NDCG@10 {result.metrics.ndcg10:.4f}")
        if best is None or result.metrics.ndcg10 > best[1]:
            best = (make, result.metrics.ndcg10)
    assert best is not None
    return best


def run_protocol(
    data: Dataset,
    protocol: str,
    grid: dict[str, list[Callable[[], Method]]],
    index: Any,
    trials: int,
) -> dict[str, Any]:
    """Baselines tuned on validation and the engine, scored on the test split."""
    split = PROTOCOLS[protocol](data.history)
    validation = PROTOCOLS[protocol](split.train)
    _log(
        f"  {protocol}: train {len(split.train):,}, {len(split.targets):,} visitors scored; "
        f"validation {len(validation.train):,} / {len(validation.targets):,}"
    )
    results: list[Result] = []
    for family, makers in grid.items():
        make, val = _tune(family, makers, validation) if len(makers) > 1 else (makers[0], None)
        [result] = evaluate(split, [make()], progress=_progress)
        result.extra = {"family": family, "validation_ndcg10": val}
        results.append(result)
        _log(f"  {result.method}: NDCG@10 {result.metrics.ndcg10:.4f}")
    defaults = EngineMethod(
        Config(), index=index, category_of=data.category, name="engine, defaults"
    )
    [plain] = evaluate(split, [defaults], progress=_progress)
    plain.extra = {"family": "engine, defaults"}
    results.append(plain)
    _log(f"  engine with its defaults: NDCG@10 {plain.metrics.ndcg10:.4f}")
    tuned = tune(
        split.train,
        Config(),
        trials=trials,
        index=index,
        category_of=data.category,
        progress=lambda n, total, best: (
            _log(f"    tuning {n}/{total}: validation {best:.4f}")
            if n % 10 == 0 or n == total
            else None
        ),
        ranker=Config().tune.ranker,
    )
    config = Config().replace(recommend={})
    config = dataclasses.replace(config, recommend=apply_setting(config.recommend, tuned.setting))
    engine = EngineMethod(
        config, index=index, category_of=data.category, name="engine", ranker=tuned.ranker
    )
    [mine] = evaluate(split, [engine], progress=_progress)
    mine.extra = {"family": "engine", "tuning": tuned.as_json()}
    results.append(mine)
    _log(f"  engine, self-tuned: NDCG@10 {mine.metrics.ndcg10:.4f} ({tuned.as_json()})")
    baselines = [r for r in results if not r.extra["family"].startswith("engine")]
    best = max(baselines, key=lambda r: r.metrics.ndcg10)
    buy_again = next(r for r in baselines if r.extra["family"] == "buy-again")
    return {
        "protocol": split.name,
        "results": [{"method": r.method, **r.extra, **r.metrics.as_json()} for r in results],
        "best_baseline": best.method,
        "ratio_best": mine.metrics.ndcg10 / max(best.metrics.ndcg10, 1e-12),
        "ratio_buy_again": mine.metrics.ndcg10 / max(buy_again.metrics.ndcg10, 1e-12),
        "buy_again_ndcg10": buy_again.metrics.ndcg10,
    }


def _table(name: str, section: dict[str, Any]) -> str:
    rows = [
        f"### {name}, {section['protocol']}",
        "",
        "| method | NDCG@10 | ±95% | Recall@20 | MAP@10 | HR@10 | coverage@10 | ÷best |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = max(r["ndcg10"] for r in section["results"] if not r["family"].startswith("engine"))
    for r in section["results"]:
        label = f"**{r['method']}**" if r["family"] == "engine" else r["method"]
        rows.append(
            f"| {label} | {r['ndcg10']:.4f} | {r['ndcg10_ci95']:.3f} | {r['recall20']:.4f} | "
            f"{r['map10']:.4f} | {r['hr10']:.3f} | {r['coverage10']:.3f} | "
            f"{r['ndcg10'] / max(best, 1e-12):.2f} |"
        )
    rows += [
        "",
        f"Engine ÷ best baseline ({section['best_baseline']}): **{section['ratio_best']:.2f}**; "
        + (
            f"÷ buy-again: **{section['ratio_buy_again']:.2f}**"
            if section["buy_again_ndcg10"] >= 0.01
            else "÷ buy-again: n/a (buy-again finds almost nothing: nobody re-buys)"
        ),
        "",
    ]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="global,last")
    parser.add_argument("--users", type=int, default=None, help="sample this many visitors")
    parser.add_argument("--quick", action="store_true", help="small grids and samples")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    grid = QUICK_GRID if args.quick else GRID
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
        "wheels": list(WHEELS),
        "arguments": vars(args) | {"json": str(args.json) if args.json else None},
        "datasets": {},
    }
    tables = []
    with threadpool_limits(1):
        for name in args.datasets.split(","):
            users = args.users if args.users is not None else (300 if args.quick else None)
            data = load(name, users, args.seed)
            shape = data.history.describe()
            _log(f"{name}: {shape} ({data.note})")
            index = _index(data)
            sections = []
            for protocol in args.protocols.split(","):
                section = run_protocol(data, protocol, grid, index, 15 if args.quick else 40)
                sections.append(section)
                tables.append(_table(name, section))
            report["datasets"][name] = {
                "shape": shape,
                "source": data.source,
                "note": data.note,
                "protocols": sections,
            }
    report["seconds"] = round(time.perf_counter() - started, 1)
    print("\n".join(tables))
    print(f"({report['seconds']:.0f} s, {report['date']}, {report['machine']})")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
