"""The engine: configuration, event model, the Faust app, the broker and the journal."""

from personify.engine.config import Config, load_config
from personify.engine.errors import (
    BrokerError,
    ConfigError,
    JournalError,
    PersonifyError,
    ValidationError,
)

__all__ = [
    "BrokerError",
    "Config",
    "ConfigError",
    "JournalError",
    "PersonifyError",
    "ValidationError",
    "load_config",
]
