"""Engine creation and schema migrations for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

_MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant works: replicas starting together take turns running migrations.
_MIGRATION_LOCK_ID = 0x07A91A4E
# Longest wait for a SQLite write turn (Database.write_turn) before going ahead without one.
WRITE_TURN_WAIT_S = 10


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI (keys create) and several threads read while the server writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Database:
    """Owns the engine. Services get connections from `begin()` / `connect()`."""

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # SQLite has one writer at a time; a thread that finds the write lock taken sleeps in
        # SQLite's busy handler (1, 2, 5 ... 100 ms steps), which under load is most of a
        # request's latency. This process's threads queue here instead (see write_turn).
        self._write_lock = threading.RLock()  # re-entrant: a turn may nest in another
        if self.is_sqlite:
            db_path = url.removeprefix("sqlite:///")
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = sa.create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": 30},
                # As many kept-open connections as worker threads (anyio's default limit, 40):
                # an overflow connection is reopened per use, with its PRAGMAs, under load.
                pool_size=40,
                max_overflow=0,
            )
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)

    def begin(self):
        """A connection inside one transaction, committed on success."""
        return self.engine.begin()

    def connect(self):
        return self.engine.connect()

    @contextlib.contextmanager
    def write_turn(self):
        """`with db.write_turn():` around a short write transaction (statements and commit) that
        runs often: on SQLite the threads of this process take turns; no-op on PostgreSQL.

        The wait is bounded (WRITE_TURN_WAIT_S, below the pool's 30 s checkout timeout): past it
        the thread goes ahead and SQLite's own locking decides, as without turns, so a thread
        holding a turn while it waits for a pooled connection can never wedge the others.
        """
        if not self.is_sqlite:
            yield
            return
        taken = self._write_lock.acquire(timeout=WRITE_TURN_WAIT_S)
        try:
            yield
        finally:
            if taken:
                self._write_lock.release()

    def upgrade(self) -> None:
        """Bring the schema to the newest revision (safe with several replicas starting)."""
        with self.engine.begin() as conn:
            if not self.is_sqlite:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            config = Config()
            config.set_main_option("script_location", str(_MIGRATIONS))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def dispose(self) -> None:
        self.engine.dispose()
