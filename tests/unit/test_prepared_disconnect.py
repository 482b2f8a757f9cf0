"""A PostgreSQL connection lost under a Prepared statement (run on the driver's own cursor, where
SQLAlchemy never sees the error): the statement raises what Connection.execute raises for a lost
connection, the connection is invalidated, and the pool takes it back without an error of its
own (it used to log "Exception during reset or similar" with a traceback), then hands out a
working one. The dispatcher's loop logs such a loss as one warning line."""

from __future__ import annotations

import logging
import sys

import psycopg
import pytest
import sqlalchemy as sa

from otaplane.store.database import Database
from otaplane.store.disconnects import LostConnectionResetFilter, log_loop_failure
from otaplane.store.prepared import Prepared
from tests.conftest import POSTGRES_URL

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="needs OTAPLANE_TEST_POSTGRES_URL")

_ONE = Prepared(sa.select(sa.literal_column("1").label("one")))


@pytest.fixture
def db(postgres):
    database = Database(postgres.create())
    yield database
    database.dispose()


def _terminate(url: str, pid: int) -> None:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
        # With a timeout (PostgreSQL 14+) it returns once the session is gone, not once signalled.
        assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()[0]


def test_a_lost_connection_is_invalidated_and_reported_as_such(db, caplog):
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.pool")
    with db.connect() as conn:
        pid = conn.connection.dbapi_connection.info.backend_pid
        _terminate(db.engine.url.render_as_string(hide_password=False), pid)
        with pytest.raises(sa.exc.DBAPIError) as raised:
            _ONE.first(conn)
        assert raised.value.connection_invalidated
        assert conn.invalidated
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    with db.connect() as conn:  # the pool's next connection works
        assert _ONE.first(conn) == {"one": 1}


def test_other_errors_leave_the_connection_alone(db):
    broken = Prepared(sa.select(sa.literal_column("CAST('x' AS INTEGER)").label("n")))
    with db.connect() as conn:
        with pytest.raises(sa.exc.DataError) as raised:  # what Connection.execute raises
            broken.first(conn)
        assert isinstance(raised.value.orig, psycopg.errors.InvalidTextRepresentation)
        assert not raised.value.connection_invalidated
        assert not conn.invalidated


def test_background_loops_log_a_lost_connection_as_one_warning(caplog):
    lost = sa.exc.DBAPIError.instance("SELECT 1", {}, psycopg.OperationalError("the connection is lost"),
                                      psycopg.Error, connection_invalidated=True)
    other = RuntimeError("a bug")
    for exc in (lost, other):
        try:
            raise exc
        except Exception:
            log_loop_failure(logging.getLogger("otaplane"), "dispatcher tick")
    warning, error = caplog.records[-2:]
    assert warning.levelno == logging.WARNING and warning.exc_info is None
    assert "connection was lost" in warning.getMessage()
    assert error.levelno == logging.ERROR and error.exc_info is not None


def test_a_connection_lost_while_checked_out_comes_back_with_one_warning(db, caplog):
    """Its last statement (a Prepared read: the driver's transaction, none of SQLAlchemy's) ran,
    then the session ended (an administrator, a restart): the pool's ROLLBACK on its way back
    fails. That is one warning line, not an error with a traceback
    (test_the_nonce_writer_goes_again_on_a_new_connection failed on it in CI)."""
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.pool")
    with db.connect() as conn:
        assert _ONE.first(conn) == {"one": 1}
        pid = conn.connection.dbapi_connection.info.backend_pid
        _terminate(db.engine.url.render_as_string(hide_password=False), pid)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    lost = [r for r in caplog.records if r.levelno == logging.WARNING and "lost while in use" in r.getMessage()]
    assert len(lost) == 1 and lost[0].exc_info is None, caplog.text
    with db.connect() as conn:  # the pool's next connection works
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1


def test_any_other_failed_reset_stays_an_error_with_its_traceback():
    for exc in (psycopg.errors.InFailedSqlTransaction("current transaction is aborted"), RuntimeError("bug")):
        try:
            raise exc
        except Exception:
            record = logging.LogRecord("sqlalchemy.pool.impl.QueuePool", logging.ERROR, __file__, 1,
                                       "Exception during reset or similar", (), sys.exc_info())
        assert LostConnectionResetFilter().filter(record)
        assert record.levelno == logging.ERROR and record.exc_info is not None
