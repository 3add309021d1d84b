"""Plugins: triggers and consent gates discovered through entry points (reserved: nothing here yet)."""

__all__: list[str] = []
