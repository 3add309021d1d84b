"""No acknowledged event is lost and none counts twice across stops, kills and rebuilds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from personify.engine.broker import EmbeddedBroker

pytestmark = pytest.mark.e2e

PERSONIFY = str(Path(sys.executable).with_name("personify"))
USERS = [f"dur-{i}" for i in range(12)]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


class Streamer(threading.Thread):
    """Posts batches with fixed event ids until stopped; remembers what was acknowledged."""

    def __init__(self, engine: Any, tag: str) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.tag = tag
        self.acked: list[list[dict[str, Any]]] = []
        self.unacked: list[list[dict[str, Any]]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            batch = [
                {
                    "event_id": f"{self.tag}-{n}-{i}",
                    "type": "product_view",
                    "user_id": USERS[(n + i) % len(USERS)],
                    "item_id": f"sku-{i}",
                }
                for i in range(40)
            ]
            n += 1
            status, _ = self.engine.post_events(batch)
            (self.acked if status == 202 else self.unacked).append(batch)
            if status != 202:
                return


def _broker_pid(engine: Any) -> int:
    """The pid of the engine's embedded broker (its one child with a listener)."""
    brokers = [
        pid
        for pid in _children(engine.proc.pid)
        if b"--listener-url" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(brokers) == 1, brokers
    return brokers[0]


def _expected(batches: list[list[dict[str, Any]]]) -> dict[str, int]:
    counts = dict.fromkeys(USERS, 0)
    for batch in batches:
        for e in batch:
            counts[e["user_id"]] += 1
    return counts


def _wait_counts(engine: Any, expected: dict[str, int]) -> None:
    for user, n in expected.items():
        if n:
            engine.wait_profile(user, lambda p, n=n: p["counts"].get("product_view", 0) >= n, 60)
    time.sleep(1.0)  # give any duplicate a chance to show up before the exact check
    for user, n in expected.items():
        status, p = engine.profile(user)
        got = p["counts"].get("product_view", 0) if status == 200 else 0
        assert got == n, f"{user}: expected {n} events, profile has {got}"


def test_sigterm_restart_keeps_every_event_once(engine_factory: Any) -> None:
    """Stop with SIGTERM while events stream in, restart on the same data: counts are exact."""
    eng = engine_factory().start()
    broker_pids = _children(eng.proc.pid)
    streamer = Streamer(eng, "term")
    streamer.start()
    eng.wait_profile(USERS[0], lambda p: p["counts"].get("product_view", 0) >= 40)
    assert eng.stop(signal.SIGTERM) == 0
    streamer.halt.set()
    streamer.join(30)
    assert broker_pids and all(_gone(pid) for pid in broker_pids), "broker outlived the engine"

    eng2 = engine_factory(eng.data_dir).start()
    for batch in streamer.unacked:  # what a client retries: same event ids
        assert eng2.post_events(batch)[0] == 202
    _wait_counts(eng2, _expected(streamer.acked + streamer.unacked))


def test_kill_9_mid_stream_loses_nothing_and_counts_nothing_twice(engine_factory: Any) -> None:
    """A kill -9 while events stream in; after a restart every acknowledged event counts once."""
    eng = engine_factory().start()
    broker_pids = _children(eng.proc.pid)
    streamer = Streamer(eng, "kill")
    streamer.start()
    eng.wait_profile(USERS[0], lambda p: p["counts"].get("product_view", 0) >= 200)
    os.kill(eng.proc.pid, signal.SIGKILL)
    eng.stop()
    streamer.halt.set()
    streamer.join(30)
    assert len(streamer.acked) >= 5
    assert broker_pids and all(_gone(pid) for pid in broker_pids), "broker outlived the engine"

    eng2 = engine_factory(eng.data_dir).start()
    for batch in streamer.unacked:
        assert eng2.post_events(batch)[0] == 202
    _wait_counts(eng2, _expected(streamer.acked + streamer.unacked))
    # and the restarted engine keeps working
    assert (
        eng2.post_events([{"type": "search", "user_id": USERS[0], "properties": {"query": "x"}}])[0]
        == 202
    )
    eng2.wait_profile(USERS[0], lambda p: p["counts"].get("search") == 1)


def test_engine_stops_when_its_broker_dies_and_restarts_exactly(engine_factory: Any) -> None:
    """The embedded broker killed under the engine: it exits (code 3), says why, loses nothing."""
    eng = engine_factory().start()
    batch = [
        {
            "event_id": f"lost-broker-{i}",
            "type": "product_view",
            "user_id": USERS[i % 3],
            "item_id": f"sku-{i}",
        }
        for i in range(30)
    ]
    assert eng.post_events(batch)[0] == 202
    os.kill(_broker_pid(eng), signal.SIGKILL)
    assert eng.proc.wait(60) == 3  # it stops on its own
    eng.stop()
    assert "the embedded broker exited" in eng.log_path.read_text(errors="replace")

    eng2 = engine_factory(eng.data_dir).start()
    _wait_counts(eng2, _expected([batch]))


def test_a_broker_that_does_not_answer_gets_a_503_and_a_retry_counts_once(
    engine_factory: Any,
) -> None:
    """A publish the broker leaves unacknowledged answers 503 in time; retrying is exact."""
    eng = engine_factory(env={"PERSONIFY_SERVER__PUBLISH_TIMEOUT_S": "2"}).start()
    first = [
        {
            "event_id": f"stall-a-{i}",
            "type": "product_view",
            "user_id": USERS[i % 3],
            "item_id": f"sku-{i}",
        }
        for i in range(30)
    ]
    second = [{**e, "event_id": e["event_id"].replace("-a-", "-b-")} for e in first]
    assert eng.post_events(first)[0] == 202
    broker = _broker_pid(eng)
    os.kill(broker, signal.SIGSTOP)
    try:
        status, body = eng.post_events(second)
    finally:
        os.kill(broker, signal.SIGCONT)
    assert status == 503, (status, body)
    assert "within 2 s" in body["error"]
    assert "same event ids" in body["detail"]
    answers = []
    for _ in range(30):  # a client retries until the broker acknowledges
        answers.append(eng.post_events(second))
        if answers[-1][0] == 202:
            break
        time.sleep(1.0)
    assert answers[-1][0] == 202, answers
    assert eng.post_events(second)[0] == 202  # once more: still counted once
    _wait_counts(eng, _expected([first, second]))


def test_tables_rebuilt_exactly_from_the_journal(engine_factory: Any) -> None:
    """With the tables directory deleted, a restart rebuilds identical profiles from the journal."""
    eng = engine_factory().start()
    events = [
        {
            "type": "add_to_cart",
            "user_id": "rb",
            "item_id": "a",
            "properties": {"price": 5, "quantity": 2},
        },
        {"type": "purchase", "user_id": "rb", "item_id": "b", "properties": {"price": 7.5}},
        {"type": "search", "user_id": "rb", "properties": {"query": "lamp"}},
        {
            "type": "product_view",
            "user_id": "rb",
            "item_id": "c",
            "properties": {"category": "home/light"},
        },
    ] + [{"type": "page_view", "user_id": f"rb-{i}"} for i in range(300)]
    assert eng.post_events(events)[0] == 202
    before = eng.wait_profile("rb", lambda p: sum(p["counts"].values()) == 4)
    eng.wait_profile("rb-299", lambda p: p["counts"] == {"page_view": 1})
    assert eng.stop() == 0
    shutil.rmtree(eng.data_dir / "faust")

    eng2 = engine_factory(eng.data_dir).start()
    after = eng2.wait_profile("rb", lambda p: sum(p["counts"].values()) == 4)
    stable = (
        "counts",
        "cart",
        "recent_items",
        "recent_searches",
        "lifetime_spend",
        "order_count",
        "first_seen",
        "last_seen",
        "engagement_score",
    )
    assert {k: after[k] for k in stable} == {k: before[k] for k in stable}
    for i in range(300):
        assert eng2.profile(f"rb-{i}")[1]["counts"] == {"page_view": 1}


def test_changelog_restore_is_exact_on_kafka(engine_factory: Any, tmp_path: Path) -> None:
    """On a Kafka broker, a worker with no local state restores every update from the changelog."""
    with EmbeddedBroker(tmp_path / "kafka.log") as kafka:
        env = {"PERSONIFY_BROKER__URL": kafka.url}
        eng = engine_factory(env=env).start()
        users = [f"cl-{i}" for i in range(50)]
        for round_ in range(3):
            batch = [
                {"type": "page_view", "user_id": u, "event_id": f"cl-{round_}-{u}"} for u in users
            ]
            assert eng.post_events(batch)[0] == 202
        for u in users:
            eng.wait_profile(u, lambda p: p["counts"].get("page_view") == 3)
        assert eng.stop() == 0

        fresh = engine_factory(env=env).start()  # new data directory: only the changelog
        for u in users:
            status, p = fresh.profile(u)
            assert status == 200 and p["counts"] == {"page_view": 3}, (u, p)


def test_missing_checkpoint_is_refused_with_the_fix(engine_factory: Any) -> None:
    """With tables but no journal checkpoint, the start fails clearly instead of double counting."""
    eng = engine_factory().start()
    assert eng.post_events([{"type": "page_view", "user_id": "cp"}])[0] == 202
    eng.wait_profile("cp", lambda p: p["counts"] == {"page_view": 1})
    assert eng.stop() == 0
    (eng.data_dir / "journal" / "checkpoint").unlink()
    result = subprocess.run(
        [PERSONIFY, "run", "--data-dir", str(eng.data_dir), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "checkpoint is missing" in result.stderr and "delete" in result.stderr
    shutil.rmtree(eng.data_dir / "faust")  # the documented fix: rebuild from the journal
    eng2 = engine_factory(eng.data_dir).start()  # healthy once the journal tail is applied
    assert eng2.profile("cp")[1]["counts"] == {"page_view": 1}


def test_replay_from_an_old_checkpoint_counts_a_busy_visitor_once(engine_factory: Any) -> None:
    """A visitor with more events than their window of event ids, all replayed after a kill -9.

    The journal's checkpoint is put back to its start (as if it had not been saved for a long
    time): every record is published again, and the stored positions, not the window, tell
    what the profiles already hold.
    """
    eng = engine_factory().start()
    busy, sent = "busy-1", 0
    for n in range(24):  # 1,200 views of one visitor, more than the window of 1,000 ids
        batch = [
            {
                "event_id": f"busy-{n}-{i}",
                "type": "product_view",
                "user_id": busy,
                "item_id": f"sku-{i % 7}",
            }
            for i in range(50)
        ] + [
            {
                "event_id": f"light-{n}",
                "type": "product_view",
                "user_id": f"light-{n}",
                "item_id": "sku-0",
            }
        ]
        assert eng.post_events(batch)[0] == 202
        sent += 50
    eng.wait_profile(busy, lambda p: p["counts"].get("product_view", 0) >= sent)
    eng.wait_profile("light-23", lambda p: p["counts"].get("product_view", 0) >= 1)
    os.kill(eng.proc.pid, signal.SIGKILL)
    eng.stop()
    (eng.data_dir / "journal" / "checkpoint").write_text("0")

    eng2 = engine_factory(eng.data_dir).start()
    marker = {"event_id": "after-replay", "type": "search", "user_id": busy}
    assert eng2.post_events([{**marker, "properties": {"query": "x"}}])[0] == 202
    profile = eng2.wait_profile(busy, lambda p: p["counts"].get("search") == 1)
    # Every record was published again and skipped: the views of the light visitors too.
    assert eng2.metric("personify_events_duplicate_total") >= sent + 24
    assert profile["counts"]["product_view"] == sent
    for n in range(24):
        assert eng2.profile(f"light-{n}")[1]["counts"] == {"product_view": 1}


def test_rocksdb_memory_is_reported_and_bounded_by_the_settings(engine_factory: Any) -> None:
    """Memtables of 1 MiB: far more written than that, their memory stays within the bound."""
    eng = engine_factory(
        config="[storage]\nrocksdb_write_buffer_mib = 1\nrocksdb_write_buffers = 2\n"
    ).start()
    for n in range(20):
        batch = [
            {
                "type": "product_view",
                "user_id": f"mem-{i}",
                "item_id": f"sku-{n}-{i % 50}",
                "properties": {"category": f"c{i % 9}/d{n}", "blob": "x" * 200},
            }
            for i in range(500)
        ]
        assert eng.post_events(batch)[0] == 202
    eng.wait_profile("mem-499", lambda p: p["counts"].get("product_view") == 20)
    memtables = eng.metric('personify_rocksdb_memory_bytes{kind="memtables",table="profiles"}')
    assert 0 < memtables <= 4 * 2 * (1 << 20) * 1.1  # partitions x buffers x size
    assert eng.metric('personify_rocksdb_memory_bytes{kind="table_readers",table="profiles"}') > 0
