"""Telling a lost database connection from any other error: for code that runs statements on
the driver's own cursor (store.prepared), where SQLAlchemy never sees the error, and for the
background loops, which log such a loss as a warning and go on."""

from __future__ import annotations

import logging
import sys

import sqlalchemy as sa
from sqlalchemy.engine import Connection


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
