"""Events written straight into the events topic by any Kafka client reach the profile."""

from __future__ import annotations

import json
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from personify.engine.models import format_ts
from personify.engine.publisher import partition_for


def _total(profile: dict[str, Any]) -> int:
    return sum(profile["counts"].values())


async def test_single_and_batch_messages_from_kafka(engine: Any, uid: str) -> None:
    """A single-event message and a batch message both reach the profile."""
    single = {
        "type": "product_view",
        "user_id": uid,
        "item_id": "k1",
        "properties": {"category": "kafka/direct"},
    }
    batch = {
        "events": [
            {"type": "search", "user_id": uid, "properties": {"query": "q"}},
            {"type": "add_to_cart", "user_id": uid, "item_id": "k1"},
        ]
    }
    await engine.produce(
        "events", (uid.encode(), json.dumps(single).encode()), (None, json.dumps(batch).encode())
    )
    p = engine.wait_profile(uid, lambda p: _total(p) == 3)
    assert p["counts"] == {"product_view": 1, "search": 1, "add_to_cart": 1}
    assert p["cart"]["items"][0]["item_id"] == "k1"


async def test_redelivered_event_id_counts_once(engine: Any, uid: str) -> None:
    """The same event id sent twice (over Kafka and over HTTP) is applied once."""
    event = {"event_id": f"dup-{uid}", "type": "page_view", "user_id": uid}
    await engine.produce(
        "events",
        (uid.encode(), json.dumps(event).encode()),
        (uid.encode(), json.dumps(event).encode()),
    )
    status, _ = engine.post_events(
        [event, {"type": "product_view", "user_id": uid, "item_id": "x"}]
    )
    assert status == 202
    p = engine.wait_profile(uid, lambda p: p["counts"].get("product_view") == 1)
    assert p["counts"]["page_view"] == 1


async def test_invalid_topic_events_go_to_dead_letter_topic(engine: Any, uid: str) -> None:
    """Invalid events from the topic land in events-dlq with the reason; valid ones still count."""
    bad_type = {"type": "teleport", "user_id": uid}
    batch = {"events": [{"type": "page_view", "user_id": uid}, {"type": "page_view"}]}
    await engine.produce(
        "events",
        (None, b"{not json"),
        (None, json.dumps(bad_type).encode()),
        (None, json.dumps(batch).encode()),
    )
    engine.wait_profile(uid, lambda p: p["counts"].get("page_view") == 1)

    def from_this_test(d: dict[str, Any]) -> bool:
        event = d["event"]
        if isinstance(event, str):
            return event.startswith("{not json")
        return event.get("user_id") == uid or (
            event.get("type") == "page_view" and "user_id" not in event
        )

    letters = [d for d in await engine.dead_letters(3, from_this_test) if from_this_test(d)]
    mine = [d for d in letters if isinstance(d["event"], dict) and d["event"].get("user_id") == uid]
    assert {d["field"] for d in mine} == {"type"}
    assert "teleport" in mine[0]["error"]
    no_id = [d for d in letters if d["field"] == "user_id" and d["source"].get("index") == 1]
    assert no_id, letters
    malformed = [d for d in letters if "malformed JSON" in d["error"]]
    assert malformed and malformed[0]["event"].startswith("{not json")
    assert len(letters) >= 3
    assert all({"topic", "partition", "offset"} <= set(d["source"]) for d in letters)


async def test_event_that_cannot_be_applied_is_dead_lettered_alone(engine: Any, uid: str) -> None:
    """A routed event the profile cannot take goes to events-dlq; its neighbours still count."""
    now = int(time.time() * 1000)

    def routed(event_id: str, etype: str, props: dict[str, Any]) -> dict[str, Any]:
        return {
            "v": 1,
            "event_id": event_id,
            "type": etype,
            "user_id": uid,
            "anonymous_id": None,
            "item_id": "i-1",
            "ts": format_ts(now),
            "ts_ms": now,
            "properties": props,
        }

    batch = [
        routed(f"{uid}-ok-1", "page_view", {}),
        routed(f"{uid}-bad", "add_to_cart", {}),  # no quantity: never passes validation
        routed(f"{uid}-ok-2", "product_view", {}),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=engine.broker)
    await producer.start()
    try:
        await producer.send_and_wait(
            "events-routed", json.dumps(batch).encode(), partition=partition_for(uid, 4)
        )
    finally:
        await producer.stop()
    p = engine.wait_profile(uid, lambda p: sum(p["counts"].values()) == 2)
    assert p["counts"] == {"page_view": 1, "product_view": 1}

    def is_mine(d: dict[str, Any]) -> bool:
        return isinstance(d["event"], dict) and d["event"].get("event_id") == f"{uid}-bad"

    letters = await engine.dead_letters(1, is_mine)
    mine = [
        d
        for d in letters
        if isinstance(d["event"], dict) and d["event"].get("event_id") == f"{uid}-bad"
    ]
    assert mine and "cannot apply" in mine[0]["error"]
    # the agent is still alive and applies later events
    assert (
        engine.post_events([{"type": "search", "user_id": uid, "properties": {"query": "x"}}])[0]
        == 202
    )
    engine.wait_profile(uid, lambda p: p["counts"].get("search") == 1)
