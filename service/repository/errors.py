"""Errors of the storage layer; driver (sqlite3) errors are translated into these.

Hierarchy::

    RepositoryError          the store failed (I/O, corruption, locked too long)
    ├── DuplicateError       a uniqueness rule was hit (e.g. account + UIDL, idempotency key)
    └── StorageFullError     the disk (or the database's size limit) is full
"""

from __future__ import annotations


class RepositoryError(Exception):
    """The store could not complete an operation."""


class DuplicateError(RepositoryError):
    """A row with the same unique key exists."""


class StorageFullError(RepositoryError):
    """The write failed because there is no space left; nothing of it was stored."""
