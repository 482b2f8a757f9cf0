"""A Prepared statement runs on the driver's own cursor, but fails as Connection.execute does:
with SQLAlchemy's wrapping of the driver's error (IntegrityError, OperationalError, ...). Before,
it raised the driver's own exception, so `retry_on_deadlock`, which reads a deadlock's SQLSTATE
from SQLAlchemy's OperationalError, let a deadlock of a prepared statement through unretried, and
a caller catching IntegrityError missed a prepared INSERT's refusal."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from otaplane.store.database import Database, retry_on_deadlock
from otaplane.store.prepared import Prepared
from tests.conftest import POSTGRES_URL

_metadata = sa.MetaData()
_things = sa.Table("prepared_error_things", _metadata, sa.Column("id", sa.Integer, primary_key=True))
_INSERT = Prepared(sa.insert(_things).values(id=sa.bindparam("id")))


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path, postgres):
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'errors.db'}")
    elif not POSTGRES_URL:
        pytest.skip("needs OTAPLANE_TEST_POSTGRES_URL")
    else:
        database = Database(postgres.create())
    _metadata.create_all(database.engine)
    yield database
    database.dispose()


def test_a_refused_insert_raises_sqlalchemys_integrity_error(db):
    with db.begin() as conn:
        assert _INSERT.rowcount(conn, id=1) == 1
    with pytest.raises(sa.exc.IntegrityError) as raised:
        with db.begin() as conn:
            _INSERT.rowcount(conn, id=1)
    assert not raised.value.connection_invalidated
    with db.connect() as conn:  # the refused transaction left nothing behind, the connection works
        assert conn.execute(sa.select(sa.func.count()).select_from(_things)).scalar() == 1


def test_a_deadlock_of_a_prepared_statement_is_retried(db):
    if db.engine.dialect.name != "postgresql":
        pytest.skip("a deadlock victim is PostgreSQL's (SQLite waits for its lock instead)")
    # A function that fails as PostgreSQL's deadlock detector does (SQLSTATE 40P01) while a
    # flag row exists: the first attempt is the victim, the second goes through.
    with db.begin() as conn:
        conn.execute(sa.text("""
            CREATE FUNCTION prepared_error_victim() RETURNS integer LANGUAGE plpgsql AS $$
            BEGIN
                IF EXISTS (SELECT 1 FROM prepared_error_things WHERE id = -1) THEN
                    RAISE EXCEPTION 'deadlock detected' USING ERRCODE = 'deadlock_detected';
                END IF;
                RETURN 1;
            END $$"""))
        conn.execute(sa.insert(_things).values(id=-1))
    victim = Prepared(sa.select(sa.func.prepared_error_victim().label("n")))
    attempts = []

    @retry_on_deadlock
    def write_once():
        attempts.append(1)
        with db.begin() as conn:
            if len(attempts) == 2:  # the deadlock is over: the other transaction went through
                conn.execute(sa.delete(_things).where(_things.c.id == -1))
            return victim.first(conn)

    assert write_once() == {"n": 1}
    assert len(attempts) == 2
