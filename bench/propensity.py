"""Propensity scores on public purchase data, beside a recency-frequency baseline.

One command::

    .venv/bin/python bench/propensity.py --datasets tafeng,completejourney

For each data set (at its real timestamps), `personify.tables.propensity.fit` learns the
purchase-in-7-days and churn-in-30-days scores the engine learns on a shop's history, and
measures them on the temporal hold-out (visitors as they were 30 days before the newest
interaction, and what they did in the days after it, never learned on). Prints ROC-AUC beside
the recency-frequency baseline scored on the same visitors in the same run (the sum of their
recency and frequency quintiles), the Brier score and the calibration by tenth of the scores.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import UTC, datetime

from _datasets import load

from personify.tables.propensity import fit


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default="tafeng,completejourney")
    p.add_argument("--users", type=int, default=None, help="sample this many visitors (all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(
        f"bench/propensity.py on {platform.node()} ({platform.machine()}), "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        flush=True,
    )
    print(
        "\n| data set | score | visitors | rate | ROC-AUC | baseline ROC-AUC | ÷baseline | Brier |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    details = []
    for name in args.datasets.split(","):
        started = time.perf_counter()
        data = load(name, args.users, args.seed)
        h = data.history
        found = fit(h.user, h.kind, h.ts_ms, seed=args.seed)
        seconds = time.perf_counter() - started
        if found is None:
            print(f"| {name} | (too little history) | | | | | | |")
            continue
        for target, e in found.evaluation.items():
            base = e["baseline_roc_auc"]
            ratio = "n/a" if not base else f"{e['roc_auc'] / base:.2f}"
            print(
                f"| {name} | {target} | {e['visitors']:,} | {e['rate']:.3f} | "
                f"**{e['roc_auc']:.3f}** | {base} | {ratio} | {e['brier']:.3f} |",
                flush=True,
            )
            details.append((name, target, e))
        print(f"  ({name}: {len(h):,} interactions, loaded and fitted in {seconds:.1f} s)")
    for name, target, e in details:
        cells = ", ".join(f"{c['predicted']:.2f}/{c['observed']:.2f}" for c in e["calibration"])
        print(f"\ncalibration, {name} {target} (predicted/observed by tenth): {cells}")


if __name__ == "__main__":
    main()
