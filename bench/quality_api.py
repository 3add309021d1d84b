"""Quality through the public API, the way a shop would get it, beside offline baselines.

Usage (from the repository root)::

    .venv/bin/python bench/quality_api.py                          # every data set
    .venv/bin/python bench/quality_api.py --datasets ml-100k --users 400

For each data set (`_datasets`, at its real timestamps) and each protocol (``--protocols``:
``global``, a temporal cut with 80% of the interactions before it; ``last``, each visitor's last
order where they bought, else their last 10 interactions, held out), a fresh ``personify run``
with the repository's ``config.toml`` gets the catalog (``POST /v1/items``: the item's text
where the data set has any, else its category) and the training history (``POST /v1/events``:
views, and each visitor's lines of one time as one purchase), then trains and tunes itself: no
command is sent; the engine starts once the backfill settles (`personify.agents.model`). Every
visitor with held-out items then gets ``GET /v1/users/{id}/recommendations?k=20``, scored
against them. Popularity, buy-again, item-kNN, implicit ALS and BPR, tuned on a validation split
of the same training part (`quality.py`), run in the same command.

It also prints how long the engine took from the last POST of the backfill until
``GET /v1/quality`` showed it trained and tuned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from _datasets import DATASETS, Dataset, load
from ingest import Personify
from quality import GRID, PROTOCOLS, QUICK_GRID, _tune
from threadpoolctl import threadpool_limits

from personify.agents.evaluation import (
    CUTOFF,
    KINDS,
    RECALL_CUTOFF,
    Method,
    evaluate,
    unit_metrics,
)

_BATCH = 1000
#: How long the engine may take to be trained and tuned after the backfill before the run fails.
_READY_TIMEOUT_S = 1200.0


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _events(data: Dataset, train: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    orders: dict[tuple[int, int], dict[str, Any]] = {}
    for n, (u, i, kind, ts) in enumerate(
        zip(
            train.user.tolist(),
            train.item.tolist(),
            train.kind.tolist(),
            train.ts_ms.tolist(),
            strict=True,
        )
    ):
        user, item, etype = train.users[u], train.items[i], KINDS[kind]
        if etype == "purchase":
            order = orders.get((u, ts))
            line = {"item_id": item, "quantity": 1, "price": 1.0}
            if order is None:
                order = {
                    "event_id": f"b{n}",
                    "type": "purchase",
                    "user_id": user,
                    "ts": ts,
                    "properties": {"items": [line]},
                }
                orders[(u, ts)] = order
                out.append(order)
            elif all(x["item_id"] != item for x in order["properties"]["items"]):
                order["properties"]["items"].append(line)
            continue
        event: dict[str, Any] = {
            "event_id": f"b{n}",
            "type": etype,
            "user_id": user,
            "item_id": item,
            "ts": ts,
        }
        if etype == "add_to_cart":
            event["properties"] = {"quantity": 1}
        out.append(event)
    return out


def _items(data: Dataset) -> list[dict[str, Any]]:
    out = []
    for item in data.history.items:
        category = data.category.get(item)
        title = data.text.get(item) or (category.replace("/", ", ") if category else item)
        entry: dict[str, Any] = {"item_id": item, "title": title[:200]}
        if category:
            entry["category"] = category
        out.append(entry)
    return out


async def _post(session: aiohttp.ClientSession, url: str, key: str, rows: list[Any]) -> None:
    for i in range(0, len(rows), _BATCH):
        body = {key: rows[i : i + _BATCH]}
        async with session.post(url, json=body) as resp:
            text = await resp.text()
            if resp.status != 202:
                raise RuntimeError(f"POST {url} answered {resp.status}: {text[:300]}")
            answer = json.loads(text)
            if answer.get("rejected"):
                raise RuntimeError(f"POST {url} rejected: {answer['rejected'][:3]}")


async def _quality(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(base + "/v1/quality") as resp:
        out: dict[str, Any] = await resp.json()
        return out


async def _ready(
    session: aiohttp.ClientSession, url: str, target: int, limit_s: float
) -> dict[str, Any]:
    """Wait until the engine trained and tuned on at least ``target`` interactions.

    Returns ``GET /v1/quality`` then.
    """
    started = time.perf_counter()
    while True:
        quality = await _quality(session, url)
        model, tuning = quality["model"], quality["tuning"]
        busy = model["training"] or tuning["running"] or tuning["requested"]
        runs = tuning["runs"]
        if not busy and runs and runs[-1]["interactions"] >= target:
            return quality
        if time.perf_counter() - started > limit_s:
            raise RuntimeError(
                f"not trained and tuned {limit_s:.0f} s after the backfill: {model} {tuning}"
            )
        await asyncio.sleep(1.0)


async def _wait_applied(engine: Personify, session: aiohttp.ClientSession, n: int) -> None:
    while True:
        metrics = await engine.metrics(session)
        if metrics.get("personify_events_applied_total", 0.0) >= n:
            return
        await asyncio.sleep(0.5)


async def _lists_settled(engine: Personify, session: aiohttp.ClientSession) -> None:
    """Wait until the lists computed ahead are computed again with what the tuning applied.

    A tuning run that changes the setting or the ranker makes every list computed ahead stale
    and queues it again; until the queue is empty, a visitor may still get the list computed
    before (served from memory). Done when nothing is pending twice in a row.
    """
    zero = 0
    while zero < 2:
        metrics = await engine.metrics(session)
        waiting = metrics.get("personify_lists_pending", 0.0) + metrics.get(
            "personify_lists_refresh_pending", 0.0
        )
        zero = zero + 1 if waiting == 0 else 0
        await asyncio.sleep(0.5)


async def run_engine(data: Dataset, split: Any, users: list[int]) -> dict[str, Any]:
    """Backfill a fresh engine over HTTP, let it train and tune, score its lists."""
    events = _events(data, split.train)
    with tempfile.TemporaryDirectory(prefix="personify-quality-") as tmp:
        engine = Personify(Path(tmp))
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await engine.start(session)
            try:
                started = time.perf_counter()
                await _post(session, engine.url + "/v1/items", "items", _items(data))
                await _post(session, engine.url + "/v1/events", "events", events)
                posted = time.perf_counter()
                _log(f"  posted {len(events):,} events in {posted - started:.1f} s")
                await _wait_applied(engine, session, len(events))
                # No command: the engine trains and tunes once the backfill ends.
                quality = await _ready(
                    session, engine.url, int(len(split.train) * 0.99), _READY_TIMEOUT_S
                )
                ready_s = time.perf_counter() - posted
                _log(f"  trained and tuned {ready_s:.0f} s after the last POST")
                await _lists_settled(engine, session)
                _log(f"  lists computed again {time.perf_counter() - posted:.0f} s after it")
                sums = np.zeros(4)
                shown: set[str] = set()
                for user in users:
                    path = f"/v1/users/{split.train.users[user]}/recommendations?k={RECALL_CUTOFF}"
                    async with session.get(engine.url + path) as resp:
                        body = await resp.json()
                    ranked_ids = [r["item_id"] for r in body["items"]]
                    shown.update(ranked_ids[:CUTOFF])
                    number = {item: i for i, item in enumerate(split.train.items)}
                    ranked = [number[i] for i in ranked_ids if i in number]
                    sums += unit_metrics(ranked, split.targets[user])
            finally:
                engine.stop()
    mean = sums / max(len(users), 1)
    return {
        "method": "engine over HTTP (self-tuned)",
        "ndcg10": float(mean[0]),
        "recall20": float(mean[1]),
        "map10": float(mean[2]),
        "hr10": float(mean[3]),
        "coverage10": len(shown) / len(split.train.items),
        "users": len(users),
        "ready_s": ready_s,
        "posted_events": len(events),
        "tuning": quality["tuning"]["setting"],
        "validation": quality["tuning"]["validation"],
        "ranker": quality["tuning"]["ranker"],
        "run": quality["tuning"]["runs"][-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument(
        "--protocols",
        default=",".join(PROTOCOLS),
        help="global (a temporal cut) and/or last (each visitor's last order or 10 interactions)",
    )
    parser.add_argument("--users", type=int, default=None, help="sample this many visitors")
    parser.add_argument("--quick", action="store_true", help="small baseline grids")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    protocols = args.protocols.split(",")
    if unknown := set(protocols) - set(PROTOCOLS):
        parser.error(f"unknown protocol {sorted(unknown)[0]!r}; known: {', '.join(PROTOCOLS)}")
    report: dict[str, Any] = {}
    for name in args.datasets.split(","):
        data = load(name, args.users)
        for protocol in protocols:
            split = PROTOCOLS[protocol](data.history)
            users = sorted(split.targets)
            _log(f"{name}, {protocol}: {data.history.describe()}; {len(users):,} visitors scored")
            rows: list[dict[str, Any]] = []
            with threadpool_limits(1):
                validation = PROTOCOLS[protocol](split.train)
                grid = QUICK_GRID if args.quick else GRID
                for family, makers in grid.items():
                    make = _tune(family, makers, validation)[0] if len(makers) > 1 else makers[0]
                    method: Method = make()
                    [result] = evaluate(split, [method])
                    rows.append({"method": result.method, **result.metrics.as_json()})
            rows.append(asyncio.run(run_engine(data, split, users)))
            best = max(r["ndcg10"] for r in rows[:-1] if r["method"] != "buy-again")
            buy_again = next(r["ndcg10"] for r in rows if r["method"] == "buy-again")
            report[f"{name}, {protocol}"] = {
                "rows": rows,
                "ratio_best": rows[-1]["ndcg10"] / max(best, 1e-12),
                "ratio_buy_again": rows[-1]["ndcg10"] / max(buy_again, 1e-12),
            }
            print(f"### {name} through the API, {split.name} ({len(users):,} visitors)\n")
            print("| method | NDCG@10 | Recall@20 | MAP@10 | HR@10 | coverage@10 | ÷best |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                ratio = r["ndcg10"] / max(best, 1e-12)
                print(
                    f"| {r['method']} | {r['ndcg10']:.4f} | {r['recall20']:.4f} "
                    f"| {r['map10']:.4f} | {r['hr10']:.3f} | {r['coverage10']:.3f} | {ratio:.2f} |"
                )
            engine_row = rows[-1]
            to_buy_again = (
                f"{report[f'{name}, {protocol}']['ratio_buy_again']:.2f}"
                if buy_again >= 0.01
                else "n/a (buy-again finds almost nothing: nobody re-buys)"
            )
            print(
                f"\n÷best is to the best of popularity, item-kNN, ALS and BPR; the engine ÷ "
                f"buy-again: {to_buy_again}. Trained and tuned {engine_row['ready_s']:.0f} s "
                f"after the last of {engine_row['posted_events']:,} events was posted.\n",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
