"""Which database a test runs on: both (the `database_dsn` fixture's default), or SQLite alone.

A check decided before any query (a malformed request refused, a signature or a parameter rejected) behaves the same
on both databases: it runs on SQLite alone. Whatever stores or reads state runs on both.
"""

from __future__ import annotations

import pytest

SQLITE_ONLY = pytest.mark.parametrize("database_dsn", ["sqlite"], indirect=True)
