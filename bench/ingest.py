"""Ingestion benchmark: Personify against a naive Faust agent, measured in the same run.

``.venv/bin/python bench/ingest.py [--events 200000] [--users 20000] [--rate 1000,100]
[--duration 30] [--changelog] [--repeat N]`` runs, one after the other on this machine:

1. the baseline: a minimal Faust worker (``bench/_naive_app.py``, a subprocess with its own
   embedded Tansu broker) that does one RocksDB table get + set per single-event message,
   and the same worker without a table (Faust's per-message ceiling). Their topic is
   pre-loaded before the worker starts; the rate is from the first event to the last, timed
   inside the worker, and the table is read back to prove every event was counted;
2. ``personify run`` (a subprocess on a fresh data directory and a free port), fed only
   through its public interfaces:

   a. the ``events`` topic, ``{"events": [...]}`` messages of ``--batch`` events (aiokafka);
      with ``--repeat N``, N times in a row on the one engine (new events for the same
      visitors each time), each run's rate printed against the first's. After each run the
      engine's footprint is printed against the empty engine's (taken 10 s after /healthz):
      resident memory and the data directory on disk, per 1M visitors seen (``--users``
      sets how many);
   b. the ``events`` topic, one event per message;
   c. ``POST /v1/events`` with ``--batch`` events per request, ``--http-concurrency`` at once;

   each time the events are written as fast as the client can and "applied" is read from
   ``personify_events_applied_total`` on ``GET /metrics`` (polled every 20 ms): the steady
   rate is from the first poll that saw progress to the poll that saw the last event. If (a)
   stalls, (a2) repeats it with a producer kept within ``--window`` events of the worker, and
   a run that fails is followed by a fresh engine;
3. latency: single-event POSTs on an open-loop schedule (each ``--rate``, by default 1,000
   and then 100 per second, for ``--duration`` seconds each), every one for a new visitor, so
   its profile exists once it is applied. Timed from the scheduled send to the 202, and from
   the 202 to the profile: ``GET /v1/users/{id}`` is polled every ``--poll-ms`` (or every 20%
   of the time waited, if longer; at most ``--get-budget`` GETs a second in all) for about
   ``--probes-per-s`` sampled events a second, which brackets the moment of the write (the
   last 404 sent, the first 200 back). Overload is judged from ``GET /metrics`` (every
   100 ms): applied against accepted events. This works with the default configuration,
   where the embedded broker has no table changelogs; ``--changelog`` runs the latency part
   on a fresh engine with ``PERSONIFY_STORAGE__CHANGELOG=on`` and also times every event by
   its record on the profiles changelog (figures labelled "changelog on").

Every event is valid (``personify.engine.models.validate_event``) and carries an event id, so
``personify_events_duplicate_total`` and the rejected counters must stay at zero. Figures go
to stdout with their ratio to the naive agent; ``--json FILE`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson
from _proc import (
    add_settings_argument,
    children,
    cpu_seconds,
    disk_mib,
    parse_metrics,
    run_record,
    settings_env,
    status_kb,
)
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from segments import stress_rules

from personify.engine.broker import EmbeddedBroker, free_port
from personify.engine.config import load_config
from personify.engine.models import validate_event
from personify.engine.publisher import partition_for

REPO = Path(__file__).resolve().parent.parent
NAIVE_APP = Path(__file__).resolve().with_name("_naive_app.py")
PERSONIFY = str(Path(sys.executable).with_name("personify"))
GOAL_EVENTS_PER_S = 30_000

Event = dict[str, Any]

_CATEGORIES = [
    "outdoor/jackets",
    "outdoor/tents",
    "outdoor/boots",
    "home/kitchen/knives",
    "home/kitchen/pans",
    "home/bedding",
    "electronics/audio/headphones",
    "electronics/audio/speakers",
    "electronics/phones",
    "electronics/laptops",
    "fashion/women/dresses",
    "fashion/men/shirts",
    "fashion/shoes/sneakers",
    "sports/cycling",
    "sports/running",
    "toys/lego",
    "beauty/skincare",
    "books/fiction",
    "books/cooking",
    "garden/tools",
]
_QUERIES = ["rain jacket", "tent 2 person", "chef knife", "noise cancelling", "running shoes"]
_TYPES = ["product_view", "search", "add_to_cart", "purchase", "page_view"]
_TYPE_WEIGHTS = [0.60, 0.15, 0.15, 0.05, 0.05]
_ITEMS = 5000


# -- events --------------------------------------------------------------------------------
def make_events(
    n: int,
    users: int,
    prefix: str,
    seed: int,
    *,
    unique_users: bool = False,
    user_prefix: str | None = None,
) -> list[Event]:
    """``n`` valid wire events from ``users`` visitors (ids ``{prefix}u{k}``), oldest first.

    Visitors are drawn uniformly at random, so consecutive events rarely share a visitor. With
    ``unique_users`` every event has a visitor of its own and no timestamp (the server's now).
    ``user_prefix`` (default ``prefix``) starts the visitor ids, so that several sets of events
    can share visitors.
    """
    uprefix = prefix if user_prefix is None else user_prefix
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - 600_000  # spread over the last ten minutes
    types = rng.choices(_TYPES, _TYPE_WEIGHTS, k=n)
    out: list[Event] = []
    for i, etype in enumerate(types):
        user = f"{uprefix}u{i}" if unique_users else f"{uprefix}u{rng.randrange(users)}"
        item = rng.randrange(_ITEMS)
        item_id = f"sku-{item}"
        price = float(5 + (item * 37) % 400)
        category = _CATEGORIES[item % len(_CATEGORIES)]
        ev: Event = {"event_id": f"{prefix}e{i}", "type": etype, "user_id": user}
        if not unique_users:
            ev["ts"] = start_ms + (i * 600_000) // max(n, 1)
        if etype == "product_view":
            ev["item_id"] = item_id
            ev["properties"] = {"category": category, "price": price}
        elif etype == "add_to_cart":
            ev["item_id"] = item_id
            ev["properties"] = {"category": category, "quantity": 1 + item % 3, "price": price}
        elif etype == "purchase":
            lines = [
                {"item_id": item_id, "quantity": 1, "price": price, "category": category},
                {"item_id": f"sku-{(item + 7) % _ITEMS}", "quantity": 2, "price": 9.5},
            ]
            ev["properties"] = {"items": lines, "currency": "EUR", "category": category}
        elif etype == "search":
            ev["properties"] = {
                "query": _QUERIES[item % len(_QUERIES)],
                "filters": {"category": category},
            }
        else:
            ev["properties"] = {"category": category, "path": f"/c/{category}"}
        out.append(ev)
    return out


def check_valid(events: Sequence[Event]) -> None:
    """Fail early if the generator ever produces an event the product would reject."""
    cfg = load_config(REPO / "config.toml").events
    now_ms = int(time.time() * 1000)
    for ev in events:
        validate_event(dict(ev), cfg, now_ms)


def chunks(items: Sequence[Event], size: int) -> Iterator[Sequence[Event]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- processes -----------------------------------------------------------------------------


@dataclass
class CpuMeter:
    """CPU used by some processes between `start` and `stop`, in cores (1.0 = one core)."""

    pids: dict[str, int]
    t0: float = 0.0
    c0: dict[str, float] = field(default_factory=dict)
    cores: dict[str, float] = field(default_factory=dict)

    def start(self) -> CpuMeter:
        """Take the starting figures."""
        self.t0 = time.perf_counter()
        self.c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        """Cores used by each process since `start`."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.cores = {
            name: (cpu_seconds(pid) - self.c0[name]) / dt for name, pid in self.pids.items()
        }
        return self.cores


def fmt_cpu(cores: dict[str, float]) -> str:
    return ", ".join(f"{name} {100 * c:.0f}%" for name, c in cores.items())


# -- Kafka helpers -------------------------------------------------------------------------
async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        )
    finally:
        await admin.close()


async def produce(
    bootstrap: str, topic: str, records: Sequence[tuple[int, bytes | None, bytes]]
) -> float:
    """Send ``(partition, key, value)`` records in large batches; return the seconds taken."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        max_batch_size=1 << 20,
        max_request_size=4 << 20,
        linger_ms=5,
        acks=1,
    )
    await producer.start()
    try:
        t0 = time.perf_counter()
        batches: dict[int, Any] = {}
        futures: list[asyncio.Future[Any]] = []
        for partition, key, value in records:
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = batches[partition] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise RuntimeError(f"a message of {len(value)} bytes fits in no batch")
        for partition, batch in batches.items():
            if batch.record_count():
                futures.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)
        return time.perf_counter() - t0
    finally:
        await producer.stop()


def single_records(
    events: Sequence[Event], partitions: int
) -> list[tuple[int, bytes | None, bytes]]:
    """One message per event, keyed and partitioned by visitor (as a Kafka client would)."""
    return [
        (partition_for(ev["user_id"], partitions), ev["user_id"].encode(), orjson.dumps(ev))
        for ev in events
    ]


def batch_records(
    events: Sequence[Event], size: int, partitions: int
) -> list[tuple[int, bytes | None, bytes]]:
    """``{"events": [...]}`` messages of ``size`` events, spread round-robin."""
    return [
        (i % partitions, f"batch-{i}".encode(), orjson.dumps({"events": list(group)}))
        for i, group in enumerate(chunks(events, size))
    ]


# -- the naive baseline ----------------------------------------------------------------------
@dataclass
class NaiveResult:
    """What the naive worker reported, with what the benchmark saw of it."""

    mode: str
    events: int
    seconds: float
    rate: float
    cpu: dict[str, float]
    rss_kb: int
    startup_s: float
    table_sum: int | None = None
    table_keys: int | None = None


async def run_naive(
    mode: str, events: Sequence[Event], workdir: Path, partitions: int
) -> NaiveResult:
    """Pre-load ``events`` into a fresh broker, then time the naive worker over all of them."""
    broker = EmbeddedBroker(workdir / f"naive-{mode}-broker.log")
    broker.start()
    try:
        topic = f"naive-{mode}-events"
        await create_topics(broker.bootstrap, [topic], partitions)
        await produce(broker.bootstrap, topic, single_records(events, partitions))
        log_path = workdir / f"naive-{mode}.log"
        with open(log_path, "wb") as log:  # noqa: ASYNC230 - opening a log is instant
            cmd = [
                sys.executable,
                str(NAIVE_APP),
                "--broker",
                broker.url,
                "--topic",
                topic,
                "--mode",
                mode,
                "--expect",
                str(len(events)),
                "--datadir",
                str(workdir / f"naive-{mode}-data"),
                "--partitions",
                str(partitions),
                "--app-id",
                f"naive-{mode}",
            ]
            t_start = time.perf_counter()
            proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                cmd, stdout=subprocess.PIPE, stderr=log, cwd=workdir
            )
            meter = CpuMeter({"worker": proc.pid, "broker": broker.pid or 0})
            assert proc.stdout is not None
            loop = asyncio.get_running_loop()
            deadline = time.perf_counter() + 60 + len(events) / 500
            line = b""
            with contextlib.suppress(TimeoutError):
                while b"NAIVE_RESULT" not in line:
                    line = await asyncio.wait_for(
                        loop.run_in_executor(None, proc.stdout.readline),
                        max(deadline - time.perf_counter(), 0.1),
                    )
                    if b"NAIVE_FIRST" in line:  # (after a terminal escape, maybe)
                        meter.start()
                    if not line and proc.poll() is not None:
                        break
            cpu = meter.stop() if meter.c0 else {}
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if b"NAIVE_RESULT" not in line:
            tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
            raise RuntimeError(f"naive worker ({mode}) gave no result; its log ends:\n{tail}")
        res = json.loads(line.split(b"NAIVE_RESULT", 1)[1])
        seconds = float(res["seconds"])
        return NaiveResult(
            mode=mode,
            events=int(res["events"]),
            seconds=seconds,
            rate=(int(res["events"]) - 1) / seconds,
            cpu=cpu,
            rss_kb=int(res.get("peak_rss_kb", 0)),
            startup_s=time.perf_counter() - t_start - seconds,
            table_sum=res.get("table_sum"),
            table_keys=res.get("table_keys"),
        )
    finally:
        broker.stop()


APPLIED = "personify_events_applied_total"


@dataclass
class Personify:
    """A ``personify run`` subprocess on a fresh data directory and a free port."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    bootstrap: str = ""
    broker_pid: int = 0
    startup_s: float = 0.0
    #: ``PERSONIFY_*`` settings for the process (the caller's own are not passed on).
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The API's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the process's output goes."""
        return self.workdir / "personify.log"

    def log_text(self) -> str:
        """The process's output so far."""
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def crash_reason(self, since: int = 0) -> str | None:
        """The first agent crash or error logged after byte ``since`` of the log, if any."""
        text = self.log_text()[since:]
        found = re.search(r"Crashed reason=(.{0,300})", text)
        if found:
            return found.group(1).split(" _from_structlog")[0]
        errors = re.findall(r"^\S+Z \[error\s*\] (.{0,80}?)\s{2,}.*$", text, re.MULTILINE)
        cause = re.search(r"^(\w+Error: .{0,200})$", text, re.MULTILINE)
        if errors:
            detail = f": {cause.group(1)}" if cause else ""
            return f"{len(errors)} errors logged, the first: {errors[0].strip()}{detail}"
        return None

    async def start(self, session: aiohttp.ClientSession, limit_s: float = 90.0) -> None:
        """Start the process and wait until /healthz answers 200."""
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONIFY_")}
        env.update(self.extra_env)
        cmd = [PERSONIFY, "run", "--config", str(REPO / "config.toml")]
        cmd += ["--data-dir", str(self.workdir / "data"), "--port", str(self.port)]
        cmd += ["--log-level", "warning"]
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:  # noqa: ASYNC230 - before anything runs
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env
            )
        while time.perf_counter() < t0 + limit_s:
            if self.proc.poll() is not None:
                tail = self.log_text()[-3000:]
                raise RuntimeError(f"personify exited with {self.proc.returncode}:\n{tail}")
            if not self.bootstrap:
                found = re.search(r"Embedded broker listening on (\S+)", self.log_text())
                if found:
                    self.bootstrap = found.group(1)
            if self.bootstrap:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            self.startup_s = time.perf_counter() - t0
                            kids = children(self.proc.pid)
                            self.broker_pid = kids[0] if kids else 0
                            return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"personify not healthy after {limit_s:g} s:\n{self.log_text()[-3000:]}")

    def stop(self) -> int | None:
        """SIGTERM, wait (SIGKILL after 30 s); return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    @property
    def pids(self) -> dict[str, int]:
        """The processes whose CPU is metered: Personify, its broker, this benchmark."""
        assert self.proc is not None
        return {"personify": self.proc.pid, "broker": self.broker_pid, "bench": os.getpid()}

    async def metrics(
        self, session: aiohttp.ClientSession, names: Sequence[str] = ()
    ) -> dict[str, float]:
        """GET /metrics, parsed: all of them, or only the samples ``names``."""
        query = [("name[]", name.partition("{")[0]) for name in names]
        async with session.get(self.url + "/metrics", params=query) as resp:
            return parse_metrics(await resp.text())


@dataclass
class Applied:
    """How a run of events reached the profiles, from polls of /metrics."""

    events: int
    applied: int
    start_t: float  # the client started sending (perf_counter)
    first_t: float  # the first poll that saw progress
    first_count: int
    last_t: float  # the poll that saw the last event (or the last poll, on a stall)

    @property
    def steady_rate(self) -> float:
        """Events applied per second from the first poll that saw progress to the last one."""
        return (self.applied - self.first_count) / max(self.last_t - self.first_t, 1e-9)

    @property
    def end_to_end_rate(self) -> float:
        """Events applied per second from the first send to the last event applied."""
        return self.applied / max(self.last_t - self.start_t, 1e-9)

    @property
    def complete(self) -> bool:
        """Whether every event was applied."""
        return self.applied >= self.events


class Progress:
    """Polls ``personify_events_applied_total`` in the background (relative to a base)."""

    def __init__(self, eng: Personify, session: aiohttp.ClientSession, interval: float) -> None:
        self.eng = eng
        self.session = session
        self.interval = interval
        self.base = 0.0
        self.applied = 0
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Progress:
        self.base = (await self.eng.metrics(self.session, [APPLIED])).get(APPLIED, 0.0)
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            applied = (await self.eng.metrics(self.session, [APPLIED])).get(APPLIED, 0.0)
            self.applied = int(applied - self.base)
            self.samples.append((time.perf_counter(), self.applied))
            await asyncio.sleep(self.interval)

    async def wait(self, n: int, start_t: float, stall_s: float) -> Applied:
        """Wait until ``n`` events are applied, or until none was applied for ``stall_s``."""
        last_change = time.perf_counter()
        seen = 0
        while self.applied < n:
            if self.applied != seen:
                seen, last_change = self.applied, time.perf_counter()
            if time.perf_counter() - last_change > stall_s:
                break
            await asyncio.sleep(self.interval / 2)
        samples = list(self.samples)
        moving = [(t, a) for t, a in samples if a > 0]
        first_t, first_count = moving[0] if moving else samples[-1]
        done = [(t, a) for t, a in samples if a >= n]
        last_t, last = done[0] if done else samples[-1]
        if not done:  # stalled: the time of the last progress
            last_t = next((t for t, a in samples if a == last), last_t)
        return Applied(n, last, start_t, first_t, first_count, last_t)


@dataclass
class Run:
    """One throughput run against Personify."""

    name: str
    events: int
    messages: int
    send_s: float
    applied: Applied
    cpu: dict[str, float]
    accepted: int = 0
    failure: str | None = None

    @property
    def rate(self) -> float:
        """The steady applied rate."""
        return self.applied.steady_rate

    @property
    def send_rate(self) -> float:
        """Events written (or accepted over HTTP) per second."""
        return (self.accepted or self.events) / max(self.send_s, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready data."""
        a = self.applied
        return {
            "name": self.name,
            "events": self.events,
            "messages": self.messages,
            "send_s": self.send_s,
            "send_rate": self.send_rate,
            "accepted": self.accepted,
            "applied": a.applied,
            "steady_rate": a.steady_rate,
            "end_to_end_rate": a.end_to_end_rate,
            "first_send_to_last_applied_s": a.last_t - a.start_t,
            "cpu": self.cpu,
            "failure": self.failure,
        }


async def run_topic(
    eng: Personify,
    session: aiohttp.ClientSession,
    name: str,
    records: list[tuple[int, bytes | None, bytes]],
    n_events: int,
    *,
    window: int | None = None,
    per_record: int = 1,
    stall_s: float = 6.0,
) -> Run:
    """Write ``records`` to the events topic and time them into the profiles.

    With ``window``, the producer keeps at most that many events written but not yet applied
    (a producer slower than the worker); without, it writes everything at once.
    """
    log_at = len(eng.log_text())
    async with Progress(eng, session, 0.02) as progress:
        meter = CpuMeter(eng.pids).start()
        t0 = time.perf_counter()
        if window is None:
            sending = asyncio.create_task(produce(eng.bootstrap, "events", records))
        else:
            sending = asyncio.create_task(
                produce_paced(eng.bootstrap, "events", records, per_record, window, progress)
            )
        applied = await progress.wait(n_events, t0, stall_s)
        if not applied.complete and not sending.done():
            sending.cancel()  # a paced producer would wait for the stalled worker forever
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        send_s = sending.result() if not sending.cancelled() else time.perf_counter() - t0
        cpu = meter.stop()
    failure = None
    if not applied.complete:
        reason = eng.crash_reason(log_at) or "no agent crash logged"
        failure = f"stalled at {applied.applied:,}/{n_events:,} applied; {reason}"
    return Run(name, n_events, len(records), send_s, applied, cpu, failure=failure)


async def produce_paced(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[int, bytes | None, bytes]],
    per_record: int,
    window: int,
    progress: Progress,
) -> float:
    """Send records while fewer than ``window`` events are written but not yet applied."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, max_batch_size=1 << 20, max_request_size=4 << 20, linger_ms=1
    )
    await producer.start()
    try:
        t0 = time.perf_counter()
        futures = []
        for i, (partition, key, value) in enumerate(records):
            while (i + 1) * per_record - progress.applied > window:  # noqa: ASYNC110 - polled
                await asyncio.sleep(0.002)
            futures.append(await producer.send(topic, value, key=key, partition=partition))
        await asyncio.gather(*futures)
        return time.perf_counter() - t0
    finally:
        await producer.stop()


async def run_http(
    eng: Personify,
    session: aiohttp.ClientSession,
    events: Sequence[Event],
    batch: int,
    concurrency: int,
    stall_s: float = 6.0,
) -> Run:
    """POST ``events`` in batches, ``concurrency`` requests at a time; time them to profiles."""
    bodies = [orjson.dumps({"events": list(group)}) for group in chunks(events, batch)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    totals = {"accepted": 0, "failed": 0}
    headers = {"Content-Type": "application/json"}

    async def poster() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(eng.url + "/v1/events", data=body, headers=headers) as r:
                doc = await r.json()
                if r.status == 202:
                    totals["accepted"] += int(doc["accepted"])
                    totals["failed"] += len(doc["rejected"])
                else:
                    totals["failed"] += batch
                    print(f"  ! POST answered {r.status}: {str(doc)[:200]}", flush=True)

    async def post_all() -> float:
        await asyncio.gather(*(poster() for _ in range(concurrency)))
        return time.perf_counter() - t0

    log_at = len(eng.log_text())
    async with Progress(eng, session, 0.02) as progress:
        meter = CpuMeter(eng.pids).start()
        t0 = time.perf_counter()
        posting = asyncio.create_task(post_all())
        applied = await progress.wait(len(events), t0, stall_s)
        post_s = await posting
        cpu = meter.stop()
    failure = None
    if not applied.complete or totals["failed"]:
        failure = (
            f"{totals['failed']} events not accepted; {applied.applied:,} applied; "
            f"{eng.crash_reason(log_at) or 'no agent crash logged'}"
        )
    return Run(
        f"HTTP {batch}/POST",
        len(events),
        len(bodies),
        post_s,
        applied,
        cpu,
        accepted=totals["accepted"],
        failure=failure,
    )


# -- latency -------------------------------------------------------------------------------
ACCEPTED_HTTP = 'personify_events_accepted_total{source="http"}'
CHANGELOG_ENV = "PERSONIFY_STORAGE__CHANGELOG"
#: Latency GET polls: the interval grows to this fraction of the time already waited.
POLL_GROWTH = 0.2
#: GETs the polls may send at once beyond their budget per second.
GET_BURST = 10


def changelog_on(eng: Personify | None) -> bool:
    """Whether ``eng`` was started with its table changelogs forced on (the default: off)."""
    return eng is not None and eng.extra_env.get(CHANGELOG_ENV, "").lower() == "on"


async def drain(consumer: AIOKafkaConsumer, limit_s: float = 20.0) -> None:
    """Move ``consumer`` to the true end of its partitions.

    Tansu answers ListOffsets(latest) too low (measured: ~1,900 records short per partition),
    so `seek_to_end` is only a start: read on until the position reaches the high-water mark
    that fetch responses carry.
    """
    await consumer.seek_to_end()
    tps = list(consumer.assignment())
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        await consumer.getmany(timeout_ms=100, max_records=50_000)
        behind = 0
        for tp in tps:
            hw = consumer.highwater(tp)
            behind += 1 if hw is None else max(hw - await consumer.position(tp), 0)
        if not behind:
            return
    print("  ! the changelog consumer did not catch up; changelog figures are late", flush=True)


class Counters:
    """Polls HTTP-accepted and applied events from ``GET /metrics``, relative to a base."""

    def __init__(self, eng: Personify, session: aiohttp.ClientSession, interval: float) -> None:
        self.eng = eng
        self.session = session
        self.interval = interval
        self.base = (0.0, 0.0)
        self.accepted = 0
        self.applied = 0
        self.backlog_max = 0
        self.polls = 0
        self._task: asyncio.Task[None] | None = None

    async def poll(self) -> tuple[int, int]:
        """Read the counters now; return ``(accepted, applied)`` since the base."""
        m = await self.eng.metrics(self.session, [ACCEPTED_HTTP, APPLIED])
        self.polls += 1
        self.accepted = int(m.get(ACCEPTED_HTTP, 0.0) - self.base[0])
        self.applied = int(m.get(APPLIED, 0.0) - self.base[1])
        self.backlog_max = max(self.backlog_max, self.accepted - self.applied)
        return self.accepted, self.applied

    async def __aenter__(self) -> Counters:
        m = await self.eng.metrics(self.session, [ACCEPTED_HTTP, APPLIED])
        self.base = (m.get(ACCEPTED_HTTP, 0.0), m.get(APPLIED, 0.0))
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.interval)


@dataclass
class Latency:
    """Single-event POSTs on an open-loop schedule, each for a new visitor."""

    offered_rate: float
    planned: int
    sent: int
    accepted: int  # 202s the benchmark received
    errors: int
    send_window_s: float  # first scheduled send -> last send
    metrics_accepted: int  # accepted (HTTP) during the send window, from /metrics
    metrics_applied: int  # applied during the send window, from /metrics
    backlog_max: int  # most accepted-but-not-applied events seen on /metrics
    caught_up_s: float | None  # last send -> /metrics shows every accepted event applied
    overloaded: str  # why the run counts as overloaded; empty if it does not
    stopped_early: bool
    post_ms: list[float]  # scheduled send -> 202
    ack_to_get_ms: list[float]  # 202 -> the first GET answering 200 came back (upper bound)
    ack_to_get_lower_ms: list[float]  # 202 -> the last GET answering 404 was sent (lower bound)
    sched_to_get_ms: list[float]  # scheduled send -> the first GET answering 200 came back
    get_timeline: list[tuple[float, float]]  # (s after the first send, 202 -> profile ms)
    sample_every: int
    poll_ms: float
    get_budget: float  # most GETs per second the polls may send (bursts of GET_BURST)
    samples: int
    missing_get: int
    get_requests: int
    get_errors: int
    metrics_polls: int
    probe_s: float  # from the first scheduled send to the last GET poll
    changelog: bool  # whether the engine wrote the changelog (and it was watched)
    ack_to_log_ms: list[float]  # 202 -> profile write seen on the changelog (every event)
    sched_to_log_ms: list[float]
    missing_log: int
    cpu: dict[str, float]

    @property
    def accepted_rate(self) -> float:
        """Events accepted (HTTP 202) per second while the schedule ran, from /metrics."""
        return self.metrics_accepted / max(self.send_window_s, 1e-9)

    @property
    def applied_rate(self) -> float:
        """Events folded into profiles per second while the schedule ran, from /metrics."""
        return self.metrics_applied / max(self.send_window_s, 1e-9)

    @property
    def get_rate(self) -> float:
        """Profile GETs per second that the sampling added."""
        return self.get_requests / max(self.probe_s, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready data."""

        def dist(v: Sequence[float]) -> dict[str, float]:
            return {
                "p50": pct(v, 50),
                "p90": pct(v, 90),
                "p99": pct(v, 99),
                "max": max(v, default=float("nan")),
                "n": len(v),
            }

        out = {
            "offered_rate": self.offered_rate,
            "planned": self.planned,
            "sent": self.sent,
            "accepted": self.accepted,
            "errors": self.errors,
            "send_window_s": self.send_window_s,
            "accepted_rate": self.accepted_rate,
            "applied_rate": self.applied_rate,
            "backlog_max": self.backlog_max,
            "caught_up_s": self.caught_up_s,
            "overloaded": self.overloaded,
            "stopped_early": self.stopped_early,
            "scheduled_to_202_ms": dist(self.post_ms),
            "ack_to_get_ms": dist(self.ack_to_get_ms),
            "ack_to_get_lower_bound_ms": dist(self.ack_to_get_lower_ms),
            "scheduled_to_get_ms": dist(self.sched_to_get_ms),
            "get_timeline": self.get_timeline,
            "sample_every": self.sample_every,
            "poll_ms": self.poll_ms,
            "get_budget": self.get_budget,
            "samples": self.samples,
            "missing_get": self.missing_get,
            "get_requests": self.get_requests,
            "get_errors": self.get_errors,
            "get_rate": self.get_rate,
            "metrics_polls": self.metrics_polls,
            "changelog": self.changelog,
            "cpu": self.cpu,
        }
        if self.changelog:
            out["ack_to_changelog_ms"] = dist(self.ack_to_log_ms)
            out["scheduled_to_changelog_ms"] = dist(self.sched_to_log_ms)
            out["missing_changelog"] = self.missing_log
        return out


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def run_latency(
    eng: Personify,
    session: aiohttp.ClientSession,
    rate: float,
    duration: float,
    prefix: str,
    *,
    sample_every: int,
    poll_ms: float,
    get_budget: float,
    changelog: bool = False,
    metrics_s: float = 0.1,
    max_backlog_s: float = 2.0,
    min_applied_ratio: float = 0.95,
) -> Latency:
    """Open-loop single-event POSTs; time sampled events until their profile exists.

    Every event has a visitor of its own, so "the profile exists" means "the event is applied".
    For one event in ``sample_every``, ``GET /v1/users/{id}`` is polled from its 202 on, one
    request every ``poll_ms`` (or every `POLL_GROWTH` of the time waited, if longer), until it
    answers 200: the profile was written after the last 404 was sent (or the 202) and before
    the 200 came back, which bounds the time from below and above. All polls together send at
    most ``get_budget`` GETs per second (a poll waits for its turn: the bracket widens, the
    load on the engine does not grow with its latency). With ``changelog`` (an
    engine started with the changelog on), the profile's record on the table's changelog
    topic also times every event.

    Overload is judged from ``GET /metrics`` (polled every ``metrics_s``): the schedule stops
    early when more than ``max_backlog_s`` seconds of accepted events wait to be applied (or of
    requests wait for their 202), and a run whose applied rate stays below
    ``min_applied_ratio`` of its accepted rate is overloaded too.
    """
    n = int(rate * duration)
    events = make_events(n, 0, prefix, seed=7, unique_users=True)
    bodies = [orjson.dumps(ev) for ev in events]
    headers = {"Content-Type": "application/json"}
    sched = [0.0] * n
    acked = [0.0] * n
    seen_get = [0.0] * n
    last_miss = [0.0] * n
    seen_log = [0.0] * n
    counts = {"errors": 0, "gets": 0, "get_errors": 0, "open": 0, "acked": 0}
    probe_end = [0.0]
    gate = [0.0]  # the GET budget's theoretical arrival time
    done = asyncio.Event()

    consumer: AIOKafkaConsumer | None = None
    if changelog:
        name = f"{load_config(REPO / 'config.toml').worker.app_id}-profiles-changelog"
        consumer = AIOKafkaConsumer(
            name,
            bootstrap_servers=eng.bootstrap,
            group_id=None,
            auto_offset_reset="latest",
            enable_auto_commit=False,
            fetch_max_wait_ms=5,
            max_partition_fetch_bytes=8 << 20,
        )
        await consumer.start()
        await drain(consumer)
    index = {ev["user_id"].encode(): i for i, ev in enumerate(events)}

    async def watch_changelog() -> None:
        assert consumer is not None
        while not done.is_set():
            batches = await consumer.getmany(timeout_ms=50, max_records=10_000)
            now = time.perf_counter()
            for records in batches.values():
                for rec in records:
                    i = index.get(rec.key)
                    if i is not None and not seen_log[i]:
                        seen_log[i] = now

    async def poll_get(i: int) -> None:
        # The first GET one interval after the 202 (the event has only just reached the
        # broker); then every `poll_ms`, or every POLL_GROWTH of the time waited so far if that
        # is longer: a bracket within ~20% at most a few dozen GETs per event, even when slow.
        url = f"{eng.url}/v1/users/{events[i]['user_id']}"
        start = last_miss[i] = acked[i]
        next_at = start + poll_ms / 1000
        while True:
            # The GET budget, a token bucket (GCRA): bursts of GET_BURST, then 1/get_budget.
            slot = max(next_at, gate[0] - GET_BURST / get_budget)
            gate[0] = max(gate[0], slot) + 1 / get_budget
            await asyncio.sleep(max(slot - time.perf_counter(), 0.0))
            sent_at = time.perf_counter()
            if sent_at > start + 10:
                return
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    status = resp.status
            except aiohttp.ClientError:
                status = 0
            counts["gets"] += 1
            now = probe_end[0] = time.perf_counter()
            if status == 200:
                seen_get[i] = now
                return
            if status == 404:
                last_miss[i] = sent_at
            else:
                counts["get_errors"] += 1
            next_at = sent_at + max(poll_ms / 1000, POLL_GROWTH * (sent_at - start))

    async def post(i: int) -> None:
        counts["open"] += 1
        try:
            async with session.post(eng.url + "/v1/events", data=bodies[i], headers=headers) as r:
                await r.read()
                if r.status == 202:
                    acked[i] = time.perf_counter()
                    counts["acked"] += 1
                else:
                    counts["errors"] += 1
        except aiohttp.ClientError:
            counts["errors"] += 1
        finally:
            counts["open"] -= 1
        if acked[i] and i % sample_every == 0:
            await poll_get(i)

    watcher = asyncio.create_task(watch_changelog()) if consumer is not None else None
    await asyncio.sleep(0.3)  # the changelog consumer's first fetch; a quiet engine
    meter = CpuMeter(eng.pids).start()
    tasks: list[asyncio.Task[None]] = []
    overloaded = ""
    backlog = max(100.0, rate * max_backlog_s)
    async with Counters(eng, session, metrics_s) as counters:
        t0 = time.perf_counter() + 0.05
        sent = 0
        for i in range(n):
            target = t0 + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if counters.accepted - counters.applied > backlog:
                overloaded = (
                    f"stopped after {sent:,}/{n:,} sends: more than {backlog:,.0f} accepted "
                    "events not yet applied (/metrics)"
                )
                break
            if counts["open"] > backlog:
                overloaded = (
                    f"stopped after {sent:,}/{n:,} sends: more than {backlog:,.0f} POSTs "
                    "waiting for their 202"
                )
                break
            sched[i] = target  # open loop: latency counts from the schedule, not the send
            tasks.append(asyncio.create_task(post(i)))
            sent += 1
        t_end = time.perf_counter()
        acc_window, app_window = await counters.poll()
        window = max(t_end - t0, 1e-9)
        # Until /metrics shows every accepted event applied; then the last GET polls.
        caught_up: float | None = None
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline:
            acc, app = await counters.poll()
            if not counts["open"] and app >= acc:
                caught_up = time.perf_counter() - t_end
                break
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        deadline = time.perf_counter() + 10
        while consumer is not None and time.perf_counter() < deadline:  # the last records
            if all(seen_log[i] for i in range(sent) if acked[i]):
                break
            await asyncio.sleep(0.05)
        cpu = meter.stop()
    done.set()
    if watcher is not None and consumer is not None:
        await watcher
        await consumer.stop()

    stopped_early = bool(overloaded)
    if not overloaded and app_window < min_applied_ratio * acc_window:
        overloaded = (
            f"applied {app_window / window:,.0f}/s < {100 * min_applied_ratio:.0f}% of "
            f"accepted {acc_window / window:,.0f}/s (/metrics)"
        )
    if not overloaded and caught_up is None:
        overloaded = "accepted events still not applied 30 s after the last send (/metrics)"

    def ms(a: float, b: float) -> float:
        return (b - a) * 1000

    ok = [i for i in range(sent) if acked[i]]
    sampled = [i for i in ok if i % sample_every == 0]
    got = [i for i in sampled if seen_get[i]]
    return Latency(
        offered_rate=rate,
        planned=n,
        sent=sent,
        accepted=len(ok),
        errors=counts["errors"],
        send_window_s=window,
        metrics_accepted=acc_window,
        metrics_applied=app_window,
        backlog_max=counters.backlog_max,
        caught_up_s=caught_up,
        overloaded=overloaded,
        stopped_early=stopped_early,
        post_ms=[ms(sched[i], acked[i]) for i in ok],
        ack_to_get_ms=[ms(acked[i], seen_get[i]) for i in got],
        ack_to_get_lower_ms=[ms(acked[i], last_miss[i]) for i in got],
        sched_to_get_ms=[ms(sched[i], seen_get[i]) for i in got],
        get_timeline=[(round(sched[i] - t0, 3), round(ms(acked[i], seen_get[i]), 2)) for i in got],
        sample_every=sample_every,
        poll_ms=poll_ms,
        get_budget=get_budget,
        samples=len(sampled),
        missing_get=len(sampled) - len(got),
        get_requests=counts["gets"],
        get_errors=counts["get_errors"],
        metrics_polls=counters.polls,
        probe_s=max(probe_end[0] - t0, window),
        changelog=changelog,
        ack_to_log_ms=[ms(acked[i], seen_log[i]) for i in ok if seen_log[i]],
        sched_to_log_ms=[ms(sched[i], seen_log[i]) for i in ok if seen_log[i]],
        missing_log=sum(1 for i in ok if not seen_log[i]) if changelog else 0,
        cpu=cpu,
    )


@contextlib.asynccontextmanager
async def py_spy(pid: int, out_dir: str | None, name: str) -> AsyncIterator[None]:
    """Record a py-spy profile of ``pid`` into ``out_dir/name.txt`` while the block runs."""
    if not out_dir:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - instant
    out = Path(out_dir) / f"{name}.txt"
    cmd = [exe, "record", "-p", str(pid), "-r", "100", "-f", "raw", "-o", str(out)]
    spy = subprocess.Popen(  # noqa: ASYNC220 - starts at once
        [*cmd, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        await asyncio.to_thread(spy.wait, 30)
        print(f"  py-spy profile: {out}", flush=True)


# -- output --------------------------------------------------------------------------------
def ratio(rate: float, base: float | None) -> str:
    return f"{rate / base:.2f}x" if base else "-"


def dist(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"p50 {pct(values, 50):7.1f}  p90 {pct(values, 90):7.1f}  p99 {pct(values, 99):7.1f}  "
        f"max {max(values):7.1f} ms  (n={len(values):,})"
    )


def print_run(r: Run, base: float | None) -> None:
    a = r.applied
    what = "accepted" if r.accepted else "written"
    print(
        f"  {r.accepted or r.events:,} events {what} in {r.send_s:.2f} s "
        f"({r.send_rate:,.0f} events/s, {r.messages:,} {'POSTs' if r.accepted else 'messages'}); "
        f"applied {a.applied:,}/{r.events:,}: steady {a.steady_rate:,.0f} events/s "
        f"({ratio(a.steady_rate, base)} naive); first send -> last applied "
        f"{a.last_t - a.start_t:.2f} s = {a.end_to_end_rate:,.0f} events/s",
        flush=True,
    )
    print(f"  CPU {fmt_cpu(r.cpu)}", flush=True)
    if r.failure:
        print(f"  FAILED: {r.failure}", flush=True)


#: What the engine did besides folding events, from /metrics: lists ranked, trainings, and
#: the milliseconds its collections of cyclic garbage held it, by generation (with a scale).
_WORK: Final = {
    "lists ranked": ('personify_lists_computed_total{kind="user"}', 1),
    "trainings": ('personify_model_trainings_total{outcome="trained"}', 1),
    **{
        f"gc ms (gen {g})": (f'personify_gc_pause_seconds_sum{{generation="{g}"}}', 1000)
        for g in range(3)
    },
}


def engine_work(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """What the engine did between two reads of /metrics (see `_WORK`)."""
    return {
        name: round((after.get(key, 0.0) - before.get(key, 0.0)) * scale)
        for name, (key, scale) in _WORK.items()
    }


def print_latency(r: Latency) -> None:
    caught = "never" if r.caught_up_s is None else f"{r.caught_up_s:.2f} s after the last send"
    state = f"OVERLOADED: {r.overloaded}" if r.overloaded else "keeping up"
    print(
        f"  {state}; /metrics while sending: {r.accepted_rate:,.0f} events/s accepted (HTTP), "
        f"{r.applied_rate:,.0f} events/s applied; at most {r.backlog_max:,} accepted, not yet "
        f"applied; all applied {caught}; {r.accepted:,} 202s, {r.errors} errors",
        flush=True,
    )
    print(f"  CPU {fmt_cpu(r.cpu)}")
    print(f"  scheduled send -> 202                   {dist(r.post_ms)}")
    print(f"  202 -> profile (GET 200 back; upper)    {dist(r.ack_to_get_ms)}")
    print(f"  202 -> profile (last 404 sent; lower)   {dist(r.ack_to_get_lower_ms)}")
    print(f"  scheduled send -> profile (GET, upper)  {dist(r.sched_to_get_ms)}")
    if r.changelog:
        print(f"  202 -> changelog write (all; chlog on)  {dist(r.ack_to_log_ms)}")
        print(f"  scheduled -> changelog write (all)      {dist(r.sched_to_log_ms)}")
    print(
        f"  probe load: GET /v1/users/{{id}} for 1 event in {r.sample_every} ({r.samples:,}), "
        f"every {r.poll_ms:g} ms or {100 * POLL_GROWTH:.0f}% of the time waited, until 200, at "
        f"most {r.get_budget:,.0f} GETs/s: {r.get_requests:,} GETs = {r.get_rate:,.0f}/s, "
        f"{100 * r.get_rate / r.offered_rate:.0f}% of the POST rate; "
        f"GET /metrics every 100 ms ({r.metrics_polls} polls); "
        f"never seen: GET {r.missing_get}"
        + (f", changelog {r.missing_log}" if r.changelog else "")
        + (f"; {r.get_errors} GET errors" if r.get_errors else ""),
        flush=True,
    )


# -- main ----------------------------------------------------------------------------------
def rates(text: str) -> list[float]:
    """``"1000,100"`` -> ``[1000.0, 100.0]``."""
    out = [float(x) for x in text.split(",") if x.strip()]
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive rates, got {text!r}")
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000, help="events per batched run")
    p.add_argument(
        "--small-events",
        type=int,
        default=50_000,
        help="events for each naive baseline and the one-event-per-message run",
    )
    p.add_argument("--users", type=int, default=20_000, help="distinct visitors")
    p.add_argument("--batch", type=int, default=500, help="events per message and per POST")
    p.add_argument("--http-concurrency", type=int, default=4, help="POSTs in flight")
    p.add_argument("--window", type=int, default=4000, help="(a2) events written, not applied")
    p.add_argument(
        "--rate",
        type=rates,
        default=[1000.0, 100.0],
        metavar="R[,R...]",
        help="latency: events/s offered, one run per rate (default 1000,100)",
    )
    p.add_argument("--duration", type=float, default=30.0, help="latency: seconds per rate")
    p.add_argument(
        "--probes-per-s",
        type=float,
        default=10.0,
        help="latency: sampled events per second polled with GET (sets the 1-in-N sample)",
    )
    p.add_argument(
        "--sample-every", type=int, default=0, help="latency: GET-poll 1 event in N (overrides)"
    )
    p.add_argument("--poll-ms", type=float, default=2.0, help="latency: GET poll interval")
    p.add_argument(
        "--get-budget",
        type=float,
        default=0.0,
        help="latency: most GETs/s for all polls together (default: 10%% of the rate, >= 100)",
    )
    p.add_argument(
        "--changelog",
        action="store_true",
        help="latency on a fresh engine with the profiles changelog on "
        f"({CHANGELOG_ENV}=on; off by default with the embedded broker), watched to time "
        "every event; those figures are labelled 'changelog on'",
    )
    p.add_argument("--partitions", type=int, default=4, help="partitions of the naive topic")
    p.add_argument("--skip-naive", action="store_true", help="skip the naive baselines")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="(a) this many times on the same engine, new events for the same visitors each "
        "time, each run's rate against the first's",
    )
    p.add_argument("--only", default="abcl", help="Personify runs: a, b, c and/or l (latency)")
    add_settings_argument(p)
    p.add_argument(
        "--py-spy",
        metavar="DIR",
        help="record a py-spy profile of Personify per run (each of --repeat's) into DIR "
        "(raw folded stacks; `pip install py-spy`; it takes some CPU)",
    )
    p.add_argument(
        "--experiments",
        type=int,
        default=0,
        help="run this many experiments (PUT /v1/experiments) on every engine, sharing the "
        "visitors, each variant B with other blend weights",
    )
    p.add_argument(
        "--segments",
        type=int,
        default=0,
        help="define this many rule segments (PUT /v1/segments) on every engine: the stress mix "
        "of bench/segments.py",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    return p.parse_args(argv)


@dataclass
class Row:
    """One line of the summary table."""

    name: str
    events: int
    rate: float
    base: float | None
    cpu: str
    note: str = ""
    #: a batched run whose applied rate counts for the product's goal
    goal: bool = False

    @classmethod
    def of(cls, name: str, r: Run, base: float | None, *, goal: bool = False) -> Row:
        """The row of a throughput run."""
        note = f"FAILED: {r.failure}" if r.failure else ""
        return cls(name, r.events, r.rate, base, fmt_cpu(r.cpu), note, goal and not r.failure)


#: Seconds between /healthz and the empty engine's footprint (the model loads meanwhile).
EMPTY_SETTLE_S = 10.0
#: How long after the last run its footprint is taken again.
SETTLE_S = 75.0


@dataclass
class Footprint:
    """The engine's resident memory and its data directory on disk, at one moment."""

    engine_mib: float
    broker_mib: float
    journal_mib: float
    disk_mib: float
    #: What the engine reports holding: RocksDB, the lists' JSON, decoded signal rows.
    rocksdb_mib: float = 0.0
    lists_mib: float = 0.0
    signal_rows: int = 0
    signal_neighbours: int = 0

    @classmethod
    async def of(cls, eng: Personify, session: aiohttp.ClientSession) -> Footprint:
        """Measure ``eng`` now."""
        assert eng.proc is not None
        data = eng.workdir / "data"
        m = await eng.metrics(session)
        return cls(
            engine_mib=status_kb(eng.proc.pid, "VmRSS") / 1024,
            broker_mib=status_kb(eng.broker_pid, "VmRSS") / 1024 if eng.broker_pid else 0.0,
            journal_mib=disk_mib(data / "journal") + disk_mib(data / "journal-items"),
            disk_mib=disk_mib(data),
            rocksdb_mib=m.get("personify_rocksdb_memory_bytes", 0.0) / 2**20,
            lists_mib=sum(v for k, v in m.items() if 'what="body_bytes"' in k) / 2**20,
            signal_rows=int(m.get('personify_signal_rows_cached{what="rows"}', 0)),
            signal_neighbours=int(m.get('personify_signal_rows_cached{what="neighbours"}', 0)),
        )

    def __str__(self) -> str:
        return (
            f"engine RSS {self.engine_mib:,.0f} MiB (RocksDB {self.rocksdb_mib:,.0f} MiB, "
            f"lists {self.lists_mib:,.0f} MiB, {self.signal_rows:,} signal rows of "
            f"{self.signal_neighbours:,} neighbours), broker {self.broker_mib:,.0f} MiB; "
            f"data directory {self.disk_mib:,.0f} MiB (journal {self.journal_mib:,.0f} MiB)"
        )

    def against(self, empty: Footprint, visitors: int) -> str:
        """This footprint, and what it adds to ``empty`` per 1M of ``visitors``."""
        per = 1e6 / max(visitors, 1) / 1024
        rss = self.engine_mib - empty.engine_mib
        disk = self.disk_mib - empty.disk_mib
        tables = disk - (self.journal_mib - empty.journal_mib)
        return (
            f"{self}; {visitors:,} visitors: engine +{rss:,.0f} MiB = {rss * per:.2f} GiB per "
            f"1M visitors; disk +{disk:,.0f} MiB = {disk * per:.2f} GiB per 1M "
            f"({tables * per:.2f} GiB without the journal)"
        )

    def as_dict(self) -> dict[str, float]:
        """The figures, for ``--json``."""
        return {
            "engine_rss_mib": self.engine_mib,
            "broker_rss_mib": self.broker_mib,
            "journal_mib": self.journal_mib,
            "disk_mib": self.disk_mib,
            "rocksdb_mib": self.rocksdb_mib,
            "lists_mib": self.lists_mib,
            "signal_rows": self.signal_rows,
            "signal_neighbours": self.signal_neighbours,
        }


@dataclass
class PersonifyBench:
    """The runs against ``personify run``, in order, sharing one process while it is healthy.

    A run that leaves the engine broken (an agent crashed) is followed by a fresh engine.
    """

    args: argparse.Namespace
    workdir: Path
    session: aiohttp.ClientSession
    base: float | None
    rows: list[Row]
    out: dict[str, Any]
    eng: Personify | None = None
    engines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def settings(self) -> dict[str, str]:
        """``--set`` as PERSONIFY_* environment variables."""
        return settings_env(self.args.set)

    async def start_engine(self, changelog: bool = False) -> Personify:
        """Start a ``personify run`` on a fresh data directory (``changelog``: forced on)."""
        env = {**self.settings, **({CHANGELOG_ENV: "on"} if changelog else {})}
        eng = Personify(self.workdir / f"personify{len(self.engines)}", extra_env=env)
        eng.workdir.mkdir()
        label = f" with {CHANGELOG_ENV}=on" if changelog_on(eng) else ""
        print(f"\n[personify] starting `personify run`{label}...", flush=True)
        self.eng = eng
        await eng.start(self.session)
        print(f"  healthy after {eng.startup_s:.1f} s (broker {eng.bootstrap})", flush=True)
        for n in range(self.args.experiments):  # each in its own slice of the visitors
            doc = {
                "variants": [{"name": "A"}, {"name": "B", "setting": {"weights.trending": 2.0}}],
                "traffic": 1.0 / self.args.experiments,
            }
            async with self.session.put(f"{eng.url}/v1/experiments/bench-{n}", json=doc) as resp:
                assert resp.status == 201, await resp.text()
        if self.args.experiments:
            print(f"  {self.args.experiments} experiments running", flush=True)
        for n, rule in enumerate(stress_rules(self.args.segments)):
            async with self.session.put(
                f"{eng.url}/v1/segments/bench-{n}", json={"rule": rule}
            ) as resp:
                assert resp.status == 201, await resp.text()
        if self.args.segments:
            print(f"  {self.args.segments} rule segments defined", flush=True)
        return eng

    async def stop_engine(self) -> None:
        """Stop the engine, keeping its peak memory and counters."""
        eng, self.eng = self.eng, None
        if eng is None or eng.proc is None:
            return
        m: dict[str, float] = {}
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            m = await eng.metrics(self.session)
        info: dict[str, Any] = {
            "startup_s": eng.startup_s,
            "peak_rss_kb": status_kb(eng.proc.pid, "VmHWM"),
            "broker_peak_rss_kb": status_kb(eng.broker_pid, "VmHWM") if eng.broker_pid else 0,
            "applied_total": m.get(APPLIED, 0.0),
            "duplicates": m.get("personify_events_duplicate_total", 0.0),
            "rejected": m.get("personify_events_rejected_total", 0.0),
            "changelog": changelog_on(eng),
        }
        info["exit_code"] = await asyncio.to_thread(eng.stop)
        self.engines.append(info)

    async def run(self) -> None:
        """Do the runs that ``--only`` names, in order."""
        try:
            for key, phase in (
                ("a", self.topic_batched),
                ("b", self.topic_single),
                ("c", self.http_batched),
                ("l", self.latency),
            ):
                if key not in self.args.only:
                    continue
                if key == "l" and self.args.changelog and not changelog_on(self.eng):
                    await self.stop_engine()  # the opt-in precise latency: changelog on
                    await self.start_engine(changelog=True)
                eng = self.eng or await self.start_engine()
                assert eng.proc is not None
                # With --repeat, (a) records one profile per run instead.
                whole = None if key == "a" and self.args.repeat > 1 else self.args.py_spy
                async with py_spy(eng.proc.pid, whole, phase.__name__):
                    await phase(eng)
        finally:
            await self.stop_engine()
        self.out["personify"] = self.engines

    async def after_failure(self, r: Run) -> None:
        """A failed run can leave an agent dead or a backlog behind: use a fresh engine."""
        if r.failure:
            print("  (restarting Personify on a fresh data directory)", flush=True)
            await self.stop_engine()
            await self.start_engine()

    async def topic_batched(self, eng: Personify) -> None:
        """(a) ``{"events": [...]}`` messages on the events topic, all written at once.

        With ``--repeat N`` the run is done N times on the same engine, each with new events
        for the same visitors (their profiles grow), and each run's rate is compared with the
        first's: the rate must not fall as the engine holds more.
        """
        a = self.args
        first: float | None = None
        await asyncio.sleep(EMPTY_SETTLE_S)  # the embedding model loads after /healthz
        empty = await Footprint.of(eng, self.session)
        print(f"\n[personify] empty: {empty}", flush=True)
        visitors: set[str] = set()
        for n in range(1, a.repeat + 1):
            tag = "a" if a.repeat == 1 else f"a{n}"
            seed = 2 if n == 1 else 100 + n
            evs = make_events(a.events, a.users, f"{tag}-", seed=seed, user_prefix="a-")
            visitors.update(e["user_id"] for e in evs)
            recs = batch_records(evs, a.batch, 4)
            run_of = "" if a.repeat == 1 else f", run {n} of {a.repeat}"
            print(
                f"\n[{tag}] events topic: {len(recs):,} messages of {a.batch} events, "
                f"written at once{run_of}"
            )
            spy_dir = a.py_spy if a.repeat > 1 else None
            assert eng.proc is not None
            before = await eng.metrics(self.session)
            async with py_spy(eng.proc.pid, spy_dir, f"topic_batched_run{n}"):
                r = await run_topic(eng, self.session, tag, recs, len(evs))
            print_run(r, self.base)
            work = engine_work(before, await eng.metrics(self.session))
            print(f"  meanwhile: {', '.join(f'{k} {v:,}' for k, v in work.items())}", flush=True)
            held = await Footprint.of(eng, self.session)
            print(f"  {held.against(empty, len(visitors))}", flush=True)
            self.out.setdefault("a_footprint", []).append(
                {"visitors": len(visitors), **held.as_dict(), "empty": empty.as_dict()}
            )
            if a.repeat > 1 and not r.failure:
                first = first or r.applied.steady_rate
                print(
                    f"  run {n}: {r.applied.steady_rate:,.0f} events/s = "
                    f"{ratio(r.applied.steady_rate, first)} run 1",
                    flush=True,
                )
            self.out["a_topic_batched" if n == 1 else f"a_topic_batched_run{n}"] = {
                **r.as_dict(),
                "meanwhile": work,
            }
            name = f"(a) topic, {a.batch} events/msg{run_of}"
            self.rows.append(Row.of(name, r, self.base, goal=True))
            if r.failure:
                break
        if not r.failure:
            # What stays: a training started by the events may still hold its history right
            # after them, and the allocator's free pages go back once the engine has been
            # quiet for [worker] malloc_trim_quiet_s (30 s, checked every 30 s).
            await asyncio.sleep(SETTLE_S)
            settled = await Footprint.of(eng, self.session)
            print(f"  {SETTLE_S:.0f} s later: {settled.against(empty, len(visitors))}", flush=True)
            self.out["a_footprint_settled"] = {
                "visitors": len(visitors),
                "after_s": SETTLE_S,
                **settled.as_dict(),
                "empty": empty.as_dict(),
            }
            return
        await self.after_failure(r)
        assert self.eng is not None
        eng = self.eng
        # The same again from a producer that stays at most `window` events ahead.
        evs = make_events(a.events, a.users, "a2-", seed=5)
        recs = batch_records(evs, a.batch, 4)
        print(f"\n[a2] same, paced: at most {a.window:,} events written and not yet applied")
        r = await run_topic(
            eng, self.session, "a2", recs, len(evs), window=a.window, per_record=a.batch
        )
        print_run(r, self.base)
        self.out["a2_topic_batched_paced"] = r.as_dict()
        name = f"(a2) topic, {a.batch} events/msg, paced"
        self.rows.append(Row.of(name, r, self.base, goal=True))
        await self.after_failure(r)

    async def topic_single(self, eng: Personify) -> None:
        """(b) one event per message on the events topic."""
        evs = make_events(self.args.small_events, self.args.users, "b-", seed=3)
        recs = single_records(evs, 4)
        print(f"\n[b] events topic: {len(recs):,} messages of 1 event", flush=True)
        r = await run_topic(eng, self.session, "b", recs, len(evs))
        print_run(r, self.base)
        self.out["b_topic_single"] = r.as_dict()
        self.rows.append(Row.of("(b) topic, 1 event/msg", r, self.base))
        await self.after_failure(r)

    async def http_batched(self, eng: Personify) -> None:
        """(c) POST /v1/events with batches, a few requests in flight."""
        a = self.args
        evs = make_events(a.events, a.users, "c-", seed=4)
        print(
            f"\n[c] POST /v1/events: {a.batch} events per request, {a.http_concurrency} in flight",
            flush=True,
        )
        r = await run_http(eng, self.session, evs, a.batch, a.http_concurrency)
        print_run(r, self.base)
        self.out["c_http_batched"] = r.as_dict()
        name = f"(c) HTTP {a.batch} events/POST"
        self.rows.append(Row(f"{name}: accepted", r.accepted, r.send_rate, self.base, ""))
        self.rows.append(Row.of(f"{name}: applied", r, self.base, goal=True))
        await self.after_failure(r)

    async def latency(self, eng: Personify) -> None:
        """Open-loop single-event POSTs at each ``--rate``, on the same engine."""
        a = self.args
        results = self.out.setdefault("latency", [])
        for k, rate in enumerate(a.rate):
            every = a.sample_every or max(1, round(rate / a.probes_per_s))
            chlog = changelog_on(eng)
            print(
                f"\n[latency] {rate:g} single-event POSTs/s for {a.duration:g} s, open loop, "
                f"a new visitor each{' (changelog on)' if chlog else ''}",
                flush=True,
            )
            lat = await run_latency(
                eng,
                self.session,
                rate,
                a.duration,
                f"l{k}-",
                sample_every=every,
                poll_ms=a.poll_ms,
                get_budget=a.get_budget or max(100.0, rate / 10),
                changelog=chlog,
            )
            print_latency(lat)
            results.append(lat.as_dict())
            if lat.caught_up_s is None and k + 1 < len(a.rate):
                reason = eng.crash_reason() or "no agent crash logged"
                print(f"  (a backlog is left: {reason}; restarting Personify)", flush=True)
                await self.stop_engine()
                eng = await self.start_engine(changelog=chlog)


async def bench_personify(
    args: argparse.Namespace, workdir: Path, base: float | None, rows: list[Row]
) -> dict[str, Any]:
    """Do the Personify runs ``--only`` asks for; return their figures."""
    out: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=1024)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await PersonifyBench(args, workdir, session, base, rows, out).run()
    return out


def print_summary(out: dict[str, Any], rows: list[Row], elapsed: float) -> None:
    print("\n" + "=" * 104)
    print(f"SUMMARY  {out['date']}  {out['cpus']} CPUs  {out['cpu_model']}  ({elapsed:.0f} s)")
    print(f"{'run':<40} {'events':>9} {'events/s':>9} {'vs naive':>9}  CPU (100% = one core)")
    for r in rows:
        if r.note.startswith("FAILED"):
            print(f"{r.name:<40} {r.events:>9,} {'FAILED':>9} {'':>9}  {r.cpu}")
        else:
            rate = ratio(r.rate, r.base)
            print(f"{r.name:<40} {r.events:>9,} {r.rate:>9,.0f} {rate:>9}  {r.cpu}")
        if r.note:
            print(f"{'':<42}{r.note[:160]}")
    for lat in out.get("latency", []):
        g, lo, p = (
            lat["ack_to_get_ms"],
            lat["ack_to_get_lower_bound_ms"],
            lat["scheduled_to_202_ms"],
        )
        state = f"OVERLOADED: {lat['overloaded']}" if lat["overloaded"] else "keeping up"
        chlog = ", changelog on" if lat["changelog"] else ""
        print(
            f"latency @ {lat['offered_rate']:g}/s{chlog}: {lat['accepted_rate']:,.0f} accepted/s, "
            f"{lat['applied_rate']:,.0f} applied/s (/metrics): {state}"
        )
        print(
            f"  send->202 p50 {p['p50']:.1f} p99 {p['p99']:.1f} max {p['max']:.1f} ms | "
            f"202->profile p50 {g['p50']:.1f} p99 {g['p99']:.1f} max {g['max']:.1f} ms "
            f"(GET-polled 1 in {lat['sample_every']}, n={g['n']}, every >={lat['poll_ms']:g} ms, "
            f"{lat['get_rate']:,.0f} GETs/s; lower bound p50 {lo['p50']:.1f} p99 {lo['p99']:.1f})"
        )
        if lat["changelog"]:
            c = lat["ack_to_changelog_ms"]
            print(
                f"  202->changelog write, every event (changelog on): p50 {c['p50']:.1f} "
                f"p99 {c['p99']:.1f} max {c['max']:.1f} ms (n={c['n']:,})"
            )
    for i, p in enumerate(out.get("personify", [])):
        print(
            f"personify #{i + 1}: peak RSS {p['peak_rss_kb'] / 1024:.0f} MiB (+ its broker "
            f"{p['broker_peak_rss_kb'] / 1024:.0f} MiB); applied {p['applied_total']:,.0f}, "
            f"duplicates {p['duplicates']:.0f}, rejected {p['rejected']:.0f}, "
            f"exit code {p['exit_code']}{' (changelog on)' if p.get('changelog') else ''}"
        )
    best = max((r.rate for r in rows if r.goal), default=None)
    if best is not None:
        verdict = "MET" if best >= GOAL_EVENTS_PER_S else "NOT MET"
        print(
            f"goal >= {GOAL_EVENTS_PER_S:,} events/s applied, batched, per worker: {verdict} "
            f"(best batched run {best:,.0f} events/s)"
        )
    print("=" * 104, flush=True)


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="personify-bench-"))
    started = time.perf_counter()
    out: dict[str, Any] = run_record(args)
    rows: list[Row] = []
    print(f"Personify ingest benchmark; {os.cpu_count()} CPUs; work dir {workdir}", flush=True)
    try:
        check_valid(make_events(2000, args.users, "p-", seed=0))
        base: float | None = None
        if not args.skip_naive:
            small = make_events(args.small_events, args.users, "n-", seed=1)
            for mode, label in (("table", "table get+set per event"), ("none", "no table")):
                print(
                    f"\n[naive/{mode}] pre-loading {len(small):,} single-event messages, "
                    "then starting the worker",
                    flush=True,
                )
                r = await run_naive(mode, small, workdir, args.partitions)
                check = ""
                if r.table_sum is not None:
                    exact = "exact" if r.table_sum == r.events else "MISMATCH"
                    check = f"; table read back: sum {r.table_sum:,} over "
                    check += f"{r.table_keys:,} keys ({exact})"
                print(
                    f"  {r.events:,} events in {r.seconds:.2f} s = {r.rate:,.0f} events/s "
                    f"(worker start {r.startup_s:.1f} s; CPU {fmt_cpu(r.cpu)}; "
                    f"peak RSS {r.rss_kb / 1024:.0f} MiB{check})",
                    flush=True,
                )
                out[f"naive_{mode}"] = r.__dict__
                if mode == "table":
                    base = r.rate
                rows.append(
                    Row(f"naive Faust agent, {label}", r.events, r.rate, base, fmt_cpu(r.cpu))
                )
        if args.only:
            out.update(await bench_personify(args, workdir, base, rows))
        print_summary(out, rows, time.perf_counter() - started)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))  # noqa: ASYNC240
        return 0
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the figures."""
    sys.exit(asyncio.run(amain(parse_args(argv))))


if __name__ == "__main__":
    main()
