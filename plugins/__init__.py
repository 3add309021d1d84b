"""Plugins: triggers and consent gates discovered through entry points (reserved)."""
