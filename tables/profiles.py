"""The profiles table: one live profile per visitor, folded from their events.

The pure functions here (`new_profile`, `apply_events`, `view`) hold all profile logic and
know nothing of Faust; `table()` is the RocksDB-backed, changelog-backed Faust table that
the profile agent writes (and the API reads). A profile is stored as one JSON document.

Exactly-once effect: a profile remembers the ids of the last ``dedup_window`` events applied
to it, and an event whose id is among them is skipped. Redelivery after a crash, a client's
retry and a journal replay therefore never count an event twice.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import math
from collections.abc import Callable, Iterable
from hashlib import blake2b
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from faust.types import TP
from rocksdict import WriteBatch

from personify.engine.app import app, current_config, routed_names
from personify.engine.config import ProfilesConfig
from personify.engine.metrics import ROCKSDB_MEMORY
from personify.engine.models import PURPOSES, Event, format_ts
from personify.tables import history

__all__ = [
    "ERASE",
    "FIRED",
    "LINK",
    "MERGE",
    "SCHEDULE",
    "SENT",
    "VECTOR_KEY",
    "Profile",
    "ProfileStore",
    "apply_events",
    "bytes_table",
    "chat_vector",
    "decode",
    "encode",
    "id_digest",
    "merge",
    "new_profile",
    "snapshot",
    "table",
    "view",
    "wire",
]

Profile = dict[str, Any]

#: Internal event carrying an anonymous visitor's profile to the user it was linked to.
MERGE = "$merge"
#: Internal event telling an anonymous visitor's profile which user it now belongs to.
LINK = "$link"
#: Erase the visitor: the profile is deleted (a tombstone in the changelog).
ERASE = "$erase"
#: A trigger's timer for the visitor (``timer``, ``due_ms``): a later one replaces it.
SCHEDULE = "$schedule"
#: The timer (``timer``, ``due_ms``) fired: it is cleared unless rescheduled since.
FIRED = "$fired"
#: An offer (``trigger``) was sent to the visitor (frequency capping reads these).
SENT = "$sent"
#: Trigger bookkeeping: applied whatever the visitor's consent (it records what the engine did).
_BOOKKEEPING = frozenset({SCHEDULE, FIRED, SENT})
#: Offers remembered per visitor.
_OFFERS_KEPT = 50
#: Writes of up to this many rows are made on the event loop; larger ones on a thread.
_SYNC_WRITE_ROWS = 16

#: An event may carry its text's embedding under this key while it is folded (never stored).
VECTOR_KEY = "_vector"

_HOUR_MS = 3_600_000
#: Session intervals kept exactly (late events are placed among them); older ones are counted.
_MAX_SESSIONS = 200
_ITEM_TYPES = frozenset({"product_view", "add_to_cart", "remove_from_cart", "click"})


def wire(e: Event) -> Event:
    """The event without what folding attached to it (its chat vector)."""
    if VECTOR_KEY in e:
        return {k: v for k, v in e.items() if k != VECTOR_KEY}
    return e


def new_profile(user_id: str) -> Profile:
    """An empty profile for ``user_id``."""
    return {
        "user_id": user_id,
        "anonymous_ids": [],
        "counts": {},
        "first_seen": None,
        "last_seen": None,
        "sessions_closed": 0,
        "session_list": [],
        "hours": {},
        "orders": 0,
        "spend": 0.0,
        "spend_by_currency": {},
        "recent_items": [],
        "cart": {},
        "searches": [],
        "affinity": {},
        "engagement": 0.0,
        "seen": [],
    }


def encode(profile: Profile) -> bytes:
    """Serialise a profile for the table."""
    return orjson.dumps(profile)


def decode(data: bytes) -> Profile:
    """Deserialise a profile from the table."""
    profile: Profile = orjson.loads(data)
    return profile


def _categories(path: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b", "a/b/c"]``: a visit counts for the parents too."""
    parts = [p for p in path.strip("/").split("/") if p]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _decay(score: float, dt_ms: float, half_life_s: float) -> float:
    return score * math.pow(0.5, dt_ms / (half_life_s * 1000.0))


def _add_affinity(p: Profile, category: str, weight: float, ts: int, cfg: ProfilesConfig) -> None:
    if weight <= 0:
        return
    aff = p["affinity"]
    for cat in _categories(category):
        score, ref = aff.get(cat, (0.0, ts))
        if ts >= ref:
            aff[cat] = [_decay(score, ts - ref, cfg.affinity_half_life_s) + weight, ts]
        else:  # a late event: its weight is decayed to the reference time instead
            aff[cat] = [score + _decay(weight, ref - ts, cfg.affinity_half_life_s), ref]


def _newest_first(entries: list[dict[str, Any]], entry: dict[str, Any], limit: int) -> list[Any]:
    """Insert ``entry`` by event time (a late event lands where it belongs), keep ``limit``."""
    i = 0
    while i < len(entries) and entries[i]["ts"] > entry["ts"]:
        i += 1
    return [*entries[:i], entry, *entries[i:]][:limit]


def _touch_item(p: Profile, item_id: str, etype: str, ts: int, cfg: ProfilesConfig) -> None:
    items = p["recent_items"]
    for old in items:
        if old["item_id"] == item_id:
            if old["ts"] > ts:
                return  # a newer interaction with this item is already recorded
            items = [r for r in items if r["item_id"] != item_id]
            break
    entry = {"item_id": item_id, "type": etype, "ts": ts}
    p["recent_items"] = _newest_first(items, entry, cfg.recent_items)


def _add_bought(bought: dict[str, list[int]], item: str, times: int, ts: int, cap: int) -> None:
    """Count ``times`` purchases of ``item`` at ``ts`` in ``bought`` (item -> [times, last ts])."""
    entry = bought.get(item)
    if entry is None:
        bought[item] = [times, ts]
        if len(bought) > cap:  # the product bought longest ago goes
            del bought[min(bought, key=lambda k: bought[k][1])]
    else:
        entry[0] += times
        entry[1] = max(entry[1], ts)


def _insert_session(sessions: list[list[int]], ts: int, count: int, gap_ms: float) -> None:
    """Place ``count`` events at ``ts`` into the sorted session intervals ``[start, end, n]``.

    A late event lands in the session it belongs to, and one that bridges two sessions joins
    them, so the result does not depend on the order events arrive in.
    """
    for i, (start, end, _n) in enumerate(sessions):
        if start - gap_ms <= ts <= end + gap_ms:
            sessions[i] = [min(start, ts), max(end, ts), sessions[i][2] + count]
            break
    else:
        sessions.append([ts, ts, count])
        sessions.sort()
        return
    merged: list[list[int]] = []
    for interval in sessions:
        if merged and interval[0] - merged[-1][1] <= gap_ms:
            last = merged[-1]
            merged[-1] = [last[0], max(last[1], interval[1]), last[2] + interval[2]]
        else:
            merged.append(interval)
    sessions[:] = merged


def _session(p: Profile, ts: int, cfg: ProfilesConfig) -> None:
    sessions: list[list[int]] = p["session_list"]
    _insert_session(sessions, ts, 1, cfg.session_gap_s * 1000)
    if len(sessions) > _MAX_SESSIONS:  # the oldest sessions are closed for good
        p["sessions_closed"] += len(sessions) - _MAX_SESSIONS
        del sessions[: len(sessions) - _MAX_SESSIONS]


def _add_chat(p: Profile, vector: Any, ts: int, half_life_s: float) -> None:
    """Fold a chat message's unit vector into the visitor's decayed chat vector."""
    new = np.asarray(vector, dtype=np.float32)
    chat = p.get("chat")
    if chat is None:
        total, ref = new, ts
    else:
        old = np.frombuffer(base64.b64decode(chat["v"]), dtype=np.float32)
        ref = max(ts, chat["ts"])
        total = old * math.pow(0.5, (ref - chat["ts"]) / (half_life_s * 1000.0)) + new * math.pow(
            0.5, (ref - ts) / (half_life_s * 1000.0)
        )
    p["chat"] = {
        "v": base64.b64encode(total.astype(np.float32).tobytes()).decode(),
        "ts": ref,
        "n": (chat or {}).get("n", 0) + 1,
    }


def chat_vector(p: Profile, now_ms: int, half_life_s: float) -> npt.NDArray[np.float32] | None:
    """The visitor's chat vector decayed to ``now_ms`` (its length says how recent), or None."""
    chat = p.get("chat")
    if chat is None:
        return None
    vec = np.frombuffer(base64.b64decode(chat["v"]), dtype=np.float32)
    scale = math.pow(0.5, max(now_ms - chat["ts"], 0) / (half_life_s * 1000.0))
    out: npt.NDArray[np.float32] = (vec * scale).astype(np.float32)
    return out


def _apply_one(p: Profile, e: Event, cfg: ProfilesConfig, chat_half_life_s: float = 3600.0) -> None:
    etype: str = e["type"]
    ts: int = e["ts_ms"]
    props: dict[str, Any] = e["properties"]
    weights = cfg.engagement_weights
    weight = weights.get(etype, weights.get("custom", 0.0))

    p["counts"][etype] = p["counts"].get(etype, 0) + 1
    p["first_seen"] = ts if p["first_seen"] is None else min(p["first_seen"], ts)
    p["last_seen"] = ts if p["last_seen"] is None else max(p["last_seen"], ts)
    _session(p, ts, cfg)
    hour = str(ts // _HOUR_MS)
    p["hours"][hour] = p["hours"].get(hour, 0) + 1
    p["engagement"] += weight
    anon = e.get("anonymous_id")
    if anon and e.get("user_id") and anon not in p["anonymous_ids"]:
        p["anonymous_ids"] = [*p["anonymous_ids"], anon][-20:]

    item_id = e.get("item_id")
    category = props.get("category")
    if item_id and etype in _ITEM_TYPES:
        _touch_item(p, item_id, etype, ts, cfg)
    if isinstance(category, str) and etype != "purchase":
        _add_affinity(p, category, weight, ts, cfg)

    if etype == "add_to_cart":
        cart = p["cart"]
        line = cart.setdefault(item_id, {"quantity": 0, "price": None, "added_at": ts})
        line["quantity"] += props["quantity"]
        if props.get("price") is not None:
            line["price"] = float(props["price"])
        if len(cart) > cfg.max_cart_items:  # the line added longest ago leaves
            del cart[min(cart, key=lambda k: cart[k]["added_at"])]
    elif etype == "remove_from_cart":
        line = p["cart"].get(item_id)
        if line is not None:
            line["quantity"] -= props["quantity"]
            if line["quantity"] <= 0:
                del p["cart"][item_id]
    elif etype == "purchase":
        revenue = float(props["revenue"])
        currency = props["currency"]
        p["orders"] += 1
        p["spend"] += revenue
        p["spend_by_currency"][currency] = p["spend_by_currency"].get(currency, 0.0) + revenue
        bought = p.setdefault("bought", {})
        for line in props["items"]:
            _touch_item(p, line["item_id"], "purchase", ts, cfg)
            p["cart"].pop(line["item_id"], None)
            _add_bought(bought, line["item_id"], 1, ts, cfg.bought_items)
            cat = line.get("category", category)
            if isinstance(cat, str):
                _add_affinity(p, cat, weight, ts, cfg)
    elif etype == "chat_message" and e.get(VECTOR_KEY) is not None:
        _add_chat(p, e[VECTOR_KEY], ts, chat_half_life_s)
    elif etype == "search":
        entry: dict[str, Any] = {"query": props["query"], "ts": ts}
        if props.get("filters"):
            entry["filters"] = props["filters"]
        p["searches"] = _newest_first(p["searches"], entry, cfg.recent_searches)

    # keep only the hourly buckets the frequency window can still see
    horizon = (p["last_seen"] - cfg.frequency_window_s * 1000) // _HOUR_MS
    if len(p["hours"]) > cfg.frequency_window_s / 3600 + 2:
        p["hours"] = {h: v for h, v in p["hours"].items() if int(h) >= horizon}


def id_digest(event_id: str) -> int:
    """The 64-bit digest under which a profile remembers an applied event id.

    Fixed-size digests keep a profile's dedup memory small whatever the ids look like; with
    1,000 ids remembered, a collision is about as likely as 1 in 10^13.
    """
    return int.from_bytes(blake2b(event_id.encode(), digest_size=8).digest(), "big", signed=True)


def consents(p: Profile | None, purpose: str, cfg: ProfilesConfig) -> bool:
    """Whether the visitor of ``p`` consents to ``purpose`` (their choice, else the regime's)."""
    record = (p or {}).get("consent", {}).get(purpose)
    if record is None:
        return cfg.consent == "opt-out"
    return bool(record[0])


def _set_consent(p: Profile, e: Event) -> None:
    """Record each purpose the event sets; a later choice wins over an earlier one."""
    choices = p.setdefault("consent", {})
    for purpose, granted in e["properties"].items():
        old = choices.get(purpose)
        if old is None or e["ts_ms"] >= old[1]:
            choices[purpose] = [bool(granted), e["ts_ms"]]


def _apply_bookkeeping(p: Profile, e: Event) -> None:
    props = e["properties"]
    if e["type"] == SCHEDULE:
        p.setdefault("timers", {})[props["timer"]] = int(props["due_ms"])
    elif e["type"] == FIRED:
        timers = p.get("timers", {})
        if timers.get(props["timer"]) == props["due_ms"]:
            del timers[props["timer"]]
    else:  # SENT
        offers = p.setdefault("offers", [])
        offers.append([e["ts_ms"], props["trigger"]])
        del offers[:-_OFFERS_KEPT]


def apply_events(
    p: Profile,
    events: Iterable[Event],
    cfg: ProfilesConfig,
    *,
    observe: Callable[[Profile, Event], None] | None = None,
    chat_half_life_s: float = 3600.0,
    vetoed: list[Event] | None = None,
    applied: list[Event] | None = None,
) -> int:
    """Fold ``events`` into profile ``p`` in place; return how many were new (not duplicates).

    Without personalization consent (`consents`) an event changes nothing: it is appended to
    ``vetoed`` instead, not even remembered as seen. ``consent`` events always apply.

    Args:
        p: the profile.
        events: the events, in order.
        cfg: the [profiles] settings.
        observe: called with the profile and each new event just before it is applied (the
            collaborative signals are derived there).
        chat_half_life_s: how fast the chat vector fades (chat events carry their vector under
            `VECTOR_KEY`).
        vetoed: receives the events left out for want of personalization consent.
        applied: receives the events applied (the new ones), in order.
    """
    seen_list: list[int] = p["seen"]
    seen = set(seen_list)
    count = 0
    for e in events:
        eid = id_digest(e["event_id"])
        if eid in seen:
            continue
        if e["type"] == "consent":
            _set_consent(p, e)
        elif e["type"] in _BOOKKEEPING:
            _apply_bookkeeping(p, e)
        elif e["type"] != MERGE and not consents(p, "personalization", cfg):
            if vetoed is not None:
                vetoed.append(e)
            continue
        elif e["type"] == MERGE:
            merge(p, e["properties"]["profile"], cfg)
        else:
            if observe is not None:
                observe(p, e)
            _apply_one(p, e, cfg, chat_half_life_s)
        seen.add(eid)
        seen_list.append(eid)
        count += 1
        if applied is not None:
            applied.append(e)
    if len(seen_list) > cfg.dedup_window:
        del seen_list[: len(seen_list) - cfg.dedup_window]
    return count


def _iso(ms: int | None) -> str | None:
    return None if ms is None else format_ts(ms)


def view(p: Profile, cfg: ProfilesConfig, now_ms: int) -> dict[str, Any]:
    """The public JSON form of a profile, with time-dependent figures computed at ``now_ms``."""
    horizon_ms = now_ms - cfg.frequency_window_s * 1000
    horizon_hour = horizon_ms // _HOUR_MS
    cart_items = [
        {
            "item_id": item,
            "quantity": line["quantity"],
            "price": line["price"],
            "added_at": _iso(line["added_at"]),
        }
        for item, line in p["cart"].items()
    ]
    cart_total = sum((line["price"] or 0.0) * line["quantity"] for line in p["cart"].values())
    affinity = {
        cat: round(_decay(score, max(now_ms - ref, 0), cfg.affinity_half_life_s), 6)
        for cat, (score, ref) in p["affinity"].items()
    }
    orders = p["orders"]
    sessions = p["session_list"]
    current = sessions[-1] if sessions else None
    active = current is not None and now_ms - current[1] <= cfg.session_gap_s * 1000
    return {
        "user_id": p["user_id"],
        "anonymous_ids": p["anonymous_ids"],
        "counts": p["counts"],
        "sessions": {
            "count": p["sessions_closed"] + len(sessions),
            "current": {
                "started": _iso(current[0] if current else None),
                "last_event": _iso(current[1] if current else None),
                "events": current[2] if current else 0,
                "active": active,
            },
        },
        "first_seen": _iso(p["first_seen"]),
        "last_seen": _iso(p["last_seen"]),
        "frequency": {
            "window_days": round(cfg.frequency_window_s / 86400, 3),
            "events": sum(n for h, n in p["hours"].items() if int(h) >= horizon_hour),
            "sessions": sum(1 for start, _end, _n in sessions if start >= horizon_ms),
        },
        "lifetime_spend": round(p["spend"], 2),
        "order_count": orders,
        "average_order_value": round(p["spend"] / orders, 2) if orders else 0.0,
        "spend_by_currency": {c: round(v, 2) for c, v in p["spend_by_currency"].items()},
        "recent_items": [
            {"item_id": r["item_id"], "type": r["type"], "ts": _iso(r["ts"])}
            for r in p["recent_items"]
        ],
        "cart": {
            "items": cart_items,
            "count": sum(line["quantity"] for line in p["cart"].values()),
            "total": round(cart_total, 2),
        },
        "recent_searches": [{**s, "ts": _iso(s["ts"])} for s in p["searches"]],
        "category_affinity": dict(sorted(affinity.items(), key=lambda kv: -kv[1])),
        "engagement_score": round(p["engagement"], 4),
        "consent": {purpose: consents(p, purpose, cfg) for purpose in PURPOSES},
        "offers_sent": [{"trigger": t, "at": _iso(ts)} for ts, t in p.get("offers", [])],
        "timers": {name: _iso(due) for name, due in sorted(p.get("timers", {}).items())},
    }


#: RocksDB properties reported by `ROCKSDB_MEMORY` (kind -> property).
_MEMORY_PROPERTIES = {
    "memtables": "rocksdb.cur-size-all-mem-tables",
    "block_cache": "rocksdb.block-cache-usage",
    "table_readers": "rocksdb.estimate-table-readers-mem",
}


def bytes_table(name: str, help: str) -> Any:
    """A RocksDB-backed Faust table of raw bytes, with the topics' partition count.

    RocksDB is sized by ``[storage]`` (Faust's defaults hold up to 2 GiB of block cache and
    192 MiB of memtables per partition) and reports its memory as `ROCKSDB_MEMORY`.
    """
    cfg = current_config()
    s = cfg.storage
    tbl = app.Table(
        name,
        default=None,
        partitions=cfg.broker.partitions,
        key_type=bytes,
        value_type=bytes,
        help=help,
        options={
            "write_buffer_size": s.rocksdb_write_buffer_mib << 20,
            "max_write_buffer_number": s.rocksdb_write_buffers,
            "block_cache_size": s.rocksdb_block_cache_mib << 20,
        },
    )
    tbl.key_serializer = "raw"
    tbl.value_serializer = "raw"
    for kind, prop in _MEMORY_PROPERTIES.items():
        ROCKSDB_MEMORY.labels(name, kind).set_function(functools.partial(_memory, tbl, prop))
    return tbl


def _memory(tbl: Any, prop: str) -> float:
    """``prop`` summed over the table's open partitions (0 before the table is opened)."""
    if tbl._data is None:
        return 0.0
    total = 0
    for db in list(tbl.data._dbs.values()):
        with contextlib.suppress(Exception):  # a store closing meanwhile
            total += int(db.property_int_value(prop) or 0)
    return float(total)


@functools.cache
def table() -> Any:
    """The Faust profiles table, RocksDB- and changelog-backed.

    It is co-partitioned with the routed events topic: the profile agent is its only writer
    (through `ProfileStore`); the API reads it.
    """
    return bytes_table("profiles", "Live visitor profiles, keyed by user id.")


class ProfileStore:
    """Batched access to the profiles table for its one writer, the profile agent.

    Faust's per-key write (``table[key] = value``) sends one changelog record and rewrites
    the partition's persisted offset for every key, which capped a worker at a few thousand
    writes per second. `put_many` writes a whole batch the way Faust's own changelog restore
    does: the changelog records go out as producer batches and are acknowledged first, then one
    RocksDB write batch and one persisted-offset update per partition. The records and their
    layout are Faust's, so restores, standbys and rebalancing work unchanged; and since the
    changelog is written before the local store, a crash in between is repaired by redelivery.

    Args:
        tbl: the Faust table (`table()`).
        changelog: whether writes go to the changelog topic too (see
            `Config.changelog_enabled`).
    """

    def __init__(self, tbl: Any, *, changelog: bool = True) -> None:
        self.table = tbl
        self.changelog = changelog

    def _db(self, partition: int) -> Any:
        # The store keeps one RocksDB database per partition.
        return self.table.data._db_for_partition(partition)

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        """Read the profiles of ``keys`` (all of ``partition``) in one call."""
        values: list[bytes | None] = self._db(partition).get(keys)
        return values

    def history_keys(self, partition: int, user_id: str) -> list[bytes]:
        """The keys of ``user_id``'s interaction history rows (see `history`)."""
        return history.user_keys(self._db(partition), user_id)

    def dbs(self) -> dict[int, Any]:
        """The store of each partition this worker holds (opened if it was not yet).

        Faust opens a partition's store on its first use: after a restart, one whose visitors
        were not read or written yet is not open, but its rows are this worker's all the same.
        """
        consumer = app.consumer
        topics = set(routed_names(current_config()))
        assigned = consumer.assignment() if consumer is not None else ()
        held = {tp.partition for tp in assigned if tp.topic in topics}
        held.update(self.table.data._dbs)
        return {partition: self._db(partition) for partition in sorted(held)}

    async def put_many(self, partition: int, items: list[tuple[bytes, bytes | None]]) -> None:
        """Write ``(key, value)`` pairs of ``partition``: changelog first, then RocksDB.

        A value of None deletes the key (a tombstone in the changelog).
        """
        if not items:
            return
        last_offset = await self._send_changelog(partition, items) if self.changelog else None
        batch = WriteBatch(raw_mode=True)
        for key, value in items:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        store = self.table.data
        db = self._db(partition)
        if len(items) <= _SYNC_WRITE_ROWS:
            db.write(batch)  # tens of microseconds: less than a hop to a thread and back
        else:
            # RocksDB releases the GIL: a large write overlaps with the event loop's work.
            await asyncio.to_thread(db.write, batch)
        for key, value in items:
            if value is None:
                store._key_index.pop(key, None)
            elif key[:1] != b"\x00":  # lets reads outside the agent find the key
                store._key_index[key] = partition
        if last_offset is not None:
            topic_name = self.table.changelog_topic.get_topic_name()
            store.set_persisted_offset(TP(topic_name, partition), last_offset)

    async def _send_changelog(self, partition: int, items: list[tuple[bytes, bytes | None]]) -> int:
        """Send the changelog records; return the offset of the last one once acknowledged."""
        producer = app.producer._ensure_producer()  # Faust's started aiokafka producer
        topic_name = self.table.changelog_topic.get_topic_name()
        futures = []
        counts = []
        builder = producer.create_batch()
        n = 0
        for key, value in items:
            if builder.append(key=key, value=value, timestamp=None) is None:
                if n == 0:
                    raise ValueError(f"record {key!r} of {len(value or b'')} bytes exceeds a batch")
                futures.append(await producer.send_batch(builder, topic_name, partition=partition))
                counts.append(n)
                builder = producer.create_batch()
                n = 0
                if builder.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"record {key!r} of {len(value or b'')} bytes exceeds a batch")
            n += 1
        futures.append(await producer.send_batch(builder, topic_name, partition=partition))
        counts.append(n)
        metas = await asyncio.gather(*futures)
        last: int = max(m.offset + c - 1 for m, c in zip(metas, counts, strict=True))
        return last


def snapshot(p: Profile) -> Profile:
    """A copy of ``p`` to merge into another profile (without its dedup memory)."""
    return {k: v for k, v in p.items() if k not in ("seen", "alias_of")}


def merge(into: Profile, other: Profile, cfg: ProfilesConfig) -> None:
    """Fold an anonymous visitor's profile ``other`` into ``into`` (session stitching)."""
    for etype, n in other["counts"].items():
        into["counts"][etype] = into["counts"].get(etype, 0) + n
    for name, pick in (("first_seen", min), ("last_seen", max)):
        values = [v for v in (into[name], other[name]) if v is not None]
        into[name] = pick(values) if values else None
    into["sessions_closed"] += other["sessions_closed"]
    for start, end, n in other["session_list"]:
        _insert_session(into["session_list"], start, n, cfg.session_gap_s * 1000)
        _insert_session(into["session_list"], end, 0, cfg.session_gap_s * 1000)
    for hour, events in other["hours"].items():
        into["hours"][hour] = into["hours"].get(hour, 0) + events
    into["orders"] += other["orders"]
    into["spend"] += other["spend"]
    for cur, amount in other["spend_by_currency"].items():
        into["spend_by_currency"][cur] = into["spend_by_currency"].get(cur, 0.0) + amount
    items = sorted(into["recent_items"] + other["recent_items"], key=lambda r: -r["ts"])
    unique: dict[str, dict[str, Any]] = {}
    for r in items:
        unique.setdefault(r["item_id"], r)
    into["recent_items"] = list(unique.values())[: cfg.recent_items]
    for item, line in other["cart"].items():
        mine = into["cart"].get(item)
        if mine is None:
            into["cart"][item] = dict(line)
        else:
            mine["quantity"] += line["quantity"]
            mine["price"] = mine["price"] if mine["price"] is not None else line["price"]
    if other.get("bought"):
        bought = into.setdefault("bought", {})
        for item, (times, ts) in other["bought"].items():
            _add_bought(bought, item, times, ts, cfg.bought_items)
    searches = sorted(into["searches"] + other["searches"], key=lambda s: -s["ts"])
    into["searches"] = searches[: cfg.recent_searches]
    for cat, (score, ref) in other["affinity"].items():
        if cat not in into["affinity"]:
            into["affinity"][cat] = [score, ref]
            continue
        mine_score, mine_ref = into["affinity"][cat]
        top = max(ref, mine_ref)
        into["affinity"][cat] = [
            _decay(mine_score, top - mine_ref, cfg.affinity_half_life_s)
            + _decay(score, top - ref, cfg.affinity_half_life_s),
            top,
        ]
    into["engagement"] += other["engagement"]
    for anon in other["anonymous_ids"]:
        if anon not in into["anonymous_ids"]:
            into["anonymous_ids"] = [*into["anonymous_ids"], anon][-20:]
    chat = other.get("chat")
    if chat is not None and (into.get("chat") is None or chat["ts"] > into["chat"]["ts"]):
        into["chat"] = dict(chat)
