"""Ingestion and serving while the engine trains and tunes itself, beside the same when idle.

Usage (from the repository root)::

    .venv/bin/python bench/training_load.py                     # MovieLens 100k history
    .venv/bin/python bench/training_load.py --windows 5 --rate 200

A fresh ``personify run`` with the repository's ``config.toml`` gets the MovieLens 100k catalog
and its first 80% of ratings at their real timestamps (`quality_api`), then trains and tunes
itself with no command; the time from the last POST to a trained and tuned engine is printed.
Then three phases:

1. **idle, before**: nothing runs in the background, and no list waits to be recomputed
   (``personify_lists_pending`` and ``personify_lists_refresh_pending`` are 0);
2. **during a run**: ``POST /v1/quality/runs`` has the engine train, tune and evaluate itself
   again (asked for again whenever the last one ended before the phase had its figures); the
   model swap and the lists it has recomputed count as part of a run;
3. **idle, after**: once no run is going.

In each phase, alternately: **serving**, pieces of 5 seconds of ``GET
/v1/users/{id}/recommendations?k=10`` for known visitors on an open-loop schedule of ``--rate``
a second (``--seconds`` in all), timed from the scheduled send to the answer (p50, p99); and
**ingestion**, ``--windows`` windows of ``--window-events`` new-visitor views (``POST
/v1/events``, 500 a request, two clients), each timed until ``personify_events_applied_total``
shows it applied. ``GET /v1/quality`` is read before and after every piece, and a piece counts
only if the engine's state held throughout: nothing running and no new model or tuning when
idle, one run in progress throughout during a run. Idle is the mean of both idle phases, which
also cancels a slow drift; the ratio during/idle is the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from _datasets import load
from ingest import Personify
from quality_api import _events, _items, _post, _quality, _ready, _wait_applied

from personify.agents.evaluation import global_split

APPLIED = "personify_events_applied_total"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _state(session: aiohttp.ClientSession, url: str) -> tuple[bool, Any, int]:
    """(a training or tuning is in progress, the model's trained_at, tuning runs recorded)."""
    quality = await _quality(session, url)
    model, tuning = quality["model"], quality["tuning"]
    return bool(model["training"] or tuning["running"]), model["trained_at"], len(tuning["runs"])


def _held(phase: str, before: tuple[bool, Any, int], after: tuple[bool, Any, int]) -> bool:
    """Whether the engine stayed in the phase's state from ``before`` to ``after``."""
    if phase == "during":  # the same run in progress throughout
        return before[0] and after[0] and before[2] == after[2]
    return not before[0] and not after[0] and before == after


async def _until(session: aiohttp.ClientSession, url: str, phase: str, limit_s: float) -> None:
    """Wait until a run is in progress (``during``) or none is, nor asked for (idle)."""
    stop = time.perf_counter() + limit_s
    while time.perf_counter() < stop:
        quality = await _quality(session, url)
        model, tuning = quality["model"], quality["tuning"]
        running = model["training"] or tuning["running"]
        if phase == "during" and running:
            return
        if phase != "during" and not running and not tuning["requested"]:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the engine did not reach the {phase} state in {limit_s:.0f} s")


async def _lists_done(engine: Personify, session: aiohttp.ClientSession) -> float:
    """Wait until no list waits to be recomputed; the seconds waited."""
    started = time.perf_counter()
    for _ in range(3000):  # at most 10 minutes
        metrics = await engine.metrics(session)
        due = metrics.get("personify_lists_pending", 0.0)
        if due + metrics.get("personify_lists_refresh_pending", 0.0) <= 0:
            break
        await asyncio.sleep(0.2)
    return time.perf_counter() - started


async def _ingest(
    engine: Personify,
    session: aiohttp.ClientSession,
    items: list[str],
    n: int,
    tag: str,
    clock: Iterator[int],
) -> float:
    """Events applied per second when two clients POST ``n`` new-visitor views.

    Their times follow the history's (``clock``: 1997 for MovieLens), as a shop's live events
    follow its backfill: dated today, they would put the whole backfill out of the
    ``[model] history_days`` window.
    """
    rng = random.Random(tag)
    before = (await engine.metrics(session)).get(APPLIED, 0.0)
    batches = [
        [
            {
                "event_id": f"{tag}-{b}-{j}",
                "type": "product_view",
                "user_id": f"{tag}-{b}-{j % 50}",
                "item_id": rng.choice(items),
                "ts": next(clock),
            }
            for j in range(500)
        ]
        for b in range(n // 500)
    ]
    queue = list(reversed(batches))

    async def client() -> None:
        while queue:
            await _post(session, engine.url + "/v1/events", "events", queue.pop())

    started = time.perf_counter()
    await asyncio.gather(client(), client())
    target = before + 500 * len(batches)
    for _ in range(6000):  # at most 10 minutes, read every 0.1 s
        if (await engine.metrics(session)).get(APPLIED, 0.0) >= target:
            break
        await asyncio.sleep(0.1)
    return 500 * len(batches) / (time.perf_counter() - started)


async def _serve(
    session: aiohttp.ClientSession, url: str, users: list[str], rate: float, seconds: float
) -> tuple[list[float], int]:
    """Open-loop GETs of recommendations: each one's ms from its scheduled send, and errors."""
    rng = random.Random()
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

    start = time.perf_counter() + 0.05
    n = int(rate * seconds)
    await asyncio.gather(*(one(start + i / rate, rng.choice(users)) for i in range(n)))
    return latencies, errors


async def _phase(
    phase: str,
    engine: Personify,
    session: aiohttp.ClientSession,
    users: list[str],
    items: list[str],
    args: argparse.Namespace,
    clock: Iterator[int],
) -> dict[str, Any]:
    """Serving in 5-second pieces and ingestion windows, alternately, where the state held.

    During a run, a new run is asked for whenever none is going.
    """
    url = engine.url
    pieces = max(1, round(args.seconds / 5.0))
    latencies: list[float] = []
    rates: list[float] = []
    served = errors = dropped = runs = 0
    for attempt in range(100):
        if served >= pieces and len(rates) >= args.windows:
            break
        if phase == "during":
            if not (await _state(session, url))[0]:
                async with session.post(url + "/v1/quality/runs") as resp:
                    runs += resp.status == 202  # 409: one is already going
            await _until(session, url, phase, 600.0)
        else:
            await _until(session, url, phase, 600.0)
            await _lists_done(engine, session)
        before = await _state(session, url)
        if served < pieces and (served <= len(rates) or len(rates) >= args.windows):
            lat, err = await _serve(session, url, users, args.rate, 5.0)
            held = _held(phase, before, await _state(session, url))
            what = f"serve p99 {np.percentile(lat, 99):.1f} ms"
            if held:
                latencies += lat
                errors += err
                served += 1
        else:
            rate = await _ingest(
                engine, session, items, args.window_events, f"{phase}-{attempt}", clock
            )
            held = _held(phase, before, await _state(session, url))
            what = f"ingest {rate:,.0f} events/s"
            if held:
                rates.append(rate)
        dropped += not held
        _log(f"{phase}: {what}{'' if held else ' (the state changed: not counted)'}")
    arr = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "ingest_windows": rates,
        "serve": {
            "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99)),
            "max_ms": float(arr.max()),
            "requests": len(latencies),
            "errors": errors,
        }
        if latencies
        else None,
        "pieces_not_counted": dropped,
        "runs_asked_for": runs,
    }


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


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
                clock = itertools.count(max(e["ts"] for e in events) + 1000, 10)
                for phase in ("idle before", "during", "idle after"):
                    out[phase] = await _phase(phase, engine, session, users, items, args, clock)
            finally:
                engine.stop()
    idle = out["idle before"]["ingest_windows"] + out["idle after"]["ingest_windows"]
    during = out["during"]["ingest_windows"]
    out["ingest_idle_per_s"] = _mean(idle)
    out["ingest_during_per_s"] = _mean(during)
    if idle and during:
        out["ingest_ratio"] = statistics.fmean(during) / statistics.fmean(idle)
    return out


def _row(name: str, phase: dict[str, Any]) -> str:
    rates = phase["ingest_windows"]
    ingest = f"{statistics.fmean(rates):,.0f} ({len(rates)} windows)" if rates else "-"
    serve = phase["serve"]
    if serve is None:
        return f"| {name} | {ingest} | - | - | - |"
    return (
        f"| {name} | {ingest} | {serve['p50_ms']:.1f} | {serve['p99_ms']:.1f} "
        f"| {serve['max_ms']:.0f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="seconds of serving a phase")
    p.add_argument("--rate", type=float, default=100.0, help="recommendation GETs a second")
    p.add_argument("--windows", type=int, default=6, help="ingestion windows a phase")
    p.add_argument("--window-events", type=int, default=5000, help="events a window")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    started = time.perf_counter()
    out = asyncio.run(run(args))
    print(f"history: {out['interactions']:,} MovieLens 100k interactions")
    print(f"trained and tuned {out['ready_s']:.0f} s after the last POST of the backfill")
    print("| phase | ingest (events/s) | serve p50 (ms) | serve p99 (ms) | serve max (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name in ("idle before", "during", "idle after"):
        print(_row(name, out[name]))
    ratio = out.get("ingest_ratio")
    print(
        "ingestion during a run / idle: "
        + (f"{ratio:.2f}" if ratio is not None else "not measured (no window held its state)")
    )
    when = datetime.now(UTC).isoformat(timespec="seconds")
    took = time.perf_counter() - started
    print(f"({took:.0f} s, {when}, {platform.machine()}, {platform.platform()})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
