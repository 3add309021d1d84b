"""Push benchmark: event posted -> fresh recommendations received on the visitor's WebSocket.

``.venv/bin/python bench/push.py [--items 2000] [--sockets 1000] [--rate 100,1000]
[--duration 30] [--workers 1] [--json FILE]`` runs, against one ``personify run`` subprocess
on a fresh data directory (default configuration) or, with ``--workers N``, N ``personify
worker`` processes sharing one embedded broker, with the sockets and POSTs spread over them
(pushes for visitors whose socket is on a worker that does not own them go through the push
topic; their latency is reported apart):

1. a synthetic catalog (the serving benchmark's) through ``POST /v1/items`` until indexed,
   and ``--history`` views per visitor (default 8) so every visitor has a profile; with one
   worker, the engine then trains and tunes its collaborative model on them by itself (at least
   1,000 interactions) and the run waits for it and for the lists it has recomputed, so the
   pushed lists are ranked with the model;
2. ``--sockets`` WebSockets (``GET /v1/ws?user_id=...``), one per visitor, each reading its
   first list;
3. for each ``--rate``: open loop for ``--duration`` seconds, one ``product_view`` per
   ``POST /v1/events`` for a visitor chosen at random among those with no event in flight (so
   every push answers exactly one event). Latency is from the moment the POST is sent to the
   moment the visitor's next ``recommendations`` message arrives: validation, the broker round
   trip, the profile agent, ranking and the push.

Reported per rate: events/s sent, pushes received, p50/p90/p99/max latency, events that got
no push within 10 s, messages dropped by the server (slow sockets), the engine's CPU (with the
embedded broker's), how long ``POST /v1/events`` took to answer 202 (p50/p99) and how many
visitors' lists the engine computed. Sockets,
posts and timing run in this one process (asyncio + aiohttp), on the same machine as the
engine; the client's CPU is shown too. The engine is stopped with SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _proc import add_settings_argument, run_record, settings_env, stage_line, stage_means_ms
from serve import (
    Engine,
    item_bodies,
    load_catalog,
    make_catalog,
    percentile,
    post_all,
    wait_lists,
    wait_model,
)

from personify.engine.broker import EmbeddedBroker
from personify.engine.publisher import partition_for

Json = dict[str, Any]
NO_PUSH_S = 10.0
#: Partitions of the routed events (the default configuration).
PARTITIONS = 4


def client_cpu() -> float:
    """CPU seconds used by this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Sockets:
    """One WebSocket per visitor; records when each visitor's next message arrives."""

    def __init__(self, urls: dict[str, str], users: list[str]) -> None:
        self.urls = {u: url.replace("http://", "ws://", 1) for u, url in urls.items()}
        self.users = users
        self.waiting: dict[str, float] = {}  # visitor -> when their event was posted
        self.latencies_ms: list[float] = []
        #: When each of ``latencies_ms`` arrived (Unix time), for a trace.
        self.arrived_at: list[float] = []
        #: Visitors whose socket is on a worker that does not own them (several workers).
        self.relayed: set[str] = set()
        self.relayed_ms: list[float] = []
        self.received = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.ready = 0

    async def _hold(self, session: aiohttp.ClientSession, user: str) -> None:
        url = f"{self.urls[user]}/v1/ws?user_id={user}"
        async with session.ws_connect(url, heartbeat=None) as ws:
            first = await ws.receive()
            assert first.type == aiohttp.WSMsgType.TEXT, first
            self.ready += 1
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                now = time.perf_counter()
                self.received += 1
                sent = self.waiting.pop(user, None)
                if sent is not None:
                    self.latencies_ms.append((now - sent) * 1000)
                    self.arrived_at.append(time.time())
                    if user in self.relayed:
                        self.relayed_ms.append((now - sent) * 1000)

    async def open(self, session: aiohttp.ClientSession) -> float:
        """Open every socket; wait until each has its first list; return the seconds."""
        t0 = time.perf_counter()
        for i, user in enumerate(self.users):
            self.tasks.append(asyncio.create_task(self._hold(session, user)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        while self.ready < len(self.users):
            if any(t.done() for t in self.tasks):
                for t in self.tasks:
                    if t.done() and t.exception():
                        raise RuntimeError(f"a socket failed: {t.exception()!r}")
            await asyncio.sleep(0.05)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Close every socket."""
        for t in self.tasks:
            t.cancel()


class Cluster:
    """The engines under test: one ``personify run``, or several ``personify worker``."""

    def __init__(self, engines: list[Engine]) -> None:
        self.engines = engines

    @property
    def url(self) -> str:
        """The first engine's API."""
        return self.engines[0].url

    def cpu(self) -> float:
        """CPU seconds used so far by every engine (and the embedded broker of a single one)."""
        return sum(e.cpu() for e in self.engines)

    def broker_cpu(self) -> float:
        """CPU seconds used so far by the embedded broker of a single engine."""
        return sum(e.broker_cpu() for e in self.engines)

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """GET /metrics of every engine, summed."""
        out: dict[str, float] = {}
        for e in self.engines:
            for k, v in (await e.metrics(session)).items():
                out[k] = out.get(k, 0.0) + v
        return out

    async def owners(self, session: aiohttp.ClientSession) -> dict[int, int]:
        """Partition of the routed events -> index of the engine that owns it (once settled)."""
        for _ in range(600):
            owner: dict[int, int] = {}
            for i, e in enumerate(self.engines):
                async with session.get(e.url + "/healthz") as r:
                    health = await r.json()
                for p in health.get("partitions", {}).get("events-routed", []):
                    owner[p] = i
            if len(owner) == PARTITIONS and len(set(owner.values())) == len(self.engines):
                return owner
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the workers did not split the partitions: {owner}")


async def run_rate(
    eng: Cluster,
    session: aiohttp.ClientSession,
    socks: Sockets,
    items: list[str],
    rate: float,
    duration: float,
) -> Json:
    """Post one view per event at ``rate`` for ``duration`` s; measure event -> push."""
    rng = random.Random(int(rate))
    socks.latencies_ms.clear()
    socks.relayed_ms.clear()
    socks.waiting.clear()
    lost = 0
    received0 = socks.received
    metrics0 = await eng.metrics(session)
    cpu0, bcpu0, ccpu0 = eng.cpu(), eng.broker_cpu(), client_cpu()
    idle = set(socks.users)
    posts: set[asyncio.Task[None]] = set()
    errors = 0
    accepted_ms: list[float] = []

    async def post(user: str, body: bytes, url: str) -> None:
        nonlocal errors
        t = time.perf_counter()
        async with session.post(
            url + "/v1/events", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            if r.status != 202:
                errors += 1
            await r.read()
        accepted_ms.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    n = 0
    while True:
        due = t0 + n / rate
        now = time.perf_counter()
        if due - t0 >= duration:
            break
        if due > now:
            await asyncio.sleep(due - now)
        # Visitors whose push came, or never will (NO_PUSH_S), can take the next event.
        now = time.perf_counter()
        for user in [u for u, sent in socks.waiting.items() if now - sent > NO_PUSH_S]:
            del socks.waiting[user]
            lost += 1
        idle = set(socks.users) - socks.waiting.keys() if n % 100 == 0 else idle
        user = rng.choice(tuple(idle)) if idle else rng.choice(socks.users)
        idle.discard(user)
        body = orjson.dumps({"type": "product_view", "user_id": user, "item_id": rng.choice(items)})
        socks.waiting[user] = time.perf_counter()
        task = asyncio.create_task(post(user, body, eng.engines[n % len(eng.engines)].url))
        posts.add(task)
        task.add_done_callback(posts.discard)
        n += 1
    sent_s = time.perf_counter() - t0
    deadline = time.perf_counter() + NO_PUSH_S
    while socks.waiting and time.perf_counter() < deadline:  # noqa: ASYNC110 - polls a dict
        await asyncio.sleep(0.05)
    lost += len(socks.waiting)
    socks.waiting.clear()
    took = time.perf_counter() - t0
    metrics1 = await eng.metrics(session)
    lat = sorted(socks.latencies_ms)
    relayed = sorted(socks.relayed_ms)
    accepted_ms.sort()
    dropped = metrics1.get("personify_ws_dropped_total", 0) - metrics0.get(
        "personify_ws_dropped_total", 0
    )
    lists_key = 'personify_lists_computed_total{kind="user"}'
    stages = stage_means_ms(metrics0, metrics1)
    lists = metrics1.get(lists_key, 0) - metrics0.get(lists_key, 0)
    return {
        "rate": rate,
        "events": n,
        "sent_per_s": n / sent_s,
        "post_errors": errors,
        "pushes": socks.received - received0,
        "measured": len(lat),
        "p50_ms": percentile(lat, 0.50),
        "p90_ms": percentile(lat, 0.90),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": lat[-1] if lat else 0.0,
        "mean_ms": sum(lat) / len(lat) if lat else 0.0,
        "stages_ms": stages,
        "accept_p50_ms": percentile(accepted_ms, 0.50),
        "accept_p99_ms": percentile(accepted_ms, 0.99),
        "relayed": len(relayed),
        "relayed_p50_ms": percentile(relayed, 0.50),
        "relayed_p99_ms": percentile(relayed, 0.99),
        "no_push": lost,
        "lists_computed": lists,
        "dropped": dropped,
        "engine_cores": (eng.cpu() - cpu0) / took,
        "broker_cores": (eng.broker_cpu() - bcpu0) / took,
        "client_cores": (client_cpu() - ccpu0) / took,
    }


async def wait_catalog(cluster: Cluster, session: aiohttp.ClientSession, cat: Any) -> Json:
    """Several workers: POST the catalog to one, wait until the workers have embedded it all."""
    bodies = list(item_bodies(cat.items))
    t0 = time.perf_counter()
    _send_s, accepted, _rejected = await post_all(session, cluster.url + "/v1/items", bodies, 2)
    last = t0
    while True:
        held = (await cluster.metrics(session)).get("personify_items_encoded_total", 0.0)
        now = time.perf_counter()
        if held >= accepted:
            break
        if now - last >= 10:
            print(f"  ... {held:,.0f}/{accepted:,} embedded after {now - t0:.0f} s", flush=True)
            last = now
        if now - t0 > 900:
            raise RuntimeError(f"catalog not loaded in 900 s: {held:,.0f}/{accepted:,}")
        await asyncio.sleep(1.0)
    took = time.perf_counter() - t0
    print(f"  {accepted:,} items embedded by the workers {took:.1f} s after the first POST")
    return {"items": accepted, "seconds": took}


async def amain(args: argparse.Namespace, cluster: Cluster, out: Json) -> None:
    cat = make_catalog(args.items)
    items = [it["item_id"] for it in cat.items]
    users = [f"visitor-{n:05d}" for n in range(args.sockets)]
    workers = len(cluster.engines)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=120),
        connector=aiohttp.TCPConnector(limit=0),
    ) as session:
        for eng in cluster.engines:
            await eng.start(session)
            print(f"personify up at {eng.url} in {eng.startup_s:.1f} s (pid {eng.pid})", flush=True)
        out["startup_s"] = max(eng.startup_s for eng in cluster.engines)
        relayed: set[str] = set()
        if workers == 1:
            out["catalog"] = await load_catalog(cluster.engines[0], session, cat, 2)
        else:
            owner = await cluster.owners(session)
            print(f"partitions by worker: {owner}", flush=True)
            out["catalog"] = await wait_catalog(cluster, session, cat)
            relayed = {
                u for i, u in enumerate(users) if owner[partition_for(u, PARTITIONS)] != i % workers
            }
        rng = random.Random(5)
        warm = [
            {"type": "product_view", "user_id": u, "item_id": rng.choice(items)}
            for _ in range(args.history)
            for u in users
        ]
        for i in range(0, len(warm), 500):
            async with session.post(
                cluster.url + "/v1/events", json={"events": warm[i : i + 500]}
            ) as r:
                assert r.status == 202, await r.text()
        await asyncio.sleep(2)
        if workers == 1 and len(warm) >= 1000:  # [model] min_interactions: a model is trained
            out["model"] = await wait_model(cluster.engines[0], session)
            out["lists"] = await wait_lists(cluster.engines[0], session)
        urls = {u: cluster.engines[i % workers].url for i, u in enumerate(users)}
        socks = Sockets(urls, users)
        socks.relayed = relayed
        opened = await socks.open(session)
        print(
            f"\n[sockets] {len(users):,} WebSockets open in {opened:.1f} s on {workers} "
            f"worker(s); {len(relayed):,} follow a visitor another worker owns",
            flush=True,
        )
        out["sockets_open_s"] = opened
        out["runs"] = []
        for rate in args.rate:
            await asyncio.sleep(2)
            print(f"\n[push] {rate:g} events/s for {args.duration:g} s", flush=True)
            res = await run_rate(cluster, session, socks, items, rate, args.duration)
            out["runs"].append(res)
            print(
                f"  {res['events']:,} events ({res['sent_per_s']:,.0f}/s, {res['post_errors']} "
                f"errors), {res['pushes']:,} pushes | event -> push p50 {res['p50_ms']:.1f} "
                f"p90 {res['p90_ms']:.1f} p99 {res['p99_ms']:.1f} max {res['max_ms']:.1f} ms | "
                f"no push {res['no_push']}, dropped {res['dropped']:.0f} | engine CPU "
                f"{100 * res['engine_cores']:.0f}% (broker {100 * res['broker_cores']:.0f}%), "
                f"client CPU {100 * res['client_cores']:.0f}% | "
                f"202 answered p50 {res['accept_p50_ms']:.1f} p99 {res['accept_p99_ms']:.1f} ms",
                flush=True,
            )
            if relayed:
                print(
                    f"  through another worker: {res['relayed']:,} pushes, p50 "
                    f"{res['relayed_p50_ms']:.1f} p99 {res['relayed_p99_ms']:.1f} ms",
                    flush=True,
                )
        socks.close()


def print_summary(out: Json) -> None:
    print("\n" + "=" * 100)
    print(f"SUMMARY  {out['date']}  {out['cpus']} CPUs  {out['cpu_model']}  Python {out['python']}")
    print(
        f"{out['args']['sockets']:,} sockets; catalog {out['args']['items']:,} items; "
        f"{out['args']['workers']} worker(s)"
    )
    print(
        f"{'events/s':>9} {'events':>8} {'pushes':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'no push':>8} {'dropped':>8} {'eng CPU':>8} {'brk CPU':>8} {'cli CPU':>8}"
    )
    for r in out.get("runs", []):
        print(
            f"{r['rate']:>9g} {r['events']:>8,} {r['pushes']:>8,} {r['p50_ms']:>8.1f} "
            f"{r['p90_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} {r['no_push']:>8} "
            f"{r['dropped']:>8.0f} {100 * r['engine_cores']:>7.0f}% "
            f"{100 * r.get('broker_cores', 0):>7.0f}% {100 * r['client_cores']:>7.0f}%"
        )
    for r in out.get("runs", []):
        print(
            f"{r['rate']:>9g} POST /v1/events answered 202 in p50 {r['accept_p50_ms']:.1f} ms, "
            f"p99 {r['accept_p99_ms']:.1f} ms; {r['lists_computed']:,.0f} lists computed"
        )
    for r in out.get("runs", []):
        if r.get("stages_ms"):
            print(f"{r['rate']:>9g} stages: {stage_line(r['stages_ms'], r['mean_ms'])}")
    for r in out.get("runs", []):
        if r.get("relayed"):
            print(
                f"{r['rate']:>9g} through another worker: {r['relayed']:,} pushes, "
                f"p50 {r['relayed_p50_ms']:.1f} ms, p99 {r['relayed_p99_ms']:.1f} ms"
            )
    print("latency: from sending POST /v1/events to receiving the visitor's next push; eng CPU")
    print("includes the embedded broker's (brk CPU)")
    print("=" * 100)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=2000, help="catalog size (default 2,000)")
    p.add_argument("--sockets", type=int, default=1000, help="open WebSockets (default 1,000)")
    p.add_argument(
        "--rate",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[100.0, 1000.0],
        help="events/s, comma-separated (default 100,1000)",
    )
    p.add_argument("--duration", type=float, default=30.0, help="seconds per rate (default 30)")
    p.add_argument(
        "--history",
        type=int,
        default=8,
        help="views per visitor before the sockets open (default 8); with one worker the run "
        "then waits until the engine has trained and tuned its model on them by itself",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="1: one `personify run`; more: that many `personify worker` on one broker, the "
        "sockets and POSTs spread over them (default 1)",
    )
    add_settings_argument(p)
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark, print the figures, and stop the engine whatever happens."""
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="personify-push-"))
    stack = contextlib.ExitStack()
    settings = settings_env(args.set)
    if args.workers > 1:
        kafka = stack.enter_context(EmbeddedBroker(workdir / "kafka.log"))
        env = {"PERSONIFY_BROKER__URL": kafka.url, "PERSONIFY_WORKER__APP_ID": "pushbench"}
        engines = []
        for i in range(args.workers):
            (workdir / f"worker{i}").mkdir()
            engines.append(
                Engine(workdir / f"worker{i}", args.log_level, "worker", {**settings, **env})
            )
    else:
        engines = [Engine(workdir, args.log_level, extra_env=settings)]
    cluster = Cluster(engines)
    out: Json = run_record(args)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    print(f"Personify push benchmark; {os.cpu_count()} CPUs; work dir {workdir}", flush=True)
    code = 0
    try:
        asyncio.run(amain(args, cluster, out))
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        code = 130
    except Exception as exc:
        print(f"\nFAILED: {exc!r}", flush=True)
        code = 1
    finally:
        for eng in engines:
            if eng.proc is not None:
                print("stopping personify (SIGTERM) ...", flush=True)
                out["exit_code"] = eng.stop()
        stack.close()
        if out.get("runs"):
            print_summary(out)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))
        if args.keep or code:
            print(f"work directory kept: {workdir} (engine logs: {[e.log_path for e in engines]})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
