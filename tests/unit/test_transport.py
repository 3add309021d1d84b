"""The tuned transport against the real embedded broker: what the stock aiokafka client gets wrong.

The producer's client first tracks every topic; the first send to a topic created after its
last metadata answer made aiokafka track that topic alone, and the next answer dropped the
partitions of every other topic, so a batch already queued for one of them waited for a leader
until the request timeout (the engine's publishes hung behind it after a restart).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from personify.engine.broker import EmbeddedBroker
from personify.engine.transport import TopicKeepingClient, keep_topics


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    with EmbeddedBroker(tmp_path / "broker.log") as embedded:
        yield embedded


async def _create(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 4, 1)])
    finally:
        await admin.close()


async def test_a_new_topic_does_not_drop_the_partitions_of_the_others(
    broker: EmbeddedBroker,
) -> None:
    await _create(broker.bootstrap, "first")
    producer = keep_topics(AIOKafkaProducer(bootstrap_servers=broker.bootstrap))
    assert isinstance(producer.client, TopicKeepingClient)
    await producer.start()
    try:
        await producer.send_and_wait("first", b"a", partition=3)
        await _create(broker.bootstrap, "second")  # unknown to the producer's metadata
        await producer.send_and_wait("second", b"b", partition=0)
        # The metadata asked for after "second" still holds "first", so a batch queued for it
        # keeps its leader.
        assert {"first", "second"} <= producer.client._topics
        await producer.client.force_metadata_update()
        assert producer.client.cluster.partitions_for_topic("first") == {0, 1, 2, 3}
        meta = await producer.send_and_wait("first", b"c", partition=3)
        assert (meta.topic, meta.partition, meta.offset) == ("first", 3, 1)
    finally:
        await producer.stop()
