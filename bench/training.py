"""What training and tuning cost: time and peak memory, as the engine's trainer runs them.

Usage (from the repository root)::

    .venv/bin/python bench/training.py                      # 1M interactions x 100k items
    .venv/bin/python bench/training.py --interactions 200000 --items 20000 --users 20000
    .venv/bin/python bench/training.py --tune ml-100k      # also one tuning run on a data set

Training: a synthetic history (visitors with tastes over clusters of items, long-tailed
popularity reaching most of the catalog, views, cart adds and purchases) goes through the
trainer's own code (`personify.agents.evaluation.train_model`: each pair's strongest
interaction, then ``implicit`` ALS on one thread, as ``[model]`` defaults). Each
measurement runs in a fresh process, so its peak RSS is its own; the baseline is the same
process having only built the arrays, measured in the same run.

Tuning (``--tune NAME``): one `personify.agents.tuning.tune` run plus the hold-out evaluation on
a public data set (`_datasets`), with ``[tune]`` defaults, as the trainer runs it after a model.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np


def _history(interactions: int, items: int, users: int, seed: int) -> Any:
    from personify.agents.evaluation import History

    rng = np.random.default_rng(seed)
    clusters = 200
    taste = rng.integers(0, clusters, size=users)  # each visitor's favourite cluster
    cluster_of = rng.integers(0, clusters, size=items)
    members = [np.flatnonzero(cluster_of == c) for c in range(clusters)]
    user = rng.integers(0, users, size=interactions)
    own = rng.random(interactions) < 0.7  # 70% within the visitor's taste
    item = np.empty(interactions, dtype=np.int64)
    # Off-taste picks follow a long tail over the whole catalog (most items get some); within a
    # taste, popularity falls with rank.
    tail = np.minimum(rng.pareto(0.6, size=interactions) * 2000, items - 1).astype(np.int64)
    item[~own] = rng.permutation(items)[tail[~own]]
    for c in range(clusters):
        rows = np.flatnonzero(own & (taste[user] == c))
        if len(rows) and len(members[c]):
            ranks = (rng.pareto(1.0, size=len(rows)) * 20).astype(np.int64) % len(members[c])
            item[rows] = members[c][ranks]
    kind = rng.choice([0, 2, 3], size=interactions, p=[0.8, 0.12, 0.08]).astype(np.int8)
    ts = np.sort(rng.integers(0, 365 * 86_400_000, size=interactions))
    return History(
        users=[f"u{i}" for i in range(users)],
        items=[f"i{i}" for i in range(items)],
        user=user.astype(np.int64),
        item=item,
        kind=kind,
        ts_ms=ts,
    )


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _train_child(args: dict[str, Any], queue: Any) -> None:
    from threadpoolctl import threadpool_limits

    from personify.agents.evaluation import train_model
    from personify.embeddings.collab import AlsSettings
    from personify.engine.config import Config

    history = _history(args["interactions"], args["items"], args["users"], args["seed"])
    built = _peak_mib()
    if not args["baseline"]:
        m = Config().model
        started = time.perf_counter()
        with threadpool_limits(1):
            model = train_model(
                history,
                AlsSettings(m.factors, m.regularization, m.alpha, m.iterations),
                Config().profiles.engagement_weights,
            )
        seconds = time.perf_counter() - started
        assert model is not None
        queue.put(
            {
                "seconds": seconds,
                "peak_mib": _peak_mib(),
                "arrays_mib": built,
                "pairs": model.interactions,
                "model_items": len(model),
            }
        )
    else:
        queue.put({"peak_mib": built})


def _in_child(target: Any, args: dict[str, Any]) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(args, queue))
    proc.start()
    out: dict[str, Any] = queue.get()
    proc.join()
    return out


def _tune_child(args: dict[str, Any], queue: Any) -> None:
    sys.path.insert(0, "bench")
    from _datasets import load
    from threadpoolctl import threadpool_limits

    from personify.agents.tuning import PROTOCOLS, holdout, tune
    from personify.engine.config import Config

    data = load(args["tune"], args.get("tune_users"))
    cfg = Config()
    held = np.zeros(len(data.history), dtype=bool)
    for cut in PROTOCOLS.values():
        held |= cut(data.history).held
    started = time.perf_counter()
    with threadpool_limits(1):
        tuned = tune(
            data.history.take(~held),
            cfg,
            trials=cfg.tune.trials,
            max_users=cfg.tune.max_users,
            category_of=data.category,
        )
        tuned_s = time.perf_counter() - started
        holdout(
            data.history,
            cfg,
            {"current": tuned.current, "tuned": tuned.setting},
            max_users=cfg.tune.max_users,
            category_of=data.category,
        )
    queue.put(
        {
            "dataset": args["tune"],
            "interactions": len(data.history),
            "tuning_s": tuned_s,
            "tuning_and_holdout_s": time.perf_counter() - started,
            "peak_mib": _peak_mib(),
            "improved": tuned.improved,
            "validation": tuned.validation,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune", metavar="DATASET", help="also time one tuning run on it")
    parser.add_argument("--tune-users", type=int, default=None, help="sample of its visitors")
    args = vars(parser.parse_args())
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "arguments": args,
    }
    base = _in_child(_train_child, {**args, "baseline": True})
    run = _in_child(_train_child, {**args, "baseline": False})
    report: dict[str, Any] = {**record, "baseline_peak_mib": base["peak_mib"], "training": run}
    print(
        f"training on {args['interactions']:,} interactions x {args['items']:,} items "
        f"({run['pairs']:,} pairs, {run['model_items']:,} items in the model): "
        f"{run['seconds']:.1f} s, peak RSS {run['peak_mib']:.0f} MiB "
        f"(the same process with only the arrays: {base['peak_mib']:.0f} MiB, "
        f"so {run['peak_mib'] - base['peak_mib']:.0f} MiB for training)"
    )
    if args["tune"]:
        tuned = _in_child(_tune_child, args)
        report["tuning"] = tuned
        print(
            f"tuning on {tuned['dataset']} ({tuned['interactions']:,} interactions): "
            f"{tuned['tuning_s']:.1f} s, with the hold-out evaluation "
            f"{tuned['tuning_and_holdout_s']:.1f} s, peak RSS {tuned['peak_mib']:.0f} MiB; "
            f"validation {json.dumps(tuned['validation'])}"
        )
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
