"""Errors of the embeddings package: a branch of the `PersonifyError` tree.

```
PersonifyError
└── EmbeddingError       bad input to an encoder or index (names what was expected and got)
    ├── ModelLoadError   the bundled sentence-transformers model could not be loaded
    └── SnapshotError    an index snapshot is missing, damaged or for another dimension
```
"""

from __future__ import annotations

from personify.engine.errors import PersonifyError

__all__ = ["EmbeddingError", "ModelLoadError", "SnapshotError"]


class EmbeddingError(PersonifyError):
    """Bad input to an encoder, cache or index; the message says what was expected and got."""


class ModelLoadError(EmbeddingError):
    """The bundled all-MiniLM-L6-v2 model could not be loaded (names the cause and the fix)."""


class SnapshotError(EmbeddingError):
    """An index snapshot cannot be written or read back (names the directory and the fix)."""
