"""Several `personify worker` processes on one Kafka broker share the partitions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from personify.engine.broker import EmbeddedBroker
from personify.engine.publisher import partition_for

pytestmark = pytest.mark.e2e


def owned(eng: Any) -> set[int]:
    """The partitions of the routed events ``eng`` owns (none while a rebalance is under way)."""
    status, health = eng.request("GET", "/healthz")
    if status != 200:  # 503 while a rebalance is under way
        return set()
    return set(health["partitions"].get("events-routed", []))


@contextlib.contextmanager
def two_workers(engine_factory: Any, tmp_path: Path, app_id: str) -> Iterator[tuple[Any, Any]]:
    """Two `personify worker` processes on one broker, once they have split the partitions."""
    with EmbeddedBroker(tmp_path / "kafka.log") as kafka:
        env = {"PERSONIFY_BROKER__URL": kafka.url, "PERSONIFY_WORKER__APP_ID": app_id}
        a = engine_factory(env=env, command="worker").start()
        b = engine_factory(env=env, command="worker").start()
        settled(a, b)
        yield a, b


def settled(a: Any, b: Any) -> tuple[set[int], set[int]]:
    """Wait until ``a`` and ``b`` split the 4 partitions between them; their shares."""
    for _ in range(300):  # until the second join's rebalance has settled
        pa, pb = owned(a), owned(b)
        if pa and pb and not pa & pb and pa | pb == {0, 1, 2, 3}:
            return pa, pb
        time.sleep(0.2)
    raise AssertionError(f"the partitions were not split: {pa} / {pb}")


def view(user: str, item: str) -> dict[str, Any]:
    return {"type": "product_view", "user_id": user, "item_id": item}


def test_two_workers_share_partitions_and_serve_every_profile(
    engine_factory: Any, tmp_path: Path
) -> None:
    """Two workers split the partitions; either one answers for any visitor."""
    with two_workers(engine_factory, tmp_path, "scale") as (a, b):
        users = [f"so-{i}" for i in range(24)]
        events = [{"type": "page_view", "user_id": u} for u in users for _ in range(2)]
        status, body = a.post_events(events)
        assert status == 202 and body["accepted"] == 48
        for u in users:
            a.wait_profile(u, lambda p: p["counts"] == {"page_view": 2})
            status, p = b.profile(u)
            assert status == 200 and p["counts"] == {"page_view": 2}, (u, p)


def test_a_socket_on_one_worker_follows_a_visitor_another_owns(
    engine_factory: Any, tmp_path: Path
) -> None:
    """Pushes reach a socket on worker A for a visitor worker B owns, and go on once B dies."""
    with two_workers(engine_factory, tmp_path, "relay") as (a, b):
        pb = owned(b)
        user = next(u for u in (f"relay-{i}" for i in range(1000)) if partition_for(u, 4) in pb)
        status, _ = a.post_events([view(user, "seed")])
        assert status == 202
        b.wait_profile(user, lambda p: p["counts"] == {"product_view": 1})

        def owners_list() -> str:
            status, body = b.request("GET", f"/v1/users/{user}/recommendations")
            assert status == 200, body
            return str(body["recommendation_id"])

        # Lists are kept (and answered again with the same id) once B's index has loaded.
        b.wait_for(lambda: owners_list() == owners_list(), what="B's lists to be kept")

        async def run() -> None:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(a.ws_url(f"user_id={user}")) as ws,
            ):
                # The first list is B's: the one B holds for the visitor (A has no profile).
                first = await a.next_message(ws, "recommendations")
                assert first["seq"] == 1 and first["user_id"] == user
                assert first["recommendation_id"] == await asyncio.to_thread(owners_list)
                # Each event, applied by B, pushes B's fresh list to A's socket.
                for n, item in enumerate(["b-one", "b-two"], start=2):
                    assert (await asyncio.to_thread(a.post_events, [view(user, item)]))[0] == 202
                    got = await a.next_message(ws, "recommendations")
                    assert got["seq"] == n
                    assert got["recommendation_id"] == await asyncio.to_thread(owners_list)
                # B dies; A takes its partitions over and goes on pushing to the same socket.
                b.proc.kill()
                b.proc.wait()
                await asyncio.to_thread(
                    a.wait_for, lambda: owned(a) == {0, 1, 2, 3}, 120, "A owning every partition"
                )
                status = 0
                for attempt in range(60):  # until A has restored B's tables and applies events
                    item = f"a-{attempt}"
                    status, _ = await asyncio.to_thread(a.post_events, [view(user, item)])
                    assert status == 202
                    try:
                        await a.next_message(ws, "recommendations", limit_s=2.0)
                        break
                    except TimeoutError:
                        continue
                else:
                    raise AssertionError("no push after worker B died")
                status, profile = await asyncio.to_thread(a.profile, user)
                assert status == 200 and profile["counts"]["product_view"] >= 4

        asyncio.run(run())
        assert a.metric('personify_ws_messages_total{type="recommendations"}') >= 4
