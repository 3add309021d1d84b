"""Plugins: triggers and consent gates found through entry points (reserved, empty for now)."""

__all__: list[str] = []
