"""The engine collects cyclic garbage in short steps and times every collection."""

from __future__ import annotations

import json
import subprocess
import sys

from personify.engine.cli import GC_THRESHOLDS

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
