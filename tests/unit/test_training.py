"""A training run in a process of its own: the same model as in the engine, errors reported."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from personify.agents.training import _pace, fit, fit_in_child, run_in_child
from personify.embeddings.collab import AlsSettings, train_als
from personify.engine.config import Config
from personify.engine.priority import to_background
from personify.tables.history import Interactions

PURCHASE = Interactions.KINDS.index("purchase")
VIEW = Interactions.KINDS.index("product_view")


def _shop(visitors: int = 60, items: int = 30) -> Interactions:
    """Two tastes (even and odd items), each visitor viewing some and re-buying one."""
    rng = np.random.default_rng(3)
    user, item, kind, ts = [], [], [], []
    for u in range(visitors):
        taste = u % 2
        for n, i in enumerate(rng.choice(np.arange(taste, items, 2), size=8, replace=False)):
            user.append(u)
            item.append(int(i))
            kind.append(VIEW)
            ts.append(1_000_000 + u * 1000 + n)
        for week in range(3):
            user.append(u)
            item.append(taste)
            kind.append(PURCHASE)
            ts.append(2_000_000 + week * 604_800_000 + u)
    return Interactions(
        users=[f"u{u}" for u in range(visitors)],
        items=[f"i{i}" for i in range(items)],
        user=np.array(user, dtype=np.int32),
        item=np.array(item, dtype=np.int32),
        kind=np.array(kind, dtype=np.int8),
        ts_ms=np.array(ts, dtype=np.int64),
    )


def test_a_model_pickled_ranks_as_before() -> None:
    """Pickled as its fields (the index is built again): same items, vectors and answers."""
    settings = AlsSettings(factors=4, regularization=0.1, alpha=10.0, iterations=5)
    model = train_als([0, 0, 1, 2], [0, 1, 1, 2], [1.0, 2.0, 1.0, 1.0], ["a", "b", "c"], settings)
    again = pickle.loads(pickle.dumps(model))
    assert again.item_ids == model.item_ids
    np.testing.assert_array_equal(again.factors, model.factors)
    assert again.describe() == model.describe()
    vector = model.factors[0]
    assert again.top(vector, 3)[0] == model.top(vector, 3)[0]


def test_the_child_learns_what_the_engine_would() -> None:
    """`fit` in a child process gives the model, re-buying and arrays `fit` gives here."""
    rows, cfg = _shop(), Config()
    here = fit(rows, cfg)
    there = asyncio.run(run_in_child(fit_in_child, (rows, cfg), "test-training"))
    assert here.model is not None and there.model is not None
    assert there.model.item_ids == here.model.item_ids
    np.testing.assert_allclose(there.model.factors, here.model.factors, rtol=1e-4, atol=1e-5)
    assert there.repeat == here.repeat
    assert there.repeat.share > 0.5  # every shopper re-buys
    np.testing.assert_array_equal(there.rows.ts_ms, here.rows.ts_ms)
    np.testing.assert_array_equal(there.rows.user, here.rows.user)
    # The visitors' names are not sent back: the engine has them (the rows it sent).
    assert there.rows.users == []
    assert there.rows.with_users(rows.users).users == here.rows.users


def test_a_child_that_fails_reports_where() -> None:
    """An error in the child comes back as a RuntimeError naming it, with no result."""
    with pytest.raises(RuntimeError, match="AttributeError"):
        asyncio.run(run_in_child(fit_in_child, (_shop(), None), "test-training"))


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_background_priority_is_the_callers_thread_alone() -> None:
    """The thread that asks runs (and starts children) at SCHED_IDLE; the others do not."""
    seen: list[tuple[str, int]] = []

    def lower() -> None:
        seen.append((to_background(), os.sched_getscheduler(0)))

    worker = threading.Thread(target=lower)
    worker.start()
    worker.join()
    assert seen == [("idle", os.SCHED_IDLE)]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def _state(pid: int) -> str:
    """The process's state letter in /proc (R running, S sleeping, T stopped...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_paced_process_is_paused_between_turns_and_let_go_at_the_end() -> None:
    """While paced it is seen stopped; once the pacing ends it runs again."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:

        async def watch() -> tuple[set[str], str]:
            pacer = asyncio.create_task(_pace(busy.pid, lambda: 0.05, period_s=0.05))
            seen = set()
            for _ in range(200):
                seen.add(_state(busy.pid))
                if "T" in seen:
                    break
                await asyncio.sleep(0.005)
            pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pacer
            return seen, _state(busy.pid)

        seen, after = asyncio.run(watch())
        assert "T" in seen
        assert after != "T"
    finally:
        busy.kill()
        busy.wait()


def test_a_paced_child_still_brings_its_result() -> None:
    """Paced to a tenth of its time, the child's training comes back whole."""
    rows, cfg = _shop(), Config()
    there = asyncio.run(run_in_child(fit_in_child, (rows, cfg), "test-training", share=lambda: 0.1))
    assert there.model is not None and there.model.item_ids == fit(rows, cfg).model.item_ids
