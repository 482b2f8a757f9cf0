"""Core statements compiled once per dialect and run straight on the driver's cursor.

For the few statements every signed request runs: SQLAlchemy's work per execution (cache key,
execution context, result metadata: 30-40 us) costs more than an indexed SQLite query. The
statement stays a Core statement, compiled by SQLAlchemy; only its execution is lean:

- parameters are passed by name, as to `Connection.execute` (statements whose parameters would
  need SQLAlchemy's bind processing are refused when compiled);
- rows come back as dicts keyed like `Row._mapping`, with the columns' result processing
  applied (e.g. SQLite's 0/1 to False/True);
- it runs on the Connection's DBAPI connection, in whatever transaction that connection is in,
  without SQLAlchemy's bookkeeping (no autobegin, no events): for reads, and for writes only
  inside a transaction begun on the Connection (`with conn.begin():`), which commits them;
- a driver error comes wrapped as Connection.execute would raise it (IntegrityError, ...);
- on SQLite, inside `Database.loop_reads()`, a SELECT's result is reused until a table it
  reads changes (READ_CACHE, store.read_versions): the polling reads that dominate a read-mostly
  API cost a dict lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.selectable import ReturnsRows, Select

from otaplane.store.disconnects import broke_connection
from otaplane.store.read_versions import tables_read, watches

# SQLite, inside Database.loop_reads(): the results of Prepared SELECTs while the tables they
# read are unchanged ({Prepared: {call and parameters: result}}; store.database._ReadTurn drops
# a statement's results when a table it reads changes). None elsewhere: every call runs.
READ_CACHE: ContextVar[dict | None] = ContextVar("otaplane_read_cache", default=None)
READ_CACHE_MAX = 10_000  # results per statement; past it the statement's results start over


class _Compiled(NamedTuple):
    sql: str
    names: tuple[str, ...]  # bound parameters, in the order of a positional paramstyle
    positional: bool
    keys: tuple[str, ...]  # result columns
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # (column index, processor)


class Prepared:
    """A SELECT, or a DML statement (with RETURNING for rows back)."""

    def __init__(self, statement: ReturnsRows):
        self.statement = statement
        self.tables = tables_read(statement)
        # Only a SELECT whose every change the counters see: any other result could go stale.
        self.cacheable = isinstance(statement, Select) and watches(statement)
        self._compiled: dict[str, _Compiled] = {}
        # The dialect seen last and its compiled form: a process talks to one database, so this
        # is a hit on every call but the first (the dict above still serves a second dialect).
        self._last: tuple[Dialect | None, _Compiled | None] = (None, None)

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = self.statement.compile(dialect=dialect)
        for name, bind in compiled.binds.items():
            if bind.type.dialect_impl(dialect).bind_processor(dialect) is not None:
                raise TypeError(f"parameter {name} needs bind processing: run this statement with Connection.execute")
        columns = list(self.statement.exported_columns)
        processors = []
        for index, column in enumerate(columns):
            processor = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if processor is not None:
                processors.append((index, processor))
        names = tuple(compiled.positiontup or compiled.binds)
        result = _Compiled(compiled.string, names, compiled.positional, tuple(c.key for c in columns),
                           tuple(processors))
        self._compiled[dialect.name] = result
        return result

    def _run(self, conn: Connection, params: dict[str, Any], fetch):
        dialect = conn.dialect
        last_dialect, compiled = self._last
        if last_dialect is not dialect:
            compiled = self._compiled.get(dialect.name) or self._compile(dialect)
            self._last = (dialect, compiled)
        values = tuple([params[name] for name in compiled.names]) if compiled.positional else params
        # The driver's own cursor: the pool's proxy (`conn.connection`) would only forward the call.
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(compiled.sql, values)
            return compiled, fetch(cursor)
        except conn.dialect.loaded_dbapi.Error as exc:
            # Raise what Connection.execute raises (IntegrityError, OperationalError, ...), so a
            # caller handles one kind of error whichever way its statement ran: retry_on_deadlock
            # reads a deadlock's SQLSTATE from an OperationalError, callers catch IntegrityError.
            lost = broke_connection(conn, exc)
            if lost:
                # SQLAlchemy did not run this, so it would not know: invalidate the connection
                # (the pool drops it instead of failing to roll it back, with a logged traceback).
                conn.invalidate()
            raise sa.exc.DBAPIError.instance(compiled.sql, values, exc, conn.dialect.loaded_dbapi.Error,
                                             connection_invalidated=lost) from exc
        finally:
            cursor.close()

    def all(self, conn: Connection, **params: Any) -> list[dict[str, Any]]:
        cache = self._results()
        if cache is not None:
            key = ("all", *params.items())
            rows = cache.get(key)
            if rows is None:
                rows = cache[key] = self._all(conn, params)
                _bound(cache)
            return [dict(row) for row in rows]  # copies: a caller may change what it gets
        return self._all(conn, params)

    def _all(self, conn: Connection, params: dict[str, Any]) -> list[dict[str, Any]]:
        compiled, rows = self._run(conn, params, _fetchall)
        return [_mapping(compiled, row) for row in rows]

    def first(self, conn: Connection, **params: Any) -> dict[str, Any] | None:
        cache = self._results()
        if cache is not None:
            key = ("first", *params.items())
            if key in cache:
                row = cache[key]
            else:
                row = cache[key] = self._first(conn, params)
                _bound(cache)
            return None if row is None else dict(row)
        return self._first(conn, params)

    def first_built(self, conn: Connection, build: Callable[[dict[str, Any]], Any], **params: Any) -> Any:
        """`build(row)` of `first()`'s row, or None when there is none. Inside the read cache the
        built object itself is kept while the tables are unchanged, and handed out again: no
        copy of the row, no build. So `build` must depend on the row alone, always be the same
        callable (it is part of the key), and return an object that no caller changes."""
        cache = self._results()
        if cache is None:
            row = self._first(conn, params)
            return None if row is None else build(row)
        key = (build, *params.items())
        if key in cache:
            return cache[key]
        row = self._first(conn, params)  # the built object is what is kept: not the row too
        built = cache[key] = None if row is None else build(row)
        _bound(cache)
        return built

    def _results(self) -> dict | None:
        """This statement's results in the read cache, or None outside it (or not cacheable)."""
        cache = READ_CACHE.get() if self.cacheable else None
        if cache is None:
            return None
        results = cache.get(self)
        if results is None:
            results = cache[self] = {}
        return results

    def _first(self, conn: Connection, params: dict[str, Any]) -> dict[str, Any] | None:
        compiled, row = self._run(conn, params, _fetchone)
        return None if row is None else _mapping(compiled, row)

    def rowcount(self, conn: Connection, **params: Any) -> int:
        """Run a DML statement without RETURNING: how many rows it changed."""
        return self._run(conn, params, _rowcount)[1]


def _bound(cache: dict) -> None:
    if len(cache) > READ_CACHE_MAX:
        cache.clear()


def _fetchall(cursor):
    return cursor.fetchall()


def _fetchone(cursor):
    return cursor.fetchone()


def _rowcount(cursor):
    return cursor.rowcount


def _mapping(compiled: _Compiled, row) -> dict[str, Any]:
    mapping = dict(zip(compiled.keys, row))
    keys = compiled.keys
    for index, processor in compiled.processors:
        mapping[keys[index]] = processor(row[index])
    return mapping
