"""SQLite's loop reads reuse a Prepared SELECT's result until a table it reads changes
(store.prepared.READ_CACHE; store.database._ReadTurn checks the tables' change counters,
store.read_versions, when PRAGMA data_version moves)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import sqlalchemy as sa

from otaplane.store import Database, read_versions
from otaplane.store.prepared import Prepared
from otaplane.store.schema import accounts, channel_nodes, devices, instances, products, signature_nonces

# A watched table (store.read_versions.WATCHED), read by "digest" (an account's id).
EXPIRY_OF = Prepared(sa.select(accounts.c.created_ms.label("expires_ms")).where(accounts.c.id == sa.bindparam("p_digest")))


@pytest.fixture()
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'cache.db'}")
    database.upgrade()
    with database.begin() as conn:
        conn.execute(sa.insert(accounts).values(id=1, name="cached", created_ms=100))
    yield database
    database.dispose()


class Statements:
    """SELECTs the loop connection runs (sqlite3's trace callback)."""

    def __init__(self, db: Database):
        with db.loop_reads() as conn:
            conn.connection.driver_connection.set_trace_callback(self._seen)
        self.selects = 0

    def _seen(self, sql: str) -> None:
        if sql.lstrip().upper().startswith("SELECT") and f"FROM {accounts.name}" in sql:
            self.selects += 1


def _expiry(db: Database, digest: int = 1):
    with db.loop_reads() as conn:
        row = EXPIRY_OF.first(conn, p_digest=digest)
        return row if row is None else row["expires_ms"]


def _set_expiry(db: Database, expires_ms: int) -> None:
    with db.begin() as conn:
        conn.execute(sa.update(accounts).values(created_ms=expires_ms))


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
                  f"c.execute('UPDATE {accounts.name} SET created_ms = 300'); c.commit()")
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


# --- per-table change counters -----------------------------------------------------------------
PRODUCT_COUNT = Prepared(sa.select(sa.func.count().label("n")).select_from(products))
NONCE_COUNT = Prepared(sa.select(sa.func.count().label("n")).select_from(signature_nonces))


def _counts(db: Database) -> tuple:
    with db.loop_reads() as conn:
        return EXPIRY_OF.first(conn, p_digest=1)["expires_ms"], PRODUCT_COUNT.all(conn)[0]


def _commit(db: Database, statement) -> None:
    with db.begin() as conn:
        conn.execute(statement)


def test_a_commit_to_a_table_no_cached_read_reads_keeps_the_cache(db):
    """A heartbeat (channel_nodes) or a nonce moves data_version; the cached reads stay."""
    statements = Statements(db)

    async def scenario():
        assert _expiry(db) == 100
        await asyncio.sleep(0)
        _commit(db, sa.insert(channel_nodes).values(node_id="n1", heartbeat_ms=1))
        _commit(db, sa.insert(signature_nonces).values(digest=7, expires_ms=1))
        await asyncio.sleep(0)
        assert _expiry(db) == 100

    asyncio.run(scenario())
    assert statements.selects == 1


def test_a_commit_drops_only_the_results_of_statements_that_read_the_changed_table(db):
    statements = Statements(db)

    async def scenario():
        assert _counts(db) == (100, {"n": 0})
        await asyncio.sleep(0)
        with db.begin() as conn:  # products: read by PRODUCT_COUNT, not by EXPIRY_OF
            instance = conn.execute(sa.insert(instances).values(
                instance_id="iot-1", account_id=1, is_default=True, created_ms=1).returning(instances.c.id)).scalar()
            conn.execute(sa.insert(products).values(
                instance_pk=instance, product_key="a1pk", product_name="p", product_secret_encrypted="x",
                node_type=0, aliyun_commodity_code="iothub", auth_type="secret", id2=False,
                status="DEVELOPMENT_STATUS", created_ms=1, modified_ms=1))
        await asyncio.sleep(0)
        assert _counts(db) == (100, {"n": 1})

    asyncio.run(scenario())
    assert statements.selects == 1  # accounts read once: the products insert left it cached


def test_a_statement_over_a_table_without_counters_is_never_cached(db):
    assert not NONCE_COUNT.cacheable
    assert EXPIRY_OF.cacheable and PRODUCT_COUNT.cacheable

    async def scenario():
        with db.loop_reads() as conn:
            assert NONCE_COUNT.all(conn)[0] == {"n": 0}
        await asyncio.sleep(0)
        _commit(db, sa.insert(signature_nonces).values(digest=7, expires_ms=1))
        await asyncio.sleep(0)
        with db.loop_reads() as conn:
            assert NONCE_COUNT.all(conn)[0] == {"n": 1}

    asyncio.run(scenario())


def test_the_hot_reads_are_cacheable():
    from otaplane.store import accounts as account_store
    from otaplane.store import firmware
    from otaplane.store import products as product_store

    assert firmware._GET.cacheable and product_store._GET.cacheable and account_store._KEY_BY_ID.cacheable


def test_counters_come_back_when_a_migration_rebuilds_a_watched_table(db):
    """Alembic's batch mode on SQLite copies a table and drops the old one, triggers and all."""
    with db.begin() as conn:
        conn.exec_driver_sql(f"DROP TRIGGER {read_versions.TABLE}_accounts_update")
    db.upgrade()
    before = _version_of(db, "accounts")
    _set_expiry(db, 600)
    assert _version_of(db, "accounts") == before + 1


def _version_of(db: Database, table: str) -> int:
    with db.begin() as conn:
        return conn.exec_driver_sql(
            f"SELECT version FROM {read_versions.TABLE} WHERE table_name = ?", (table,)).scalar_one()


def test_a_schema_change_forgets_everything(db):
    statements = Statements(db)

    async def scenario():
        assert _expiry(db) == 100
        await asyncio.sleep(0)
        with db.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE unrelated (x INTEGER)")
        await asyncio.sleep(0)
        assert _expiry(db) == 100

    asyncio.run(scenario())
    assert statements.selects == 2


def test_a_database_without_counters_forgets_everything_on_any_commit(tmp_path):
    """A file migrated by an older otaplane that has not run this one's upgrade yet."""
    database = Database(f"sqlite:///{tmp_path / 'old.db'}")
    database.upgrade()
    with database.begin() as conn:
        for (trigger,) in conn.exec_driver_sql(
                f"SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '{read_versions.TABLE}%'").all():
            conn.exec_driver_sql(f"DROP TRIGGER {trigger}")
        conn.exec_driver_sql(f"DROP TABLE {read_versions.TABLE}")
        conn.execute(sa.insert(accounts).values(id=1, name="cached", created_ms=100))
    statements = Statements(database)

    async def scenario():
        assert _expiry(database) == 100
        await asyncio.sleep(0)
        _commit(database, sa.insert(channel_nodes).values(node_id="n1", heartbeat_ms=1))
        await asyncio.sleep(0)
        assert _expiry(database) == 100

    try:
        asyncio.run(scenario())
    finally:
        database.dispose()
    assert statements.selects == 2


# --- devices: watched for rows and their product only --------------------------------------------
DEVICE_COUNT = Prepared(sa.select(sa.func.count().label("n")).select_from(devices)
                        .where(devices.c.product_id == sa.bindparam("p_product")))
LAST_SEEN = Prepared(sa.select(devices.c.last_seen_ms).where(devices.c.id == sa.bindparam("p_device")))


def _product_with_device(db: Database) -> tuple[int, int]:
    with db.begin() as conn:
        instance = conn.execute(sa.insert(instances).values(
            instance_id="iot-1", account_id=1, is_default=True, created_ms=1).returning(instances.c.id)).scalar()
        product = conn.execute(sa.insert(products).values(
            instance_pk=instance, product_key="a1pk", product_name="p", product_secret_encrypted="x",
            node_type=0, aliyun_commodity_code="iothub", auth_type="secret", id2=False,
            status="DEVELOPMENT_STATUS", created_ms=1, modified_ms=1).returning(products.c.id)).scalar()
        device = conn.execute(sa.insert(devices).values(
            iot_id="d1", product_id=product, device_name="d1", device_secret_encrypted="x",
            created_ms=1, modified_ms=1).returning(devices.c.id)).scalar()
    return product, device


def test_a_device_count_survives_heartbeats_but_not_a_new_device(db):
    product, _device = _product_with_device(db)
    counted = []

    def count():
        with db.loop_reads() as conn:
            conn.connection.driver_connection.set_trace_callback(
                lambda sql: counted.append(sql) if "count(*)" in sql else None)
            return DEVICE_COUNT.all(conn, p_product=product)[0]["n"]

    async def scenario():
        assert count() == 1
        await asyncio.sleep(0)
        _commit(db, sa.update(devices).values(online=True, last_seen_ms=5, ip_address="10.0.0.1"))
        await asyncio.sleep(0)
        assert count() == 1
        assert len(counted) == 1  # the update of columns the count does not read left it cached
        _commit(db, sa.insert(devices).values(iot_id="d2", product_id=product, device_name="d2",
                                              device_secret_encrypted="x", created_ms=1, modified_ms=1))
        await asyncio.sleep(0)
        assert count() == 2

    asyncio.run(scenario())


def test_a_statement_reading_an_unwatched_column_is_never_cached():
    assert DEVICE_COUNT.cacheable
    assert not LAST_SEEN.cacheable  # last_seen_ms changes without moving the devices counter


def test_upgrade_replaces_a_trigger_defined_otherwise(db):
    """An older otaplane's trigger (here: every UPDATE of devices) is redefined at upgrade."""
    name = f"{read_versions.TABLE}_devices_update"
    with db.begin() as conn:
        conn.exec_driver_sql(f"DROP TRIGGER {name}")
        conn.exec_driver_sql(f"CREATE TRIGGER {name} AFTER UPDATE ON devices BEGIN SELECT 1; END")
    db.upgrade()
    with db.begin() as conn:
        sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).scalar_one()
    assert sql == read_versions._triggers()[name]
    assert "UPDATE OF id, product_id ON devices" in sql
