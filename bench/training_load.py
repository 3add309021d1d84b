"""Ingestion and serving while the engine trains and tunes itself, beside the same when idle.

Usage (from the repository root)::

    .venv/bin/python bench/training_load.py                     # MovieLens 100k history
    .venv/bin/python bench/training_load.py --seconds 20 --rate 200

A fresh ``personify run`` with the repository's ``config.toml`` gets the MovieLens 100k catalog
and its first 80% of ratings at their real timestamps (`quality_api`), then trains and tunes
itself with no command; the time from the last POST to a trained and tuned engine is printed.
Then, twice, side by side:

1. **idle**: nothing runs in the background;
2. **during a run**: ``POST /v1/quality/runs`` has the engine train, tune and evaluate itself
   again (or, when the idle phase's new visitors already started a run, that one), and the
   measurements start once ``GET /v1/quality`` shows it tuning (and must end before it
   finishes, or the figures say so).

Each time, once the lists to recompute in the background are done (``personify_lists_pending``
is 0: a new model or setting has every list computed again): **serving**, ``GET
/v1/users/{id}/recommendations?k=10`` for known visitors on an open-loop schedule of ``--rate``
a second for ``--seconds``, timed from the scheduled send to the answer (p50, p99); then
**ingestion**, ``POST /v1/events`` of 500 new-visitor views per request as fast as two clients
can for ``--seconds``, the rate read from ``personify_events_applied_total``. During the run,
measuring starts once the tuning (after the training) runs. The ratios during/idle are the
figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from _datasets import load
from ingest import Personify
from quality_api import _events, _items, _post, _quality, _wait_applied

from personify.agents.evaluation import global_split


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _ready(session: aiohttp.ClientSession, url: str, target: int, limit_s: float) -> None:
    """Wait until the engine trained and tuned on at least ``target`` interactions."""
    started = time.perf_counter()
    while True:
        quality = await _quality(session, url)
        model, tuning = quality["model"], quality["tuning"]
        busy = model["training"] or tuning["running"] or tuning["requested"]
        runs = tuning["runs"]
        if not busy and runs and runs[-1]["interactions"] >= target:
            return
        if time.perf_counter() - started > limit_s:
            raise RuntimeError(f"not trained and tuned after {limit_s:.0f} s: {model} {tuning}")
        await asyncio.sleep(1.0)


async def _running(session: aiohttp.ClientSession, url: str) -> bool:
    quality = await _quality(session, url)
    return bool(quality["model"]["training"] or quality["tuning"]["running"])


async def _tuning(session: aiohttp.ClientSession, url: str) -> bool:
    return bool((await _quality(session, url))["tuning"]["running"])


async def _lists_done(engine: Personify, session: aiohttp.ClientSession) -> float:
    """Wait until no list waits to be recomputed; the seconds waited."""
    started = time.perf_counter()
    for _ in range(3000):  # at most 10 minutes
        if (await engine.metrics(session)).get("personify_lists_pending", 0.0) <= 0:
            break
        await asyncio.sleep(0.2)
    return time.perf_counter() - started


async def _ingest(
    engine: Personify, session: aiohttp.ClientSession, items: list[str], seconds: float, tag: str
) -> float:
    """Events applied per second while two clients POST new-visitor views for ``seconds``."""
    rng = random.Random(tag)
    before = (await engine.metrics(session)).get("personify_events_applied_total", 0.0)
    sent = 0
    stop = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal sent
        batch = 0
        while time.perf_counter() < stop:
            events = [
                {
                    "event_id": f"{tag}-{n}-{batch}-{j}",
                    "type": "product_view",
                    "user_id": f"{tag}-{n}-{batch}-{j % 50}",
                    "item_id": rng.choice(items),
                }
                for j in range(500)
            ]
            await _post(session, engine.url + "/v1/events", "events", events)
            sent += len(events)
            batch += 1

    started = time.perf_counter()
    await asyncio.gather(client(0), client(1))
    await _wait_applied(engine, session, int(before) + sent)
    return sent / (time.perf_counter() - started)


async def _serve(
    session: aiohttp.ClientSession, url: str, users: list[str], rate: float, seconds: float
) -> dict[str, float]:
    """Open-loop GETs of recommendations: p50 and p99 (ms) from the scheduled send."""
    rng = random.Random(7)
    latencies: list[float] = []
    errors = 0

    async def one(at: float, user: str) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        async with session.get(f"{url}/v1/users/{user}/recommendations?k=10") as resp:
            await resp.read()
            if resp.status != 200:
                errors += 1
        latencies.append((time.perf_counter() - at) * 1000.0)

    start = time.perf_counter() + 0.2
    n = int(rate * seconds)
    await asyncio.gather(*(one(start + i / rate, rng.choice(users)) for i in range(n)))
    arr = np.asarray(latencies)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "requests": float(len(arr)),
        "errors": float(errors),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data = load("ml-100k")
    split = global_split(data.history, 0.2)
    events = _events(data, split.train)
    users = sorted({e["user_id"] for e in events})
    items = list(data.history.items)
    out: dict[str, Any] = {"interactions": len(events)}
    with tempfile.TemporaryDirectory(prefix="personify-training-load-") as tmp:
        engine = Personify(Path(tmp))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            await engine.start(session)
            try:
                await _post(session, engine.url + "/v1/items", "items", _items(data))
                await _post(session, engine.url + "/v1/events", "events", events)
                posted = time.perf_counter()
                await _wait_applied(engine, session, len(events))
                await _ready(session, engine.url, int(len(events) * 0.99), 1200.0)
                out["ready_s"] = time.perf_counter() - posted
                _log(f"trained and tuned {out['ready_s']:.0f} s after the last POST")
                for phase in ("idle", "during"):
                    if phase == "during":
                        async with session.post(engine.url + "/v1/quality/runs") as resp:
                            # 409: the new visitors of the idle phase already started one
                            if resp.status not in (202, 409):
                                raise RuntimeError(f"POST /v1/quality/runs: {resp.status}")
                            _log(f"run: {'asked for' if resp.status == 202 else 'already going'}")
                        for _ in range(1500):  # the run starts at the next check, then trains
                            if await _tuning(session, engine.url):
                                break
                            await asyncio.sleep(0.2)
                    waited = await _lists_done(engine, session)
                    serve = await _serve(session, engine.url, users, args.rate, args.seconds)
                    rate = await _ingest(engine, session, items, args.seconds, phase)
                    still = await _running(session, engine.url) if phase == "during" else None
                    out[phase] = {
                        "ingest_per_s": rate,
                        **serve,
                        "lists_recomputed_s": waited,
                        "run_still_going": still,
                    }
                    _log(f"{phase}: {json.dumps(out[phase])}")
                out["ingest_ratio"] = out["during"]["ingest_per_s"] / out["idle"]["ingest_per_s"]
                out["p99_ratio"] = out["during"]["p99_ms"] / out["idle"]["p99_ms"]
            finally:
                engine.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per measurement")
    p.add_argument("--rate", type=float, default=100.0, help="recommendation GETs a second")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    started = time.perf_counter()
    out = asyncio.run(run(args))
    idle, during = out["idle"], out["during"]
    print(f"history: {out['interactions']:,} MovieLens 100k interactions")
    print(f"trained and tuned {out['ready_s']:.0f} s after the last POST of the backfill")
    print("| | ingest (events/s) | serve p50 (ms) | serve p99 (ms) |")
    print("|---|---:|---:|---:|")
    for name, row in (("idle", idle), ("during a training and tuning run", during)):
        print(
            f"| {name} | {row['ingest_per_s']:,.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} |"
        )
    print(
        f"ingestion during/idle: {out['ingest_ratio']:.2f}; serve p99 during/idle: "
        f"{out['p99_ratio']:.2f}; the run was still going at the end: {during['run_still_going']}"
    )
    when = datetime.now(UTC).isoformat(timespec="seconds")
    took = time.perf_counter() - started
    print(f"({took:.0f} s, {when}, {platform.machine()}, {platform.platform()})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
