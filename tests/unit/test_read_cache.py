"""SQLite's loop reads reuse a Prepared SELECT's result until the database changes
(store.prepared.READ_CACHE, cleared by store.database._ReadTurn on PRAGMA data_version)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import sqlalchemy as sa

from otaplane.store import Database
from otaplane.store.prepared import Prepared
from otaplane.store.schema import signature_nonces

EXPIRY_OF = Prepared(sa.select(signature_nonces.c.expires_ms).where(signature_nonces.c.digest == sa.bindparam("p_digest")))


@pytest.fixture()
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'cache.db'}")
    database.upgrade()
    with database.begin() as conn:
        conn.execute(sa.insert(signature_nonces).values(digest=1, expires_ms=100))
    yield database
    database.dispose()


class Statements:
    """SELECTs the loop connection runs (sqlite3's trace callback)."""

    def __init__(self, db: Database):
        with db.loop_reads() as conn:
            conn.connection.driver_connection.set_trace_callback(self._seen)
        self.selects = 0

    def _seen(self, sql: str) -> None:
        if sql.lstrip().upper().startswith("SELECT") and signature_nonces.name in sql:
            self.selects += 1


def _expiry(db: Database, digest: int = 1):
    with db.loop_reads() as conn:
        row = EXPIRY_OF.first(conn, p_digest=digest)
        return row if row is None else row["expires_ms"]


def _set_expiry(db: Database, expires_ms: int) -> None:
    with db.begin() as conn:
        conn.execute(sa.update(signature_nonces).values(expires_ms=expires_ms))


def test_an_unchanged_database_is_read_once(db):
    statements = Statements(db)

    async def scenario():
        assert _expiry(db) == 100
        assert _expiry(db, 2) is None
        await asyncio.sleep(0)  # later turns: same data_version
        assert _expiry(db) == 100
        assert _expiry(db, 2) is None  # "no row" is a result too
        with db.loop_reads() as conn:
            EXPIRY_OF.first(conn, p_digest=1)["expires_ms"] = -1  # a caller's change stays its own
        await asyncio.sleep(0)
        assert _expiry(db) == 100

    asyncio.run(scenario())
    assert statements.selects == 2


def test_a_commit_of_another_connection_is_seen_next_turn(db):
    statements = Statements(db)

    async def scenario():
        assert _expiry(db) == 100
        _set_expiry(db, 200)  # this process, a pooled connection
        assert _expiry(db) == 100  # the turn's snapshot
        await asyncio.sleep(0)
        assert _expiry(db) == 200

    asyncio.run(scenario())
    assert statements.selects == 2


def test_a_commit_of_another_process_is_seen_next_turn(db, tmp_path):
    async def scenario():
        assert _expiry(db) == 100
        await asyncio.sleep(0)
        script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
                  f"c.execute('UPDATE {signature_nonces.name} SET expires_ms = 300'); c.commit()")
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache.db")], check=True)  # noqa: ASYNC221
        await asyncio.sleep(0)
        assert _expiry(db) == 300

    asyncio.run(scenario())


def test_reads_off_the_loop_are_not_cached(db):
    statements = Statements(db)
    assert _expiry(db) == 100
    assert _expiry(db) == 100
    assert statements.selects == 2


class Built:
    """A build function that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, row):
        self.calls += 1
        return ("built", row["expires_ms"])


def _built_expiry(db: Database, build: Built, digest: int = 1):
    with db.loop_reads() as conn:
        return EXPIRY_OF.first_built(conn, build, p_digest=digest)


def test_a_built_object_is_kept_until_the_database_changes(db):
    build = Built()
    statements = Statements(db)

    async def scenario():
        first = _built_expiry(db, build)
        assert first == ("built", 100)
        await asyncio.sleep(0)
        assert _built_expiry(db, build) is first  # the very object: no row copy, no build
        assert _built_expiry(db, build, 2) is None  # no row: build is not called
        _set_expiry(db, 400)
        await asyncio.sleep(0)
        assert _built_expiry(db, build) == ("built", 400)

    asyncio.run(scenario())
    assert build.calls == 2
    assert statements.selects == 3  # digest 1 twice (before and after the change), digest 2 once


def test_off_the_loop_every_call_builds_afresh(db):
    build = Built()
    assert _built_expiry(db, build) == ("built", 100)
    _set_expiry(db, 500)
    assert _built_expiry(db, build) == ("built", 500)
    assert build.calls == 2
