"""Derived state kept in RocksDB-backed Faust tables, rebuilt from changelogs.

`profiles`: one live profile per visitor. Its pure functions need no running engine; its
`table()` needs a configured one.
"""

__all__ = ["profiles"]
