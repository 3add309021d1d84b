"""Vector index: the `VectorIndex` protocol and `FaissIndex`, with atomic snapshots.

`FaissIndex` keeps unit-length float32 vectors under string ids (mapped to int64 ids in a
``faiss.IndexIDMap2``) and answers top-k inner-product (= cosine) queries. It is exact (flat)
while small and switches itself to HNSW once it holds `IndexSettings.hnsw_threshold` vectors:
the one rebuild happens inside the `upsert` that crosses the threshold. HNSW in faiss cannot
delete, so a removed or replaced id is tombstoned: a search never returns it, and the index is
rebuilt without tombstones once they exceed `IndexSettings.compact_fraction` of what it holds.

`save` writes a snapshot (faiss index, id map, manifest) with temp files and renames, the
manifest last, so a crash leaves the previous snapshot readable. The manifest carries a content
fingerprint (of the live ids and vectors only), so a caller can tell a stale snapshot from the
catalog it has now without loading it: compare `read_snapshot_info(dir).fingerprint` with
`content_fingerprint(ids, vectors)`.

Every method takes a lock, so the index may be shared between threads; from a coroutine use
the ``*_async`` methods, which run in a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import faiss
import numpy as np
import numpy.typing as npt

from personify.embeddings.errors import EmbeddingError, SnapshotError

__all__ = [
    "FaissIndex",
    "Hit",
    "IndexKind",
    "IndexSettings",
    "ItemsMatch",
    "SnapshotInfo",
    "VectorIndex",
    "content_fingerprint",
    "read_snapshot_info",
]

IndexKind = Literal["flat", "hnsw"]
Vector = npt.NDArray[np.float32]

_MANIFEST = "manifest.json"
_FORMAT = "personify-faiss-index"
_FORMAT_VERSION = 1
_MOD = 1 << 256
#: Similarity rows a flat index keeps for `FaissIndex.search_items`, in bytes ...
SEED_ROWS_BYTES = 64 << 20
#: ... but at least this many rows.
_MIN_SEED_ROWS = 64


@dataclass(frozen=True, slots=True)
class ItemsMatch:
    """What `VectorIndex.search_items` found.

    Attributes:
        seeds: the items searched by that the index holds, in the order given.
        ids: the hits, best first.
        scores: their scores (float64).
        closest: the seed most similar to a hit (None for an id that is not a hit or gone).
    """

    seeds: list[str]
    ids: list[str]
    scores: npt.NDArray[np.float64]
    closest: Callable[[str], str | None]


class Hit(NamedTuple):
    """One search result; a NamedTuple so it also unpacks as ``(id, score)``.

    Attributes:
        id: the item's id.
        score: inner product of the unit-length query and item vectors (cosine, -1..1).
    """

    id: str
    score: float


@dataclass(frozen=True, slots=True)
class IndexSettings:
    """How a `FaissIndex` is built and searched.

    Attributes:
        hnsw_threshold: vectors at which the index switches from exact (flat) to HNSW.
        hnsw_m: HNSW neighbours per node (memory and build time grow with it).
        ef_construction: HNSW candidate list while building (higher: better graph, slower).
        ef_search: HNSW candidate list while searching (raised to k when k is larger);
            recall@10 on MiniLM vectors is about 0.85/0.91/0.95 at 16/32/64.
        compact_fraction: rebuild an HNSW index once tombstones exceed this share of it.
        build_threads: OpenMP threads for adding and rebuilding; 0 means every core.
        batch_threads: OpenMP threads for `search_many`; 0 means every core. A single query
            always runs on one thread (faster, and fair to concurrent callers).
    """

    hnsw_threshold: int = 10_000
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    compact_fraction: float = 0.2
    build_threads: int = 0
    batch_threads: int = 0

    def __post_init__(self) -> None:
        for name in ("hnsw_threshold", "hnsw_m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EmbeddingError(
                    f"IndexSettings.{name}: expected an integer >= 1, got {value!r}"
                )
        for name in ("build_threads", "batch_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise EmbeddingError(
                    f"IndexSettings.{name}: expected an integer >= 0 (0 = every core), "
                    f"got {value!r}"
                )
        if not 0.0 < self.compact_fraction < 1.0:
            raise EmbeddingError(
                "IndexSettings.compact_fraction: expected a number between 0 and 1 (exclusive), "
                f"got {self.compact_fraction!r}"
            )


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What a snapshot's manifest says, read without loading the index.

    Attributes:
        directory: the snapshot directory.
        fingerprint: content fingerprint of the ids and vectors saved (see `content_fingerprint`).
        dim: vector length.
        count: live vectors saved.
        kind: ``"flat"`` or ``"hnsw"``.
        created_at: Unix time of the save.
        index_file: the faiss index file, relative to ``directory``.
        ids_file: the id map file, relative to ``directory``.
    """

    directory: Path
    fingerprint: str
    dim: int
    count: int
    kind: IndexKind
    created_at: float
    index_file: str
    ids_file: str


class VectorIndex(Protocol):
    """Unit-length vectors under string ids, searched by inner product."""

    @property
    def dim(self) -> int:
        """Length of every vector."""
        ...

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the live ids and vectors (equal content, equal fingerprint)."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, item_id: object) -> bool: ...

    def busy(self) -> bool:
        """Whether a write holds the index right now (a search would wait for it)."""
        ...

    def upsert(self, ids: Sequence[str], vectors: npt.ArrayLike) -> None:
        """Add vectors, replacing those of ids already present (vectors are normalised)."""
        ...

    def remove(self, ids: Iterable[str]) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed."""
        ...

    def vector(self, item_id: str) -> Vector | None:
        """The stored (unit-length) vector of ``item_id``, or None."""
        ...

    def vectors(self, item_ids: Sequence[str]) -> tuple[list[str], Vector]:
        """The stored vectors of those of ``item_ids`` present, in order."""
        ...

    def search(self, query: npt.ArrayLike, k: int, *, exclude: Collection[str] = ()) -> list[Hit]:
        """The ``k`` best hits for one query vector, best first, skipping ``exclude``."""
        ...

    def search_many(
        self, queries: npt.ArrayLike, k: int, *, exclude: Collection[str] = ()
    ) -> list[list[Hit]]:
        """`search` for each row of a matrix."""
        ...

    def search_ids(
        self, query: npt.ArrayLike, k: int, *, exclude: Collection[str] = ()
    ) -> tuple[list[str], npt.NDArray[np.float64]]:
        """`search` as (ids, scores): no `Hit` per result (for the ranking's hot path)."""
        ...

    def search_items(
        self,
        item_ids: Sequence[str],
        weights: Sequence[float],
        k: int,
        *,
        exclude: Collection[str] = (),
    ) -> ItemsMatch | None:
        """Search by the weighted sum of the stored vectors of ``item_ids``; None if none held."""
        ...

    async def search_async(
        self, query: npt.ArrayLike, k: int, *, exclude: Collection[str] = ()
    ) -> list[Hit]:
        """`search` in a worker thread."""
        ...

    async def upsert_async(self, ids: Sequence[str], vectors: npt.ArrayLike) -> None:
        """`upsert` in a worker thread."""
        ...

    def save(self, directory: str | os.PathLike[str]) -> SnapshotInfo:
        """Write a snapshot to ``directory`` atomically."""
        ...


# -- vectors and fingerprints --------------------------------------------------------------


def _unit_rows(values: npt.ArrayLike, dim: int, what: str, ids: Sequence[str] | None) -> Vector:
    """A C-contiguous float32 copy of a (n, dim) matrix (or one vector), rows scaled to norm 1."""
    try:
        rows = np.array(values, dtype=np.float32, order="C", copy=True)
    except (TypeError, ValueError) as exc:
        raise EmbeddingError(f"{what}: expected numbers of shape (n, {dim}), got {exc}") from None
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise EmbeddingError(
            f"{what}: expected shape (n, {dim}) or ({dim},), got {np.shape(values)}; "
            "was the index built for another model?"
        )
    if ids is not None and rows.shape[0] != len(ids):
        raise EmbeddingError(f"{what}: expected {len(ids)} rows (one per id), got {rows.shape[0]}")
    norms = np.linalg.norm(rows, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0.0))
    if bad.size:
        row = int(bad[0])
        name = f" (id {ids[row]!r})" if ids is not None else ""
        raise EmbeddingError(
            f"{what}[{row}]{name}: expected a finite, non-zero vector, got "
            f"{'NaN or infinity' if not np.isfinite(rows[row]).all() else 'a zero vector'}"
        )
    rows /= norms[:, None].astype(np.float32)
    return rows


def _check_ids(ids: Sequence[str] | Iterable[str], what: str = "ids") -> list[str]:
    if isinstance(ids, str | bytes):
        raise EmbeddingError(
            f"{what}: expected a sequence of str ids, got a single {type(ids).__name__} "
            f"{ids[:40]!r}; wrap it in a list"
        )
    out = list(ids)
    for i, item_id in enumerate(out):
        if not isinstance(item_id, str) or not item_id:
            raise EmbeddingError(f"{what}[{i}]: expected a non-empty str, got {item_id!r:.60}")
    return out


def _check_search(k: int, exclude: Collection[str]) -> list[str]:
    """The ids of ``exclude``, once ``k`` and they are checked."""
    if not isinstance(k, int) or k < 1:
        raise EmbeddingError(f"k: expected an integer >= 1, got {k!r}")
    return _check_ids(exclude, "exclude") if exclude else []


def _digest(item_id: str, row: Vector) -> int:
    """One item's share of the fingerprint (rows have a fixed length, so this is unambiguous)."""
    data = item_id.encode("utf-8") + b"\0" + row.astype("<f4", copy=False).tobytes()
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


def _finish(dim: int, count: int, total: int) -> str:
    text = f"{_FORMAT}/{_FORMAT_VERSION}:{dim}:{count}:{total:064x}"
    return hashlib.sha256(text.encode()).hexdigest()


def content_fingerprint(ids: Sequence[str], vectors: npt.ArrayLike) -> str:
    """The fingerprint a `FaissIndex` holding exactly these ids and vectors reports.

    It depends only on the set of (id, normalised vector) pairs: not on their order, on how
    they were added and removed, or on the index kind.

    Args:
        ids: distinct item ids.
        vectors: one row per id (normalised here as `FaissIndex.upsert` does).

    Returns:
        A hex SHA-256 string.

    Raises:
        EmbeddingError: ids repeat, or the shapes disagree.
    """
    keys = _check_ids(ids)
    if len(set(keys)) != len(keys):
        raise EmbeddingError("ids: expected distinct ids, got repeats")
    shape = np.shape(vectors)
    if len(shape) != 2:
        raise EmbeddingError(f"vectors: expected shape (n, dim), got {shape}")
    rows = _unit_rows(vectors, shape[1], "vectors", keys)
    total = sum(_digest(k, r) for k, r in zip(keys, rows, strict=True)) % _MOD
    return _finish(shape[1], len(keys), total)


# -- snapshots -----------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_snapshot_info(directory: str | os.PathLike[str]) -> SnapshotInfo | None:
    """Read a snapshot's manifest, without loading the index.

    Args:
        directory: where `FaissIndex.save` wrote it.

    Returns:
        The manifest, or None when the directory holds no snapshot.

    Raises:
        SnapshotError: the manifest exists but cannot be read or is not a Personify snapshot.
    """
    path = Path(directory)
    manifest = path / _MANIFEST
    try:
        raw = json.loads(manifest.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SnapshotError(
            f"{manifest}: cannot read the snapshot manifest ({exc}); "
            "delete the directory to rebuild the index from the catalog"
        ) from exc
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise SnapshotError(
            f"{manifest}: expected a {_FORMAT} manifest, got {str(raw)[:80]!r}; "
            "point the index at its own directory"
        )
    if raw.get("version") != _FORMAT_VERSION:
        raise SnapshotError(
            f"{manifest}: expected snapshot format version {_FORMAT_VERSION}, got "
            f"{raw.get('version')!r}; delete the directory to rebuild the index"
        )
    try:
        kind = raw["kind"]
        if kind not in ("flat", "hnsw"):
            raise ValueError(f"kind {kind!r}")
        return SnapshotInfo(
            directory=path,
            fingerprint=str(raw["fingerprint"]),
            dim=int(raw["dim"]),
            count=int(raw["count"]),
            kind=kind,
            created_at=float(raw["created_at"]),
            index_file=str(raw["index_file"]),
            ids_file=str(raw["ids_file"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(
            f"{manifest}: malformed manifest ({exc!r}); delete the directory to rebuild the index"
        ) from exc


def _all_rows(index: faiss.Index) -> Vector:
    """Every vector stored in ``index``, in its internal order."""
    if index.ntotal == 0:
        return np.empty((0, index.d), dtype=np.float32)
    return np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


def _threads(n: int) -> int:
    return n if n > 0 else (os.cpu_count() or 1)


# -- the index -----------------------------------------------------------------------------


class FaissIndex:
    """A `VectorIndex` on faiss-cpu: exact while small, HNSW from `hnsw_threshold` vectors.

    Vectors are normalised on the way in, so scores are cosine similarities. Replacing an id
    gives it a new int64 id; on HNSW the old one is tombstoned.

    Args:
        dim: vector length (384 for all-MiniLM-L6-v2).
        settings: build and search settings.

    Raises:
        EmbeddingError: ``dim`` is below 1.
    """

    def __init__(self, dim: int, settings: IndexSettings | None = None) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise EmbeddingError(f"dim: expected an integer >= 1, got {dim!r}")
        self._dim = dim
        self._settings = settings or IndexSettings()
        self._lock = threading.RLock()
        self._key_to_int: dict[str, int] = {}
        self._int_to_key: dict[int, str] = {}
        self._digests: dict[str, int] = {}
        self._total = 0
        self._tombstones: set[int] = set()
        self._tomb_selector: faiss.IDSelectorBatch | None = None
        self._next_int = 0
        self._rebuilds = 0
        self._kind: IndexKind = "flat"
        self._index, self._inner = self._new_index("flat")
        #: A flat index's vectors and their int64 ids, both ordered by id, until the next write.
        self._flat: tuple[Vector, npt.NDArray[np.int64]] | None = None
        #: A flat index's similarity rows of items searched by (`search_items`): the inner
        #: product of the item's vector with each stored vector, in `_flat`'s order.
        self._seed_rows: dict[int, Vector] = {}

    # -- read-only state -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Length of every vector."""
        return self._dim

    @property
    def settings(self) -> IndexSettings:
        """The settings this index was made with."""
        return self._settings

    @property
    def kind(self) -> IndexKind:
        """``"flat"`` (exact) or ``"hnsw"`` (approximate) right now."""
        return self._kind

    @property
    def tombstones(self) -> int:
        """Removed or replaced vectors still held by an HNSW index until the next rebuild."""
        return len(self._tombstones)

    @property
    def rebuilds(self) -> int:
        """How many times this index was rebuilt (switch to HNSW or compaction)."""
        return self._rebuilds

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the live ids and vectors; see `content_fingerprint`."""
        with self._lock:
            return _finish(self._dim, len(self._key_to_int), self._total)

    def __len__(self) -> int:
        return len(self._key_to_int)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._key_to_int

    def busy(self) -> bool:
        """Whether another thread holds the index right now (a write: a search would wait)."""
        if self._lock.acquire(blocking=False):
            self._lock.release()
            return False
        return True

    def ids(self) -> list[str]:
        """The ids held, in no particular order."""
        with self._lock:
            return list(self._key_to_int)

    def vectors(self, item_ids: Sequence[str]) -> tuple[list[str], Vector]:
        """The stored vectors of those of ``item_ids`` present (in order), under one lock."""
        with self._lock:
            found = [i for i in item_ids if i in self._key_to_int]
            flat = self._flat_rows()
            if flat is not None:
                matrix, labels = flat
                numbers = [self._key_to_int[i] for i in found]
                return found, matrix[np.searchsorted(labels, numbers)]
            rows = np.empty((len(found), self._dim), dtype=np.float32)
            for n, item_id in enumerate(found):
                rows[n] = self._index.reconstruct(self._key_to_int[item_id])
            return found, rows

    def vector(self, item_id: str) -> Vector | None:
        """The stored (unit-length) vector of ``item_id``, or None when absent."""
        with self._lock:
            internal = self._key_to_int.get(item_id)
            if internal is None:
                return None
            flat = self._flat_rows()
            if flat is not None:
                matrix, labels = flat
                found: Vector = matrix[int(np.searchsorted(labels, internal))]
                return found
            row: Vector = np.asarray(self._index.reconstruct(internal), dtype=np.float32)
            return row

    def __repr__(self) -> str:
        return (
            f"<FaissIndex dim={self._dim} kind={self._kind} size={len(self)} "
            f"tombstones={len(self._tombstones)}>"
        )

    # -- writes ----------------------------------------------------------------------------
    def upsert(self, ids: Sequence[str], vectors: npt.ArrayLike) -> None:
        """Add vectors, replacing those of ids already present.

        No full rebuild, except once when the index reaches `hnsw_threshold` (the switch to
        HNSW) and when tombstones pass `compact_fraction` (compaction).

        Args:
            ids: item ids; if one repeats, its last row wins.
            vectors: one row per id, any non-zero length (normalised here).

        Raises:
            EmbeddingError: an id is empty or not a str, or a row has the wrong length, is zero
                or is not finite.
        """
        keys = _check_ids(ids)
        rows = _unit_rows(vectors, self._dim, "vectors", keys)
        last = {key: row for row, key in enumerate(keys)}
        if len(last) != len(keys):
            keys = list(last)
            rows = rows[list(last.values())]
        if not keys:
            return
        with self._lock:
            self._drop(keys)
            internal = np.arange(self._next_int, self._next_int + len(keys), dtype=np.int64)
            self._next_int += len(keys)
            faiss.omp_set_num_threads(_threads(self._settings.build_threads))
            self._index.add_with_ids(rows, internal)
            self._forget_flat()
            for key, number, row in zip(keys, internal.tolist(), rows, strict=True):
                digest = _digest(key, row)
                self._key_to_int[key] = number
                self._int_to_key[number] = key
                self._digests[key] = digest
                self._total = (self._total + digest) % _MOD
            self._maintain()

    def remove(self, ids: Iterable[str]) -> int:
        """Remove ids; unknown ids are ignored.

        Returns:
            How many ids were removed.

        Raises:
            EmbeddingError: ``ids`` is a bare string.
        """
        keys = _check_ids(ids)
        with self._lock:
            removed = self._drop(keys)
            self._maintain()
            return removed

    def compact(self) -> None:
        """Rebuild now without tombstones, as flat or HNSW by the current size."""
        with self._lock:
            self._rebuild(self._target_kind())

    # -- search ----------------------------------------------------------------------------
    def search(self, query: npt.ArrayLike, k: int, *, exclude: Collection[str] = ()) -> list[Hit]:
        """The best ``k`` items for one query vector.

        Args:
            query: a vector of length `dim` (or a (1, dim) matrix); normalised here.
            k: how many hits at most.
            exclude: ids never to return (e.g. items the visitor already bought).

        Returns:
            Up to ``k`` hits, highest score first; fewer when the index holds fewer.

        Raises:
            EmbeddingError: ``k`` is below 1, or the query has the wrong shape or is zero.
        """
        return self._search(self._one_query(query), k, exclude)[0]

    def search_ids(
        self, query: npt.ArrayLike, k: int, *, exclude: Collection[str] = ()
    ) -> tuple[list[str], npt.NDArray[np.float64]]:
        """`search`, as the hits' ids and their scores (float64), highest first.

        Raises:
            EmbeddingError: as `search`.
        """
        rows = self._one_query(query)
        with self._lock:
            if self._kind == "flat":
                return self._flat_search(rows[0], k, exclude)
            found = self._search_arrays(rows, k, exclude)
            if found is None:
                return [], np.empty(0, dtype=np.float64)
            scores, labels, names = found
            keep = [j for j, number in enumerate(labels[0].tolist()) if number in names]
            ids = [names[number] for number in labels[0, keep].tolist()]
        return ids, scores[0, keep].astype(np.float64)

    def _one_query(self, query: npt.ArrayLike) -> Vector:
        """``query`` as a normalised (1, dim) matrix (a vector or a one-row matrix)."""
        rows = _unit_rows(query, self._dim, "query", None)
        if rows.shape[0] != 1:
            raise EmbeddingError(
                f"query: expected one vector, got {rows.shape[0]} rows; use search_many"
            )
        return rows

    def search_many(
        self, queries: npt.ArrayLike, k: int, *, exclude: Collection[str] = ()
    ) -> list[list[Hit]]:
        """`search` for each row of a (n, dim) matrix, on `batch_threads` threads.

        Returns:
            One list of hits per row.
        """
        rows = _unit_rows(queries, self._dim, "queries", None)
        return self._search(rows, k, exclude)

    async def search_async(
        self, query: npt.ArrayLike, k: int, *, exclude: Collection[str] = ()
    ) -> list[Hit]:
        """`search` in a worker thread, so the event loop is never blocked."""
        return await asyncio.to_thread(self.search, query, k, exclude=exclude)

    async def search_many_async(
        self, queries: npt.ArrayLike, k: int, *, exclude: Collection[str] = ()
    ) -> list[list[Hit]]:
        """`search_many` in a worker thread."""
        return await asyncio.to_thread(self.search_many, queries, k, exclude=exclude)

    async def upsert_async(self, ids: Sequence[str], vectors: npt.ArrayLike) -> None:
        """`upsert` in a worker thread (the switch to HNSW can take seconds)."""
        await asyncio.to_thread(self.upsert, ids, vectors)

    async def remove_async(self, ids: Iterable[str]) -> int:
        """`remove` in a worker thread (a compaction can take seconds)."""
        return await asyncio.to_thread(self.remove, ids)

    # -- snapshots -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> SnapshotInfo:
        """Write a snapshot to ``directory`` (created if missing), atomically.

        The index and id map go to new files, then the manifest naming them replaces the old
        one (the commit point), then the previous snapshot's files are deleted. The directory
        belongs to this index: one process saves there at a time.

        Returns:
            The new manifest.

        Raises:
            SnapshotError: the directory cannot be written.
        """
        path = Path(directory)
        tag = uuid.uuid4().hex[:16]
        index_file, ids_file = f"index-{tag}.faiss", f"ids-{tag}.json"
        with self._lock:
            info = SnapshotInfo(
                directory=path,
                fingerprint=self.fingerprint,
                dim=self._dim,
                count=len(self._key_to_int),
                kind=self._kind,
                created_at=time.time(),
                index_file=index_file,
                ids_file=ids_file,
            )
            id_map = {
                "keys": list(self._key_to_int),
                "ints": list(self._key_to_int.values()),
                "tombstones": sorted(self._tombstones),
                "next_int": self._next_int,
            }
            manifest = {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "fingerprint": info.fingerprint,
                "dim": info.dim,
                "count": info.count,
                "kind": info.kind,
                "created_at": info.created_at,
                "index_file": index_file,
                "ids_file": ids_file,
            }
            try:
                path.mkdir(parents=True, exist_ok=True)
                tmp = path / f".{index_file}.tmp"
                faiss.write_index(self._index, str(tmp))
                _fsync_path(tmp)
                os.replace(tmp, path / index_file)
                _write_atomic(path / ids_file, json.dumps(id_map).encode())
                _write_atomic(path / _MANIFEST, json.dumps(manifest, indent=1).encode())
                _fsync_path(path)
            except (OSError, RuntimeError) as exc:  # faiss reports I/O errors as RuntimeError
                raise SnapshotError(
                    f"{path}: cannot write the index snapshot ({exc}); check free space and "
                    "permissions there"
                ) from exc
            # Files of earlier snapshots, and temporary files of saves that crashed.
            for pattern in ("index-*.faiss", "ids-*.json", ".*.tmp"):
                for old in path.glob(pattern):
                    if old.name not in (index_file, ids_file):
                        old.unlink(missing_ok=True)
        return info

    async def save_async(self, directory: str | os.PathLike[str]) -> SnapshotInfo:
        """`save` in a worker thread."""
        return await asyncio.to_thread(self.save, directory)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        settings: IndexSettings | None = None,
        dim: int | None = None,
    ) -> FaissIndex:
        """Read a snapshot written by `save` and check it against its fingerprint.

        Args:
            directory: the snapshot directory.
            settings: settings for the loaded index (the snapshot keeps its kind until the
                next rebuild).
            dim: the vector length the caller needs; a snapshot of another length is an error.

        Returns:
            The index, holding what it held when saved.

        Raises:
            SnapshotError: there is no snapshot, it is damaged, or its dimension is not ``dim``.
        """
        info = read_snapshot_info(directory)
        path = Path(directory)
        if info is None:
            raise SnapshotError(
                f"{path}: no index snapshot here (no {_MANIFEST}); build the index and save() it"
            )
        if dim is not None and info.dim != dim:
            raise SnapshotError(
                f"{path}: expected a snapshot of {dim}-dimensional vectors, got {info.dim}; "
                "it was built with another model: delete it and re-encode the catalog"
            )
        try:
            loaded = faiss.read_index(str(path / info.index_file))
            id_map = json.loads((path / info.ids_file).read_bytes())
            keys = [str(k) for k in id_map["keys"]]
            ints = [int(i) for i in id_map["ints"]]
            tombstones = {int(i) for i in id_map["tombstones"]}
            next_int = int(id_map["next_int"])
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(
                f"{path}: cannot read the index snapshot ({exc!r}); delete the directory to "
                "rebuild the index from the catalog"
            ) from exc
        index = cls(info.dim, settings)
        if not isinstance(loaded, faiss.IndexIDMap2):
            raise SnapshotError(
                f"{path / info.index_file}: expected an IndexIDMap2, got "
                f"{type(loaded).__name__}; delete the directory to rebuild the index"
            )
        inner = faiss.downcast_index(loaded.index)
        if isinstance(inner, faiss.IndexHNSWFlat):
            kind: IndexKind = "hnsw"
            inner.hnsw.efSearch = index._settings.ef_search
        elif isinstance(inner, faiss.IndexFlat):
            kind = "flat"
        else:
            raise SnapshotError(
                f"{path / info.index_file}: expected a flat or HNSW index inside the id map, "
                f"got {type(inner).__name__}; delete the directory to rebuild the index"
            )
        internal = faiss.vector_to_array(loaded.id_map).astype(np.int64)
        if (
            len(keys) != len(ints)
            or loaded.d != info.dim
            or inner.metric_type != faiss.METRIC_INNER_PRODUCT
            or sorted(internal.tolist()) != sorted([*ints, *tombstones])
        ):
            raise SnapshotError(
                f"{path}: the index file and the id map disagree; delete the directory to "
                "rebuild the index from the catalog"
            )
        rows = _all_rows(inner)
        position = {number: i for i, number in enumerate(internal.tolist())}
        total = 0
        for key, number in zip(keys, ints, strict=True):
            digest = _digest(key, rows[position[number]])
            index._key_to_int[key] = number
            index._int_to_key[number] = key
            index._digests[key] = digest
            total += digest
        index._total = total % _MOD
        index._tombstones = tombstones
        index._next_int = next_int
        index._index, index._inner, index._kind = loaded, inner, kind
        if index.fingerprint != info.fingerprint:
            raise SnapshotError(
                f"{path}: the snapshot's content does not match its fingerprint (damaged or "
                "partly overwritten); delete the directory to rebuild the index"
            )
        with index._lock:
            index._maintain()
        return index

    @classmethod
    async def load_async(
        cls,
        directory: str | os.PathLike[str],
        *,
        settings: IndexSettings | None = None,
        dim: int | None = None,
    ) -> FaissIndex:
        """`load` in a worker thread."""
        return await asyncio.to_thread(cls.load, directory, settings=settings, dim=dim)

    # -- helpers (called with the lock held) -----------------------------------------------
    def _new_index(self, kind: IndexKind) -> tuple[faiss.IndexIDMap2, faiss.Index]:
        inner: faiss.Index
        if kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self._dim, self._settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self._settings.ef_construction
            hnsw.hnsw.efSearch = self._settings.ef_search
            inner = hnsw
        else:
            inner = faiss.IndexFlatIP(self._dim)
        return faiss.IndexIDMap2(inner), inner

    def _drop(self, keys: Iterable[str]) -> int:
        """Forget ``keys``: out of the maps and the fingerprint, out of faiss or tombstoned."""
        gone: list[int] = []
        for key in keys:
            number = self._key_to_int.pop(key, None)
            if number is None:
                continue
            del self._int_to_key[number]
            self._total = (self._total - self._digests.pop(key)) % _MOD
            gone.append(number)
        if not gone:
            return 0
        if self._kind == "flat":
            self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(gone, dtype=np.int64)))
            self._forget_flat()
        else:
            self._tombstones.update(gone)
            self._tomb_selector = None
        return len(gone)

    def _target_kind(self) -> IndexKind:
        return "hnsw" if len(self._key_to_int) >= self._settings.hnsw_threshold else "flat"

    def _maintain(self) -> None:
        """Switch to HNSW at the threshold; compact when tombstones pass their share."""
        if self._kind == "flat" and self._target_kind() == "hnsw":
            self._rebuild("hnsw")
        elif self._tombstones and (
            len(self._tombstones) > self._settings.compact_fraction * self._index.ntotal
        ):
            self._rebuild(self._target_kind())

    def _rebuild(self, kind: IndexKind) -> None:
        total = self._index.ntotal
        internal = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        index, inner = self._new_index(kind)
        if total:
            rows = _all_rows(self._inner)
            keep = np.fromiter(
                (number in self._int_to_key for number in internal.tolist()),
                dtype=bool,
                count=total,
            )
            faiss.omp_set_num_threads(_threads(self._settings.build_threads))
            index.add_with_ids(np.ascontiguousarray(rows[keep]), internal[keep])
        self._index, self._inner, self._kind = index, inner, kind
        self._forget_flat()
        self._tombstones.clear()
        self._tomb_selector = None
        self._rebuilds += 1

    def _search(self, rows: Vector, k: int, exclude: Collection[str]) -> list[list[Hit]]:
        with self._lock:
            found = self._search_arrays(rows, k, exclude)
            if found is None:
                return [[] for _ in range(rows.shape[0])]
            scores, labels, names = found
            return [
                [
                    Hit(names[number], float(score))
                    for score, number in zip(score_row.tolist(), label_row.tolist(), strict=True)
                    if number in names  # -1 (not enough results) and tombstones never match
                ]
                for score_row, label_row in zip(scores, labels, strict=True)
            ]

    def _flat_rows(self) -> tuple[Vector, npt.NDArray[np.int64]] | None:
        """A flat index's vectors and their ids, ordered by id (None for HNSW); lock held."""
        if self._kind != "flat":
            return None
        if self._flat is None:
            total = self._inner.ntotal
            xb = self._inner.get_xb()  # type: ignore[attr-defined] # IndexFlat's, not in stubs
            matrix = faiss.rev_swig_ptr(xb, total * self._dim)
            matrix = np.array(matrix, dtype=np.float32).reshape(total, self._dim)  # a copy
            labels = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            order = np.argsort(labels, kind="stable")
            self._flat = (np.ascontiguousarray(matrix[order]), labels[order])
        return self._flat

    def _forget_flat(self) -> None:
        """The stored vectors changed: drop what was derived from them (lock held)."""
        self._flat = None
        self._seed_rows = {}

    def _flat_search(
        self, query: Vector, k: int, exclude: Collection[str]
    ) -> tuple[list[str], npt.NDArray[np.float64]]:
        """`search_ids` on a flat index as one matrix-vector product (exact); lock held.

        Faiss's single-query search with an exclusion filter checks the filter per vector
        and builds the filter objects per call; this is a few times cheaper.
        """
        excluded_keys = _check_search(k, exclude)
        flat = self._flat_rows()
        assert flat is not None
        matrix, labels = flat
        ids, scores, _best = self._flat_top(matrix @ query, labels, k, excluded_keys)
        return ids, scores

    def _flat_top(
        self,
        scores: npt.NDArray[np.float32],
        labels: npt.NDArray[np.int64],
        k: int,
        excluded_keys: list[str],
    ) -> tuple[list[str], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """The ``k`` best of ``scores`` less the excluded, highest first; lock held.

        ``scores`` has one entry per row of `_flat` (excluded ones are set to -inf in place).
        Returns the ids, their scores and their rows.
        """
        available = len(labels)
        excluded = [self._key_to_int[e] for e in excluded_keys if e in self._key_to_int]
        if excluded:
            where = np.searchsorted(labels, np.unique(np.asarray(excluded, dtype=np.int64)))
            scores[where] = -np.inf
            available -= len(where)
        k_eff = min(k, available)
        if k_eff < 1:
            return [], np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64)
        if k_eff < len(scores):
            top = np.argpartition(-scores, k_eff - 1)[:k_eff]
        else:
            top = np.arange(len(scores))
        best = top[np.argsort(-scores[top], kind="stable")][:k_eff]
        names = self._int_to_key
        return [names[n] for n in labels[best].tolist()], scores[best].astype(np.float64), best

    def search_items(
        self,
        item_ids: Sequence[str],
        weights: Sequence[float],
        k: int,
        *,
        exclude: Collection[str] = (),
    ) -> ItemsMatch | None:
        """`search_ids` for the weighted sum of the stored vectors of ``item_ids`` (normalised).

        Items not held are left out; None when none is held (or the sum is zero). On a flat
        index the similarity rows of the items are kept until the next write (up to
        `SEED_ROWS_BYTES`), so that a visitor's next search, with one more recent item, costs
        a weighted sum of rows instead of a pass over every stored vector.

        Raises:
            EmbeddingError: on a bad ``k`` or ``exclude``, or as many weights as items.
        """
        if len(weights) != len(item_ids):
            raise EmbeddingError(
                f"weights: expected {len(item_ids)} (one per item), got {len(weights)}"
            )
        excluded_keys = _check_search(k, exclude)
        with self._lock:
            held = [
                (item, w, self._key_to_int[item])
                for item, w in zip(item_ids, weights, strict=True)
                if item in self._key_to_int
            ]
            if not held:
                return None
            seeds = [item for item, _w, _n in held]
            w = np.fromiter((w for _i, w, _n in held), dtype=np.float32, count=len(held))
            flat = self._flat_rows()
            if flat is None:
                return self._search_items_hnsw(seeds, w, k, exclude)
            matrix, labels = flat
            numbers = [n for _i, _w, n in held]
            rows = self._rows_of(numbers, matrix, labels)
            norm = float(np.linalg.norm(w @ matrix[np.searchsorted(labels, numbers)]))
            if not np.isfinite(norm) or norm == 0.0:
                return None
            combined = w @ rows
            combined /= np.float32(norm)
            ids, scores, best = self._flat_top(combined, labels, k, excluded_keys)
            nearest = rows[:, best].argmax(axis=0).tolist() if len(best) else []
            closest = dict(zip(ids, (seeds[j] for j in nearest), strict=True))
            return ItemsMatch(seeds, ids, scores, closest.get)

    def _rows_of(
        self, numbers: list[int], matrix: Vector, labels: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        """The similarity rows of the stored vectors ``numbers`` (s, n); lock held."""
        cache = self._seed_rows
        # Taken before anything is evicted: making room may drop one of these.
        rows = {n: cache[n] for n in numbers if n in cache}
        missing = list(dict.fromkeys(n for n in numbers if n not in rows))
        if missing:
            fresh = matrix[np.searchsorted(labels, missing)] @ matrix.T
            room = max(_MIN_SEED_ROWS, SEED_ROWS_BYTES // max(4 * len(labels), 1))
            for old in list(itertools.islice(cache, max(len(cache) + len(missing) - room, 0))):
                del cache[old]
            for n, row in zip(missing, fresh, strict=True):
                cache[n] = rows[n] = row
        return np.stack([rows[n] for n in numbers])

    def _search_items_hnsw(
        self, seeds: list[str], weights: npt.NDArray[np.float32], k: int, exclude: Collection[str]
    ) -> ItemsMatch | None:
        """`search_items` on an HNSW index: one search for the weighted sum; lock held."""
        vecs = np.stack([self._index.reconstruct(self._key_to_int[s]) for s in seeds])
        query = weights @ vecs
        if not np.isfinite(query).all() or not query.any():
            return None
        ids, scores = self.search_ids(query, k, exclude=exclude)
        seed_matrix = vecs.astype(np.float32)

        def closest(item_id: str) -> str | None:
            vec = self.vector(item_id)
            return None if vec is None else seeds[int((seed_matrix @ vec).argmax())]

        return ItemsMatch(seeds, ids, scores, closest)

    def _search_arrays(
        self, rows: Vector, k: int, exclude: Collection[str]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], dict[int, str]] | None:
        """(scores, labels, the ids of labels) of each row; None when nothing can match.

        A label not in the ids (-1 for too few results, or a tombstone) is no hit. The caller
        holds the lock while it reads the ids.
        """
        excluded_keys = _check_search(k, exclude)
        with self._lock:
            excluded = {self._key_to_int[e] for e in excluded_keys if e in self._key_to_int}
            k_eff = min(k, len(self._key_to_int) - len(excluded))
            if k_eff < 1:
                return None
            keepalive: list[
                faiss.IDSelector
            ] = []  # faiss selectors hold raw pointers to each other
            selector = self._selector(excluded, keepalive)
            if self._kind == "hnsw":
                # The stubs of faiss 1.15 omit SearchParametersHNSW (it is in the module).
                hnsw_params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
                hnsw_params.efSearch = max(self._settings.ef_search, k_eff)
                params: faiss.SearchParameters | None = hnsw_params
            else:
                params = None if selector is None else faiss.SearchParameters()
            if params is not None:
                params.sel = selector
            threads = 1 if rows.shape[0] == 1 else _threads(self._settings.batch_threads)
            faiss.omp_set_num_threads(threads)
            scores, labels = self._index.search(rows, k_eff, params=params)
            return scores, labels, self._int_to_key

    def _selector(
        self, excluded: set[int], keepalive: list[faiss.IDSelector]
    ) -> faiss.IDSelector | None:
        """An IDSelector that rejects tombstones and ``excluded``, or None if none are."""
        parts: list[faiss.IDSelector] = []
        if self._tombstones:
            if self._tomb_selector is None:
                self._tomb_selector = faiss.IDSelectorBatch(
                    np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
                )
            parts.append(self._tomb_selector)
        if excluded:
            parts.append(
                faiss.IDSelectorBatch(np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
            )
        if not parts:
            return None
        rejected: faiss.IDSelector = (
            parts[0] if len(parts) == 1 else faiss.IDSelectorOr(parts[0], parts[1])
        )
        selector = faiss.IDSelectorNot(rejected)
        keepalive.extend([*parts, rejected, selector])
        return selector
