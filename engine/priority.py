"""Background work at a priority that gives way to ingestion and serving at once.

Training and tuning run in child processes (`personify.agents.training`). ``SCHED_IDLE``
(Linux) runs a process only on a core nothing else wants, and hands the core back as soon as a
normal process wakes up on it; a quiet engine (after a backfill) still lends it every idle
core. Elsewhere, or where the policy is refused, the nice value is raised. Priority alone is
not enough on a virtual machine, whose cores slow each other whatever runs on them: there the
children are also paced (`personify.agents.training.run_in_child`).
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["BACKGROUND_NICE", "to_background"]

#: The nice value where ``SCHED_IDLE`` is not available.
BACKGROUND_NICE = 19


def to_background() -> str:
    """Move the calling thread (and what it starts from now on) to background priority.

    On Linux a thread's scheduling policy and nice value are its own, and a process started
    from it inherits both. Returns what was applied: ``"idle"``, ``"nice"`` or ``"none"``.
    """
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
    with contextlib.suppress(OSError):
        if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        else:
            os.nice(max(0, BACKGROUND_NICE - os.nice(0)))
        return "nice"
    return "none"
