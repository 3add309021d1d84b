"""The real FAISS index: writes, search, the switch to HNSW, tombstones and snapshots."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from personify.embeddings import (
    EmbeddingError,
    FaissIndex,
    Hit,
    IndexSettings,
    SnapshotError,
    content_fingerprint,
    read_snapshot_info,
)
from personify.embeddings import index as index_module

Vectors = npt.NDArray[np.float32]
TopicFactory = Callable[..., tuple[list[str], Vectors]]

#: One OpenMP thread everywhere: deterministic HNSW graphs and fair to other work on the box.
ONE_THREAD = {"build_threads": 1, "batch_threads": 1}


def _settings(**changes: float) -> IndexSettings:
    return IndexSettings(**{**ONE_THREAD, **changes})  # type: ignore[arg-type]  # test helper


def _small() -> FaissIndex:
    """Four items on the unit circle (padded to 4 dimensions)."""
    index = FaissIndex(4, _settings())
    index.upsert(
        ["east", "north", "west", "northeast"],
        [[1, 0, 0, 0], [0, 1, 0, 0], [-1, 0, 0, 0], [1, 1, 0, 0]],
    )
    return index


def _ids(hits: list[Hit]) -> list[str]:
    return [hit.id for hit in hits]


def _recall(truth: list[list[Hit]], approx: list[list[Hit]]) -> float:
    shared = [len(set(_ids(t)) & set(_ids(a))) / len(t) for t, a in zip(truth, approx, strict=True)]
    return float(np.mean(shared))


def test_upsert_then_search_ranks_by_cosine() -> None:
    """Search returns (id, cosine) pairs, best first; vectors are normalised on the way in."""
    index = _small()
    assert len(index) == 4
    assert "north" in index
    assert "south" not in index
    hits = index.search([2, 0.1, 0, 0], k=3)
    assert _ids(hits) == ["east", "northeast", "north"]
    ident, score = hits[0]
    assert ident == "east"
    assert score == pytest.approx(2 / np.hypot(2, 0.1), abs=1e-6)
    assert hits[1].score == pytest.approx(np.cos(np.pi / 4 - np.arctan2(0.1, 2)), abs=1e-6)
    stored = index.vector("northeast")
    assert stored is not None
    np.testing.assert_allclose(stored, [2**-0.5, 2**-0.5, 0, 0], atol=1e-6)
    assert index.vector("south") is None


def test_upsert_replaces_an_existing_vector() -> None:
    """Upserting a known id replaces its vector in place of adding a second one."""
    index = _small()
    index.upsert(["west"], [[0.9, 0.1, 0, 0]])
    assert len(index) == 4
    hits = index.search([1, 0, 0, 0], k=4)
    assert sorted(_ids(hits)) == ["east", "north", "northeast", "west"]
    assert _ids(hits)[:2] == ["east", "west"]


def test_repeated_id_in_one_upsert_keeps_the_last_row() -> None:
    """When an id repeats within one call, its last row wins."""
    index = FaissIndex(2, _settings())
    index.upsert(["a", "a", "b"], [[1, 0], [0, 1], [1, 1]])
    assert len(index) == 2
    assert _ids(index.search([0, 1], k=1)) == ["a"]


def test_remove_forgets_ids_and_ignores_unknown_ones() -> None:
    """Removing returns how many ids it removed; they are never returned again."""
    index = _small()
    assert index.remove(["east", "nowhere"]) == 1
    assert "east" not in index
    assert len(index) == 3
    assert "east" not in _ids(index.search([1, 0, 0, 0], k=10))
    assert index.remove([]) == 0


def test_exclude_and_k_larger_than_the_index() -> None:
    """Excluded ids are skipped; k beyond the size returns what there is."""
    index = _small()
    hits = index.search([1, 0, 0, 0], k=10, exclude={"east", "unknown"})
    assert _ids(hits) == ["northeast", "north", "west"]
    assert index.search([1, 0, 0, 0], k=2, exclude=["east", "northeast", "north", "west"]) == []
    assert FaissIndex(4).search([1, 0, 0, 0], k=5) == []


def test_search_many_answers_each_row() -> None:
    """search_many returns one ranked list per query row."""
    index = _small()
    results = index.search_many([[1, 0, 0, 0], [0, 1, 0, 0]], k=1)
    assert [_ids(hits) for hits in results] == [["east"], ["north"]]


def test_bad_input_is_refused_with_what_was_expected() -> None:
    """Wrong shapes, zero or NaN vectors, bare-string ids and k < 1 raise EmbeddingError."""
    index = _small()
    with pytest.raises(EmbeddingError, match=r"expected shape \(n, 4\) or \(4,\), got \(3,\)"):
        index.search([1, 0, 0], k=1)
    with pytest.raises(EmbeddingError, match=r"vectors\[0\] \(id 'zero'\).*got a zero vector"):
        index.upsert(["zero"], [[0, 0, 0, 0]])
    with pytest.raises(EmbeddingError, match="NaN or infinity"):
        index.upsert(["nan"], [[np.nan, 0, 0, 0]])
    with pytest.raises(EmbeddingError, match="expected 2 rows"):
        index.upsert(["a", "b"], [[1, 0, 0, 0]])
    with pytest.raises(EmbeddingError, match="wrap it in a list"):
        index.remove("east")
    with pytest.raises(EmbeddingError, match="k: expected an integer >= 1, got 0"):
        index.search([1, 0, 0, 0], k=0)
    with pytest.raises(EmbeddingError, match="use search_many"):
        index.search([[1, 0, 0, 0], [0, 1, 0, 0]], k=1)
    with pytest.raises(EmbeddingError, match="ef_search: expected an integer >= 1, got 0"):
        IndexSettings(ef_search=0)
    with pytest.raises(EmbeddingError, match="compact_fraction"):
        IndexSettings(compact_fraction=1.5)


def test_hnsw_recall_at_10_against_exact_search(topic_vectors_factory: TopicFactory) -> None:
    """On 3000 clustered 384-d vectors HNSW (M=32, efSearch 64) finds >= 90% of the exact top 10."""
    all_ids, all_rows = topic_vectors_factory(3200)
    ids, rows, queries = all_ids[:3000], all_rows[:3000], all_rows[3000:]  # held-out queries
    exact = FaissIndex(384, _settings(hnsw_threshold=10**9))
    exact.upsert(ids, rows)
    approx = FaissIndex(384, _settings(hnsw_threshold=1000))
    approx.upsert(ids, rows)
    assert (exact.kind, approx.kind) == ("flat", "hnsw")
    truth = exact.search_many(queries, 10)
    assert _recall(truth, approx.search_many(queries, 10)) >= 0.9
    # Single queries (one thread, the other code path) agree with the batch.
    assert [approx.search(q, 10) for q in queries[:5]] == approx.search_many(queries[:5], 10)


def test_switch_to_hnsw_at_threshold_keeps_results(topic_vectors_factory: TopicFactory) -> None:
    """Crossing hnsw_threshold rebuilds once as HNSW, and searches still find the same items."""
    ids, rows = topic_vectors_factory(600)
    index = FaissIndex(384, _settings(hnsw_threshold=600))
    index.upsert(ids[:599], rows[:599])
    assert (index.kind, index.rebuilds) == ("flat", 0)
    before = index.search_many(rows[:50], 10)
    index.upsert(ids[599:], rows[599:])
    assert (index.kind, index.rebuilds, len(index)) == ("hnsw", 1, 600)
    after = index.search_many(rows[:50], 10, exclude=[ids[599]])
    assert [_ids(h)[0] for h in after] == ids[:50]  # every item is its own nearest neighbour
    assert _recall(before, after) >= 0.95
    index.upsert(ids[:10], rows[:10])  # later upserts add in place: no more rebuilds
    assert index.rebuilds == 1


def test_tombstoned_ids_are_never_returned(topic_vectors_factory: TopicFactory) -> None:
    """On HNSW, removed and replaced vectors stay in the graph but never come back."""
    ids, rows = topic_vectors_factory(400)
    index = FaissIndex(384, _settings(hnsw_threshold=100, compact_fraction=0.5))
    index.upsert(ids, rows)
    assert index.kind == "hnsw"
    removed = ids[:50]
    assert index.remove(removed) == 50
    index.upsert(ids[50:60], rows[200:210])  # replaced: the old vectors are tombstoned too
    assert (index.tombstones, len(index)) == (60, 350)
    for hits in index.search_many(rows[:60], k=len(index)):
        found = _ids(hits)
        assert not set(found) & set(removed)
        assert len(found) == len(set(found))  # a replaced id appears once
    # A replaced item is found by its new vector, not its old one.
    assert _ids(index.search(rows[200], k=2)) in (
        [ids[200], ids[50]],
        [ids[50], ids[200]],
    )
    assert ids[55] not in _ids(index.search(rows[55], k=1))


def _flat_then_hnsw(ids: list[str], rows: npt.NDArray[np.float32]) -> Iterator[FaissIndex]:
    """A flat index, then an HNSW one with tombstones, each holding ``ids`` less the first 20."""
    for threshold in (10_000, 100):
        index = FaissIndex(384, _settings(hnsw_threshold=threshold, compact_fraction=0.9))
        index.upsert(ids, rows)
        index.remove(ids[:20])
        yield index


def test_search_ids_answers_as_search(topic_vectors_factory: TopicFactory) -> None:
    """`search_ids` gives the same ids and scores as `search`, exclusions and tombstones too.

    On a flat index it is a matrix product of its own, kept current across writes.
    """
    ids, rows = topic_vectors_factory(300)
    for index in _flat_then_hnsw(ids, rows):
        exclude = set(ids[20:30])
        for row in rows[:40:7]:
            hits = index.search(row, k=25, exclude=exclude)
            found, scores = index.search_ids(row, k=25, exclude=exclude)
            assert found == _ids(hits)
            assert scores.tolist() == pytest.approx([hit.score for hit in hits], abs=1e-6)
            assert not set(found) & (set(ids[:20]) | exclude)
    found, scores = index.search_ids(rows[0], k=5, exclude=index.ids())
    assert (found, scores.tolist()) == ([], [])
    flat = FaissIndex(384, _settings())
    flat.upsert(ids[:50], rows[:50])
    assert flat.search_ids(rows[60], k=3)[0] == _ids(flat.search(rows[60], k=3))
    flat.upsert(ids[50:100], rows[50:100])  # writes after a search are seen by the next
    flat.remove(ids[:10])
    flat.upsert(ids[10:12], rows[98:100])
    for row in rows[95:100]:
        found, _scores = flat.search_ids(row, k=4, exclude={ids[99]})
        assert found == _ids(flat.search(row, k=4, exclude={ids[99]}))
        assert ids[99] not in found and not set(found) & set(ids[:10])
    found_ids, vecs = flat.vectors([ids[10], ids[5], ids[60]])
    assert found_ids == [ids[10], ids[60]]
    assert np.allclose(vecs[0], rows[98] / np.linalg.norm(rows[98]), atol=1e-6)
    assert np.allclose(flat.vector(ids[60]), rows[60] / np.linalg.norm(rows[60]), atol=1e-6)


def _weighted_query(index: FaissIndex, items: list[str], weights: list[float]) -> np.ndarray:
    held, vecs = index.vectors(items)
    w = [weights[items.index(i)] for i in held]
    return np.asarray(w, dtype=np.float32) @ vecs


def test_search_items_answers_as_the_weighted_sum_of_the_items_vectors(
    topic_vectors_factory: TopicFactory,
) -> None:
    """`search_items` finds what `search_ids` finds for the weighted sum of the items' vectors.

    Items not held are left out; each hit's closest item is the one most similar to it; on a
    flat index the kept similarity rows follow every write.
    """
    ids, rows = topic_vectors_factory(300)
    for index in _flat_then_hnsw(ids, rows):
        exclude = set(ids[20:30])
        for start in (30, 100, 200):
            items = [ids[start], ids[5], ids[start + 40], ids[start + 7]]  # ids[5] is gone
            weights = [1.0, 0.9, 0.8, 0.6]
            match = index.search_items(items, weights, k=25, exclude=exclude)
            assert match is not None
            assert match.seeds == [items[0], items[2], items[3]]
            query = _weighted_query(index, items, weights)
            found, scores = index.search_ids(query, k=25, exclude=exclude)
            assert match.ids == found
            assert match.scores.tolist() == pytest.approx(scores.tolist(), abs=1e-5)
            _held, seed_vecs = index.vectors(match.seeds)
            for hit in match.ids[:10]:
                vec = index.vector(hit)
                assert vec is not None
                assert match.closest(hit) == match.seeds[int((seed_vecs @ vec).argmax())]
        assert index.search_items([ids[0], "nope"], [1.0, 1.0], k=5) is None
        with pytest.raises(EmbeddingError, match="weights"):
            index.search_items([ids[40]], [1.0, 2.0], k=5)
        with pytest.raises(EmbeddingError, match="k"):
            index.search_items([ids[40]], [1.0], k=0)
    flat = FaissIndex(384, _settings())
    flat.upsert(ids[:50], rows[:50])
    before = flat.search_items([ids[3], ids[4]], [1.0, 0.5], k=5)
    assert before is not None
    flat.upsert([ids[3]], [rows[120]])  # the item's own vector changes: so do its rows
    flat.upsert(ids[100:110], rows[100:110])
    flat.remove([before.ids[0]])
    after = flat.search_items([ids[3], ids[4]], [1.0, 0.5], k=5)
    query = _weighted_query(flat, [ids[3], ids[4]], [1.0, 0.5])
    assert after is not None and after.ids == flat.search_ids(query, k=5)[0]
    assert before.ids[0] not in after.ids


def test_search_items_with_a_full_row_cache_keeps_the_rows_it_needs(
    topic_vectors_factory: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making room for new similarity rows never drops one the same search still needs.

    With the cache full, a visitor whose oldest cached item is among their seeds, beside a new
    one, used to evict that row first and fail (a KeyError from every ranking that used the
    content source, on a catalog of some ten thousand items).
    """
    monkeypatch.setattr(index_module, "SEED_ROWS_BYTES", 0)  # room for _MIN_SEED_ROWS rows
    ids, rows = topic_vectors_factory(300)
    flat = FaissIndex(384, _settings())
    flat.upsert(ids, rows)
    room = index_module._MIN_SEED_ROWS
    for start in range(0, room, 8):  # fill the cache, oldest first: ids[0], ids[1], ...
        assert flat.search_items(ids[start : start + 8], [1.0] * 8, k=5) is not None
    seeds = [ids[0], ids[room + 10]]  # the oldest row kept, and a new one
    match = flat.search_items(seeds, [1.0, 0.5], k=5)
    query = _weighted_query(flat, seeds, [1.0, 0.5])
    assert match is not None and match.ids == flat.search_ids(query, k=5)[0]


def test_busy_while_another_thread_writes() -> None:
    """`busy` tells a caller that a search would wait for a write in progress elsewhere."""
    index = _small()
    assert not index.busy()
    holding, release = threading.Event(), threading.Event()

    def write() -> None:  # a write that lasts until released: it holds the index's lock
        with index._lock:
            holding.set()
            release.wait(10)
            index.upsert(["south"], [[0, -1, 0, 0]])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert holding.wait(10)
        assert index.busy()
    finally:
        release.set()
        writer.join(10)
    assert not index.busy()
    assert "south" in index


def test_compaction_when_tombstones_pass_their_fraction(
    topic_vectors_factory: TopicFactory,
) -> None:
    """Past compact_fraction tombstones the index rebuilds without them, keeping the rest."""
    ids, rows = topic_vectors_factory(500)
    index = FaissIndex(384, _settings(hnsw_threshold=100, compact_fraction=0.2))
    index.upsert(ids, rows)
    rebuilds = index.rebuilds
    index.remove(ids[:100])  # 100 of 500 held: exactly 0.2, not past it
    assert (index.tombstones, index.rebuilds) == (100, rebuilds)
    index.remove(ids[100:101])
    assert (index.tombstones, index.rebuilds, index.kind) == (0, rebuilds + 1, "hnsw")
    assert [_ids(index.search(r, k=1)) for r in rows[101:111]] == [[i] for i in ids[101:111]]
    index.remove(ids[101:450])  # compaction below the threshold goes back to exact search
    assert (index.kind, len(index)) == ("flat", 50)


@pytest.mark.parametrize("threshold", [10**9, 100], ids=["flat", "hnsw"])
def test_save_load_round_trip_gives_identical_results(
    topic_vectors_factory: TopicFactory, tmp_path: Path, threshold: int
) -> None:
    """A loaded snapshot answers every query exactly as the saved index did."""
    ids, rows = topic_vectors_factory(300)
    settings = _settings(hnsw_threshold=threshold, compact_fraction=0.5)
    index = FaissIndex(384, settings)
    index.upsert(ids, rows)
    index.remove(ids[:20])
    info = index.save(tmp_path / "snap")
    assert (info.count, info.dim, info.kind) == (280, 384, index.kind)

    loaded = FaissIndex.load(tmp_path / "snap", settings=settings, dim=384)
    assert (len(loaded), loaded.kind, loaded.tombstones) == (280, index.kind, index.tombstones)
    assert loaded.fingerprint == index.fingerprint == info.fingerprint
    queries = rows[::7]
    assert loaded.search_many(queries, 10) == index.search_many(queries, 10)
    # The loaded index keeps working: new ids do not collide with saved ones.
    loaded.upsert(["fresh"], rows[:1])
    assert _ids(loaded.search(rows[0], k=1)) == ["fresh"]
    assert len(loaded) == 281


async def test_async_variants_match_sync(
    topic_vectors_factory: TopicFactory, tmp_path: Path
) -> None:
    """The *_async methods run in a thread and return what the sync ones return."""
    ids, rows = topic_vectors_factory(50)
    index = FaissIndex(384, _settings())
    await index.upsert_async(ids, rows)
    assert await index.search_async(rows[3], 5) == index.search(rows[3], 5)
    assert await index.search_many_async(rows[:3], 5) == index.search_many(rows[:3], 5)
    assert await index.remove_async(ids[:2]) == 2
    with pytest.raises(EmbeddingError, match="wrap it in a list"):
        await index.upsert_async("ab", rows[:2])  # not split into ids "a" and "b"
    await index.save_async(tmp_path)
    loaded = await FaissIndex.load_async(tmp_path)
    assert loaded.fingerprint == index.fingerprint


def test_fingerprint_follows_content_only(topic_vectors_factory: TopicFactory) -> None:
    """The fingerprint changes with any id or vector and not with order, history or kind."""
    ids, rows = topic_vectors_factory(120)
    flat = FaissIndex(384, _settings())
    flat.upsert(ids, rows)
    empty = FaissIndex(384).fingerprint
    assert flat.fingerprint != empty
    assert flat.fingerprint == content_fingerprint(ids[::-1], rows[::-1])

    hnsw = FaissIndex(384, _settings(hnsw_threshold=50))
    hnsw.upsert(ids[60:], rows[60:])
    hnsw.upsert(ids[:60], rows[:60])
    assert hnsw.kind == "hnsw"
    assert hnsw.fingerprint == flat.fingerprint

    original = flat.fingerprint
    flat.upsert([ids[0]], rows[1:2])  # one vector changed
    assert flat.fingerprint != original
    flat.upsert([ids[0]], rows[:1])  # and changed back
    assert flat.fingerprint == original
    flat.upsert(["extra"], rows[:1])
    assert flat.fingerprint != original
    flat.remove(["extra"])
    assert flat.fingerprint == original


def test_snapshot_fingerprint_tells_a_stale_snapshot(
    topic_vectors_factory: TopicFactory, tmp_path: Path
) -> None:
    """read_snapshot_info shows, without loading, whether a snapshot matches the catalog."""
    ids, rows = topic_vectors_factory(40)
    assert read_snapshot_info(tmp_path) is None
    index = FaissIndex(384, _settings())
    index.upsert(ids, rows)
    index.save(tmp_path)
    snapshot = read_snapshot_info(tmp_path)
    assert snapshot is not None
    assert snapshot.fingerprint == content_fingerprint(ids, rows)
    index.upsert(["new-item"], rows[:1])
    assert snapshot.fingerprint != index.fingerprint  # the catalog moved on: stale
    second = index.save(tmp_path)
    assert read_snapshot_info(tmp_path) == second
    assert second.fingerprint == index.fingerprint
    # Only the latest snapshot's files remain, and no temporary files.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["manifest.json", second.index_file, second.ids_file])


def test_missing_damaged_or_foreign_snapshots_are_refused(
    topic_vectors_factory: TopicFactory, tmp_path: Path
) -> None:
    """Loading fails with SnapshotError naming the directory and the fix."""
    with pytest.raises(SnapshotError, match=r"no index snapshot here.*save\(\) it"):
        FaissIndex.load(tmp_path / "nothing")
    ids, rows = topic_vectors_factory(30)
    index = FaissIndex(384, _settings())
    index.upsert(ids, rows)
    info = index.save(tmp_path / "snap")
    with pytest.raises(SnapshotError, match="expected a snapshot of 768-dimensional vectors"):
        FaissIndex.load(tmp_path / "snap", dim=768)

    id_map_path = tmp_path / "snap" / info.ids_file
    id_map = json.loads(id_map_path.read_text())
    id_map["keys"][0], id_map["keys"][1] = id_map["keys"][1], id_map["keys"][0]
    id_map_path.write_text(json.dumps(id_map))
    with pytest.raises(SnapshotError, match=r"does not match its fingerprint.*delete the"):
        FaissIndex.load(tmp_path / "snap")

    (tmp_path / "snap" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(SnapshotError, match="expected a personify-faiss-index manifest"):
        FaissIndex.load(tmp_path / "snap")
