"""The store of computed lists: valid while their owners are unchanged, bounded, thread-safe."""

from __future__ import annotations

import tempfile
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from personify.engine.app import app, configure
from personify.engine.config import Config

if app.personify_config is None:  # the cache lives beside the agents, which read the config
    data = tempfile.mkdtemp(prefix="personify-lists-")
    configure(Config().replace(storage={"data_dir": data}), "kafka://127.0.0.1:9")

from personify.agents.lists import Entry, ListCache, RefreshBudget, burst_hold


def entry(cache: ListCache, *owners: str, rec_id: str = "r") -> Entry:
    """A list computed now from ``owners`` (their generations read first, as the builder does)."""
    gens = tuple(cache.generation(o) for o in owners)
    return Entry(0, owners, gens, 0, 0, rec_id, b"[]", 0)


def test_a_list_lasts_until_its_owner_changes() -> None:
    cache = ListCache(10)
    assert cache.put("u", entry(cache, "u"))
    got = cache.get("u")
    assert got is not None and got.rec_id == "r"
    cache.changed(["u"], queue=False)
    assert cache.get("u") is None
    assert "u" not in cache.pending


def test_a_list_computed_during_a_change_is_refused() -> None:
    """Generations are read before the profile: a change meanwhile makes the result stale."""
    cache = ListCache(10)
    stale = entry(cache, "u")  # read before ...
    cache.changed(["u"], queue=True)  # ... the profile changed
    assert not cache.put("u", stale)
    assert cache.get("u") is None
    assert cache.take(5) == ["u"]
    assert cache.take(5) == []


def test_a_linked_visitor_follows_both_profiles() -> None:
    cache = ListCache(10)
    assert cache.put("anon", entry(cache, "anon", "user"))
    cache.changed(["user"], queue=False)
    assert cache.get("anon") is None
    assert cache.put("anon", entry(cache, "anon", "user"))
    cache.changed(["anon"], queue=False)
    assert cache.get("anon") is None


def test_least_recently_used_lists_go_first() -> None:
    cache = ListCache(2)
    for key in "abc":
        cache.put(key, entry(cache, key))
        if key == "b":
            assert cache.get("a") is not None  # a is used: b is now the oldest
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2


def test_forgetting_generations_never_revives_a_stale_list() -> None:
    """Past 4 x capacity owners followed the cache starts over; an old list cannot come back."""
    cache = ListCache(1)
    old = entry(cache, "u")
    cache.changed(["u"], queue=False)
    assert cache.put("x", entry(cache, "x"))
    for n in range(10):
        entry(cache, f"x{n}")  # generations read: followed, until the cache starts over
    assert cache.get("x") is None  # forgotten with the generations
    assert not cache.put("u", old)
    assert cache.put("u", entry(cache, "u"))


def test_changes_of_owners_never_ranked_leave_nothing_behind() -> None:
    """A backfill of visitors no one asks for: no generation kept, nothing queued, no list."""
    cache = ListCache(4)
    assert cache.put("kept", entry(cache, "kept", rec_id="x" * 100))
    assert cache.body_bytes == 2
    cache.changed([f"v{n}" for n in range(100)], queue=False)
    assert cache.refreshing() == 0 and not cache.queued()  # no list of theirs to compute
    assert len(cache) == 1
    cache.queue("kept")  # aged, waiting for a refresh ...
    cache.changed(["kept"], queue=False)  # ... and changed: dropped, nothing to refresh
    assert cache.get("kept") is None and len(cache) == 0 and cache.body_bytes == 0
    assert cache.take_stale(10) == []
    late = entry(cache, "v1")  # ranked now: followed from its generation read ...
    cache.changed(["v1"], queue=False)
    assert not cache.put("v1", late)  # ... so a change meanwhile still makes it stale


def test_lists_of_visitors_who_never_asked_wait_for_an_idle_loop_newest_first() -> None:
    """Queued with ``idle``: at most ``capacity``, the newest kept and taken first."""
    cache = ListCache(3)
    cache.changed(["a", "b", "c", "d"], queue=False, idle=True)
    cache.changed(["b"], queue=False, idle=True)  # changed again: the newest now
    assert not cache.queued() and cache.refreshing() == 0  # nothing else waits for them
    assert list(cache.unasked) == ["c", "d", "b"]  # "a", the oldest, past the capacity
    assert cache.put("d", entry(cache, "d"))  # asked for meanwhile: not computed again
    assert cache.take_unasked(5) == ["b", "c"]
    cache.changed(["e"], queue=False, idle=True)
    cache.changed(["e"], queue=True)  # asked for since: computed ahead instead
    assert cache.take(5) == ["e"] and cache.take_unasked(5) == []


def test_aged_lists_wait_behind_changed_ones() -> None:
    """A refresh of a list that only aged never jumps the queue of lists whose owner changed."""
    cache = ListCache(10)
    cache.queue("aged")
    cache.changed(["changed"], queue=True)
    cache.changed(["watched"], queue=True, urgent=True)
    assert cache.backlog() == 3
    assert cache.take(10) == ["watched", "changed"]
    assert cache.take_stale(10) == ["aged"]
    cache.changed(["both"], queue=True)
    cache.queue("both")  # already queued as changed: not again as aged
    assert cache.take_stale(10) == []
    assert cache.take(10) == ["both"]


def test_age_all_keeps_lists_servable_and_queues_them_behind_changes() -> None:
    """After a new model every list is recomputed, the most recently used first.

    Meanwhile the old ones are served; a list queued because its visitor changed stays first.
    """
    cache = ListCache(10)
    for key in ("old", "recent", "changed"):
        cache.put(key, entry(cache, key))
    assert cache.get("recent") is not None  # used last
    cache.changed(["changed"], queue=True)
    cache.age_all()
    assert cache.get("old") is not None and cache.get("recent") is not None
    assert cache.take(10) == ["changed"]
    assert cache.take_stale(10) == ["recent", "old"]
    assert cache.backlog() == 0


def test_clear_forgets_lists_and_queue() -> None:
    cache = ListCache(10)
    cache.put("u", entry(cache, "u"))
    cache.changed(["v"], queue=True)
    cache.clear()
    assert cache.get("u") is None and cache.take(10) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "change"]), st.sampled_from("abc")), max_size=40))
def test_never_serves_a_list_older_than_the_last_change(ops: list[tuple[str, str]]) -> None:
    """Whatever the order of puts and changes, get() returns lists computed after the change."""
    cache = ListCache(2)
    changed_at: dict[str, int] = {}
    for step, (op, key) in enumerate(ops):
        if op == "change":
            cache.changed([key], queue=False)
            changed_at[key] = step
        else:
            cache.put(key, Entry(step, (key,), (cache.generation(key),), 0, 0, str(step), b"[]", 0))
        for k in "abc":
            got = cache.get(k)
            if got is not None:
                assert got.computed_ms > changed_at.get(k, -1)


def test_concurrent_changes_and_puts() -> None:
    """Changes from one thread and puts from another never leave a stale list servable."""
    cache = ListCache(100)
    stop = threading.Event()

    def changer() -> None:
        while not stop.is_set():
            cache.changed(["u"], queue=True)

    t = threading.Thread(target=changer)
    t.start()
    try:
        for _ in range(2000):
            e = entry(cache, "u")
            cache.put("u", e)
    finally:
        stop.set()
        t.join()
    last = entry(cache, "u")
    got = cache.get("u")
    assert got is None or got.gens == last.gens


def test_a_list_stored_on_request_is_not_computed_again() -> None:
    """A queued owner whose current list a request stored leaves the queue; a socket's stays."""
    cache = ListCache(10)
    cache.changed(["u"], queue=True)
    cache.changed(["w"], queue=False, urgent=True)
    assert cache.put("u", entry(cache, "u", rec_id="asked"))
    assert cache.put("w", entry(cache, "w"))
    assert cache.take(5) == ["w"]  # a socket waits for its push
    got = cache.get("u")
    assert got is not None and got.rec_id == "asked"


def test_fresh_profiles_kept_for_the_builder_are_bounded_newest_last() -> None:
    """A backfill writes profiles faster than lists are ranked: only the newest are kept."""
    from personify.agents import lists

    lists._just_written.clear()
    try:
        cap = lists._JUST_WRITTEN_MAX
        lists._keep_written({f"v{n}": b'{"user_id": "v%d"}' % n for n in range(cap + 10)})
        assert len(lists._just_written) == cap
        assert "v9" not in lists._just_written and "v10" in lists._just_written
        lists._keep_written({"v10": b'{"user_id": "v10", "again": true}'})  # written again
        assert next(reversed(lists._just_written)) == "v10"
        assert b"again" in lists._just_written["v10"]
    finally:
        lists._just_written.clear()


class Clocks:
    """A wall clock and a CPU clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def run(self, seconds: float, busy: float) -> None:
        """``seconds`` pass, of which the loop's thread works ``busy`` (a share)."""
        self.wall += seconds
        self.cpu += seconds * busy


def test_the_refresh_gives_way_as_the_loops_other_work_grows() -> None:
    clocks = Clocks()
    budget = RefreshBudget(
        0.15, 0.02, 0.5, 1.0, 0.1, clock=lambda: clocks.wall, cpu_clock=lambda: clocks.cpu
    )
    # A loop all but idle: the refresh may take most of it (what is left of 80%) ...
    clocks.run(2.0, busy=0.0)
    assert budget.share(0.0) == 0.8
    clocks.run(2.0, busy=0.05)  # an idle engine's timers and metrics
    assert abs(budget.share(0.0) - 0.75) < 0.005
    # ... and 15% at most once the loop's other work passes 10%.
    clocks.run(2.0, busy=0.2)
    assert budget.share(0.0) == 0.15
    # Requests keep the loop 40% busy besides a refresh of 10 ms: what is left of the room.
    clocks.run(0.01, busy=1.0)  # the refresh itself is not the loop's other work
    clocks.run(2.0, busy=0.4)
    assert abs(budget.share(0.01) - 0.10) < 0.005
    # 60% busy: the floor, however busy the loop gets.
    clocks.run(2.0, busy=0.6)
    assert budget.share(0.0) == 0.02
    clocks.run(2.0, busy=1.0)
    assert budget.share(0.0) == 0.02
    # The load is averaged: a short quiet moment does not open the share at once ...
    clocks.run(0.1, busy=0.0)
    assert budget.share(0.0) == 0.02
    # ... a quiet second does.
    clocks.run(1.0, busy=0.0)
    assert budget.share(0.0) == 0.8


def test_lists_not_stored_are_queued_ahead_of_the_aged_ones_in_order() -> None:
    cache = ListCache(10)
    for key in ("a", "old"):
        assert cache.put(key, entry(cache, key))
    cache.age_all()  # a and old aged: they wait for a refresh
    cache.changed(["b"], queue=True)  # b's list waits already, as changed
    assert cache.queue_ahead(["c", "a", "b", "d", "c"]) == 2
    assert cache.queue_ahead(["d"]) == 0  # queued already
    assert cache.refreshing() == 4 and cache.backlog() == 5
    # c and d first (not stored), then the aged ones as they were; b waits as changed.
    assert cache.take(5) == ["b"]
    assert cache.take_stale(3) == ["c", "d", "old"]
    assert cache.take_stale(5) == ["a"]
    # A list stored meanwhile (asked for) is not computed again.
    assert cache.queue_ahead(["e", "f"]) == 2
    assert cache.put("e", entry(cache, "e"))
    assert cache.take_stale(5) == ["f"]


def test_a_visitors_first_change_goes_at_once_and_a_burst_waits_out_the_window() -> None:
    window = 0.010
    ranked_at = {"busy": 100.000, "earlier": 99.000}
    # Nobody queued was ranked within the window: no wait.
    assert burst_hold(["new", "earlier"], ranked_at, 100.004, window) == 0.0
    assert burst_hold([], ranked_at, 100.004, window) == 0.0
    # A visitor ranked 4 ms ago changes again: the lists wait the other 6 ms.
    assert abs(burst_hold(["new", "busy"], ranked_at, 100.004, window) - 0.006) < 1e-9
    # Once the window has passed, at once; and never longer than the window.
    assert burst_hold(["busy"], ranked_at, 100.011, window) == 0.0
    assert burst_hold(["busy"], {"busy": 200.0}, 100.0, window) == window
    # Without a window nothing waits.
    assert burst_hold(["busy"], ranked_at, 100.004, 0.0) == 0.0


def test_the_first_queued_owners_come_urgent_first_as_take_goes() -> None:
    cache = ListCache(10)
    cache.changed(["p1", "p2", "p3"], queue=True)
    cache.changed(["u1"], queue=True, urgent=True)
    cache.changed(["aged"], queue=False)
    assert cache.first_queued(2) == ["u1", "p1", "p2"]
    assert cache.urgent_queued()  # someone waits: the builder does not hold back
    assert cache.take(1) == ["u1"]
    assert not cache.urgent_queued() and cache.queued()  # only lists computed ahead wait
    assert cache.take(4) == ["p1", "p2", "p3"]
    assert cache.first_queued(2) == []
    assert not cache.queued()


def test_readers_are_remembered_for_a_window_and_bounded() -> None:
    """Visitors who asked lately are known for ``window_s``; the least recent go past capacity."""
    from personify.agents.lists import Readers

    asked = Readers(capacity=3, window_s=60.0)
    for n, user in enumerate(["a", "b", "c"]):
        asked.note(user, 100.0 + n)
    assert not asked.take("a", 160.1)  # past the window
    asked.note("a", 150.0)  # asked again: the most recent now
    asked.note("d", 151.0)  # over capacity: the least recent ("b") goes
    assert len(asked) == 3
    assert not asked.take("b", 151.0)
    assert all(asked.take(u, 151.0) for u in ("a", "c", "d"))
    assert not asked.take("never", 151.0)


def test_each_request_earns_one_list_ahead() -> None:
    """A reader's first change is computed ahead; later ones wait for the next request."""
    from personify.agents.lists import Readers

    asked = Readers(capacity=10, window_s=60.0)
    asked.note("a", 100.0)
    assert asked.take("a", 101.0)
    assert not asked.take("a", 102.0)  # no request since: not ahead
    assert len(asked) == 0
    asked.note("a", 103.0)  # asked again
    assert asked.take("a", 104.0)


def test_lists_ahead_wait_for_their_reads_once_most_go_unread() -> None:
    """Once most lists computed ahead are dropped unread, only proven readers get them.

    A visitor whose last list computed ahead was read keeps getting them; others get one try
    in eight, which keeps measuring the share read.
    """
    from personify.agents.lists import Readers

    asked = Readers(capacity=1_000, window_s=60.0)
    now = 100.0
    for n in range(400):  # each asks, changes (computed ahead), then changes again unread
        user = f"v{n}"
        asked.note(user, now)
        assert asked.take(user, now) or asked.read_share < 0.5
        asked.take(user, now)
    assert asked.read_share < 0.5
    earned = 0
    for n in range(80):  # now most asking visitors wait for their next request
        asked.note(f"w{n}", now)
        earned += asked.take(f"w{n}", now)
    assert earned == 10  # one in eight
    # A visitor who reads between changes proves it and has every next list ahead.
    reader = next(f"w{n}" for n in range(80) if f"w{n}" in asked._ahead)
    for _ in range(5):
        asked.note(reader, now)  # read what was computed ahead ...
        assert asked.take(reader, now)  # ... so the next is computed ahead too
    share = asked.read_share
    for _ in range(300):  # and as reads come between changes again, the share comes back
        asked.note(reader, now)
        asked.take(reader, now)
    assert share < 0.5 <= asked.read_share


def test_only_lists_someone_asked_for_are_computed_ahead() -> None:
    """A changed profile queues the list of a visitor who asked lately; another's waits.

    Another's stored list is stale all the same: computed again when asked for, or when
    nothing else waits (as an aged list).
    """
    import time

    from personify.agents import lists

    cache = lists.list_cache()
    cache.clear()
    lists._just_written.clear()
    try:
        assert cache.put("quiet", entry(cache, "quiet"))
        lists.readers().note("asker", time.monotonic())
        lists.profiles_changed(
            ["asker", "quiet"], states={"asker": b'{"a": 1}', "quiet": b'{"q": 1}'}
        )
        assert "asker" in cache.pending and "quiet" not in cache.pending
        assert cache.get("quiet") is None  # stale: dropped, computed when asked for ...
        assert len(cache) == 0 and cache.refreshing() == 0
        assert list(cache.unasked) == ["quiet"]  # ... or while the loop is all but idle
        assert set(lists._just_written) == {"asker"}  # only the profiles about to be ranked
        assert cache.put("asker", entry(cache, "asker"))  # computed ahead
        lists.profiles_changed(["asker"], states={"asker": b'{"a": 2}'})
        assert "asker" not in cache.pending  # no request since the list computed ahead
        assert cache.get("asker") is None and len(cache) == 0
    finally:
        cache.clear()
        lists._just_written.clear()
