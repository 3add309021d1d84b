"""What rule segments cost ingestion: `bench/ingest.py` with and without them, in alternation.

One command::

    .venv/bin/python bench/segments_ingest.py [--pairs 3] [--segments 50]

Runs ``bench/ingest.py --only a --skip-naive`` (200,000 events over 20,000 visitors written to
the events topic at once, a fresh engine each time) ``--pairs`` times with no segment and as
many times with ``--segments`` rule segments (the stress mix of `bench/segments.py`), in the
order none, segments, segments, none, none, ... so that a drift of the machine weighs on both
alike. Prints each run's steady rate, the engine's CPU time per event and what it did meanwhile
(trainings of the model, lists ranked), then the medians and their ratios: the rate with
segments over the rate without (the goal: at least 0.9), and the CPU time per event without
over with; then the rate ratio over the runs with the most common number of trainings only (a
second training that starts before a run ends takes CPU from it, whether segments are on or
not). Extra arguments after ``--`` go to every ingest run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _proc import run_record

HERE = Path(__file__).resolve().parent


def one_run(segments: int, extra: list[str], out_dir: Path, n: int) -> dict[str, float]:
    """One ingest run: rate (events/s), engine CPU µs per event, trainings and lists meanwhile."""
    out = out_dir / f"run{n}-{segments}.json"
    command = [sys.executable, str(HERE / "ingest.py"), "--only", "a", "--skip-naive"]
    command += ["--json", str(out), *(["--segments", str(segments)] if segments else []), *extra]
    print(f"\n=== run {n}: {segments or 'no'} segments: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)
    doc = json.loads(out.read_text())
    a = doc["a_topic_batched"]
    if a.get("failure"):
        raise SystemExit(f"run {n} failed: {a['failure']}")
    cpu_s = a["cpu"]["personify"] * a["first_send_to_last_applied_s"]
    work = a.get("meanwhile", {})
    return {
        "rate": a["steady_rate"],
        "cpu_us": 1e6 * cpu_s / a["events"],
        "trainings": work.get("trainings", 0),
        "lists": work.get("lists ranked", 0),
    }


def like_for_like(runs: dict[int, list[dict[str, float]]], segments: int) -> str | None:
    """The ratio of median rates over the runs with as many trainings as the most common count.

    A training (and the tuning after it) that starts within a run takes CPU from ingestion;
    whether the second one starts before the run ends is a matter of timing, not of segments.
    """
    counts = [r["trainings"] for found in runs.values() for r in found]
    common = max(set(counts), key=counts.count)
    kept = {k: [r["rate"] for r in found if r["trainings"] == common] for k, found in runs.items()}
    if not kept[0] or not kept[segments]:
        return None
    ratio = statistics.median(kept[segments]) / statistics.median(kept[0])
    return (
        f"runs with {common:.0f} training(s) only ({len(kept[0])} without, "
        f"{len(kept[segments])} with): rate {ratio:.2f}x"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="runs of each kind")
    parser.add_argument("--segments", type=int, default=50, help="rule segments in the runs with")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("extra", nargs="*", help="arguments for bench/ingest.py (after --)")
    args = parser.parse_args(argv)
    order = [0, args.segments, args.segments, 0] * ((args.pairs + 1) // 2)
    order = order[: 2 * args.pairs]
    with tempfile.TemporaryDirectory(prefix="personify-segments-ingest-") as tmp:
        done = [one_run(segments, args.extra, Path(tmp), n) for n, segments in enumerate(order, 1)]
    runs: dict[int, list[dict[str, float]]] = {0: [], args.segments: []}
    for segments, r in zip(order, done, strict=True):
        runs[segments].append(r)
    head = ("run", "segments", "events/s", "CPU µs/event", "trainings", "lists")
    print("\n{:>3} {:>8} {:>9} {:>13} {:>10} {:>7}".format(*head))
    for n, (segments, r) in enumerate(zip(order, done, strict=True), 1):
        print(
            f"{n:>3} {segments:>8} {r['rate']:>9,.0f} {r['cpu_us']:>13.0f} "
            f"{r['trainings']:>10.0f} {r['lists']:>7,.0f}"
        )
    print(f"\n{'segments':>8}  {'events/s (each run)':<40} {'median':>8}  CPU µs/event (median)")
    medians: dict[int, dict[str, float]] = {}
    for segments, found in runs.items():
        rates = [r["rate"] for r in found]
        cpu = [r["cpu_us"] for r in found]
        medians[segments] = {"rate": statistics.median(rates), "cpu_us": statistics.median(cpu)}
        each = ", ".join(f"{x:,.0f}" for x in rates)
        print(
            f"{segments:>8}  {each:<40} {medians[segments]['rate']:>8,.0f}  "
            f"{medians[segments]['cpu_us']:.0f}"
        )
    with_, none = medians[args.segments], medians[0]
    rate_ratio = with_["rate"] / none["rate"]
    cpu_ratio = none["cpu_us"] / with_["cpu_us"]
    verdict = "within 10%" if rate_ratio >= 0.9 else "NOT within 10%"
    print(
        f"\n{args.segments} segments / none: rate {rate_ratio:.2f}x ({verdict}); "
        f"CPU per event {cpu_ratio:.2f}x (none over with)"
    )
    alike = like_for_like(runs, args.segments)
    if alike:
        print(alike)
    if args.json:
        doc: dict[str, Any] = {
            **run_record(args),
            "runs": {str(k): v for k, v in runs.items()},
            "medians": {str(k): v for k, v in medians.items()},
            "rate_ratio": rate_ratio,
            "cpu_ratio": cpu_ratio,
            "like_for_like": alike,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
