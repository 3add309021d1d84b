"""Several `personify worker` processes on one Kafka broker share the partitions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from personify.engine.broker import EmbeddedBroker

pytestmark = pytest.mark.e2e


def test_two_workers_share_partitions_and_serve_every_profile(
    engine_factory: Any, tmp_path: Path
) -> None:
    """Two workers split the partitions; either one answers for any visitor."""
    with EmbeddedBroker(tmp_path / "kafka.log") as kafka:
        env = {"PERSONIFY_BROKER__URL": kafka.url, "PERSONIFY_WORKER__APP_ID": "scale"}
        a = engine_factory(env=env, command="worker").start()
        b = engine_factory(env=env, command="worker").start()

        def owned(eng: Any) -> set[int]:
            status, health = eng.request("GET", "/healthz")
            if status != 200:  # 503 while a rebalance is under way
                return set()
            return set(health["partitions"].get("events-routed", []))

        for _ in range(300):  # until the second join's rebalance has settled
            pa, pb = owned(a), owned(b)
            if pa and pb and not pa & pb and pa | pb == {0, 1, 2, 3}:
                break
            time.sleep(0.2)
        assert pa and pb and not pa & pb and pa | pb == {0, 1, 2, 3}, (pa, pb)

        users = [f"so-{i}" for i in range(24)]
        events = [{"type": "page_view", "user_id": u} for u in users for _ in range(2)]
        status, body = a.post_events(events)
        assert status == 202 and body["accepted"] == 48
        for u in users:
            a.wait_profile(u, lambda p: p["counts"] == {"page_view": 2})
            status, p = b.profile(u)
            assert status == 200 and p["counts"] == {"page_view": 2}, (u, p)
