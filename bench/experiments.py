"""Experiments: simulated shoppers with known rates drive a running engine over HTTP.

Usage (from the repository root)::

    .venv/bin/python bench/experiments.py                 # the three parts below
    .venv/bin/python bench/experiments.py --aa-runs 50 --json experiments.json

Each simulated shopper is a visitor never seen: ``GET /v1/users/{id}/recommendations`` (the
engine assigns the variant and records the exposure), then, by the true rates of the variant the
answer names, a ``click`` and a ``purchase`` of the first item with its ``recommendation_id``.
Shoppers arrive in "hours" (batches); after each, once the engine has applied everything sent,
the results are read (``GET /v1/experiments/{id}/results``), as a shop checking every hour would.

1. **A/A**: ``--aa-runs`` experiments at once, each with its own slice of the visitors
   (``traffic`` 1/runs) and two identical variants. An experiment whose conversion lift reads
   "significant" at any hourly look is a false positive: their share is the false-positive
   rate, to compare with ``[experiments] alpha``.
2. **A/B**: one experiment whose variant B converts ``--lift`` (10%) better than A; hours go on
   until B's lift reads significant: the bench prints how many visitors that took.
3. **Bandit against an even split**: two experiments of half the visitors each, with the same
   three variants of known conversion rates; one allocates by Thompson sampling, the other
   evenly. Regret: the conversions lost against always serving the best variant (expected, from
   the true rates of the variants served).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from _proc import run_record
from ingest import Personify

_ITEMS = [
    {"item_id": f"sku-{n}", "title": f"Product {n}", "category": f"shop/c{n % 5}", "price": 20.0}
    for n in range(50)
]
_CONCURRENCY = 32
_EVENTS_PER_POST = 1000


def _log(text: str) -> None:
    print(text, flush=True)


class Shop:
    """Shoppers against one engine; counts what it sent, to wait for the engine to apply it."""

    def __init__(self, engine: Personify, session: aiohttp.ClientSession, seed: int) -> None:
        self.engine = engine
        self.session = session
        self.rng = random.Random(seed)
        self.exposures = 0
        self.orders = 0
        self.visitors = 0

    async def _get(self, visitor: str, gate: asyncio.Semaphore) -> dict[str, Any]:
        async with (
            gate,
            self.session.get(f"{self.engine.url}/v1/users/{visitor}/recommendations?k=5") as resp,
        ):
            body: dict[str, Any] = await resp.json()
            assert resp.status == 200, body
            return body

    async def hour(
        self, prefix: str, shoppers: int, rates: dict[str, tuple[float, float]]
    ) -> list[tuple[str, str]]:
        """``shoppers`` new visitors, each served a list and acting by its variant's rates.

        ``rates``: variant label -> (click rate, conversion rate); a label not in it acts as
        the default (no click, no purchase). Returns (visitor, variant label) of each.
        """
        gate = asyncio.Semaphore(_CONCURRENCY)
        visitors = [f"{prefix}-{self.visitors + n}" for n in range(shoppers)]
        self.visitors += shoppers
        answers = await asyncio.gather(*(self._get(v, gate) for v in visitors))
        events: list[dict[str, Any]] = []
        served: list[tuple[str, str]] = []
        for visitor, body in zip(visitors, answers, strict=True):
            served.append((visitor, body["variant"]))
            if not body["items"]:
                continue
            self.exposures += 1
            click_rate, conversion = rates.get(body["variant"], (0.0, 0.0))
            item = body["items"][0]["item_id"]
            props = {"recommendation_id": body["recommendation_id"]}
            if self.rng.random() < click_rate:
                events.append(
                    {"type": "click", "user_id": visitor, "item_id": item, "properties": props}
                )
            if self.rng.random() < conversion:
                self.orders += 1
                line = {"item_id": item, "price": 20.0, "quantity": 1}
                events.append(
                    {
                        "type": "purchase",
                        "user_id": visitor,
                        "properties": {**props, "items": [line]},
                    }
                )
        for start in range(0, len(events), _EVENTS_PER_POST):
            chunk = {"events": events[start : start + _EVENTS_PER_POST]}
            async with self.session.post(f"{self.engine.url}/v1/events", json=chunk) as resp:
                assert resp.status == 202, await resp.text()
        await self.applied()
        return served

    async def applied(self, limit_s: float = 600.0) -> None:
        """Wait until the KPIs hold every exposure and order sent."""
        today = datetime.now(UTC).date()
        span = f"from={today - timedelta(days=1)}&to={today + timedelta(days=1)}"
        ends = time.monotonic() + limit_s
        while time.monotonic() < ends:
            async with self.session.get(f"{self.engine.url}/v1/kpis?{span}") as resp:
                totals = (await resp.json())["totals"]
            if totals["exposures"] >= self.exposures and totals["orders"] >= self.orders:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"not applied in {limit_s:g} s: {totals} against {self.exposures}")

    async def put(self, experiment: str, doc: dict[str, Any]) -> None:
        """PUT the experiment."""
        async with self.session.put(
            f"{self.engine.url}/v1/experiments/{experiment}", json=doc
        ) as resp:
            assert resp.status in (200, 201), await resp.text()

    async def delete(self, experiment: str) -> None:
        """DELETE the experiment."""
        async with self.session.delete(f"{self.engine.url}/v1/experiments/{experiment}") as resp:
            assert resp.status == 200, await resp.text()

    async def results(self, experiment: str) -> dict[str, Any]:
        """GET the experiment's results."""
        async with self.session.get(
            f"{self.engine.url}/v1/experiments/{experiment}/results"
        ) as resp:
            body: dict[str, Any] = await resp.json()
            return body


def _variant(results: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(v for v in results["variants"] if v["name"] == name)
    return found


async def aa(shop: Shop, args: argparse.Namespace) -> dict[str, Any]:
    runs = args.aa_runs
    traffic = 1.0 / runs
    names = [f"aa{n}" for n in range(runs)]
    for name in names:
        await shop.put(name, {"variants": [{"name": "A"}, {"name": "B"}], "traffic": traffic})
    rates = {f"{n}/{v}": (args.click, args.conversion) for n in names for v in ("A", "B")}
    flagged: dict[str, int] = {}
    per_hour = args.aa_visitors * runs // args.hours
    started = time.perf_counter()
    for hour in range(1, args.hours + 1):
        await shop.hour("aa", per_hour, rates)
        for name in names:
            b = _variant(await shop.results(name), "B")
            lift = (b["conversion"] or {}).get("lift") or {}
            if lift.get("significant") and name not in flagged:
                flagged[name] = hour
        _log(
            f"  hour {hour:2d}: {shop.visitors:,} visitors, {len(flagged)} of {runs} experiments "
            f"ever significant ({time.perf_counter() - started:.0f} s)"
        )
    visitors = [sum(v["visitors"] for v in (await shop.results(n))["variants"]) for n in names]
    for name in names:
        await shop.delete(name)
    rate = len(flagged) / runs
    _log(
        f"A/A: {runs} experiments, {sum(visitors) / runs:,.0f} visitors each on average, looked at "
        f"every hour for {args.hours} hours: {len(flagged)} ever significant = false-positive rate "
        f"{rate:.3f} (alpha {args.alpha})"
    )
    return {
        "runs": runs,
        "hours": args.hours,
        "visitors_per_run": sum(visitors) / runs,
        "false_positives": len(flagged),
        "false_positive_rate": rate,
        "flagged_at_hour": sorted(flagged.values()),
    }


async def ab(shop: Shop, args: argparse.Namespace) -> dict[str, Any]:
    await shop.put("ab", {"variants": [{"name": "A"}, {"name": "B"}]})
    rates = {
        "ab/A": (args.click, args.ab_conversion),
        "ab/B": (args.click, args.ab_conversion * (1 + args.lift)),
    }
    before = shop.visitors
    found_at: int | None = None
    b: dict[str, Any] = {}
    for hour in range(1, args.ab_hours + 1):
        await shop.hour("ab", args.ab_visitors, rates)
        b = _variant(await shop.results("ab"), "B")
        lift = (b["conversion"] or {}).get("lift") or {}
        _log(
            f"  hour {hour:2d}: {shop.visitors - before:,} visitors, B's lift "
            f"{lift.get('relative')} interval {lift.get('interval')} p {lift.get('p_value')}"
        )
        if lift.get("significant"):
            found_at = shop.visitors - before
            break
    await shop.delete("ab")
    if found_at is None:
        seen = shop.visitors - before
        _log(f"A/B: a true {args.lift:.0%} lift not detected within {seen:,} visitors")
    else:
        _log(f"A/B: a true {args.lift:.0%} lift in conversion detected after {found_at:,} visitors")
    return {
        "conversion_a": args.ab_conversion,
        "lift": args.lift,
        "detected_after_visitors": found_at,
        "visitors": shop.visitors - before,
        "b": b.get("conversion"),
    }


async def bandit(shop: Shop, args: argparse.Namespace) -> dict[str, Any]:
    truth = {"A": args.bandit_rates[0], "B": args.bandit_rates[1], "C": args.bandit_rates[2]}
    variants = [{"name": n} for n in truth]
    await shop.put("even", {"variants": variants, "traffic": 0.5})
    await shop.put("bandit", {"variants": variants, "traffic": 0.5, "allocation": "thompson"})
    rates = {f"{e}/{n}": (args.click, r) for e in ("even", "bandit") for n, r in truth.items()}
    best = max(truth.values())
    regret = {"even": 0.0, "bandit": 0.0}
    served = {"even": 0, "bandit": 0}
    per_batch = args.bandit_visitors // args.bandit_batches
    for _batch in range(args.bandit_batches):
        for _visitor, label in await shop.hour("bandit", per_batch, rates):
            experiment, _, name = label.partition("/")
            if experiment in regret:
                regret[experiment] += best - truth[name]
                served[experiment] += 1
    shares = {}
    for experiment in ("even", "bandit"):
        shown = await shop.results(experiment)
        total = sum(v["visitors"] for v in shown["variants"]) or 1
        shares[experiment] = {v["name"]: round(v["visitors"] / total, 3) for v in shown["variants"]}
        await shop.delete(experiment)
    _log(
        f"Bandit: conversion rates {truth}; regret (conversions lost against always the best) "
        f"Thompson sampling {regret['bandit']:.1f} over {served['bandit']:,} visitors, "
        f"even split {regret['even']:.1f} over {served['even']:,} "
        f"({regret['bandit'] / max(regret['even'], 1e-9):.2f}x); shares {shares}"
    )
    return {"truth": truth, "regret": regret, "visitors": served, "shares": shares}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"run": run_record(args)}
    with tempfile.TemporaryDirectory(prefix="personify-experiments-") as tmp:
        engine = Personify(Path(tmp))
        timeout = aiohttp.ClientTimeout(total=600)
        connector = aiohttp.TCPConnector(limit=_CONCURRENCY)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await engine.start(session)
            try:
                async with session.post(engine.url + "/v1/items", json={"items": _ITEMS}) as resp:
                    assert resp.status == 202, await resp.text()
                shop = Shop(engine, session, args.seed)
                while True:  # the catalog indexed: lists have items
                    async with session.get(engine.url + "/v1/users/warm-up/recommendations") as r:
                        if (await r.json())["items"]:
                            break
                    await asyncio.sleep(0.5)
                started = time.perf_counter()
                if "aa" in args.parts:
                    out["aa"] = await aa(shop, args)
                if "ab" in args.parts:
                    out["ab"] = await ab(shop, args)
                if "bandit" in args.parts:
                    out["bandit"] = await bandit(shop, args)
                out["seconds"] = time.perf_counter() - started
                out["visitors"] = shop.visitors
                _log(f"{shop.visitors:,} simulated visitors in {out['seconds']:.0f} s")
            finally:
                engine.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="aa,ab,bandit")
    parser.add_argument("--aa-runs", type=int, default=200)
    parser.add_argument("--aa-visitors", type=int, default=1200, help="visitors per A/A experiment")
    parser.add_argument("--hours", type=int, default=24, help="hourly looks of the A/A runs")
    parser.add_argument("--click", type=float, default=0.3, help="click rate of every variant")
    parser.add_argument("--conversion", type=float, default=0.1, help="A/A conversion rate")
    parser.add_argument("--ab-conversion", type=float, default=0.2, help="A's conversion rate")
    parser.add_argument("--lift", type=float, default=0.1, help="B's true relative lift")
    parser.add_argument("--ab-visitors", type=int, default=2000, help="A/B visitors per hour")
    parser.add_argument("--ab-hours", type=int, default=60)
    parser.add_argument(
        "--bandit-rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.12, 0.15]
    )
    parser.add_argument("--bandit-visitors", type=int, default=20_000)
    parser.add_argument("--bandit-batches", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=0.05, help="[experiments] alpha (shown)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
