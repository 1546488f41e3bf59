"""Errors of the storage layer; driver (sqlite3) errors are translated into these.

Hierarchy::

    RepositoryError          the store failed (I/O, corruption, locked too long)
    ├── DuplicateError       a uniqueness rule was hit (e.g. account + UIDL, idempotency key)
    ├── StorageFullError     the disk (or the database's size limit) is full
    └── StoreUnavailableError the database cannot be reached (down, connection lost, no
                             connection free within the timeout); try again later
"""

from __future__ import annotations


class RepositoryError(Exception):
    """The store could not complete an operation."""


class DuplicateError(RepositoryError):
    """A row with the same unique key exists."""


class StorageFullError(RepositoryError):
    """The write failed because there is no space left; nothing of it was stored."""


class StoreUnavailableError(RepositoryError):
    """The database cannot be reached right now: nothing was done (or the transaction was
    rolled back); the operation may be tried again."""


class SchemaTooNewError(RepositoryError):
    """The database's schema is newer than this code knows: it must not run against it."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"the database schema is version {found}, newer than this Mailroom ({known}):"
            " upgrade Mailroom"
        )
        self.found = found
        self.known = known
