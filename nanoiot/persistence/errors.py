"""What a failed database write means: one row the database refused, or the database itself out of reach.

The two call for opposite answers. A refused row (a value out of the column's range, a violated constraint) is
that row's own fault: the journal writes the rest of its batch without it and only that row's caller fails. An
unreachable database (connection refused or dropped, a lock held too long) fails every row alike: splitting a
batch into thousands of single writes would only hammer a database that is already down.
"""

from __future__ import annotations

from sqlalchemy.exc import (DataError, DBAPIError, DisconnectionError, IntegrityError, InterfaceError,
                            OperationalError, StatementError)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from nanoiot.errors import ErrorCode, InvalidArguments, ServiceUnavailable

#: Python-side refusals of one value before it reaches the database (sqlite3 raises OverflowError for an integer
#: beyond 64 bits; psycopg2 ValueError for a NUL character in a string).
_VALUE_ERRORS = (OverflowError, ValueError, TypeError)


def is_unavailable(exc: BaseException) -> bool:
    """True when the database could not be reached or used at all (every write fails alike)."""
    if isinstance(exc, (DatabaseUnavailable, OperationalError, InterfaceError, DisconnectionError, ConnectionError,
                        TimeoutError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def is_refused_row(exc: BaseException) -> bool:
    """True when the database (or its driver) refused a value or a constraint: the fault of the rows written, not
    of the database, so the same write without the offending row can succeed."""
    if is_unavailable(exc):
        return False
    if isinstance(exc, (DataError, IntegrityError)):
        return True
    if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
        return isinstance(exc.orig, _VALUE_ERRORS)  # a value the driver could not even send
    return isinstance(exc, _VALUE_ERRORS)


class RowRefused(InvalidArguments):
    """A client's values the database refused (after the edge let them pass): a 400 of the client's own, which
    names the error id of the log line holding the database's text (never shown: it carries SQL and values)."""

    def __init__(self, what: str, error_id: str) -> None:
        super().__init__(f"The database refused {what} (error id {error_id})", errorId=error_id)


class DatabaseUnavailable(ServiceUnavailable):
    """The database cannot be reached: what the repository raises instead of the driver's error, so that every door
    answers 503 with ``Retry-After`` (MQTT CONNACK "server unavailable", CoAP 5.03) and no host, port or SQL leaks.
    The driver's error stays on ``__cause__`` for the log."""

    error_code = ErrorCode.DATABASE
    default_message = "The database is unavailable; try again later"
