"""Shared fixtures: a real engine (`personify run` in a subprocess) and small HTTP helpers.

Every end-to-end test talks to a real engine: the embedded Tansu broker, the Faust worker
with RocksDB tables and the aiohttp API, started exactly as a user starts them.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

PERSONIFY = str(Path(sys.executable).with_name("personify"))
START_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Engine:
    """A running `personify run` process and what it printed."""

    data_dir: Path
    port: int
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    config: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    broker: str = ""
    command: str = "run"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- process control -------------------------------------------------------------
    def start(self, *, wait_healthy: bool = True) -> Engine:
        args = [PERSONIFY, self.command, "--data-dir", str(self.data_dir), "--port", str(self.port)]
        if self.config is not None:
            args += ["--config", str(self.config)]
        env = {**os.environ, "PERSONIFY_LOGGING__LEVEL": "warning", **self.extra_env}
        self.log_fh = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            args, stdout=self.log_fh, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir.parent
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
            found = re.search(r"Embedded broker listening on (\S+)", text)
            if found:
                self.broker = found.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"engine exited with {self.proc.returncode}:\n{text[-4000:]}")
            if wait_healthy and (self.broker or "API listening" in text):
                status, _ = self.request("GET", "/healthz")
                if status == 200:
                    return self
            elif not wait_healthy and "API listening" in text:
                return self
            time.sleep(0.2)
        raise AssertionError(f"engine not healthy in {START_TIMEOUT_S} s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        if not self.log_fh.closed:
            self.log_fh.close()
        return code

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    # -- HTTP ------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
        key: str | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if key is not None:
            req.add_header("Authorization", f"Bearer {key}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                payload = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            status = exc.code
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            return 0, repr(exc)  # the server is gone or went away mid-request
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload.decode("utf-8", "replace")

    def post_events(self, events: list[dict[str, Any]] | dict[str, Any]) -> tuple[int, Any]:
        body = {"events": events} if isinstance(events, list) else events
        return self.request("POST", "/v1/events", body)

    def metric(self, sample: str) -> float:
        """The value of ``sample`` (name and labels, as exposed) on GET /metrics, or 0."""
        text = str(self.request("GET", "/metrics")[1])
        prefix = sample + " "
        return next(
            (float(x[len(prefix) :]) for x in text.splitlines() if x.startswith(prefix)), 0.0
        )

    def add_items(self, items: list[dict[str, Any]]) -> None:
        """POST ``items`` to a fresh catalog and wait until it holds all of them, embedded.

        Items are applied partition by partition: the count covers every partition. Their
        text vectors follow once the text model is loaded (items whose title has a word have
        one).
        """
        status, body = self.request("POST", "/v1/items", {"items": items})
        assert status == 202, body
        self.wait_for(
            lambda: self.metric("personify_catalog_items") == len(items),
            what="the catalog to hold the items",
        )
        titled = sum(1 for item in items if any(c.isalpha() for c in str(item.get("title", ""))))
        self.wait_for(
            lambda: self.metric("personify_items_embedded") >= titled,
            what="the items to be embedded",
        )

    def profile(self, user_id: str) -> tuple[int, Any]:
        return self.request("GET", f"/v1/users/{user_id}")

    def ws_url(self, query: str) -> str:
        """The URL of ``GET /v1/ws?<query>``."""
        return self.url.replace("http://", "ws://", 1) + "/v1/ws?" + query

    @staticmethod
    async def next_message(
        ws: aiohttp.ClientWebSocketResponse, kind: str | None = None, limit_s: float = 30.0
    ) -> dict[str, Any]:
        """The socket's next message (of type ``kind``: others are skipped), as JSON."""
        while True:
            msg = await ws.receive(timeout=limit_s)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            body = dict(json.loads(msg.data))
            if kind is None or body["type"] == kind:
                return body

    def wait_for(self, check: Callable[[], Any], timeout: float = 60.0, what: str = "it") -> Any:
        """Poll ``check`` until it returns something truthy; fail with the last value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"{what} never held; last: {last!r}")

    # -- Kafka -----------------------------------------------------------------------
    async def produce(self, topic: str, *messages: tuple[bytes | None, bytes]) -> None:
        """Write ``(key, value)`` messages to ``topic`` on the engine's broker."""
        producer = AIOKafkaProducer(bootstrap_servers=self.broker)
        await producer.start()
        try:
            for key, value in messages:
                await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()

    async def dead_letters(
        self,
        want: int,
        match: Callable[[dict[str, Any]], bool] = lambda d: True,
        topic: str = "events-dlq",
    ) -> list[dict[str, Any]]:
        """Read ``topic`` from the start until ``want`` records satisfy ``match`` (or 30 s)."""
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.broker,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
        )
        await consumer.start()
        found: list[dict[str, Any]] = []
        try:
            for _ in range(300):
                batch = await consumer.getmany(timeout_ms=100)
                found += [json.loads(r.value) for rs in batch.values() for r in rs]
                if sum(1 for d in found if match(d)) >= want:
                    break
        finally:
            await consumer.stop()
        return found

    def wait_profile(
        self, user_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        """Poll the profile until ``until(profile)`` holds; fail with the last one seen."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            status, last = self.profile(user_id)
            if status == 200 and until(last):
                return dict(last)
            time.sleep(0.05)
        raise AssertionError(f"profile {user_id} never matched; last: {last}")


@pytest.fixture
def engine_factory(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """Make engines on fresh data directories; every one is stopped after the test."""
    made: list[Engine] = []

    def make(
        data_dir: Path | None = None,
        *,
        config: str | None = None,
        env: dict[str, str] | None = None,
        command: str = "run",
    ) -> Engine:
        root = tmp_path / f"engine{len(made)}"
        root.mkdir(exist_ok=True)
        cfg_path = None
        if config is not None:
            cfg_path = root / "config.toml"
            cfg_path.write_text(config)
        eng = Engine(
            data_dir=data_dir or root / "data",
            port=_free_port(),
            log_path=root / "engine.log",
            extra_env=env or {},
            config=cfg_path,
            command=command,
        )
        made.append(eng)
        return eng

    yield make
    for eng in made:
        if eng.proc is not None and eng.proc.poll() is None:
            eng.proc.kill()
            eng.proc.wait()
        if not eng.log_fh.closed:
            eng.log_fh.close()


class HookServer:
    """A local HTTP endpoint recording each POST: (body, X-Personify-Signature header)."""

    def __init__(self) -> None:
        received: list[tuple[bytes, str]] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((body, self.headers.get("X-Personify-Signature", "")))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass  # quiet

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 30.0) -> list[tuple[bytes, str]]:
        """What was received once there are at least ``n`` requests (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.received)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def hook_server() -> Iterator[HookServer]:
    """A webhook receiver on a free loopback port."""
    server = HookServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def module_hook_server() -> Iterator[HookServer]:
    """A webhook receiver shared by the tests of one module."""
    server = HookServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def module_engine(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Engine]:
    """Make an engine shared by the tests of one module (stopped by the caller)."""

    def make(config: str | None = None) -> Engine:
        root = tmp_path_factory.mktemp("module-engine")
        cfg_path = None
        if config is not None:
            cfg_path = root / "config.toml"
            cfg_path.write_text(config)
        return Engine(
            data_dir=root / "data",
            port=_free_port(),
            log_path=root / "engine.log",
            config=cfg_path,
        )

    return make


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One engine shared by the tests that only add events for their own visitors."""
    root = tmp_path_factory.mktemp("shared-engine")
    cfg = root / "config.toml"
    # The learned model has tests of its own (e2e/test_model.py): here it stays off, so that a
    # model trained part-way through the session cannot change the lists other tests check.
    cfg.write_text('[events]\ncustom_types = ["wishlist_add"]\n\n[model]\nenabled = false\n')
    eng = Engine(
        data_dir=root / "data", port=_free_port(), log_path=root / "engine.log", config=cfg
    )
    eng.start()
    yield eng
    code = eng.stop()
    assert code == 0, eng.tail()


@pytest.fixture
def uid(request: pytest.FixtureRequest) -> str:
    """A visitor id unique to the test."""
    return f"u-{request.node.name}-{time.monotonic_ns()}"


@pytest.fixture
def grocery_factory() -> Callable[..., Any]:
    """Make a grocery history: shoppers re-buying weekly staples plus one random product."""
    from personify.agents.evaluation import History

    def make(shoppers: int = 60, seed: int = 1) -> History:
        rng = random.Random(seed)
        products = [f"p{j}" for j in range(40)]
        day = 86_400_000
        rows = []
        for s in range(shoppers):
            staples = rng.sample(products, 4)
            for week in range(8):
                ts = week * 7 * day + s * 1000
                for item in [*staples[: 3 + week % 2], rng.choice(products)]:
                    rows.append((f"s{s}", item, "purchase", ts))
        return History.of(rows, products)

    return make
