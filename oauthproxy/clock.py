"""The database's clock: one time source for decisions several instances share (rotation, grace, expiry)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement


class database_now(FunctionElement):  # lower case: an SQL function, as SQLAlchemy names them
    """The database server's current time in UTC, naive, in the form the columns store, `seconds` from now.

    Every instance compares against this one clock, so a skewed instance clock cannot shorten or stretch the
    refresh grace window (issue: 30 s of skew revoked honest retries and accepted late replays).
    """

    type = DateTime()
    inherit_cache = True

    def __init__(self, seconds: int = 0):
        self.seconds = int(seconds)
        super().__init__()


@compiles(database_now, "postgresql")
def _postgresql(element: database_now, compiler: Any, **kw: Any) -> str:
    # statement_timestamp(), not now(): a transaction open for a while still compares against the present.
    now = "(statement_timestamp() AT TIME ZONE 'UTC')"
    return f"({now} + interval '{element.seconds} seconds')" if element.seconds else now


@compiles(database_now, "sqlite")
def _sqlite(element: database_now, compiler: Any, **kw: Any) -> str:
    # SQLAlchemy stores SQLite datetimes as text 'YYYY-MM-DD HH:MM:SS.ffffff': produce exactly that shape
    # (%f is seconds with milliseconds), so text comparison is time comparison.
    modifier = f", '{element.seconds:+d} seconds'" if element.seconds else ""
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now'{modifier})"
