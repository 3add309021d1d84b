"""Text embeddings and the vector index: encoders, an encoding cache and a FAISS index.

A library with no Faust in it: agents and the API call it, `service.py` (later) wraps it in a
Faust service. Heavy imports (torch, sentence-transformers) happen only in
`SentenceEncoder.load`.
"""

from personify.embeddings.encoder import (
    MODEL_NAME,
    CachedEncoder,
    CacheStats,
    Encoder,
    SentenceEncoder,
    encode_async,
    normalize_text,
)
from personify.embeddings.errors import EmbeddingError, ModelLoadError, SnapshotError
from personify.embeddings.index import (
    FaissIndex,
    Hit,
    IndexKind,
    IndexSettings,
    ItemsMatch,
    SnapshotInfo,
    VectorIndex,
    content_fingerprint,
    read_snapshot_info,
)

__all__ = [
    "MODEL_NAME",
    "CacheStats",
    "CachedEncoder",
    "EmbeddingError",
    "Encoder",
    "FaissIndex",
    "Hit",
    "IndexKind",
    "IndexSettings",
    "ItemsMatch",
    "ModelLoadError",
    "SentenceEncoder",
    "SnapshotError",
    "SnapshotInfo",
    "VectorIndex",
    "content_fingerprint",
    "encode_async",
    "normalize_text",
    "read_snapshot_info",
]
