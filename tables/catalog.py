"""The items table (the catalog) and its in-memory view.

Catalog changes travel on the items topic like events; the catalog agent is the items
table's one writer. `Catalog` is the process's in-memory view of the table (what ranking needs
per candidate: category, stock, title), loaded from the table on start and kept current by
the agent, so serving never reads RocksDB per candidate.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from personify.engine.models import Item
from personify.tables.store import bytes_table, held_db, scan

__all__ = [
    "Catalog",
    "ItemInfo",
    "catalog",
    "decode_item",
    "encode_item",
    "has_words",
    "item_text",
    "stored_items",
    "table",
]


def encode_item(item: Item) -> bytes:
    """Serialise an item for the table."""
    return orjson.dumps(item)


def decode_item(data: bytes) -> Item:
    """Deserialise an item from the table."""
    item: Item = orjson.loads(data)
    return item


#: Characters of the description embedded (the title, category and tags say the most; a
#: long text costs encoding time roughly in proportion).
DESCRIPTION_CHARS = 300


def item_text(item: Item) -> str:
    """The text an item is embedded from: title, category words, tags, start of description."""
    parts = [item["title"]]
    if item.get("category"):
        parts.append(item["category"].replace("/", " "))
    if item.get("tags"):
        parts.append(", ".join(item["tags"]))
    if item.get("description"):
        parts.append(item["description"][:DESCRIPTION_CHARS])
    return ". ".join(p.strip() for p in parts if p and p.strip())


#: Letters (in any script) an item's text needs before it is embedded.
MIN_LETTERS = 2
_LETTER = re.compile(r"[^\W\d_]")


def has_words(text: str) -> bool:
    """Whether a text says anything to the language model: at least two letters.

    An item known only by codes and numbers ("110411", "12429 / 3") gets no text vector: the
    model would place it next to other items whose digits look alike, which says nothing about
    the products. Such items take no part in content similarity or text search; every other
    source still ranks them.
    """
    return len(_LETTER.findall(text, 0, 4096)[:MIN_LETTERS]) >= MIN_LETTERS


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """What ranking needs of an item."""

    item_id: str
    title: str
    category: str | None
    in_stock: bool
    price: float | None


class Catalog:
    """The in-memory view of the items table: item id -> `ItemInfo` (thread-safe reads)."""

    def __init__(self) -> None:
        self._items: dict[str, ItemInfo] = {}
        #: Items deleted while this process runs (never recommended, even from old signals).
        self.deleted: set[str] = set()
        self._lock = threading.Lock()
        #: Set once the view holds the whole table (after start).
        self.loaded = False
        #: Counts items deleted or gone out of stock: lists computed before a change of it
        #: are checked for such items before they are served.
        self.removals = 0
        #: Counts every change.
        self.version = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def get(self, item_id: str) -> ItemInfo | None:
        """The item, or None when it is not in the catalog."""
        return self._items.get(item_id)

    def ids(self) -> list[str]:
        """Every item id."""
        return list(self._items)

    def put(self, item: Item) -> None:
        """Add or replace an item."""
        info = ItemInfo(
            item_id=item["item_id"],
            title=item["title"],
            category=item.get("category"),
            in_stock=bool(item.get("in_stock", True)),
            price=item.get("price"),
        )
        with self._lock:
            old = self._items.get(info.item_id)
            if not info.in_stock and (old is None or old.in_stock):
                self.removals += 1
            self.version += 1
            self._items[info.item_id] = info
            self.deleted.discard(info.item_id)

    def remove(self, item_id: str) -> None:
        """Forget an item (no error when it is unknown)."""
        with self._lock:
            self._items.pop(item_id, None)
            self.deleted.add(item_id)
            self.removals += 1
            self.version += 1

    def touch(self) -> None:
        """Count a change made elsewhere (the items' vectors were indexed)."""
        with self._lock:
            self.version += 1

    def category_of(self, item_id: str) -> str | None:
        """The item's category path, or None."""
        info = self._items.get(item_id)
        return None if info is None else info.category


@functools.cache
def catalog() -> Catalog:
    """The process's catalog view."""
    return Catalog()


@functools.cache
def table() -> Any:
    """The Faust items table: item id -> item JSON (written by the catalog agent)."""
    return bytes_table("items", "The item catalog, keyed by item id.")


def stored_items(tbl: Any, partitions: int) -> Iterator[Item]:
    """Every item held locally in the items table (all local partitions)."""
    for partition in range(partitions):
        partition_db = held_db(tbl, partition)
        if partition_db is None:  # a partition this worker has never held
            continue
        for _key, value in scan(partition_db):
            yield decode_item(value)
