"""What a segments sweep costs: RFM cut points and 50 rules over a million stored profiles.

One command::

    .venv/bin/python bench/segments.py --profiles 1000000

Writes ``--profiles`` synthetic profiles (the engine's own JSON form, built by
`personify.tables.profiles.apply_events` from a few events each, then varied) into
``--partitions`` RocksDB databases laid out as the engine's, then times, each over every profile:

- the baseline: reading and decoding every profile, and nothing else (the floor of any sweep);
- RFM: reading, decoding, and computing the quintile cut points (`personify.tables.segments`);
- rules: reading, decoding, and evaluating ``--rules`` rule segments for each profile (what a
  sweep does to find visitors out of date);
- clusters: reading, decoding, computing each visitor's features, and fitting the behavioural
  clusters (k-means for k = 2-8 on a sample, k chosen by silhouette, then fitted on all).

Prints each time, profiles per second, and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import platform
import random
import shutil
import tempfile
import time
from array import array
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rocksdict import Rdict, WriteBatch

from personify.engine.config import ProfilesConfig
from personify.tables.clusters import fit as fit_clusters
from personify.tables.profiles import apply_events, new_profile
from personify.tables.propensity import profile_features
from personify.tables.segments import Facts, Rules, profile_rows, rfm_cuts, rfm_values

DAY = 86_400_000
CATEGORIES = ["outdoor/jackets", "outdoor/tents", "home/kitchen", "electronics/audio", "books"]
#: The kinds of rule `stress_rules` cycles through, each with thresholds 1, 2, ...
RULES = (
    "views >= {n}",
    "orders >= 1 and spend > {n}0",
    "days_since_order > {n} and orders > 0",
    'affinity("outdoor") > 0.{n} and orders == 0',
    "cart_value > {n}0 and days_since_seen < 1",
    'events_in(7) >= {n} and consent("marketing")',
    "monetary >= 4 and recency <= 2 or frequency == 5 and {n} > 0",
    "searches >= {n} or cart_items >= {n}",
)


def stress_rules(count: int) -> list[str]:
    """``count`` rules over counts, spend, recency, affinity, cart, consent and RFM scores.

    A stress mix (also `bench/ingest.py --segments`): a visitor is in about half of them, and
    most events change some visitor's membership.
    """
    return [RULES[n % len(RULES)].format(n=n // len(RULES) + 1) for n in range(count)]


def templates(now_ms: int, rng: random.Random, cfg: ProfilesConfig) -> list[dict[str, Any]]:
    """A few hundred profiles folded from events: their JSON shape is the engine's."""
    out = []
    for n in range(300):
        p = new_profile(f"t{n}")
        events: list[dict[str, Any]] = []
        ts = now_ms - rng.randint(0, 200) * DAY
        for k in range(rng.randint(3, 40)):
            ts += rng.randint(1, 600_000)
            item = f"i{rng.randint(0, 5000)}"
            category = rng.choice(CATEGORIES)
            kind = rng.choices(["product_view", "add_to_cart", "search", "purchase"], [8, 2, 1, 1])[
                0
            ]
            props: dict[str, Any] = {"category": category}
            if kind == "add_to_cart":
                props |= {"quantity": 1, "price": float(rng.randint(5, 200))}
            elif kind == "search":
                props = {"query": "boots"}
            elif kind == "purchase":
                price = float(rng.randint(5, 200))
                line = {"item_id": item, "price": price, "quantity": 1}
                props = {"items": [line], "revenue": price, "currency": "EUR"}
            events.append(
                {
                    "event_id": f"e{n}-{k}",
                    "type": kind,
                    "user_id": p["user_id"],
                    "anonymous_id": None,
                    "item_id": None if kind in ("search", "purchase") else item,
                    "ts_ms": ts,
                    "properties": props,
                }
            )
        apply_events(p, events, cfg)
        out.append(p)
    return out


def write(root: Path, profiles: int, partitions: int, now_ms: int, seed: int) -> list[Rdict]:
    rng = random.Random(seed)
    cfg = ProfilesConfig()
    shapes = templates(now_ms, rng, cfg)
    dbs = [Rdict(str(root / f"p{n}")) for n in range(partitions)]
    batches = [WriteBatch(raw_mode=False) for _ in dbs]
    started = time.perf_counter()
    for n in range(profiles):
        p = dict(shapes[n % len(shapes)])
        shift = rng.randint(0, 60) * DAY
        p["user_id"] = f"v{n}"
        if p["last_seen"] is not None:
            p["last_seen"] -= shift
        if p.get("last_order") is not None:
            p["last_order"] -= shift
            p["spend"] = p["spend"] * rng.uniform(0.5, 3.0)
        part = n % partitions
        batches[part].put(p["user_id"].encode(), orjson.dumps(p))
        if (n + 1) % 20_000 == 0:
            for db, batch in zip(dbs, batches, strict=True):
                db.write(batch)
            batches = [WriteBatch(raw_mode=False) for _ in dbs]
            print(f"\r  written {n + 1:,} profiles", end="", flush=True)
    for db, batch in zip(dbs, batches, strict=True):
        db.write(batch)
    print(f"\r  written {profiles:,} profiles in {time.perf_counter() - started:.1f} s", flush=True)
    return dbs


def timed(name: str, dbs: list[Rdict], work: Any) -> float:
    started = time.perf_counter()
    n = 0
    for db in dbs:
        for row in profile_rows(db):
            work(row)
            n += 1
    seconds = time.perf_counter() - started
    print(f"  {name:<44} {seconds:7.1f} s  {n / seconds:>10,.0f} profiles/s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profiles", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--rules", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(
        f"bench/segments.py on {platform.node()} ({platform.processor() or platform.machine()}), "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {args.profiles:,} profiles, "
        f"{args.partitions} partitions, {args.rules} rules",
        flush=True,
    )
    now_ms = int(time.time() * 1000)
    cfg = ProfilesConfig()
    root = Path(tempfile.mkdtemp(prefix="personify-segments-"))
    try:
        dbs = write(root, args.profiles, args.partitions, now_ms, args.seed)
        base = timed("baseline: read and decode", dbs, lambda row: None)
        values = array("d")

        def rfm(row: tuple[str, dict[str, Any]]) -> None:
            found = rfm_values(row[1], now_ms)
            if found is not None:
                values.extend(found)

        rfm_s = timed("RFM: read, decode, values", dbs, rfm)
        started = time.perf_counter()
        cuts = rfm_cuts(values, now_ms)
        rfm_s += time.perf_counter() - started
        rules = Rules({f"s{n}": rule for n, rule in enumerate(stress_rules(args.rules))})
        held = [0]

        def evaluate(row: tuple[str, dict[str, Any]]) -> None:
            held[0] += len(rules.members(Facts(row[1], cfg, now_ms, cuts)))

        rules_s = timed(f"rules: read, decode, {args.rules} rules", dbs, evaluate)
        rows: list[Any] = []

        def features(row: tuple[str, dict[str, Any]]) -> None:
            rows.append(profile_features(row[1], now_ms))

        cluster_s = timed("clusters: read, decode, features", dbs, features)
        started = time.perf_counter()
        fitted = fit_clusters(np.vstack(rows), now_ms)
        fit_s = time.perf_counter() - started
        cluster_s += fit_s
        assert fitted is not None
        print(
            f"  {'clusters: k-means, k by silhouette':<44} {fit_s:7.1f} s  "
            f"(k = {len(fitted.centroids)}; silhouette {fitted.silhouette})",
            flush=True,
        )
        print(
            f"\n  clusters over {args.profiles:,} profiles: {cluster_s:.1f} s "
            f"({cluster_s / base:.2f}x the baseline)"
        )
        print(
            f"  RFM over {args.profiles:,} profiles: {rfm_s:.1f} s "
            f"({rfm_s / base:.2f}x the baseline; {len(values) // 3:,} buyers)\n"
            f"  {args.rules} rules over {args.profiles:,} profiles: {rules_s:.1f} s "
            f"({rules_s / base:.2f}x the baseline; {held[0] / args.profiles:.1f} segments per "
            "visitor)",
            flush=True,
        )
        for db in dbs:
            db.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
