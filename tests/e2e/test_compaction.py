"""The embedded broker's routed topic is emptied once applied: no event lost or counted twice."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from personify.engine.publisher import partition_for

VISITORS = [f"compact-{n}" for n in range(8)]


def _post_round(eng: Any, per_visitor: int) -> None:
    """One POST per event, each once the last is answered: one routed message each.

    (Concurrent POSTs would share messages: the publisher batches what arrives together.)
    """
    for n in range(per_visitor):
        for u in VISITORS:
            event = {"type": "product_view", "user_id": u, "item_id": f"i{n}"}
            assert eng.post_events(event)[0] == 202


def _wait_counts(eng: Any, views: int) -> None:
    for u in VISITORS:
        eng.wait_profile(u, lambda p: p["counts"] == {"product_view": views})


def test_routed_topic_is_emptied_without_losing_or_repeating_events(engine_factory: Any) -> None:
    """Events before, across and after compactions are each applied once, and after a restart."""
    eng = engine_factory(
        config="[broker]\nembedded_compact_messages = 10\n",
        env={"PERSONIFY_LOGGING__LEVEL": "info"},
    ).start()
    views = 0
    for round_ in range(1, 4):
        _post_round(eng, 10)  # 80 messages over the 4 partitions: past 10 in one at least
        views += 10
        _wait_counts(eng, views)
        deadline = time.monotonic() + 30  # a try postponed (the agent behind) waits 10 s
        while eng.metric("personify_routed_compactions_total") < round_:
            assert time.monotonic() < deadline, eng.tail()
            time.sleep(0.2)
    # No partition holds what 30 events a visitor would have left there.
    busiest = max(Counter(partition_for(u, 4) for u in VISITORS).values())
    ends = [eng.metric(f'personify_routed_end_offset{{partition="{p}"}}') for p in range(4)]
    assert max(ends) < 30 * busiest, ends
    # The journal replays only what was not applied: counts survive a restart unchanged.
    assert eng.stop() == 0, eng.tail()
    eng.start()
    _wait_counts(eng, views)
    _post_round(eng, 1)
    _wait_counts(eng, views + 1)
