"""The interaction history the learned model trains on: (visitor, item, kind, time) rows.

Each item interaction a profile applies (a product view, a click, a cart add, each line of a
purchase) is kept as one small row in the profiles table, written in the same RocksDB batch as
the profile it changed, so the history and the profiles never disagree after a crash. A row's
key is derived from the event id and the item, so applying an event again writes the same key:
replay and redelivery cannot count an interaction twice.

Keys sort by visitor, then time: a zero byte and ``h``, the visitor id's length (2 bytes), the
visitor id, the event time (8 bytes) and a digest of (event id, item) (4 bytes). The value is
the kind (one byte) and the item id. An erased visitor's rows are found by their prefix and
deleted with the profile. The history is apart from the journal (compacting the journal never
takes it away) and is kept for ``[model] history_days`` before its newest interaction.
"""

from __future__ import annotations

import array
import itertools
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import numpy as np
import numpy.typing as npt

from personify.engine.models import Event
from personify.tables.signals import PREFIX
from personify.tables.store import prefixed

__all__ = [
    "KIND_OF_EVENT",
    "ROW_PREFIX",
    "Interactions",
    "RepeatStats",
    "Scan",
    "repeat_stats",
    "rows_of",
    "scan",
    "user_keys",
    "user_prefix",
]

#: All history rows start with this.
ROW_PREFIX = PREFIX + b"h"
#: Event type -> the kind byte stored.
KIND_OF_EVENT: dict[str, bytes] = {
    "product_view": b"v",
    "click": b"k",
    "add_to_cart": b"c",
    "purchase": b"p",
}
#: Kind byte -> event type.
EVENT_OF_KIND: dict[bytes, str] = {v: k for k, v in KIND_OF_EVENT.items()}
_TS_OFFSET = 1 << 63  # times sort as unsigned big-endian numbers, negative ones too
_TAIL = struct.Struct(">Q4s")
_TAIL_NUMBERS = struct.Struct(">QI")  # the same tail, its digest read as a number
#: A key's tail (`_TAIL`) as a numpy record: the offset time and the digest, big-endian.
_TAIL_RECORD = np.dtype([("t", ">u8"), ("d", ">u4")])


def user_prefix(user_id: str) -> bytes:
    """The key prefix of every history row of ``user_id``."""
    raw = user_id.encode()
    return ROW_PREFIX + len(raw).to_bytes(2, "big") + raw


def _key(user: bytes, ts_ms: int, event_id: str, item_id: str) -> bytes:
    digest = blake2b(f"{event_id}\x00{item_id}".encode(), digest_size=4).digest()
    return user + _TAIL.pack(ts_ms + _TS_OFFSET, digest)


def rows_of(user_id: str, events: Iterable[Event]) -> list[tuple[bytes, bytes]]:
    """The history rows of ``events`` (applied to ``user_id``'s profile), as (key, value)."""
    prefix: bytes | None = None
    out: list[tuple[bytes, bytes]] = []
    for e in events:
        kind = KIND_OF_EVENT.get(e["type"])
        if kind is None:
            continue
        if e["type"] == "purchase":
            items = [line["item_id"] for line in e["properties"].get("items", ())]
        elif e.get("item_id"):
            items = [e["item_id"]]
        else:
            continue
        if prefix is None:
            prefix = user_prefix(user_id)
        for item in items:
            out.append((_key(prefix, e["ts_ms"], e["event_id"], item), kind + item.encode()))
    return out


def user_keys(db: Any, user_id: str) -> list[bytes]:
    """The keys of ``user_id``'s history rows in ``db`` (one partition's store)."""
    return [key for key, _value in prefixed(db, user_prefix(user_id))]


def _split(key: bytes) -> tuple[str, int, int]:
    """A row key's visitor, event time and digest (as a number)."""
    n = int.from_bytes(key[2:4], "big")
    user = key[4 : 4 + n].decode()
    ts, digest = _TAIL_NUMBERS.unpack_from(key, 4 + n)
    return user, ts - _TS_OFFSET, digest


@dataclass(frozen=True, slots=True)
class Interactions:
    """A history as arrays: visitors and items numbered, one entry per row.

    Attributes:
        users: visitor ids, numbered by position.
        items: item ids, numbered by position.
        user: each row's visitor number.
        item: each row's item number.
        kind: each row's event type number (position in `KINDS`).
        ts_ms: each row's event time.
    """

    users: list[str]
    items: list[str]
    user: npt.NDArray[np.int32]
    item: npt.NDArray[np.int32]
    kind: npt.NDArray[np.int8]
    ts_ms: npt.NDArray[np.int64]

    #: Event types in kind-number order.
    KINDS = ("product_view", "click", "add_to_cart", "purchase")

    def __len__(self) -> int:
        return len(self.user)


class Scan:
    """Every history row in ``dbs`` (partition -> its store), read a few rows at a time.

    ``step`` reads on the caller's thread, so an event loop can read the history in slices
    between its other work (on a thread beside the loop, every socket call of the loop waited
    for the reading thread to hand back the interpreter lock: pushes waited 100 ms and more at
    the start of each training). ``result`` then builds the arrays. RocksDB iterators read a
    consistent snapshot: writes meanwhile are not seen, nor harmed.

    Rows more than ``keep_ms`` older than the newest row are left out of the result (the
    window follows the history, so a backfill of old events keeps its last ``keep_ms``);
    their keys come back per partition, for the caller to delete. They are made again from
    what the one pass kept of each row (its partition and its key's digest, 6 bytes): finding
    them by reading the history a second time held the interpreter lock, beside the loop, for
    as long as the first read.
    """

    def __init__(self, dbs: Mapping[int, Any], keep_ms: int | None = None) -> None:
        self._keep_ms = keep_ms
        number = {event: n for n, event in enumerate(Interactions.KINDS)}
        self._kind_of = {kb: number[event] for kb, event in EVENT_OF_KIND.items()}
        self._users: dict[str, int] = {}
        self._items: dict[str, int] = {}
        # Packed columns: a row leaves no Python object behind but its visitor's and item's
        # names (millions of small objects, freed at the end, would leave the interpreter's
        # memory pools fragmented by what was allocated meanwhile).
        self._u = array.array("q")
        self._i = array.array("q")
        self._k = array.array("b")
        self._t = array.array("q")
        self._p = array.array("h")  # the row's partition
        self._d = array.array("I")  # its key's digest
        self._rows: Iterator[tuple[int, tuple[bytes, bytes]]] = (
            (partition, row) for partition, db in dbs.items() for row in prefixed(db, ROW_PREFIX)
        )
        self.done = False

    def __len__(self) -> int:
        """Rows read so far."""
        return len(self._t)

    def step(self, rows: int) -> bool:
        """Read up to ``rows`` more rows; True once every row is read."""
        users, items, kind_of = self._users, self._items, self._kind_of
        u, i, k, t, p, d = self._u, self._i, self._k, self._t, self._p, self._d
        before = len(t)
        for partition, (key, value) in itertools.islice(self._rows, rows):
            user, ts, digest = _split(key)
            u.append(users.setdefault(user, len(users)))
            i.append(items.setdefault(value[1:].decode(), len(items)))
            k.append(kind_of.get(value[:1], 0))
            t.append(ts)
            p.append(partition)
            d.append(digest)
        if len(t) - before < rows:
            self.done = True
        return self.done

    def result(self) -> tuple[Interactions, dict[int, list[bytes]]]:
        """The rows read, as arrays, and the expired keys (read every row first)."""
        while not self.done:
            self.step(1 << 20)
        ts_ms = np.array(self._t, dtype=np.int64)
        user_no = np.array(self._u, dtype=np.int64)
        item_no = np.array(self._i, dtype=np.int64)
        kind = np.array(self._k, dtype=np.int8)
        partition = np.array(self._p, dtype=np.int64)
        digest = np.array(self._d, dtype=np.uint32)
        self._u, self._i, self._k, self._t, self._p, self._d = (
            array.array(c) for c in ("q", "q", "b", "q", "h", "I")
        )
        user_names, item_names = list(self._users), list(self._items)
        self._users, self._items = {}, {}
        old: dict[int, list[bytes]] = {}
        keep_ms = self._keep_ms
        if keep_ms is not None and len(ts_ms):
            keep = ts_ms >= int(ts_ms.max()) - keep_ms
            gone = np.flatnonzero(~keep)
            if len(gone):
                old = _keys(user_names, user_no[gone], ts_ms[gone], digest[gone], partition[gone])
            if old:  # numbered again, without the visitors and items of expired rows only
                user_no, item_no = user_no[keep], item_no[keep]
                kind, ts_ms = kind[keep], ts_ms[keep]
                user_nums, user_no = np.unique(user_no, return_inverse=True)
                item_nums, item_no = np.unique(item_no, return_inverse=True)
                user_names = [user_names[n] for n in user_nums.tolist()]
                item_names = [item_names[n] for n in item_nums.tolist()]
        interactions = Interactions(
            users=user_names,
            items=item_names,
            user=user_no.astype(np.int32),
            item=item_no.astype(np.int32),
            kind=kind,
            ts_ms=ts_ms,
        )
        return interactions, old


def _keys(
    user_names: list[str],
    user_no: npt.NDArray[np.int64],
    ts_ms: npt.NDArray[np.int64],
    digest: npt.NDArray[np.uint32],
    partition: npt.NDArray[np.int64],
) -> dict[int, list[bytes]]:
    """The keys of the rows given by their columns, per partition, in the order given."""
    tails = np.empty(len(ts_ms), _TAIL_RECORD)
    tails["t"] = ts_ms.view(np.uint64) ^ np.uint64(_TS_OFFSET)  # as adding 2**63, modulo 2**64
    tails["d"] = digest
    raw = tails.tobytes()
    size = _TAIL_RECORD.itemsize
    prefixes: dict[int, bytes] = {}
    keys: dict[int, list[bytes]] = {}
    for j, (user, part) in enumerate(zip(user_no.tolist(), partition.tolist(), strict=True)):
        prefix = prefixes.get(user)
        if prefix is None:
            prefix = prefixes[user] = user_prefix(user_names[user])
        keys.setdefault(part, []).append(prefix + raw[j * size : (j + 1) * size])
    return keys


def scan(
    dbs: Mapping[int, Any], keep_ms: int | None = None
) -> tuple[Interactions, dict[int, list[bytes]]]:
    """Every history row in ``dbs``, and the expired keys, in one go (see `Scan`)."""
    return Scan(dbs, keep_ms).result()


@dataclass(frozen=True, slots=True)
class RepeatStats:
    """How a shop's visitors re-buy, learned from its history (for the buy-again source).

    Attributes:
        purchases: purchase lines in the history (one per visitor, product and time).
        share: the share of them that re-buy a product the visitor had bought before.
        gap_s: the median time between two purchases of one product by one visitor (None:
            no re-buy at all).
    """

    purchases: int
    share: float
    gap_s: float | None

    #: Below this share re-buying is noise: bought products stay out of lists.
    MIN_SHARE = 0.02

    @property
    def strength(self) -> float:
        """How much buy-again counts (0-1): 0 below `MIN_SHARE`, full from a 20% share."""
        if self.share < self.MIN_SHARE:
            return 0.0
        return min(1.0, self.share * 5.0)

    @property
    def half_life_s(self) -> float:
        """How fast a past purchase fades as a buy-again candidate: four typical gaps."""
        return max(4.0 * (self.gap_s or 7 * 86400.0), 86400.0)

    def as_json(self) -> dict[str, Any]:
        """As JSON (and for saving)."""
        return {
            "purchases": self.purchases,
            "share": round(self.share, 5),
            "gap_s": None if self.gap_s is None else round(self.gap_s, 1),
            "strength": round(self.strength, 4),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RepeatStats:
        """The stats saved by `as_json`."""
        gap = data.get("gap_s")
        return cls(
            int(data["purchases"]), float(data["share"]), None if gap is None else float(gap)
        )


def repeat_stats(
    user: npt.NDArray[np.integer[Any]],
    item: npt.NDArray[np.integer[Any]],
    kind: npt.NDArray[np.integer[Any]],
    ts_ms: npt.NDArray[np.integer[Any]],
) -> RepeatStats:
    """The re-buying in a history given as arrays (kinds numbered as `Interactions.KINDS`)."""
    bought = kind == Interactions.KINDS.index("purchase")
    if not bought.any():
        return RepeatStats(0, 0.0, None)
    rows = np.unique(
        np.stack(
            [user[bought].astype(np.int64), item[bought].astype(np.int64), ts_ms[bought]], axis=1
        ),
        axis=0,
    )  # sorted by visitor, product, time; one row per line
    same = (rows[1:, 0] == rows[:-1, 0]) & (rows[1:, 1] == rows[:-1, 1])
    gaps = (rows[1:, 2] - rows[:-1, 2])[same]
    share = float(same.sum()) / len(rows)
    gap_s = float(np.median(gaps)) / 1000.0 if len(gaps) else None
    return RepeatStats(len(rows), share, gap_s)
