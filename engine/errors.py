"""The error tree of Personify: every error we raise on purpose derives from `PersonifyError`.

```
PersonifyError
├── ConfigError          config.toml or a PERSONIFY_* variable is wrong (names file, key, fix)
├── BrokerError          the embedded broker could not start or the broker is unreachable
├── ValidationError      an event failed validation (names the field and the reason)
├── JournalError         the local event journal is damaged or cannot be written
└── EmbeddingError       (personify.embeddings) the model or an index snapshot cannot be used
    ├── ModelLoadError
    └── SnapshotError
```
"""

from __future__ import annotations

__all__ = ["BrokerError", "ConfigError", "JournalError", "PersonifyError", "ValidationError"]


class PersonifyError(Exception):
    """Root of every error Personify raises on purpose."""


class ConfigError(PersonifyError):
    """A setting is missing, unknown or out of range; the message names file, key and fix."""


class BrokerError(PersonifyError):
    """The broker could not be started or reached."""


class JournalError(PersonifyError):
    """The local event journal cannot be read or written."""


class ValidationError(PersonifyError):
    """An event is invalid.

    Attributes:
        field: the dotted path of the offending field (``""`` for the whole event).
        reason: what was expected and what was got.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason
