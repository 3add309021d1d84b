"""The push hub: sequence numbers, replay on resume, bounded queues that drop the oldest."""

from __future__ import annotations

import asyncio
import json

from personify.agents.push import Hub, Subscriber
from personify.engine.config import PushConfig


def decode(data: bytes) -> dict[str, object]:
    return dict(json.loads(data))


def test_messages_carry_type_and_increasing_seq() -> None:
    hub = Hub(PushConfig())
    assert hub.publish("u", "recommendations", b'"x":1') == 0  # nobody follows u yet
    sub, fresh = hub.subscribe("u", None)
    assert fresh
    assert hub.publish("u", "recommendations", b'"x":1') == 1
    assert hub.publish("u", "offer", b'"trigger":"t"') == 2
    got = asyncio.run(sub.take())
    assert [decode(d) for d in got] == [
        {"type": "recommendations", "seq": 1, "user_id": "u", "x": 1},
        {"type": "offer", "seq": 2, "user_id": "u", "trigger": "t"},
    ]


def test_messages_show_the_id_the_socket_asked_for() -> None:
    """With pseudonymised ids the channel is keyed by the pseudonym, messages show the id."""
    hub = Hub(PushConfig())
    sub, _fresh = hub.subscribe("p-0123", None, display="alice@example.com")
    hub.publish("p-0123", "offer", b'"trigger":"t"')
    (got,) = asyncio.run(sub.take())
    assert decode(got) == {
        "type": "offer",
        "seq": 1,
        "user_id": "alice@example.com",
        "trigger": "t",
    }


def test_resume_replays_what_was_missed() -> None:
    hub = Hub(PushConfig(replay_size=3))
    sub, _ = hub.subscribe("u", None)
    for n in range(5):
        hub.publish("u", "recommendations", f'"n":{n}'.encode())
    hub.unsubscribe("u", sub)
    assert hub.watching("u")  # the buffer outlives the socket
    again, fresh = hub.subscribe("u", 3)
    assert not fresh
    assert [decode(d)["seq"] for d in asyncio.run(again.take())] == [4, 5]
    # Older than the buffer: what is left, plus a fresh list.
    third, fresh = hub.subscribe("u", 1)
    assert fresh
    assert [decode(d)["seq"] for d in asyncio.run(third.take())] == [3, 4, 5]
    # Unknown (ahead of the channel, e.g. after a restart): a fresh list only.
    fourth, fresh = hub.subscribe("u", 99)
    assert fresh
    fourth.close()
    assert asyncio.run(fourth.take()) == []


def test_a_full_queue_drops_the_oldest() -> None:
    sub = Subscriber(2)
    for n in range(5):
        sub.offer(str(n).encode())
    assert sub.dropped == 3
    assert asyncio.run(sub.take()) == [b"3", b"4"]


def test_a_slow_socket_does_not_hold_back_another() -> None:
    hub = Hub(PushConfig(queue_size=2))
    slow, _ = hub.subscribe("u", None)
    fast, _ = hub.subscribe("u", None)
    for n in range(10):
        hub.publish("u", "recommendations", f'"n":{n}'.encode())
        assert decode(asyncio.run(fast.take())[0])["seq"] == n + 1
    assert slow.dropped == 8
    assert [decode(d)["seq"] for d in asyncio.run(slow.take())] == [9, 10]


def test_channels_are_bounded() -> None:
    hub = Hub(PushConfig(max_channels=2))
    for user in "abc":
        sub, _ = hub.subscribe(user, None)
        hub.unsubscribe(user, sub)
    assert len(hub) == 2 and not hub.watching("a")
