"""Signature nonce memory, in the database so that every replica sees every nonce.

Every signed request records its nonce before its action runs. `NonceWriter` group-commits
them: one writer thread collects the nonces of concurrent requests and records them in one
transaction (one COMMIT for many), and each request awaits its own outcome.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from hashlib import blake2b
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from otaplane.store.database import Database
from otaplane.store.disconnects import broke_connection
from otaplane.store.prepared import Prepared
from otaplane.store.schema import signature_nonces as nonces

log = logging.getLogger("otaplane.nonces")


def digest(access_key_id: str, nonce: str) -> int:
    """The row key of a nonce in use: a signed 64-bit BLAKE2b digest of (AccessKeyId, nonce),
    length-prefixed so that no two pairs share an input. Two different nonces of one key land on
    one digest with a chance of about n / 2**64 for n nonces in use (1 in 10**12 at ten million):
    the second would be refused as a replay, and the client signs it again with a fresh nonce."""
    return int.from_bytes(digest_bytes(access_key_id, nonce), "big", signed=True)


def digest_bytes(access_key_id: str, nonce: str) -> bytes:
    """digest() as its 8 big-endian bytes (the key of store.nonce_file)."""
    data = f"{len(access_key_id)}:{access_key_id}{nonce}".encode("utf-8", "surrogatepass")
    return blake2b(data, digest_size=8).digest()


def _insert_new(dialect):
    return (
        dialect.insert(nonces)
        .values(digest=sa.bindparam("p_digest"), expires_ms=sa.bindparam("p_expires_ms"))
        .on_conflict_do_nothing()
        # Which rows went in (rowcount is not reliable here with psycopg 3, nor for many rows).
        .returning(nonces.c.digest)
    )


# Built once: this runs on every signed request, and building a statement costs more than running it.
# (Parameter names differ from column names: SQLAlchemy reserves those in INSERT/UPDATE.)
_INSERT_NEW = {"postgresql": _insert_new(postgresql), "sqlite": _insert_new(sqlite)}
# SQLite: the rows of a batch in one statement too, compiled once per row count and run lean
# (store.prepared). The writer thread gives up the GIL for every call into SQLite (and for each
# row of RETURNING) and must win it back from the busy event loop each time: so the usual case,
# where every nonce is new, is one plain INSERT that commits itself (see NonceWriter._write).
_SQLITE_MAX_ROWS = 400  # 800 parameters, under the oldest SQLite limit (999)


@functools.lru_cache(maxsize=128)
def _insert_rows_sqlite(count: int, returning: bool) -> Prepared:
    """INSERT of `count` rows: plain (any row already there fails it all), or skipping the rows
    already there and RETURNING the others."""
    rows = [{"digest": sa.bindparam(f"d{i}"), "expires_ms": sa.bindparam(f"e{i}")} for i in range(count)]
    insert = sqlite.insert(nonces).values(rows)
    if returning:
        return Prepared(insert.on_conflict_do_nothing().returning(nonces.c.digest))
    return Prepared(insert)


_ROW_PARAMS = [(f"d{i}", f"e{i}") for i in range(_SQLITE_MAX_ROWS)]  # names built once


def _numbered(rows: list[dict]) -> dict:
    params = {}
    assert len(rows) <= _SQLITE_MAX_ROWS
    for (d, e), row in zip(_ROW_PARAMS, rows):
        params[d], params[e] = row["p_digest"], row["p_expires_ms"]
    return params


class SomeNonceUsed(Exception):
    """remember_many(expect_fresh=True) found a nonce recorded already, and recorded none."""


_TAKE_OVER_EXPIRED = (
    sa.update(nonces)
    .where(nonces.c.digest == sa.bindparam("p_digest"), nonces.c.expires_ms < sa.bindparam("p_now_ms"))
    .values(expires_ms=sa.bindparam("p_expires_ms"))
    .returning(nonces.c.digest)
)


class NonceUse(NamedTuple):
    key_id: str
    nonce: str
    now_ms: int  # when the request was checked
    ttl_ms: int  # how long the nonce stays used


def remember_many(conn: Connection, uses: Sequence[NonceUse], expect_fresh: bool = False) -> list[bool]:
    """Record several nonces in the caller's transaction (`with conn.begin():`); per use,
    False when already used.

    The primary key makes the check atomic across processes: of two requests racing with one
    nonce, only one inserts it. Within `uses` the first of a repeated (key, nonce) wins. Rows
    go in sorted, so that two processes inserting overlapping batches lock them in the same
    order (PostgreSQL would otherwise find a deadlock and fail one of them).

    With `expect_fresh` on SQLite, the rows go in as one plain INSERT (no RETURNING), which
    fails as a whole, recording nothing, when one of them is there already: then SomeNonceUsed
    is raised, and the caller calls again without `expect_fresh` to learn which.
    """
    keys = [digest(use.key_id, use.nonce) for use in uses]
    first: dict[int, NonceUse] = {}
    for key, use in zip(keys, uses):
        first.setdefault(key, use)
    fresh: set[int] = set()
    ordered = sorted(first.items())
    rows = [{"p_digest": key, "p_expires_ms": use.now_ms + use.ttl_ms} for key, use in ordered]
    if conn.dialect.name == "sqlite" and expect_fresh and 0 < len(rows) <= _SQLITE_MAX_ROWS:
        try:
            _insert_rows_sqlite(len(rows), False).rowcount(conn, **_numbered(rows))
        except sa.exc.IntegrityError:  # the statement failed as a whole: nothing went in
            raise SomeNonceUsed() from None
        # Every row went in: each use is fresh, but a repeat of an earlier use in `uses`.
        return [first[key] is use for key, use in zip(keys, uses)]
    elif conn.dialect.name == "sqlite":
        for start in range(0, len(rows), _SQLITE_MAX_ROWS):
            chunk = rows[start:start + _SQLITE_MAX_ROWS]
            fresh.update(row["digest"] for row in _insert_rows_sqlite(len(chunk), True).all(conn, **_numbered(chunk)))
    elif rows:
        fresh.update(row.digest for row in conn.execute(_INSERT_NEW["postgresql"], rows))
    for key, use in ordered:
        if key in fresh:
            continue
        # Used before: accept again only once the old record has expired (taken over atomically).
        values = {"p_digest": key, "p_now_ms": use.now_ms, "p_expires_ms": use.now_ms + use.ttl_ms}
        if conn.execute(_TAKE_OVER_EXPIRED, values).first() is not None:
            fresh.add(key)
    return [first[key] is use and key in fresh for key, use in zip(keys, uses)]


def purge_expired(conn: Connection, now_ms: int) -> int:
    return conn.execute(sa.delete(nonces).where(nonces.c.expires_ms < now_ms)).rowcount


def take_all_in_use(conn: Connection, now_ms: int) -> list[tuple[int, int]]:
    """(digest, expires_ms) of every nonce still in use, deleted from the table (in the caller's
    transaction): for a nonce memory that takes over from the table (store.nonce_file)."""
    rows = [(row.digest, row.expires_ms) for row in conn.execute(
        sa.select(nonces.c.digest, nonces.c.expires_ms).where(nonces.c.expires_ms >= now_ms))]
    conn.execute(sa.delete(nonces))
    return rows


class _BrokenBeforeCommit(Exception):
    """A nonce batch failed on a connection that is gone, before its COMMIT was sent."""


class _Waiting(NamedTuple):
    use: NonceUse
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class NonceWriter:
    """Group commit for nonces: `await writer.remember(...)` is True once the nonce is durably
    recorded (committed) as fresh, False when it was already used.

    The nonces of the requests that reach this point in one turn of the event loop travel
    together to one writer thread, which records everything that reached it while it was busy
    in one transaction (`remember_many`) and commits once, then hands each request its outcome
    on the request's event loop. A failed transaction fails every request in it. On SQLite the
    thread takes the process's write turn (`Database.write_turn`) like any other writer.
    """

    MAX_BATCH = 500  # nonces per transaction, at most (soft: a loop turn's nonces stay together)
    CHECKPOINT_EVERY = 500  # SQLite: nonces written between checkpoints (a WAL page or so each)

    def __init__(self, db: Database):
        self.db = db
        self._checkpointer = _Checkpointer(db) if db.is_sqlite else None
        self._since_checkpoint = 0
        self._turn: dict[asyncio.AbstractEventLoop, list[_Waiting]] = {}  # this loop turn's nonces
        # Loop turns handed over to the thread (None: stop). A put wakes the thread only when it
        # waits; while it writes, turns just pile up for its next transaction.
        self._handed_over: queue.SimpleQueue[list[_Waiting] | None] = queue.SimpleQueue()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._conn: Connection | None = None  # the writer thread's

    async def remember(self, key_id: str, nonce: str, now_ms: int, ttl_ms: int) -> bool:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        turn = self._turn.get(loop)
        if turn is None:
            turn = self._turn[loop] = []
            loop.call_soon(self._hand_over, loop)  # after every request that is ready to run now
        turn.append(_Waiting(NonceUse(key_id, nonce, now_ms, ttl_ms), future, loop))
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        turn = self._turn.pop(loop)
        if self._closed:
            _settle([(waiting.future, RuntimeError("the nonce writer is closed")) for waiting in turn])
            return
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="otaplane-nonces", daemon=True)
                    self._thread.start()
        self._handed_over.put(turn)

    def purge_expired(self, now_ms: int) -> int:
        with self.db.begin() as conn:
            return purge_expired(conn, now_ms)

    def close(self) -> None:
        """Finish the nonces already handed over, then stop the thread."""
        self._closed = True
        with self._start:
            thread = self._thread
        if thread is not None:
            self._handed_over.put(None)
            thread.join(timeout=30)
        if self._checkpointer is not None:
            self._checkpointer.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Waiting] = []
            turn = self._handed_over.get()
            while True:
                if turn is None:
                    stopping = True  # still write what was handed over before
                else:
                    batch.extend(turn)
                if len(batch) >= self.MAX_BATCH:
                    break
                try:
                    turn = self._handed_over.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write_and_settle(batch)
        if self._conn is not None:
            self._conn.invalidate()  # not back to the pool in autocommit mode
            self._conn = None

    def _write_and_settle(self, batch: list[_Waiting]) -> None:
        try:
            outcomes: list[bool] | BaseException = self._write([w.use for w in batch])
        except Exception as exc:  # every request of the batch fails (500) and says why in the log
            outcomes = exc
        else:
            if self._checkpointer is not None:
                self._since_checkpoint += len(batch)
                if self._since_checkpoint >= self.CHECKPOINT_EVERY:
                    self._since_checkpoint = 0
                    self._checkpointer.request()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, object]]] = {}
        for index, waiting in enumerate(batch):
            outcome = outcomes if isinstance(outcomes, BaseException) else outcomes[index]
            by_loop.setdefault(waiting.loop, []).append((waiting.future, outcome))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def _write(self, uses: list[NonceUse]) -> list[bool]:
        try:
            return self._write_once(uses)
        except _BrokenBeforeCommit as broken:
            # The thread's connection was gone (e.g. PostgreSQL restarted while it sat idle) and
            # nothing was committed: the batch goes again, once, on a new connection.
            log.warning("the nonce writer's connection broke (%s); writing the batch again", broken.__cause__)
            return self._write_once(uses)

    def _write_once(self, uses: list[NonceUse]) -> list[bool]:
        conn = self._connection()
        try:
            with self.db.write_turn():
                if self.db.is_sqlite:
                    # Autocommit (see _connection): the usual batch, every nonce new, is a single
                    # call into SQLite, one INSERT that commits itself when it returns.
                    try:
                        return remember_many(conn, uses, expect_fresh=True)
                    except SomeNonceUsed:  # a replay (rare): nothing went in, now learn which
                        pass
                transaction = conn.begin()  # on SQLite, each statement commits itself all the same
                try:
                    outcomes = remember_many(conn, uses)
                except Exception as exc:
                    if broke_connection(conn, exc):
                        raise _BrokenBeforeCommit() from exc
                    raise
                # Past this point a broken connection leaves the outcome unknown: no retry (a
                # nonce that did go in would come back as used).
                transaction.commit()
                return outcomes
        except BaseException:
            self._conn = None
            conn.invalidate()  # closed for good: never back to the pool (SQLite: autocommit)
            raise

    def _connection(self) -> Connection:
        """The thread's connection, for its lifetime: a pooled one per batch would come with a
        cold page cache (SQLite) and a checkout each time. On SQLite its driver connection is in
        autocommit mode: every statement of remember_many is atomic on its own, and committed
        (durable) when it returns."""
        if self._conn is None:
            self._conn = self.db.connect()
            if self.db.is_sqlite:
                driver = self._conn.connection.driver_connection
                driver.isolation_level = None
                # Its commits leave the WAL checkpoints to the checkpointer thread (below).
                driver.execute("PRAGMA wal_autocheckpoint=0")
        return self._conn


class _Checkpointer:
    """SQLite: copies the WAL's pages into the database file in the background, for the nonce
    writer, whose commits leave that to it. An automatic checkpoint (SQLite's default, every
    1000 pages) runs in the committing connection, and would hold up every request waiting for
    that commit for milliseconds, several times a second under load. PASSIVE checkpoints wait
    for no reader nor writer: the nonce writer goes on meanwhile, and once a checkpoint has
    caught up, its next commit starts the WAL file over from the beginning."""

    def __init__(self, db: Database):
        self.db = db
        self._due = threading.Event()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def request(self) -> None:
        if self._thread is None:
            with self._start:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(target=self._run, name="otaplane-checkpoint", daemon=True)
                    self._thread.start()
        self._due.set()

    def close(self) -> None:
        self._closed = True
        self._due.set()
        with self._start:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)

    def _run(self) -> None:
        with self.db.connect() as conn:
            driver = conn.connection.driver_connection
            while True:
                self._due.wait()
                self._due.clear()
                if self._closed:
                    return
                try:
                    for _attempt in range(10):  # until it has caught up with the writer, briefly
                        busy, wal_pages, copied = driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        if busy or copied >= wal_pages:
                            break
                        time.sleep(0.001)
                except Exception:  # try again next time; meanwhile the WAL file just grows
                    log.exception("WAL checkpoint failed")


def _settle(settled: list[tuple[asyncio.Future, object]]) -> None:
    for future, outcome in settled:
        if future.done():  # the request was cancelled meanwhile; its nonce stays recorded
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
