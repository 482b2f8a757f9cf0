"""Engine creation and schema migrations for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from contextvars import ContextVar
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine

from otaplane.store import read_versions
from otaplane.store.disconnects import broke_connection, quiet_lost_connection_resets
from otaplane.store.prepared import READ_CACHE

_MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant works: replicas starting together take turns running migrations.
_MIGRATION_LOCK_ID = 0x07A91A4E
# Longest wait for a SQLite write turn (Database.write_turn) before going ahead without one.
WRITE_TURN_WAIT_S = 10
# PostgreSQL: connections of `Database.read_engine`, and at most as many reads at once (the gateway's
# limiter): beyond a few threads, more only contend for the GIL (2, 4, 8 and 40 threads measured
# within 15% of each other, 40 the slowest).
QUICK_READ_CONNECTIONS = 8
# The connection `Database.connect()` hands out inside `Database.loop_reads()`.
_PINNED: ContextVar = ContextVar("otaplane_pinned_connection", default=None)


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
        # The database file of SQLite (None for PostgreSQL or an in-memory database): files that
        # belong with it (the nonce file, store.nonce_file) sit beside it.
        self.sqlite_path: str | None = None
        if self.is_sqlite:
            db_path = url.removeprefix("sqlite:///")
            if db_path and db_path != ":memory:":
                self.sqlite_path = db_path
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = sa.create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": 30},
                # As many kept-open connections as worker threads (anyio's default limit, 40)
                # plus three held for good (event loop reads; the nonce writer and its WAL
                # checkpointer where nonces are kept in the database, store.nonces): an overflow
                # connection is reopened per use, with its PRAGMAs.
                pool_size=40 + 3,
                max_overflow=0,
            )
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # Kept open for as many worker threads as anyio runs (40), plus the nonce writer's and
            # a few more: an overflow connection is opened per use (~5 ms) and closed after.
            self.engine = sa.create_engine(url, pool_size=40, max_overflow=10, pool_pre_ping=True,
                                           connect_args=_application_name(url, "otaplane"))
            quiet_lost_connection_resets()  # a session ended under a checked-out connection: a warning
            # The short reads of `autocommit_read`: connections in autocommit mode for good, so a
            # checkout is a pop from the pool (pre-ping, the autocommit switch and the reset on
            # return cost ~140 us of CPU and a round trip per read). Without pre-ping a connection
            # that broke while idle (a server restart) fails its next read: autocommit_read then
            # drops it and reads again on a new one.
            self.read_engine = sa.create_engine(url, pool_size=QUICK_READ_CONNECTIONS, max_overflow=0,
                                                pool_pre_ping=False, isolation_level="AUTOCOMMIT",
                                                pool_reset_on_return=None,
                                                connect_args=_application_name(url, "otaplane-reads"))
        if self.is_sqlite:
            self.read_engine = self.engine  # unused: quick reads run on the loop (loop_reads)
        self._engines = (self.engine, self.read_engine)
        self._loop_connections: dict[int, Connection] = {}  # thread id -> its loop_reads() connection
        self._loop_turns: dict[int, _ReadTurn] = {}  # SQLite: thread id -> that connection's read turn

    def begin(self):
        """A connection inside one transaction, committed on success."""
        return self.engine.begin()

    def connect(self):
        """`with db.connect() as conn:` a pooled connection, or inside `loop_reads()` that one."""
        pinned = _PINNED.get()
        if pinned is not None and pinned.engine in self._engines:
            return contextlib.nullcontext(pinned)
        return self.engine.connect()

    def loop_reads(self) -> _LoopReads:
        """`with db.loop_reads():` around short synchronous reads run on the event loop (the
        gateway's quick_read actions on SQLite). Inside, `connect()` hands out one long-lived
        connection of this thread instead of a pooled one: no checkout, and a warm page cache.
        Nothing may await inside the block (the context, and so the connection, would be
        shared with other tasks), and nothing may write.

        On SQLite the blocks of one turn of the event loop also share one read transaction
        (each statement on its own would take and drop the WAL read lock: two system calls).
        It ends in a callback scheduled when it began, so before anything that the loop
        receives afterwards gets to run: every request served in it had arrived before its
        snapshot was taken, and sees every write acknowledged before the request was sent.
        """
        thread = threading.get_ident()
        conn = self._loop_connections.get(thread)
        if conn is None:
            conn = self._loop_connections[thread] = self.engine.connect()
            if self.is_sqlite:
                self._loop_turns[thread] = _ReadTurn(conn.connection.driver_connection)
        return _LoopReads(conn, self._loop_turns.get(thread))

    def autocommit_read(self, function, *args):
        """`function(*args)`, short reads only, run in a worker thread (the gateway's quick_read
        actions on PostgreSQL): inside, `connect()` hands out one connection of `read_engine`,
        in autocommit mode, so no transaction is left to roll back (a round trip) when it goes
        back to the pool. Each statement still sees what was committed before it began, as in
        a READ COMMITTED transaction. Nothing may write inside it: it may run twice, when its
        connection turns out to be broken (reads are safe to repeat)."""
        for attempt in (1, 2):
            with self.read_engine.connect() as conn:
                token = _PINNED.set(conn)
                try:
                    return function(*args)
                except Exception as exc:
                    if attempt == 2 or not broke_connection(conn, exc):
                        raise
                    conn.invalidate()  # closed, never back to the pool; the loop reads again
                finally:
                    _PINNED.reset(token)
        raise AssertionError("unreachable")

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
            if self.is_sqlite:
                read_versions.ensure(conn)  # after the migrations: they may rebuild a table

    def dispose(self) -> None:
        for conn in self._loop_connections.values():
            conn.close()
        self._loop_connections.clear()
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


def _application_name(url: str, name: str) -> dict[str, str]:
    """PostgreSQL: which pool a session of pg_stat_activity belongs to, unless the URL names one."""
    return {} if "application_name" in url else {"application_name": name}


class _LoopReads:
    """Database.loop_reads(): a class, not a generator, as it runs on every such request."""

    __slots__ = ("cache_token", "conn", "token", "turn")

    def __init__(self, conn: Connection, turn: _ReadTurn | None):
        self.conn = conn
        self.turn = turn

    def __enter__(self) -> Connection:
        self.token = _PINNED.set(self.conn)
        self.cache_token = None
        if self.turn is not None and self.turn.join():
            self.cache_token = READ_CACHE.set(self.turn.cache)
        return self.conn

    def __exit__(self, *_exc) -> None:
        _PINNED.reset(self.token)
        if self.cache_token is not None:
            READ_CACHE.reset(self.cache_token)
        if self.conn.in_transaction():  # a Core statement began one: the next block starts afresh
            self.conn.rollback()


class _ReadTurn:
    """One SQLite read transaction for the loop_reads() blocks of one turn of the event loop,
    and the results of its Prepared reads (store.prepared.READ_CACHE), kept from turn to turn
    while the tables they read are unchanged. `PRAGMA data_version` moves when any other
    connection, of this process or another, commits a change; only then are the tables' change
    counters read (store.read_versions), and only the results of changed tables dropped."""

    __slots__ = ("cache", "driver", "open", "table_versions", "version")

    def __init__(self, driver):
        self.driver = driver  # the sqlite3 connection
        self.open = False
        self.cache: dict = {}  # {Prepared: its results}
        self.version = None  # data_version the cache was checked at
        self.table_versions: dict[str, int] | None = None  # read_versions.read() at that check

    def join(self) -> bool:
        """True when the block runs in the turn's transaction (and may use the cache)."""
        if self.open:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: each statement takes its own snapshot
            return False
        if not self.driver.in_transaction:
            self.driver.execute("BEGIN")  # deferred: the pragma below takes the snapshot
        # Read inside the transaction: the version of the very snapshot the turn reads.
        version = self.driver.execute("PRAGMA data_version").fetchone()[0]
        if version != self.version:
            self._forget_changed_tables()
            self.version = version
        self.open = True
        loop.call_soon(self.end)  # next turn, ahead of what the loop receives meanwhile
        return True

    def _forget_changed_tables(self) -> None:
        versions = read_versions.read(self.driver)  # in the turn's snapshot, like its reads
        previous, self.table_versions = self.table_versions, versions
        if versions is None or previous is None or versions[read_versions.SCHEMA] != previous[read_versions.SCHEMA]:
            self.cache.clear()
            return
        changed = {table for table, count in versions.items() if previous.get(table) != count}
        if changed:
            for prepared in [p for p in self.cache if not changed.isdisjoint(p.tables)]:
                del self.cache[prepared]

    def end(self) -> None:
        self.open = False
        if self.driver.in_transaction:
            self.driver.rollback()  # read-only: nothing to keep


DEADLOCK_ATTEMPTS = 3
_RETRYABLE_SQLSTATES = ("40P01", "40001")  # deadlock detected, serialization failure


def retry_on_deadlock(function):
    """Run a function that makes one write transaction again when PostgreSQL chose it as the
    victim of a deadlock (or a serialization failure), up to DEADLOCK_ATTEMPTS times. The code
    takes locks in one order (a device's push row, then its task), so this is the safety net."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
            try:
                return function(*args, **kwargs)
            except sa.exc.OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) not in _RETRYABLE_SQLSTATES or attempt == DEADLOCK_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    return run


def hold_rows(conn: Connection, table: sa.Table, *where, no_key: bool = False) -> bool:
    """Hold the rows matching `where` until the transaction ends, against every writer that
    would change or refer to them (run it first): on PostgreSQL `SELECT ... FOR UPDATE` (with
    `no_key`, `FOR NO KEY UPDATE`, which inserts that merely refer to the rows do not wait for);
    on SQLite a write that changes nothing, which takes the database's write lock. Whether any
    row matched."""
    if conn.dialect.name == "sqlite":
        (key,) = table.primary_key.columns
        return conn.execute(sa.update(table).where(*where).values({key.name: key})).rowcount > 0
    held = sa.select(*table.primary_key.columns).where(*where).with_for_update(key_share=no_key)
    return conn.execute(held).first() is not None
