"""Live updates: per-visitor message channels behind the WebSocket endpoint.

Each visitor with a socket open (or open recently) has a `Channel`: a per-visitor sequence
number, a bounded replay buffer (``[push] replay_size``) that lets a client reconnecting with
``resume_from`` receive what it missed, and the sockets subscribed to it. Each socket has a
`Subscriber` queue bounded at ``[push] queue_size``: a client that does not keep up loses its
oldest messages (counted) and never slows down the others or the engine.

Messages are JSON objects with ``type`` and ``seq``; they are encoded once and the same bytes
go to every socket of the visitor.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from personify.engine.app import current_config
from personify.engine.config import PushConfig
from personify.engine.jsonbytes import dumps_kept
from personify.engine.logging import get_logger
from personify.engine.metrics import WS_DROPPED, WS_MESSAGES
from personify.plugins.manager import plugins

__all__ = [
    "Channel",
    "Hub",
    "Remote",
    "Subscriber",
    "deliver",
    "hub",
    "recommendations_message",
]


_log = get_logger(__name__)


class Subscriber:
    """One socket's queue of encoded messages, bounded: the oldest go first when it is full."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def offer(self, data: bytes) -> None:
        """Queue ``data``; drop the oldest message if the queue is full."""
        if len(self._queue) >= self.capacity:
            self._queue.popleft()
            self.dropped += 1
            WS_DROPPED.inc()
        self._queue.append(data)
        self._wake.set()

    async def take(self) -> list[bytes]:
        """Every queued message, oldest first (waits for at least one; [] once closed)."""
        while not self._queue and not self.closed:
            self._wake.clear()
            await self._wake.wait()
        out = list(self._queue)
        self._queue.clear()
        return out

    def close(self) -> None:
        """Wake `take` for good."""
        self.closed = True
        self._wake.set()


@dataclass
class Channel:
    """A visitor's sequence, replay buffer and sockets."""

    replay_size: int
    #: The visitor's id as their sockets know it, JSON-encoded (not a pseudonym).
    display: bytes = b'""'
    seq: int = 0
    buffer: deque[tuple[int, bytes]] = field(default_factory=deque)
    subscribers: set[Subscriber] = field(default_factory=set)
    idle_since: float | None = None


class Remote(Protocol):
    """The other workers' sockets, when several workers share the partitions."""

    def watching(self, user_id: str) -> bool:
        """Whether a socket on another worker follows ``user_id``."""
        ...

    def forward(self, user_id: str, kind: str, body: bytes) -> None:
        """Send a message to the other workers' sockets of ``user_id``."""
        ...

    def forget(self, user_id: str) -> None:
        """Have every other worker drop what it buffers for ``user_id``."""
        ...


class Hub:
    """Every visitor's channel on this worker.

    Args:
        cfg: the [push] settings.
    """

    def __init__(self, cfg: PushConfig) -> None:
        self.cfg = cfg
        self._channels: OrderedDict[str, Channel] = OrderedDict()
        #: The other workers' sockets (set by the relay when workers share the partitions).
        self.remote: Remote | None = None

    def __len__(self) -> int:
        return len(self._channels)

    def watching(self, user_id: str) -> bool:
        """Whether anyone follows ``user_id`` (a socket open now or recently)."""
        channel = self._channels.get(user_id)
        if channel is None:
            return False
        if channel.subscribers:
            return True
        return not self._expired(channel, time.monotonic())

    def followed(self, user_id: str) -> bool:
        """Whether anyone follows ``user_id``, on this worker or on another."""
        return self.watching(user_id) or (self.remote is not None and self.remote.watching(user_id))

    def watched(self) -> list[str]:
        """The visitors followed on this worker (sockets open now or recently)."""
        now = time.monotonic()
        return [u for u, c in self._channels.items() if not self._expired(c, now)]

    def sockets(self) -> int:
        """Open sockets."""
        return sum(len(c.subscribers) for c in self._channels.values())

    def _expired(self, channel: Channel, now: float) -> bool:
        return (
            not channel.subscribers
            and channel.idle_since is not None
            and now - channel.idle_since > self.cfg.replay_ttl_s
        )

    def subscribe(
        self, user_id: str, resume_from: int | None, display: str | None = None
    ) -> tuple[Subscriber, bool]:
        """A new socket of ``user_id``: its queue, and whether it needs a fresh list.

        ``display`` is the id the socket asked for, shown in every message (``user_id`` is
        its pseudonym when ids are pseudonymised).

        With ``resume_from``, the messages after that sequence number still in the replay
        buffer are queued first; a fresh list is needed when none was given, or when messages
        after it are no longer buffered (or the sequence is unknown, e.g. after a restart).
        """
        channel = self._channels.get(user_id)
        if channel is None or self._expired(channel, time.monotonic()):
            channel = Channel(self.cfg.replay_size, dumps_kept(display or user_id))
            self._channels[user_id] = channel
        self._channels.move_to_end(user_id)
        sub = Subscriber(self.cfg.queue_size)
        channel.subscribers.add(sub)
        channel.idle_since = None
        self._evict()
        if resume_from is None or resume_from > channel.seq:
            return sub, True
        missed = [data for seq, data in channel.buffer if seq > resume_from]
        oldest = channel.buffer[0][0] if channel.buffer else channel.seq + 1
        for data in missed:
            sub.offer(data)
        return sub, oldest > resume_from + 1

    def unsubscribe(self, user_id: str, sub: Subscriber) -> None:
        """The socket closed; the buffer stays for ``replay_ttl_s``."""
        sub.close()
        channel = self._channels.get(user_id)
        if channel is None:
            return
        channel.subscribers.discard(sub)
        if not channel.subscribers:
            channel.idle_since = time.monotonic()

    def _evict(self) -> None:
        now = time.monotonic()
        while len(self._channels) > self.cfg.max_channels:
            oldest, channel = next(iter(self._channels.items()))
            if channel.subscribers and not self._expired(channel, now):
                self._channels.move_to_end(oldest)  # in use: never dropped
                if all(c.subscribers for c in self._channels.values()):
                    break
                continue
            del self._channels[oldest]

    def publish(self, user_id: str, kind: str, body: bytes) -> int:
        """Send ``{"type": kind, "seq": N, "user_id": U, <body>}`` to ``user_id``'s sockets.

        ``body`` is the rest of the object, encoded: ``b'"items":[...]'``. Returns N.
        Nothing is sent (0) when no channel follows the visitor.
        """
        channel = self._channels.get(user_id)
        if channel is None:
            return 0
        if self._expired(channel, time.monotonic()):
            del self._channels[user_id]
            return 0
        channel.seq += 1
        head = (
            b'{"type":'
            + orjson.dumps(kind)
            + b',"seq":'
            + str(channel.seq).encode()
            + b',"user_id":'
            + channel.display
        )
        data = head + (b"," + body if body else b"") + b"}"
        channel.buffer.append((channel.seq, data))
        while len(channel.buffer) > channel.replay_size:
            channel.buffer.popleft()
        for sub in channel.subscribers:
            sub.offer(data)
        WS_MESSAGES.labels(kind).inc()
        return channel.seq

    def send(self, user_id: str, kind: str, body: bytes) -> int:
        """`publish` here and on the other workers' sockets of ``user_id``; this seq."""
        if self.remote is not None:
            self.remote.forward(user_id, kind, body)
        return self.publish(user_id, kind, body)

    def forget(self, user_id: str, *, everywhere: bool = True) -> None:
        """Drop what is buffered for ``user_id`` (an erasure); their sockets stay open.

        With ``everywhere``, the other workers drop theirs too.
        """
        channel = self._channels.get(user_id)
        if channel is not None:
            channel.buffer.clear()
        if everywhere and self.remote is not None:
            self.remote.forget(user_id)

    def close_all(self) -> None:
        """Wake every socket's sender to finish (the server is stopping)."""
        for channel in self._channels.values():
            for sub in channel.subscribers:
                sub.close()


def recommendations_message(rec_id: str, items: bytes, variant: str = "default") -> bytes:
    """The body of a ``recommendations`` message (see `Hub.publish`)."""
    return (
        b'"recommendation_id":'
        + orjson.dumps(rec_id)
        + b',"variant":'
        + orjson.dumps(variant)
        + b',"items":'
        + items
    )


async def deliver(user_id: str, plugin: str, action: Any, *, hooks: bool = True) -> bool:
    """Send a trigger's action to the visitor's sockets and to the outbound-action hooks.

    An action is a dict with a string ``type`` (e.g. ``offer``); anything else is logged and
    dropped. Without ``hooks`` it only goes to the visitor's sockets. Returns whether it was
    sent.
    """
    if not isinstance(action, dict) or not isinstance(action.get("type"), str):
        _log.warning(
            "plugin returned an invalid action; dropped", plugin=plugin, action=repr(action)
        )
        return False
    kind = action["type"]
    rest = {k: v for k, v in action.items() if k not in ("type", "seq", "user_id")}
    rest.setdefault("plugin", plugin)
    try:
        body = orjson.dumps(rest)[1:-1]
    except TypeError as exc:
        _log.warning("plugin action is not JSON; dropped", plugin=plugin, error=str(exc))
        return False
    hub().send(user_id, kind, body)
    if hooks:
        await plugins().call("personify_action", user_id=user_id, action=action)
    return True


@functools.cache
def hub() -> Hub:
    """This worker's hub."""
    return Hub(current_config().push)
