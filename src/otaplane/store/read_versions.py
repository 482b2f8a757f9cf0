"""Per-table change counters for SQLite's read cache (store.prepared.READ_CACHE).

`PRAGMA data_version` only says that something was committed: on its own, a channel heartbeat
or a device's progress report would throw away every cached package, product and key. Triggers
count the INSERTs, UPDATEs and DELETEs of each watched table, in the writer's own transaction
and whichever process or tool writes (the CLI, another server on the same file, the sqlite3
shell). A read turn that finds data_version moved reads the counters and forgets only the
results of statements that read a table whose counter moved (store.database._ReadTurn).

A statement that reads any table not watched here is never cached (Prepared.cacheable). The
counters are plumbing, not schema: `ensure(conn)` (re)creates them after every migration run,
so a migration that rebuilds a watched table (Alembic's batch mode on SQLite drops and copies
it, and its triggers with it) cannot leave the cache blind. PostgreSQL has no read cache and no
counters.
"""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa
from sqlalchemy.sql import visitors

# The tables of the cached reads: packages (QueryOTAFirmware), products and their device count
# (QueryProduct), AccessKeys and their accounts (every signed request).
WATCHED_TABLES = frozenset({"firmware", "ota_modules", "products", "devices", "access_keys", "accounts"})

TABLE = "read_cache_versions"
SCHEMA = "<schema>"  # PRAGMA schema_version, under a name no table has: a DDL change forgets all
_READ = f"SELECT table_name, version FROM {TABLE}"


def tables_read(statement: sa.sql.ClauseElement) -> frozenset[str]:
    """Every table a statement reads, its subqueries' included."""
    return frozenset(element.name for element in visitors.iterate(statement) if isinstance(element, sa.Table))


def read(driver: sqlite3.Connection) -> dict[str, int] | None:
    """{table: counter, SCHEMA: schema_version} as the driver's current snapshot sees them;
    None when the database has no counters (not migrated by this version yet)."""
    try:
        versions = dict(driver.execute(_READ).fetchall())
    except sqlite3.OperationalError:
        return None
    versions[SCHEMA] = driver.execute("PRAGMA schema_version").fetchone()[0]
    return versions


def ensure(conn: sa.Connection) -> None:
    """Create the counters and their triggers where missing (SQLite only; idempotent)."""
    conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {TABLE} "
                         "(table_name VARCHAR(64) PRIMARY KEY, version BIGINT NOT NULL)")
    for table in sorted(WATCHED_TABLES):
        conn.exec_driver_sql(f"INSERT OR IGNORE INTO {TABLE} (table_name, version) VALUES ('{table}', 0)")
        for operation in ("INSERT", "UPDATE", "DELETE"):
            conn.exec_driver_sql(
                f"CREATE TRIGGER IF NOT EXISTS {TABLE}_{table}_{operation.lower()} AFTER {operation} ON {table} "
                f"BEGIN UPDATE {TABLE} SET version = version + 1 WHERE table_name = '{table}'; END"
            )
