"""The crash matrix: killed anywhere, a restarted engine counts exactly and forgets no erasure.

After a kill at each point of its work, every acknowledged event counts exactly once, none is
lost, and every erased visitor stays erased. Each case arms one fail point
(`personify.engine.failpoints`): the engine kills itself there (with its embedded broker, or
alone) while a client sends a burst of 5,000 events of one visitor, light visitors' events,
catalog changes and erasures. The client then starts the engine again on the same data
directory, sends again what was not acknowledged (same ids, as a client retries), and checks
every profile, item and erasure.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

#: Small topics, segments and retention, so that topic switches, flushes and journal
#: compactions happen within a few seconds of traffic.
CONFIG = """
[broker]
embedded_compact_messages = 5
[storage]
journal_segment_bytes = 65536
journal_retention_s = 1.0
[recommend]
signal_flush_interval_s = 1.0
[model]
enabled = false
"""
BUSY = "crash-busy"
LIGHT = [f"crash-light-{i}" for i in range(60)]
ERASED = [f"crash-erased-{i}" for i in range(3)]


def _plan() -> list[tuple[str, Any]]:
    """What the client sends, in order: ("events", batch), ("erase", visitor), ("items", ...)."""
    plan: list[tuple[str, Any]] = [
        ("events", [{"event_id": f"e-{u}", "type": "page_view", "user_id": u} for u in ERASED])
    ]
    for n in range(10):  # the burst: 5,000 events of one visitor, with light ones between
        plan.append(
            (
                "events",
                [
                    {
                        "event_id": f"busy-{n}-{i}",
                        "type": "product_view",
                        "user_id": BUSY,
                        "item_id": f"c-{i % 20}",
                    }
                    for i in range(500)
                ],
            )
        )
        plan.append(
            (
                "events",
                [
                    {
                        "event_id": f"light-{n}-{u}",
                        "type": "add_to_cart" if n % 3 else "search",
                        "user_id": u,
                        **({"item_id": "c-1"} if n % 3 else {"properties": {"query": "x"}}),
                    }
                    for u in LIGHT
                ],
            )
        )
        if n in (2, 5, 8):
            plan.append(("erase", ERASED[n // 3]))
            plan.append(("items", [{"item_id": f"c-new-{n}", "title": f"New lamp {n}"}]))
    return plan


def _answer(eng: Any, action: str, body: Any) -> tuple[int, Any]:
    """Send one action; the status and body (status 0: the engine died, or no answer)."""
    if action == "events":
        answer: tuple[int, Any] = eng.post_events(body)
    elif action == "erase":
        answer = eng.request("DELETE", f"/v1/users/{body}")
    else:
        answer = eng.request("POST", "/v1/items", {"items": body})
    return answer


def _send(eng: Any, action: str, body: Any) -> bool:
    """Send one action; False when it was not acknowledged."""
    return _answer(eng, action, body)[0] == 202


def _retry(eng: Any, action: str, body: Any) -> list[tuple[int, Any]]:
    """What a client does with what was not acknowledged: send it again, a few times.

    Returns the answers, the last one 202 when it was acknowledged.
    """
    answers: list[tuple[int, Any]] = []
    for _attempt in range(3):
        answers.append(_answer(eng, action, body))
        if answers[-1][0] == 202:
            break
    return answers


def _expected(sent: list[tuple[str, Any]]) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = {}
    for action, body in sent:
        if action == "events":
            for e in body:
                counts.setdefault(e["user_id"], Counter())[e["type"]] += 1
        elif action == "erase":
            counts.pop(body, None)
    return counts


#: (point, which pass kills, with the embedded broker): five points, one with the engine
#: killed alone. ``PERSONIFY_CRASH_MATRIX=full`` (``bench/crash.py``) runs every point at
#: several passes, each with and without the broker.
CASES = [
    ("fold", 5, True),
    ("applied", 3, False),
    ("erase", 1, True),
    ("catalog_write", 2, True),
    ("journal_compact", 1, True),
]
if os.environ.get("PERSONIFY_CRASH_MATRIX") == "full":
    CASES += [
        (point, count, group)
        for point, count in (
            ("journal_append", 4),
            ("journal_append", 12),
            ("signal_flush", 2),
            ("applied", 5),
            ("fold", 2),
            ("fold", 14),
            ("applied", 9),
            ("applied", 17),
            ("erase", 2),
            ("erase", 3),
            ("signal_flush", 5),
            ("topic_switch", 1),
            ("topic_switch", 3),
            ("catalog_write", 4),
            ("journal_compact", 3),
        )
        for group in (True, False)
    ]


@pytest.mark.parametrize(
    ("point", "count", "group"),
    CASES,
    ids=[f"{p}-{n}-{'with broker' if g else 'engine alone'}" for p, n, g in CASES],
)
def test_killed_at_a_point_and_restarted_counts_exactly(
    engine_factory: Any, point: str, count: int, group: bool
) -> None:
    env = {"PERSONIFY_FAILPOINTS": f"{point}:{count}"}
    if group:
        env["PERSONIFY_FAILPOINTS_GROUP"] = "1"
    eng = engine_factory(config=CONFIG, env=env).start()
    assert eng.request("POST", "/v1/items", {"items": [{"item_id": "c-1", "title": "Lamp"}]})[0]
    acked: list[tuple[str, Any]] = []
    unacked: list[tuple[str, Any]] = []
    for action, body in _plan():
        if unacked or eng.proc.poll() is not None:
            unacked.append((action, body))
        elif _send(eng, action, body):
            acked.append((action, body))
        else:
            unacked.append((action, body))
    died = eng.wait_for(lambda: eng.proc.poll() is not None, 60, f"the kill at {point}")
    assert died
    assert f"failpoint {point}" in eng.tail(20000)
    eng.stop()

    info = {"PERSONIFY_LOGGING__LEVEL": "info"}  # what the restarted engine did, if it fails
    eng2 = engine_factory(eng.data_dir, config=CONFIG, env=info).start()
    for action, body in unacked:  # the client retries what was not acknowledged, in order
        answers = _retry(eng2, action, body)
        assert answers[-1][0] == 202, (action, answers, eng2.tail())
    expected = _expected(acked + unacked)
    marker = {"event_id": "crash-marker", "type": "page_view", "user_id": BUSY}
    assert eng2.post_events([marker])[0] == 202
    expected[BUSY]["page_view"] += 1
    eng2.wait_profile(BUSY, lambda p: p["counts"].get("page_view") == 1)
    for user, counts in expected.items():
        profile = eng2.wait_profile(user, lambda p, c=counts: p["counts"] == dict(c), 30)
        assert profile["counts"] == dict(counts), user
    for user in ERASED:
        if user not in expected:
            assert eng2.profile(user)[0] == 404, user
    for action, body in acked + unacked:
        if action == "items":
            item_id = body[0]["item_id"]
            eng2.wait_for(
                lambda i=item_id: eng2.request("GET", f"/v1/items/{i}")[0] == 200, 30, item_id
            )
