"""Telling a lost database connection from any other error: for code that runs statements on
the driver's own cursor (store.prepared), where SQLAlchemy never sees the error, for the
background loops, which log such a loss as a warning and go on, and for SQLAlchemy's pool,
whose failed reset of a connection lost while checked out is one warning line too."""

from __future__ import annotations

import logging
import sys

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

# SQLAlchemy's pool logs on its class's logger (sqlalchemy.log): QueuePool, the pool of every engine here.
POOL_LOGGER = "sqlalchemy.pool.impl.QueuePool"
_POOL_RESET_FAILED = "Exception during reset or similar"


def broke_connection(conn: Connection, exc: Exception) -> bool:
    """Whether `exc`, raised while `conn` was in use, says the connection is gone: the driver's
    error straight from a cursor (store.prepared runs on it) or SQLAlchemy's wrapping of one."""
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig
    if not isinstance(exc, conn.dialect.loaded_dbapi.Error):
        return False
    try:
        driver_connection = conn.connection.dbapi_connection
    except sa.exc.SQLAlchemyError:  # already invalidated
        return True
    return conn.dialect.is_disconnect(exc, driver_connection, None)


def log_loop_failure(log: logging.Logger, what: str) -> None:
    """From an `except` block of a background loop, which tries again at its next turn: a lost
    database connection (a restart, a failover; the pool has dropped it) is one warning line,
    anything else an error with its traceback."""
    exc = sys.exc_info()[1]
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        log.warning("%s: the database connection was lost (%s); trying again", what, type(exc.orig).__name__)
    else:
        log.exception("%s failed", what)


def lost_on_the_wire(exc: BaseException) -> bool:
    """Whether a psycopg error, raised with no connection at hand to ask, says the session is
    gone: libpq's own failures (no SQLSTATE: "server closed the connection unexpectedly"),
    connection exceptions (08...) and the server ending the session (57P01-57P03: an
    administrator, a crash, a restart)."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    sqlstate = exc.sqlstate
    return sqlstate is None or sqlstate.startswith(("08", "57P"))


class LostConnectionResetFilter(logging.Filter):
    """A connection coming back to SQLAlchemy's pool is rolled back first; when its session
    ended while it was checked out (the server restarted, an administrator ended it), that
    ROLLBACK fails and the pool logs "Exception during reset or similar" as an error with a
    traceback, then drops the connection. Nothing failed that the pool does not handle: such a
    record becomes one warning line. Any other failed reset stays an error with its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.msg == _POOL_RESET_FAILED and exc is not None and lost_on_the_wire(exc):
            record.msg = "a database connection was lost while in use (%s); the pool drops it"
            record.args = (type(exc).__name__,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


_RESET_FILTER = LostConnectionResetFilter()


def quiet_lost_connection_resets() -> None:
    """Install LostConnectionResetFilter on the pool's logger (once, whatever the engines)."""
    logger = logging.getLogger(POOL_LOGGER)
    if _RESET_FILTER not in logger.filters:
        logger.addFilter(_RESET_FILTER)
