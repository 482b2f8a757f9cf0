"""Per-table change counters for SQLite's read cache (store.prepared.READ_CACHE).

`PRAGMA data_version` only says that something was committed: on its own, a channel heartbeat
or a device's progress report would throw away every cached package, product and key. Triggers
count the INSERTs, UPDATEs and DELETEs of each watched table, in the writer's own transaction
and whichever process or tool writes (the CLI, another server on the same file, the sqlite3
shell). A read turn that finds data_version moved reads the counters and forgets only the
results of statements that read a table whose counter moved (store.database._ReadTurn).

Only a statement that `watches` covers is cached (Prepared.cacheable): every table it reads is
watched and, of a table watched for some columns only, it reads no other column. The counters
are plumbing, not schema: `ensure(conn)` (re)creates them after every migration run, so a
migration that rebuilds a watched table (Alembic's batch mode on SQLite drops and copies it,
and its triggers with it) cannot leave the cache blind. PostgreSQL has no read cache and no
counters.
"""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa
from sqlalchemy.sql import visitors

# The tables of the cached reads: packages (QueryOTAFirmware), products and their device count
# (QueryProduct), AccessKeys and their accounts (every signed request). Value: the columns whose
# UPDATEs count, or None for all. The device count needs rows and their product only, and the
# devices' other columns change at every connect, heartbeat and report.
WATCHED: dict[str, frozenset[str] | None] = {
    "firmware": None,
    "ota_modules": None,
    "products": None,
    "access_keys": None,
    "accounts": None,
    "devices": frozenset({"id", "product_id"}),
}

TABLE = "read_cache_versions"
SCHEMA = "<schema>"  # PRAGMA schema_version, under a name no table has: a DDL change forgets all
_READ = f"SELECT table_name, version FROM {TABLE}"
_TRIGGER_PREFIX = f"{TABLE}_"


def tables_read(statement: sa.sql.ClauseElement) -> frozenset[str]:
    """Every table a statement reads, its subqueries' included."""
    return frozenset(element.name for element in visitors.iterate(statement) if isinstance(element, sa.Table))


def watches(statement: sa.sql.ClauseElement) -> bool:
    """True when the counters see every change that could alter the statement's result."""
    for element in visitors.iterate(statement):
        if isinstance(element, sa.Table) and element.name not in WATCHED:
            return False
        if isinstance(element, sa.Column) and isinstance(element.table, sa.Table):
            columns = WATCHED.get(element.table.name)
            if columns is not None and element.name not in columns:
                return False
    return True


def read(driver: sqlite3.Connection) -> dict[str, int] | None:
    """{table: counter, SCHEMA: schema_version} as the driver's current snapshot sees them;
    None when the database has no counters (not migrated by this version yet)."""
    try:
        versions = dict(driver.execute(_READ).fetchall())
    except sqlite3.OperationalError:
        return None
    versions[SCHEMA] = driver.execute("PRAGMA schema_version").fetchone()[0]
    return versions


def _triggers() -> dict[str, str]:
    """{name: CREATE TRIGGER statement} as SQLite keeps them in sqlite_master."""
    wanted = {}
    for table, columns in sorted(WATCHED.items()):
        for operation in ("INSERT", "UPDATE", "DELETE"):
            event = operation
            if operation == "UPDATE" and columns is not None:
                event = f"UPDATE OF {', '.join(sorted(columns))}"
            name = f"{_TRIGGER_PREFIX}{table}_{operation.lower()}"
            wanted[name] = (f"CREATE TRIGGER {name} AFTER {event} ON {table} "
                            f"BEGIN UPDATE {TABLE} SET version = version + 1 WHERE table_name = '{table}'; END")
    return wanted


def ensure(conn: sa.Connection) -> None:
    """Create the counters and their triggers where missing, and replace a trigger that an
    older otaplane defined otherwise (SQLite only; idempotent)."""
    conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {TABLE} "
                         "(table_name VARCHAR(64) PRIMARY KEY, version BIGINT NOT NULL)")
    for table in sorted(WATCHED):
        conn.exec_driver_sql(f"INSERT OR IGNORE INTO {TABLE} (table_name, version) VALUES ('{table}', 0)")
    existing = dict(conn.exec_driver_sql(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE ?", (_TRIGGER_PREFIX + "%",)).all())
    wanted = _triggers()
    for name, sql in existing.items():
        if wanted.get(name) != sql:
            conn.exec_driver_sql(f"DROP TRIGGER {name}")
    for name, sql in wanted.items():
        if existing.get(name) != sql:
            conn.exec_driver_sql(sql)
