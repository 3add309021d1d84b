"""Soak benchmark: steady shop traffic for many minutes, to see what drifts.

``.venv/bin/python bench/soak.py [--minutes 30] [--rate 200] [--sockets 1000]
[--visitors 100000] [--reads 50] [--items 3000] [--set SECTION__KEY=VALUE ...] [--json FILE]
[--plot FILE]`` runs one ``personify run`` subprocess on a fresh data directory with the
repository's ``config.toml`` (``--set`` overrides a setting, as ``PERSONIFY_SECTION__KEY``):

1. a synthetic catalog of ``--items`` products (the serving benchmark's) through
   ``POST /v1/items``, until every item is embedded; two views each for the ``--sockets``
   visitors, who then open a WebSocket (``GET /v1/ws``) each and read their first list;
2. for ``--minutes``, open loop: ``--rate`` events a second, one per ``POST /v1/events``: a
   share of them (the sockets' share of the visitors, at least 30%) a product view of a
   socket visitor with no event in flight, timed until their next ``recommendations``
   message; the rest a mix of views (55%), searches (20%), cart adds (15%) and purchases (10%)
   of ``--visitors`` visitors; and ``--reads`` ``GET /v1/users/{id}/recommendations`` a second
   for visitors who have sent events;
3. at the end, once the agents have caught up, 500 visitors sampled among those who sent
   events have their profile's counts compared with what was acknowledged.

Each minute prints and saves: events sent, POST p99, event-to-push p50/p99, read p99, errors
(answers other than 202/200, events that got no push within 10 s), the agents' lag, the event
loop's stalls (its 0.1 s timer woken over 0.1 s late) and seconds of delay in all, the resident
memory of the engine and of its embedded broker, the data directory's size on disk, and the
seconds of the training and tuning runs that ended in the minute. The
table goes to stdout, every figure to ``--json``, and a plot of them to ``--plot``. The verdict
lines check the goals of a shop running for weeks: push p99 under 50 ms in every minute, the
last minute's within 1.25x of minute 2's, memory and disk growing by under 5% over the last
10 minutes, no errors, every sampled visitor counted exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _proc import (
    add_settings_argument,
    disk_mib,
    run_record,
    settings_env,
    stage_line,
    stage_means_ms,
)
from push import NO_PUSH_S, Sockets
from serve import Engine, item_bodies, make_catalog, percentile, post_all

Json = dict[str, Any]
#: Event mix of the visitors without a socket.
MIX = (("product_view", 0.55), ("search", 0.20), ("add_to_cart", 0.15), ("purchase", 0.10))
QUERIES = ("lamp", "running shoes", "coffee", "desk", "blue shirt", "gift", "tent", "novel")
SAMPLED = 500


class Traffic:
    """The open-loop event generator and what it measured in the current minute."""

    def __init__(self, args: argparse.Namespace, items: list[str], socks: Sockets) -> None:
        self.args = args
        self.items = items
        self.socks = socks
        self.rng = random.Random(11)
        self.visitors = [f"soak-{n:06d}" for n in range(args.visitors)]
        self.sent: Counter[tuple[str, str]] = Counter()  # (visitor, type) -> acknowledged
        self.active: list[str] = []  # visitors with an acknowledged event (reads ask for them)
        self.active_set: set[str] = set()
        self.post_ms: list[float] = []
        self.read_ms: list[float] = []
        self.errors = 0
        self.no_push = 0
        self.events = 0

    def take_minute(self) -> Json:
        """This minute's figures; starts the next minute."""
        post, read = sorted(self.post_ms), sorted(self.read_ms)
        if self.args.trace:  # each timed push: when it arrived, and its latency
            with (self.args.trace / "pushes.tsv").open("a") as f:
                f.writelines(
                    f"{at:.3f}\t{ms:.2f}\n"
                    for at, ms in zip(self.socks.arrived_at, self.socks.latencies_ms, strict=True)
                )
        push = sorted(self.socks.latencies_ms)
        out = {
            "events": self.events,
            "post_p99_ms": percentile(post, 0.99),
            "push_p50_ms": percentile(push, 0.50),
            "push_p99_ms": percentile(push, 0.99),
            "push_mean_ms": sum(push) / len(push) if push else 0.0,
            "pushes_timed": len(push),
            "read_p99_ms": percentile(read, 0.99),
            "reads": len(read),
            "errors": self.errors,
            "no_push": self.no_push,
        }
        self.post_ms.clear()
        self.read_ms.clear()
        self.socks.latencies_ms.clear()
        self.socks.arrived_at.clear()
        self.errors = self.no_push = self.events = 0
        return out

    def event(self, n: int) -> tuple[str, Json]:
        """The ``n``-th event: (visitor, body); a socket visitor's view is timed."""
        rng = self.rng
        share = max(0.3, len(self.socks.users) / max(len(self.visitors), 1))
        if self.socks.users and rng.random() < share:
            now = time.perf_counter()
            for user in [u for u, t in self.socks.waiting.items() if now - t > NO_PUSH_S]:
                del self.socks.waiting[user]
                self.no_push += 1
            user = rng.choice(self.socks.users)
            if user not in self.socks.waiting:
                self.socks.waiting[user] = time.perf_counter()
                return user, {"type": "product_view", "user_id": user, "item_id": self._item()}
        user = rng.choice(self.visitors)
        kind = rng.choices([k for k, _w in MIX], weights=[w for _k, w in MIX])[0]
        body: Json = {"type": kind, "user_id": user}
        if kind == "search":
            body["properties"] = {"query": rng.choice(QUERIES)}
        elif kind == "add_to_cart":
            body |= {"item_id": self._item(), "properties": {"quantity": 1, "price": 9.5}}
        elif kind == "purchase":
            body |= {"item_id": self._item(), "properties": {"price": 19.0}}
        else:
            body["item_id"] = self._item()
        return user, body

    def _item(self) -> str:
        # Popular items get more traffic: a rough Zipf over the catalog.
        return self.items[min(int(self.rng.paretovariate(1.2)) - 1, len(self.items) - 1)]

    async def post(self, session: aiohttp.ClientSession, url: str, user: str, body: Json) -> None:
        """POST one event; count it for its visitor once acknowledged."""
        t = time.perf_counter()
        try:
            async with session.post(
                url + "/v1/events",
                data=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            ) as r:
                await r.read()
                ok = r.status == 202
        except aiohttp.ClientError:
            ok = False
        self.post_ms.append((time.perf_counter() - t) * 1000)
        if not ok:
            self.errors += 1
            self.socks.waiting.pop(user, None)
            return
        self.sent[(user, body["type"])] += 1
        if user not in self.active_set:
            self.active_set.add(user)
            self.active.append(user)

    async def read(self, session: aiohttp.ClientSession, url: str) -> None:
        """GET the list of a visitor who has sent events."""
        if not self.active:
            return
        user = self.rng.choice(self.active)
        t = time.perf_counter()
        try:
            async with session.get(f"{url}/v1/users/{user}/recommendations?k=10") as r:
                await r.read()
                ok = r.status == 200
        except aiohttp.ClientError:
            ok = False
        self.read_ms.append((time.perf_counter() - t) * 1000)
        if not ok:
            self.errors += 1


async def lag(eng: Engine, session: aiohttp.ClientSession) -> float:
    """The agents' lag (messages behind, summed over partitions)."""
    return agent_lag(await eng.metrics(session))


def agent_lag(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("personify_agent_lag"))


_LOOP = "personify_event_loop_delay_seconds"


def loop_totals(metrics: dict[str, float]) -> tuple[float, float]:
    """(timer wake-ups later than 0.1 s, seconds of delay in all) since the engine started."""
    late = metrics.get(_LOOP + "_count", 0.0) - metrics.get(_LOOP + '_bucket{le="0.1"}', 0.0)
    return late, metrics.get(_LOOP + "_sum", 0.0)


async def load(
    eng: Engine, session: aiohttp.ClientSession, args: argparse.Namespace, socks: Sockets
) -> list[str]:
    """The catalog (until embedded), two views for each socket visitor, and their sockets."""
    cat = make_catalog(args.items)
    items = [it["item_id"] for it in cat.items]
    t0 = time.perf_counter()
    _s, accepted, _r = await post_all(
        session, eng.url + "/v1/items", list(item_bodies(cat.items)), 2
    )
    while (await eng.metrics(session)).get("personify_items_encoded_total", 0.0) < accepted:
        if time.perf_counter() - t0 > 900:
            raise RuntimeError("the catalog was not embedded within 900 s")
        await asyncio.sleep(1.0)
    print(f"  {accepted:,} items embedded in {time.perf_counter() - t0:.0f} s", flush=True)
    history = [
        orjson.dumps(
            {
                "events": [
                    {"type": "product_view", "user_id": u, "item_id": items[(i * 7 + j) % 97]}
                    for i, u in enumerate(socks.users[n : n + 500])
                    for j in range(2)
                ]
            }
        )
        for n in range(0, len(socks.users), 500)
    ]
    await post_all(session, eng.url + "/v1/events", history, 2)
    while await lag(eng, session) > 0:  # noqa: ASYNC110 - polls the engine
        await asyncio.sleep(0.5)
    took = await socks.open(session)
    print(f"  {len(socks.users):,} sockets open, each with its first list, in {took:.0f} s")
    return items


def _trace_gc(path: Path) -> None:
    """Append each garbage collection of this process over 10 ms to ``path``."""
    started = [0.0]
    out = path.open("a", buffering=1)

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if took > 0.01:
            out.write(f"{time.time():.3f}\t{info['generation']}\t{took * 1000:.1f}\n")

    gc.callbacks.append(note)


async def soak(args: argparse.Namespace, eng: Engine, out: Json) -> None:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=60), connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        await eng.start(session)
        users = [f"soak-{n:06d}" for n in range(args.sockets)]
        socks = Sockets(dict.fromkeys(users, eng.url), users)
        print(f"[load] engine up in {eng.startup_s:.1f} s", flush=True)
        items = await load(eng, session, args, socks)
        traffic = Traffic(args, items, socks)
        # This client's own garbage collections would hold its loop, and the pushes that arrive
        # meanwhile would be timed late: what it set up is never scanned again, and with
        # --trace each pause over 10 ms is kept (client_gc.tsv).
        gc.freeze()
        if args.trace:
            _trace_gc(args.trace / "client_gc.tsv")
        data_dir = eng.workdir / "data"
        tasks: set[asyncio.Task[None]] = set()

        def spawn(coro: Any) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        print(
            f"\n[soak] {args.rate:g} events/s, {args.reads:g} reads/s, {args.sockets:,} sockets, "
            f"{args.visitors:,} visitors, {args.minutes} minutes"
        )
        header = (
            f"{'min':>3} {'events':>7} {'POST p99':>9} {'push p50':>9} {'push p99':>9} "
            f"{'read p99':>9} {'errors':>6} {'lag':>5} {'stalls':>6} {'stall s':>7} {'RSS eng':>8} "
            f"{'RSS brk':>8} {'disk':>7}"
        )
        print(header + "\n" + "-" * len(header), flush=True)
        minutes: list[Json] = out["minutes"]
        stage_seen = await eng.metrics(session)
        loop_seen = loop_totals(stage_seen)
        t0 = time.perf_counter()
        n = reads = 0
        for minute in range(1, args.minutes + 1):
            end = t0 + minute * 60.0
            while True:
                now = time.perf_counter()
                if now >= end:
                    break
                due_event = t0 + n / args.rate
                due_read = t0 + reads / args.reads if args.reads > 0 else float("inf")
                due = min(due_event, due_read)
                if due > now:
                    await asyncio.sleep(min(due, end) - now)
                    continue
                if due_event <= due_read:
                    user, body = traffic.event(n)
                    spawn(traffic.post(session, eng.url, user, body))
                    traffic.events += 1
                    n += 1
                else:
                    spawn(traffic.read(session, eng.url))
                    reads += 1
            row = traffic.take_minute()
            engine_rss, broker_rss = eng.rss_mib()
            metrics = await eng.metrics(session)
            late, delay_s = loop_totals(metrics)
            stages = stage_means_ms(stage_seen, metrics)
            background = {
                kind: round(
                    metrics.get(f'personify_background_seconds_total{{kind="{kind}"}}', 0.0)
                    - stage_seen.get(f'personify_background_seconds_total{{kind="{kind}"}}', 0.0),
                    1,
                )
                for kind in ("training", "tuning")
            }
            stage_seen = metrics
            row |= {
                "minute": minute,
                "lag": agent_lag(metrics),
                "loop_stalls": late - loop_seen[0],
                "loop_delay_s": round(delay_s - loop_seen[1], 2),
                "stages_ms": stages,
                "rocksdb_mib": sum(
                    v for k, v in metrics.items() if k.startswith("personify_rocksdb_memory_bytes{")
                )
                / 2**20,
                "lists_cached": metrics.get('personify_lists_cached{kind="user",what="lists"}', 0),
                "list_bytes_mib": metrics.get(
                    'personify_lists_cached{kind="user",what="body_bytes"}', 0
                )
                / 2**20,
                "trainings": metrics.get('personify_model_trainings_total{outcome="trained"}', 0),
                "model_interactions": metrics.get("personify_model_interactions", 0),
                "background_s": background,
                "rss_engine_mib": engine_rss,
                "rss_broker_mib": broker_rss,
                "disk_mib": disk_mib(data_dir),
            }
            loop_seen = (late, delay_s)
            minutes.append(row)
            print(
                f"{minute:>3} {row['events']:>7,} {row['post_p99_ms']:>7.1f}ms "
                f"{row['push_p50_ms']:>7.1f}ms {row['push_p99_ms']:>7.1f}ms "
                f"{row['read_p99_ms']:>7.1f}ms {row['errors'] + row['no_push']:>6} "
                f"{row['lag']:>5.0f} {row['loop_stalls']:>6.0f} {row['loop_delay_s']:>7.2f} "
                f"{engine_rss:>6.0f}Mi {broker_rss:>6.0f}Mi "
                f"{row['disk_mib']:>5.0f}Mi",
                flush=True,
            )
            print(
                f"    stages: {stage_line(stages, row['push_mean_ms'])}\n"
                f"    RocksDB {row['rocksdb_mib']:.0f} MiB; {row['lists_cached']:,.0f} lists in "
                f"memory ({row['list_bytes_mib']:.0f} MiB of JSON); model trained "
                f"{row['trainings']:.0f} times so far (last on "
                f"{row['model_interactions']:,.0f} interactions); ended this minute: "
                f"training {background['training']:.1f} s, tuning {background['tuning']:.1f} s",
                flush=True,
            )
            if args.json:
                args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        if tasks:  # the last posts and reads
            await asyncio.wait(set(tasks))
        socks.close()
        print("\n[check] waiting for the agents, then comparing sampled profiles", flush=True)
        for _ in range(600):
            if await lag(eng, session) == 0:
                break
            await asyncio.sleep(0.5)
        out["exact"] = await check_counts(session, eng.url, traffic)
        print(
            f"  {out['exact']['exact']}/{out['exact']['sampled']} sampled visitors counted "
            f"exactly ({out['exact']['events']:,} events acknowledged in all)"
        )


async def check_counts(session: aiohttp.ClientSession, url: str, traffic: Traffic) -> Json:
    """Compare sampled visitors' profile counts with the events acknowledged for them."""
    by_user: dict[str, Counter[str]] = {}
    for (user, kind), count in traffic.sent.items():
        by_user.setdefault(user, Counter())[kind] = count
    sample = random.Random(5).sample(sorted(by_user), min(SAMPLED, len(by_user)))
    wrong: list[Json] = []
    for _attempt in range(20):
        wrong = []
        for user in sample:
            async with session.get(f"{url}/v1/users/{user}") as r:
                profile = await r.json() if r.status == 200 else {}
            counts = profile.get("counts", {})
            expected = dict(by_user[user])
            if user in traffic.socks.users:  # their two views before the soak
                expected["product_view"] = expected.get("product_view", 0) + 2
            if {k: counts.get(k, 0) for k in expected} != expected:
                wrong.append({"user": user, "expected": expected, "counted": counts})
        if not wrong:
            break
        await asyncio.sleep(1.0)
    return {
        "sampled": len(sample),
        "exact": len(sample) - len(wrong),
        "events": sum(traffic.sent.values()),
        "wrong": wrong[:10],
    }


def verdict(out: Json) -> list[str]:
    """The goals, each with what was measured."""
    rows = out["minutes"]
    if len(rows) < 2:
        return ["too short for a verdict (2 minutes at least)"]
    worst = max(r["push_p99_ms"] for r in rows)
    drift = rows[-1]["push_p99_ms"] / max(rows[1]["push_p99_ms"], 1e-9)
    tail = rows[-11:] if len(rows) >= 12 else rows[1:] if len(rows) >= 3 else rows

    def growth(key: str) -> float:
        return tail[-1][key] / max(tail[0][key], 1e-9) - 1.0

    rss = growth("rss_engine_mib"), growth("rss_broker_mib")
    disk = growth("disk_mib")
    errors = sum(r["errors"] + r["no_push"] for r in rows)
    exact = out.get("exact", {})

    def mark(ok: bool) -> str:
        return "ok  " if ok else "MISS"

    return [
        f"{mark(worst < 50)} push p99 under 50 ms in every minute (worst {worst:.1f} ms)",
        f"{mark(drift <= 1.25)} last minute's push p99 within 1.25x of minute 2's ({drift:.2f}x)",
        f"{mark(max(rss) < 0.05)} memory over the last {len(tail) - 1} minutes: engine "
        f"{rss[0]:+.1%}, broker {rss[1]:+.1%}",
        f"{mark(disk < 0.05)} disk over the last {len(tail) - 1} minutes: {disk:+.1%}",
        f"{mark(errors == 0)} errors and events without a push: {errors}",
        f"{mark(exact.get('exact') == exact.get('sampled'))} sampled visitors counted exactly: "
        f"{exact.get('exact')}/{exact.get('sampled')}",
    ]


def plot(out: Json, path: Path) -> None:
    """Latencies, memory, disk and lag per minute, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["minutes"]
    x = [r["minute"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    ax = axes[0][0]
    for key, label in (
        ("push_p99_ms", "event -> push p99"),
        ("push_p50_ms", "event -> push p50"),
        ("post_p99_ms", "POST p99"),
        ("read_p99_ms", "read p99"),
    ):
        ax.plot(x, [r[key] for r in rows], marker=".", label=label)
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel("ms")
    ax.set_title("latency")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot(x, [r["rss_engine_mib"] for r in rows], marker=".", label="engine")
    ax.plot(x, [r["rss_broker_mib"] for r in rows], marker=".", label="embedded broker")
    ax.set_ylabel("MiB")
    ax.set_title("resident memory")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(x, [r["disk_mib"] for r in rows], marker=".")
    ax.set_ylabel("MiB")
    ax.set_title("data directory on disk")
    ax = axes[1][1]
    ax.plot(x, [r["lag"] for r in rows], marker=".")
    ax.set_ylabel("messages")
    ax.set_title("agents' lag at the minute's end")
    for ax in axes[1]:
        ax.set_xlabel("minute")
    a = out["args"]
    fig.suptitle(
        f"soak: {a['rate']:g} events/s, {a['reads']:g} reads/s, {a['sockets']:,} sockets, "
        f"{a['visitors']:,} visitors ({out['date']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--visitors", type=int, default=100_000)
    parser.add_argument("--reads", type=float, default=50.0, help="list reads per second")
    parser.add_argument("--items", type=int, default=3000)
    add_settings_argument(parser)
    parser.add_argument("--json", type=Path, metavar="FILE")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="a PNG of the minutes")
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="DIR",
        help="keep each push's arrival time and latency (pushes.tsv) and the engine's log at "
        "info level (personify.log) in DIR",
    )
    args = parser.parse_args(argv)
    if args.minutes < 1 or args.rate <= 0 or args.sockets < 0 or args.visitors < 1:
        parser.error("--minutes, --rate and --visitors must be positive, --sockets >= 0")
    if args.sockets > args.visitors:
        parser.error("--sockets cannot exceed --visitors")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="personify-soak-"))
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        (args.trace / "pushes.tsv").write_text("")
    eng = Engine(
        workdir, log_level="info" if args.trace else "warning", extra_env=settings_env(args.set)
    )
    out: Json = run_record(args) | {"minutes": []}
    try:
        asyncio.run(soak(args, eng, out))
    except KeyboardInterrupt:
        print("\ninterrupted: the minutes so far are kept", file=sys.stderr)
    finally:
        code = eng.stop()
        out["engine_exit_code"] = code
        if code not in (0, None):
            print(eng.log_tail(), file=sys.stderr)
        if args.trace:
            shutil.copy(eng.log_path, args.trace / "personify.log")
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    for line in verdict(out):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    if args.plot and out["minutes"]:
        plot(out, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
