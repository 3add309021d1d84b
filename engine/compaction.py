"""Keeping the embedded broker small: the routed topic is emptied once it has been applied.

The embedded broker keeps every message it is sent, and its work for each fetch grows with
what a partition holds (``bench/broker.py``: ~0.4 ms of broker CPU per message sent to an
empty partition read at its end, ~1.9 ms at 10,000 messages), so under sustained load the
latency of every event rose with time. Nothing needs the routed messages once they are applied:
the journal keeps every event, and the tables hold what was derived from them.

So, with the embedded broker, the routed events go to two topics in turn (`routed_names`), and
once a partition of the current one holds ``[broker] embedded_compact_messages`` messages,
`RoutedCompaction`:

1. holds new publishes and lets those in flight be acknowledged;
2. waits until the profile agent has applied every message of the current topic (it reports
   each one), so a visitor's events are applied in order across the switch;
3. sends the publishes to the other topic (empty) from then on: they waited a few ms;
4. deletes the drained topic and creates it again, empty, and points the consumer at its
   offset 0 (Faust's offset commits wait meanwhile), ready for the next switch.

If the agent has not caught up within ``drain_s`` (it may itself be waiting to publish), the
publishes go on to the same topic and the next try comes ``backoff_s`` later. With an external
Kafka cluster, retention is Kafka's business and nothing here runs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faust.transport.drivers.aiokafka import server_list
from faust.types import TP

from personify.engine.app import app, current_config, publisher, routed_names, topic
from personify.engine.failpoints import failpoint
from personify.engine.logging import get_logger
from personify.engine.metrics import ROUTED_COMPACTIONS
from personify.engine.publisher import Publisher
from personify.engine.transport import commits_held, rewind

__all__ = ["RoutedCompaction", "compaction"]

_log = get_logger(__name__)


class RoutedCompaction:
    """Switches the routed events between two topics and empties the one left (see the module).

    Args:
        pub: the publisher of routed events; its topic is the first of ``topics``.
        topics: the two Faust topics to publish to in turn (none: never compacts).
        threshold: messages in one partition of the current topic that start a switch.
        drain_s: how long publishes are held waiting for the agent to catch up.
        backoff_s: the wait before another try after one that gave up.
    """

    def __init__(
        self,
        pub: Publisher,
        topics: list[Any],
        threshold: int,
        drain_s: float = 0.5,
        backoff_s: float = 10.0,
    ) -> None:
        self.pub = pub
        self.topics = topics
        self.threshold = threshold if len(topics) == 2 else 0
        self.drain_s = drain_s
        self.backoff_s = backoff_s
        #: (topic, partition) -> the offset after the last message the profile agent applied.
        self.applied: dict[tuple[str, int], int] = {}
        self._next_try = 0.0
        self._running = False
        #: A topic switched away from whose emptying failed: emptied before the next switch.
        self._unready: str | None = None

    def note_applied(self, tp: Any, offset: int) -> None:
        """The profile agent applied the message at ``offset`` of ``tp`` (topic, partition)."""
        key = (tp.topic, tp.partition)
        if offset >= self.applied.get(key, 0):
            self.applied[key] = offset + 1

    @property
    def current(self) -> str:
        """The name of the topic routed events are published to now."""
        name: str = self.pub.topic.get_topic_name()
        return name

    @property
    def due(self) -> bool:
        """Whether a partition holds enough to switch (and no try is running or backing off)."""
        return (
            self.threshold > 0
            and self.pub.ready.is_set()  # the journal's tail is published (not held)
            and not self._running
            and time.monotonic() >= self._next_try
            and max(self.pub.ends.values(), default=0) >= self.threshold
        )

    def drained(self) -> bool:
        """Whether every message published to the current topic has been applied."""
        name = self.current
        return all(self.applied.get((name, p), 0) >= end for p, end in self.pub.ends.items())

    async def run(self) -> bool:
        """Switch topics if the agent catches up in time, then empty the old one.

        A broker error is logged and the next try comes ``backoff_s`` later; a topic whose
        emptying failed is emptied before any switch back to it.
        """
        self._running = True
        try:
            return await self._run()
        except Exception as exc:
            self._next_try = time.monotonic() + self.backoff_s
            _log.warning("routed topic switch failed; tried again later", error=repr(exc))
            return False
        finally:
            self._running = False

    async def _run(self) -> bool:
        if self._unready is not None:
            await self._recreate(self._unready)
            self._unready = None
        t0 = time.perf_counter()
        async with self.pub.held():
            deadline = time.monotonic() + self.drain_s
            while not self.drained():
                if time.monotonic() >= deadline:
                    self._next_try = time.monotonic() + self.backoff_s
                    _log.info(
                        "routed topic switch postponed: the agent is behind",
                        published=dict(self.pub.ends),
                        applied={f"{t}:{p}": o for (t, p), o in self.applied.items()},
                    )
                    return False
                await asyncio.sleep(0.001)
            old, held = self.current, sum(self.pub.ends.values())
            self.pub.topic = next(t for t in self.topics if t.get_topic_name() != old)
            self.pub.ends.clear()
        paused_ms = (time.perf_counter() - t0) * 1000
        self._unready = old
        failpoint("topic_switch")
        await self._recreate(old)
        self._unready = None
        ROUTED_COMPACTIONS.inc()
        _log.info(
            "routed topic switched and emptied",
            emptied=old,
            messages=held,
            publishes_held_ms=round(paused_ms, 1),
            took_ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        return True

    async def _recreate(self, name: str) -> None:
        cfg = current_config()
        async with commits_held(app.consumer):
            admin = AIOKafkaAdminClient(bootstrap_servers=server_list(app.conf.broker, 9092))
            await admin.start()
            try:
                deleted = await admin.delete_topics([name])
                _check("delete", deleted.topic_error_codes, ok=(0, _UNKNOWN_TOPIC))
                created = await admin.create_topics(
                    [NewTopic(name, cfg.broker.partitions, cfg.broker.replication_factor)]
                )
                _check("create", created.topic_errors, ok=(0,))
            finally:
                await admin.close()
            await rewind(app.consumer, [TP(name, p) for p in range(cfg.broker.partitions)])
        for key in [k for k in self.applied if k[0] == name]:
            del self.applied[key]


#: Kafka's error code for a topic that does not exist (deleting it again is no error).
_UNKNOWN_TOPIC = 3


def _check(what: str, results: Any, ok: tuple[int, ...]) -> None:
    """Raise if an admin answer's ``(topic, error code, ...)`` entries hold an error."""
    for topic_name, code, *_rest in results:
        if code not in ok:
            raise RuntimeError(f"{what} topic {topic_name}: Kafka error code {code}")


_compaction: RoutedCompaction | None = None


def compaction() -> RoutedCompaction:
    """The process's compaction of the routed topic (never due without the embedded broker)."""
    global _compaction
    if _compaction is None:
        cfg = current_config()
        pub = publisher()
        names = routed_names(cfg)
        others = [topic(name) for name in names if name != pub.topic.get_topic_name()]
        _compaction = RoutedCompaction(
            pub, [pub.topic, *others], cfg.broker.embedded_compact_messages
        )
    return _compaction


@app.timer(1.0)  # type: ignore[untyped-decorator] # Faust is untyped
async def _compact_when_due() -> None:
    routed = compaction()
    if routed.due:
        await routed.run()
