"""Embedded broker benchmark: what the bundled broker costs, and the transport floor of a push.

``.venv/bin/python bench/broker.py [--held 0,5000,10000,20000] [--rate 300,1000,1000,300]
[--duration 15] [--sockets 1000] [--json FILE]`` runs two parts, each on a fresh embedded
broker (the one ``personify run`` starts):

1. **held**: one partition with a consumer reading at its end (as the engine's is). For each
   figure of ``--held``, that many single-record batches are produced first, then 500 more,
   each acknowledged before the next: ms per produce and the broker's CPU ms per produce.
   A second series without the consumer separates the produce from the fetch.
2. **floor**: the transport every push rides on, with nothing else. A server process
   (``bench/_floor_server.py``) takes ``POST /v1/events``, sends the events to the broker
   (acks=all), reads them back with a consumer and sends a fixed 20-item list on the
   visitor's WebSocket. The push benchmark's own client drives it: ``--sockets`` sockets, one
   ``product_view`` per POST for a visitor with no event in flight, latency from the POST to
   the visitor's next message. The rates run one after the other on the same broker, which
   keeps every batch it was sent; the server's and the broker's CPU are shown apart.

The push benchmark's goal figures are read against the floor: the engine's latency can only
be the floor plus its own work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from _proc import cpu_seconds, parse_metrics, run_record
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from push import Sockets, run_rate

from personify.engine.broker import EmbeddedBroker, free_port, wait_for_port

Json = dict[str, Any]
PROBES = 500


async def _create_topic(broker: EmbeddedBroker, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def held_series(workdir: Path, held: list[int], consumer: bool) -> list[Json]:
    """Produce cost as the partition fills, with or without a consumer at its end."""
    out: list[Json] = []
    with EmbeddedBroker(workdir / f"held-{int(consumer)}.log") as broker:
        assert broker._proc is not None
        pid = broker._proc.pid
        await _create_topic(broker, "t", 1)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)
        await producer.start()
        reader: asyncio.Task[None] | None = None
        cons: Any = None
        if consumer:
            cons = AIOKafkaConsumer(
                "t",
                bootstrap_servers=broker.bootstrap,
                group_id="g",
                fetch_max_wait_ms=10,
                auto_offset_reset="earliest",
            )
            await cons.start()

            async def read() -> None:
                while True:
                    await cons.getmany(timeout_ms=100)

            reader = asyncio.create_task(read())
        try:
            n = 0
            last = time.perf_counter()
            for target in held:
                while n < target:
                    await (await producer.send("t", b"y" * 300, partition=0))
                    n += 1
                    if time.perf_counter() - last > 10:
                        print(f"  ... {n:,}/{target:,} batches", flush=True)
                        last = time.perf_counter()
                cpu0, t0 = cpu_seconds(pid), time.perf_counter()
                for _ in range(PROBES):
                    await (await producer.send("t", b"x" * 300, partition=0))
                took = time.perf_counter() - t0
                n += PROBES
                row = {
                    "consumer": consumer,
                    "held": target,
                    "produce_ms": 1000 * took / PROBES,
                    "broker_cpu_ms": 1000 * (cpu_seconds(pid) - cpu0) / PROBES,
                }
                out.append(row)
                print(
                    f"  {'with' if consumer else 'no':>4} consumer, {target:>7,} batches held: "
                    f"produce {row['produce_ms']:.2f} ms, broker CPU {row['broker_cpu_ms']:.2f} ms",
                    flush=True,
                )
        finally:
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                await cons.stop()
            await producer.stop()
    return out


class _Floor:
    """The floor server as the push benchmark's client sees an engine."""

    def __init__(self, url: str, pids: list[int]) -> None:
        self.url = url
        self.pids = pids
        self.engines = [self]

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids)

    def broker_cpu(self) -> float:
        return cpu_seconds(self.pids[1])

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(self.url + "/metrics") as r:
            return parse_metrics(await r.text())


async def floor_series(
    floor: _Floor, rates: list[float], duration: float, sockets: int
) -> list[Json]:
    """The bare transport at each rate, one after the other on one broker."""
    out: list[Json] = []
    users = [f"visitor-{n:05d}" for n in range(sockets)]
    items = [f"item-{n:05d}" for n in range(2000)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        socks = Sockets({u: floor.url for u in users}, users)
        opened = await socks.open(session)
        print(f"  {sockets:,} WebSockets open in {opened:.1f} s", flush=True)
        for rate in rates:
            await asyncio.sleep(2)
            cpu0 = [cpu_seconds(p) for p in floor.pids]
            t0 = time.perf_counter()
            res = await run_rate(floor, session, socks, items, rate, duration)  # type: ignore[arg-type]
            took = time.perf_counter() - t0
            res["server_cores"], res["broker_cores"] = (
                (cpu_seconds(p) - c) / took for p, c in zip(floor.pids, cpu0, strict=True)
            )
            out.append(res)
            print(
                f"  {rate:g} events/s: {res['events']:,} events, {res['pushes']:,} pushes | "
                f"p50 {res['p50_ms']:.1f} p90 {res['p90_ms']:.1f} "
                f"p99 {res['p99_ms']:.1f} max {res['max_ms']:.1f} ms | "
                f"server CPU {100 * res['server_cores']:.0f}%, "
                f"broker {100 * res['broker_cores']:.0f}%, "
                f"client {100 * res['client_cores']:.0f}% | "
                f"202 p50 {res['accept_p50_ms']:.1f} p99 {res['accept_p99_ms']:.1f} ms",
                flush=True,
            )
        socks.close()
    return out


def run_floor(workdir: Path, args: argparse.Namespace) -> list[Json]:
    """Start a broker and the floor server, drive it at every rate, stop both."""
    with EmbeddedBroker(workdir / "floor.log") as broker:
        assert broker._proc is not None
        asyncio.run(_create_topic(broker, "floor", 4))
        port = free_port()
        server_py = str(Path(__file__).with_name("_floor_server.py"))
        server = subprocess.Popen([sys.executable, server_py, broker.bootstrap, str(port), "floor"])
        try:
            if not wait_for_port("127.0.0.1", port, 30):
                raise RuntimeError("the floor server did not start")
            time.sleep(3)  # its consumer joins the group
            floor = _Floor(f"http://127.0.0.1:{port}", [server.pid, broker._proc.pid])
            return asyncio.run(floor_series(floor, args.rate, args.duration, args.sockets))
        finally:
            server.terminate()
            server.wait(10)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",")]

    p.add_argument(
        "--held",
        type=ints,
        default=[0, 5000, 10000, 20000],
        help="batches held before each probe (default 0,5000,10000,20000)",
    )
    p.add_argument(
        "--rate",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[300.0, 1000.0, 1000.0, 300.0],
        help="floor rates in events/s, run in turn (default 300,1000,1000,300)",
    )
    p.add_argument("--duration", type=float, default=15.0, help="seconds per rate (default 15)")
    p.add_argument("--sockets", type=int, default=1000, help="open WebSockets (default 1,000)")
    p.add_argument("--skip-held", action="store_true", help="run the floor only")
    p.add_argument("--skip-floor", action="store_true", help="run the held series only")
    p.add_argument("--json", help="write every figure to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out: Json = run_record(args)
    print(f"Embedded broker benchmark; {os.cpu_count()} CPUs ({out['cpu_model']})", flush=True)
    with tempfile.TemporaryDirectory(prefix="personify-broker-") as tmp:
        workdir = Path(tmp)
        if not args.skip_held:
            print("\n[held] produce cost as one partition fills (500 acknowledged produces each)")
            out["held"] = asyncio.run(held_series(workdir, args.held, consumer=True))
            out["held"] += asyncio.run(held_series(workdir, args.held, consumer=False))
        if not args.skip_floor:
            print(f"\n[floor] POST -> broker -> WebSocket, no processing, {args.sockets:,} sockets")
            out["floor"] = run_floor(workdir, args)
    print("\n" + "=" * 100)
    print(f"SUMMARY  {out['date']}  {out['cpus']} CPUs  {out['cpu_model']}  Python {out['python']}")
    for row in out.get("held", []):
        print(
            f"held {row['held']:>7,} batches, {'with' if row['consumer'] else 'no':>4} consumer: "
            f"produce {row['produce_ms']:.2f} ms, broker CPU {row['broker_cpu_ms']:.2f} ms"
        )
    for r in out.get("floor", []):
        print(
            f"floor {r['rate']:>6g} events/s: p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms | "
            f"server {100 * r['server_cores']:.0f}%, broker {100 * r['broker_cores']:.0f}%, "
            f"client {100 * r['client_cores']:.0f}%"
        )
    print("=" * 100)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
