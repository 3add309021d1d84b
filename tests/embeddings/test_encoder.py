"""The real all-MiniLM-L6-v2 encoder and the encoding cache (no mocks, the bundled model)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from personify.embeddings import (
    CachedEncoder,
    EmbeddingError,
    SentenceEncoder,
    encode_async,
    normalize_text,
)

TITLES = [
    "waterproof hiking jacket",
    "rain shell for trekking",
    "espresso machine",
    "stainless steel coffee grinder",
    "trail running shoes",
    "insulated down parka",
]


class CountingEncoder:
    """A real encoder around another one that records every text it is asked to encode."""

    def __init__(self, inner: SentenceEncoder) -> None:
        self.inner = inner
        self.name = inner.name
        self.seen: list[str] = []
        self.calls = 0

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls += 1
        self.seen.extend(texts)
        return self.inner.encode(texts)


@pytest.fixture
def counting_encoder_factory(
    sentence_encoder: SentenceEncoder,
) -> Callable[[], CountingEncoder]:
    """Make encoders that count what reaches the real model."""
    return lambda: CountingEncoder(sentence_encoder)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))


def test_similar_texts_score_higher(sentence_encoder: SentenceEncoder) -> None:
    """A hiking jacket is closer to a trekking rain shell than to an espresso machine."""
    jacket, shell, espresso = sentence_encoder.encode(TITLES[:3])
    assert _cosine(jacket, shell) > _cosine(jacket, espresso) + 0.2
    grinder = sentence_encoder.encode(["stainless steel coffee grinder"])[0]
    assert _cosine(espresso, grinder) > _cosine(espresso, shell)


def test_vectors_are_unit_length_float32_of_dim_384(sentence_encoder: SentenceEncoder) -> None:
    """The encoder returns a C-contiguous float32 (n, 384) matrix with rows of norm 1."""
    vectors = sentence_encoder.encode(TITLES)
    assert sentence_encoder.dim == 384
    assert vectors.shape == (len(TITLES), 384)
    assert vectors.dtype == np.float32
    assert vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_empty_matrix(sentence_encoder: SentenceEncoder) -> None:
    """No texts give a (0, 384) matrix without calling the model."""
    assert sentence_encoder.encode([]).shape == (0, 384)


def test_bare_string_is_rejected_with_a_fix(sentence_encoder: SentenceEncoder) -> None:
    """A single str (which would be encoded letter by letter) is refused, naming the fix."""
    with pytest.raises(EmbeddingError, match=r"wrap it in a list"):
        sentence_encoder.encode("espresso machine")
    with pytest.raises(EmbeddingError, match=r"texts\[1\]: expected str, got int"):
        sentence_encoder.encode(["ok", 3])  # type: ignore[list-item]  # the wrong type is the test


def test_load_is_offline_and_records_its_time(sentence_encoder: SentenceEncoder) -> None:
    """Loading switches the Hugging Face libraries to offline mode and times itself."""
    constants = sys.modules["huggingface_hub.constants"]
    assert vars(constants)["HF_HUB_OFFLINE"] is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert 0.0 < sentence_encoder.load_seconds < 120.0


def test_normalize_text_collapses_whitespace_and_unicode_forms() -> None:
    """Texts differing only in whitespace or Unicode composition share a normal form."""
    assert normalize_text("  rain\tshell \n for  trekking ") == "rain shell for trekking"
    assert normalize_text("cafe\u0301") == normalize_text("caf\u00e9")


def test_cache_never_reencodes_an_unchanged_text(
    counting_encoder_factory: Callable[[], CountingEncoder],
) -> None:
    """The first call misses and encodes; repeats (even re-spaced) hit and reach no model."""
    inner = counting_encoder_factory()
    cache = CachedEncoder(inner)
    first = cache.encode(TITLES[:3])
    assert (cache.misses, cache.hits) == (3, 0)
    assert inner.seen == TITLES[:3]

    again = cache.encode(["espresso  machine", TITLES[0], TITLES[3], TITLES[3]])
    assert (cache.misses, cache.hits) == (4, 3)  # only TITLES[3] was new, and only once
    assert inner.seen == [*TITLES[:3], TITLES[3]]
    np.testing.assert_array_equal(again[0], first[2])
    np.testing.assert_array_equal(again[1], first[0])
    np.testing.assert_array_equal(again[2], again[3])
    np.testing.assert_allclose(again[2], inner.inner.encode([TITLES[3]])[0], atol=1e-6)
    assert cache.stats.hit_rate == pytest.approx(3 / 7)
    assert "espresso machine" in cache
    assert "flux capacitor" not in cache


def test_cache_memory_is_a_bounded_lru(
    counting_encoder_factory: Callable[[], CountingEncoder],
) -> None:
    """Past its capacity the cache forgets the least recently used text first."""
    inner = counting_encoder_factory()
    cache = CachedEncoder(inner, capacity=2)
    cache.encode(TITLES[:2])
    cache.encode([TITLES[0]])  # TITLES[0] is now the most recent
    cache.encode([TITLES[2]])  # evicts TITLES[1]
    assert cache.stats.size == 2
    assert TITLES[0] in cache
    assert TITLES[1] not in cache
    with pytest.raises(EmbeddingError, match="capacity: expected an integer >= 1, got 0"):
        CachedEncoder(inner, capacity=0)


def test_cache_persists_in_rocksdb_across_restarts(
    counting_encoder_factory: Callable[[], CountingEncoder], tmp_path: Path
) -> None:
    """Vectors written to the RocksDB directory are read back by a new cache, not re-encoded."""
    first_inner = counting_encoder_factory()
    with CachedEncoder(first_inner, directory=tmp_path / "cache") as cache:
        expected = cache.encode(TITLES)
    assert len(first_inner.seen) == len(TITLES)

    second_inner = counting_encoder_factory()
    with CachedEncoder(second_inner, directory=tmp_path / "cache") as reopened:
        got = reopened.encode(list(reversed(TITLES)))
        stats = reopened.stats
    assert second_inner.calls == 0
    assert (stats.hits, stats.disk_hits, stats.misses) == (len(TITLES), len(TITLES), 0)
    np.testing.assert_array_equal(got, expected[::-1])


def test_cache_namespace_keeps_models_apart(
    counting_encoder_factory: Callable[[], CountingEncoder], tmp_path: Path
) -> None:
    """A cache directory shared by another namespace (model) does not serve its vectors."""
    with CachedEncoder(counting_encoder_factory(), directory=tmp_path / "c") as cache:
        cache.encode(TITLES[:2])
    inner = counting_encoder_factory()
    with CachedEncoder(inner, directory=tmp_path / "c", namespace="another-model") as other:
        other.encode(TITLES[:2])
    assert inner.seen == TITLES[:2]


def test_cache_directory_held_by_another_cache_is_an_actionable_error(
    counting_encoder_factory: Callable[[], CountingEncoder], tmp_path: Path
) -> None:
    """Opening a RocksDB directory that is in use fails naming the directory and the fix."""
    with (
        CachedEncoder(counting_encoder_factory(), directory=tmp_path / "busy"),
        pytest.raises(EmbeddingError, match=r"busy: cannot open .* own directory"),
    ):
        CachedEncoder(counting_encoder_factory(), directory=tmp_path / "busy")


async def test_encode_async_matches_encode(sentence_encoder: SentenceEncoder) -> None:
    """Async encoding (method and function, plain and cached) returns what encode returns."""
    expected = sentence_encoder.encode(TITLES)
    np.testing.assert_allclose(await sentence_encoder.encode_async(TITLES), expected, atol=1e-6)
    cache = CachedEncoder(sentence_encoder)
    np.testing.assert_allclose(await encode_async(cache, TITLES), expected, atol=1e-6)
    np.testing.assert_allclose(await cache.encode_async(TITLES), expected, atol=1e-6)
    assert cache.stats.hits == len(TITLES)
    with pytest.raises(EmbeddingError, match="wrap it in a list"):
        await encode_async(cache, "espresso machine")


async def test_encode_async_leaves_the_event_loop_free(
    sentence_encoder: SentenceEncoder,
) -> None:
    """While a batch is encoded in a thread, other coroutines on the loop keep running."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    await sentence_encoder.encode_async([f"{t} model {i}" for i in range(16) for t in TITLES])
    elapsed = time.perf_counter() - started
    task.cancel()
    assert ticks >= 2, f"loop ticked {ticks} times in {elapsed:.3f} s of encoding"
