"""The engine collects cyclic garbage in short steps and times every collection."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

from personify.engine.cli import GC_THRESHOLDS
from personify.engine.gcpause import collection_paused

#: Sets the engine's collector up, makes enough cyclic garbage for some first-generation
#: collections, collects everything once, and prints what the histogram observed.
_SCRIPT = """
import gc, json
from personify.engine.cli import _tune_garbage_collection
from personify.engine.metrics import REGISTRY
_tune_garbage_collection()
for _ in range(20_000):
    a = []; a.append(a)  # a cycle: only the collector frees it
gc.collect()
count = {
    g: REGISTRY.get_sample_value("personify_gc_pause_seconds_count", {"generation": str(g)})
    for g in range(3)
}
print(json.dumps({"thresholds": gc.get_threshold(), "count": count}))
"""


def test_collections_run_in_short_steps_and_are_timed() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    seen = json.loads(out.stdout)
    assert tuple(seen["thresholds"]) == GC_THRESHOLDS
    # 20,000 cycles at a first-generation threshold of 2,000: several collections on the way.
    assert seen["count"]["0"] >= 20_000 // GC_THRESHOLDS[0] - 1
    assert seen["count"]["2"] >= 1  # gc.collect() itself


def test_collection_paused_holds_the_collector_off_and_always_turns_it_on_again() -> None:
    """Inside the block nothing is collected; after it (even after an error) it collects again."""
    assert gc.isenabled()
    collections_before = gc.get_stats()[0]["collections"]
    with collection_paused():
        assert not gc.isenabled()
        for _ in range(3 * gc.get_threshold()[0]):
            a: list[object] = []
            a.append(a)
        with collection_paused():  # nested: still off afterwards, until the outer block ends
            pass
        assert not gc.isenabled()
        assert gc.get_stats()[0]["collections"] == collections_before
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collection_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()  # switched off by someone else: left off
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
