"""Live messages across workers: a socket on one worker follows a visitor another worker owns.

With an external broker several workers share the partitions. A visitor's events are applied,
and their lists computed, by the worker that owns their partition, while their WebSocket may be
open on any worker. The workers tell each other through the ``[topics] push`` topic, which each
of them reads in full (no consumer group), from its end when it starts:

- ``watch``: the visitors a worker has sockets for (open now, or recently: their replay buffer
  is still kept). A worker announces a visitor as soon as a socket opens, and its whole list
  every ``[push] announce_s``; an announcement lapses after three periods, so the sockets of a
  worker that died are soon forgotten. A first socket whose visitor another worker owns asks
  that worker for the visitor's current list (``fresh``).
- ``hello``: sent by a worker whose partitions changed; every worker answers with its list at
  once, so a worker taking over partitions knows at once whom to push to.
- ``msg``: a message for a visitor's sockets, sent by the owner when another worker follows
  them; each worker that follows them queues it like a message of its own (with its own
  ``seq``). ``forget`` drops a visitor's buffered messages everywhere (an erasure).

With the embedded broker there is only ever one worker, and the relay does not run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import mode
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from faust.transport.drivers.aiokafka import server_list

from personify.agents.exposures import recorder
from personify.agents.lists import serve_recommendations
from personify.agents.push import hub, recommendations_message
from personify.agents.recommend import Request
from personify.engine.app import app, current_config, owns, topic
from personify.engine.logging import get_logger

__all__ = ["Relay", "RelayService", "open_socket"]

_log = get_logger(__name__)
#: Visitors per ``watch`` record.
_CHUNK = 2000
#: Announcements lapse after this many periods without one.
_LAPSE_PERIODS = 3


class Relay:
    """This worker's side of the push topic: who watches what elsewhere, and the messages."""

    def __init__(self) -> None:
        #: This process, as the other workers know it.
        self.worker_id = uuid.uuid4().hex[:12]
        self.cfg = current_config()
        #: visitor -> {worker id -> when its announcement lapses (monotonic)}.
        self._watchers: dict[str, dict[str, float]] = {}
        self._topic = topic(self.cfg.topics.push)
        self._pending: set[asyncio.Future[Any]] = set()

    # -- the other workers' sockets (push.Remote) ------------------------------------------

    def watching(self, user_id: str) -> bool:
        """Whether a socket on another worker follows ``user_id``."""
        workers = self._watchers.get(user_id)
        if not workers:
            return False
        now = time.monotonic()
        return any(until > now for until in workers.values())

    def forward(self, user_id: str, kind: str, body: bytes) -> None:
        """Send a message to the other workers that follow ``user_id``."""
        workers = self._watchers.get(user_id)
        if not workers:
            return
        now = time.monotonic()
        to = [w for w, until in workers.items() if until > now]
        if to:
            self._send(user_id, {"op": "msg", "to": to, "user": user_id, "kind": kind}, body)

    def forget(self, user_id: str) -> None:
        """Have every other worker drop what it buffers for ``user_id``."""
        self._send(user_id, {"op": "forget", "user": user_id})

    # -- announcements ---------------------------------------------------------------------

    def watch(self, user_id: str, *, fresh: bool) -> None:
        """A socket for ``user_id`` opened here; with ``fresh`` the owner sends their list."""
        self._send(user_id, {"op": "watch", "users": [user_id], "fresh": fresh})

    def announce(self) -> None:
        """Tell the other workers every visitor followed here."""
        users = hub().watched()
        for i in range(0, len(users), _CHUNK):
            self._send(self.worker_id, {"op": "watch", "users": users[i : i + _CHUNK]})

    def hello(self) -> None:
        """Ask every worker to announce its sockets now (partitions moved)."""
        self._send(self.worker_id, {"op": "hello"})

    def _send(self, key: str, head: dict[str, Any], body: bytes = b"") -> None:
        head["w"] = self.worker_id
        value = orjson.dumps(head) + (b"\n" + body if body else b"")
        task = asyncio.ensure_future(self._produce(key, value))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _produce(self, key: str, value: bytes) -> None:
        try:
            await self._topic.send(key=key.encode(), value=value, force=True)
        except Exception as exc:
            _log.warning("push topic send failed; message lost", error=str(exc))

    # -- what the other workers send -------------------------------------------------------

    def receive(self, value: bytes) -> None:
        """Apply one record of the push topic."""
        head_text, _, body = value.partition(b"\n")
        try:
            head = orjson.loads(head_text)
            op, sender = head["op"], head["w"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            _log.warning("malformed push topic record; skipped", record=value[:200])
            return
        if sender == self.worker_id:
            return
        if op == "msg":
            if self.worker_id in head.get("to", ()):
                hub().publish(head["user"], head["kind"], body)
        elif op == "watch":
            until = time.monotonic() + _LAPSE_PERIODS * self.cfg.push.announce_s
            for user in head.get("users", ()):
                self._watchers.setdefault(user, {})[sender] = until
                if head.get("fresh") and owns(user):
                    task = asyncio.ensure_future(self._send_list(user, sender))
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)
        elif op == "hello":
            self.announce()
        elif op == "forget":
            hub().forget(head["user"], everywhere=False)

    async def _send_list(self, user_id: str, worker: str) -> None:
        """Send ``user_id``'s current list to ``worker``, which just opened a socket for them."""
        try:
            served = await serve_recommendations(user_id, Request(k=self.cfg.recommend.list_size))
        except Exception:
            _log.exception("list for a socket on another worker failed", user_id=user_id)
            return
        recorder().served(user_id, served.rec_id, served.items, "ws", served.variant)
        body = recommendations_message(served.rec_id, served.items, served.variant)
        head = {"op": "msg", "to": [worker], "user": user_id, "kind": "recommendations"}
        self._send(user_id, head, body)

    def expire(self) -> None:
        """Drop lapsed announcements."""
        now = time.monotonic()
        for user in list(self._watchers):
            workers = self._watchers[user]
            for w in [w for w, until in workers.items() if until <= now]:
                del workers[w]
            if not workers:
                del self._watchers[user]


#: This worker's relay, or None when it is the only worker (the embedded broker).
_RELAY: Relay | None = None


@app.service
class RelayService(mode.Service):  # type: ignore[misc] # mode is untyped
    """Reads the push topic from its end and announces this worker's sockets periodically."""

    @mode.Service.task  # type: ignore[untyped-decorator]
    async def _run(self) -> None:
        global _RELAY
        cfg = current_config()
        if cfg.broker.embedded:
            return
        rl = Relay()
        await app.producer.maybe_start()
        await rl._topic.maybe_declare()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=server_list(app.conf.broker, 9092),
            enable_auto_commit=False,
            fetch_max_wait_ms=cfg.worker.fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            tps = [
                TopicPartition(cfg.topics.push, p)
                for p in sorted(consumer.partitions_for_topic(cfg.topics.push) or ())
            ] or [TopicPartition(cfg.topics.push, p) for p in range(cfg.broker.partitions)]
            consumer.assign(tps)
            # The broker may answer an end offset short of the true end: a few older records
            # may come first, which is harmless (no message was addressed to this new worker).
            await consumer.seek_to_end(*tps)
            _RELAY = rl
            hub().remote = rl
            rl.hello()
            rl.announce()
            next_announce = time.monotonic() + cfg.push.announce_s
            while not self.should_stop:
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                for records in batches.values():
                    for record in records:
                        try:
                            rl.receive(record.value)
                        except Exception:
                            _log.exception("push topic record failed; skipped")
                if time.monotonic() >= next_announce:
                    rl.expire()
                    rl.announce()
                    next_announce = time.monotonic() + cfg.push.announce_s
        finally:
            hub().remote = None
            _RELAY = None
            await consumer.stop()


async def _on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
    """Partitions moved: ask every worker who follows whom, to push to them at once."""
    if _RELAY is not None:
        _RELAY.hello()


app.on_partitions_assigned.connect(_on_assigned)


def open_socket(user_id: str) -> bool:
    """A socket for ``user_id`` opened here; whether another worker sends their first list.

    False (the caller serves the list) unless another worker owns the visitor.
    """
    rl = _RELAY
    if rl is None:
        return False
    remote_owner = owns(user_id) is False
    rl.watch(user_id, fresh=remote_owner)
    return remote_owner
