"""Events written straight into the events topic by any Kafka client reach the profile."""

from __future__ import annotations

import json
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


def _total(profile: dict[str, Any]) -> int:
    return sum(profile["counts"].values())


async def _produce(engine: Any, *messages: tuple[bytes | None, bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=engine.broker)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait("events", value, key=key)
    finally:
        await producer.stop()


async def _dead_letters(engine: Any, want: int) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(
        "events-dlq",
        bootstrap_servers=engine.broker,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    found: list[dict[str, Any]] = []
    try:
        for _ in range(200):
            batch = await consumer.getmany(timeout_ms=100)
            found += [json.loads(r.value) for rs in batch.values() for r in rs]
            if len(found) >= want:
                break
    finally:
        await consumer.stop()
    return found


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
    await _produce(
        engine, (uid.encode(), json.dumps(single).encode()), (None, json.dumps(batch).encode())
    )
    p = engine.wait_profile(uid, lambda p: _total(p) == 3)
    assert p["counts"] == {"product_view": 1, "search": 1, "add_to_cart": 1}
    assert p["cart"]["items"][0]["item_id"] == "k1"


async def test_redelivered_event_id_counts_once(engine: Any, uid: str) -> None:
    """The same event id sent twice (over Kafka and over HTTP) is applied once."""
    event = {"event_id": f"dup-{uid}", "type": "page_view", "user_id": uid}
    await _produce(
        engine,
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
    await _produce(
        engine,
        (None, b"{not json"),
        (None, json.dumps(bad_type).encode()),
        (None, json.dumps(batch).encode()),
    )
    engine.wait_profile(uid, lambda p: p["counts"].get("page_view") == 1)
    letters = await _dead_letters(engine, 3)
    mine = [d for d in letters if isinstance(d["event"], dict) and d["event"].get("user_id") == uid]
    assert {d["field"] for d in mine} == {"type"}
    assert "teleport" in mine[0]["error"]
    no_id = [d for d in letters if d["field"] == "user_id" and d["source"].get("index") == 1]
    assert no_id, letters
    malformed = [d for d in letters if "malformed JSON" in d["error"]]
    assert malformed and malformed[0]["event"].startswith("{not json")
    assert all({"topic", "partition", "offset"} <= set(d["source"]) for d in letters)
