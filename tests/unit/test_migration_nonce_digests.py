"""Migration 0006: the nonces in use at the upgrade stay refused as replays afterwards."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from otaplane.store import Database
from otaplane.store import database as database_module
from otaplane.store.nonces import NonceUse, remember_many
from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path, postgres):
    url = postgres.create() if request.param == "postgresql" else f"sqlite:///{tmp_path / 'm.db'}"
    database = Database(url)
    yield database
    database.dispose()


def _migrate(db: Database, revision: str) -> None:
    with db.engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(database_module._MIGRATIONS))  # noqa: SLF001
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def test_nonces_recorded_before_the_upgrade_are_still_used(db):
    _migrate(db, "0005")
    old = sa.table("signature_nonces", sa.column("access_key_id"), sa.column("nonce"), sa.column("expires_ms"))
    with db.engine.begin() as conn:
        conn.execute(sa.insert(old), [
            {"access_key_id": "LTAIkey", "nonce": "n-1", "expires_ms": 5_000},
            {"access_key_id": "LTAIkey", "nonce": "n-2", "expires_ms": 1_000},
            # more than one chunk of the streamed copy
            *({"access_key_id": "LTAIother", "nonce": f"bulk-{i}", "expires_ms": 5_000} for i in range(2_500)),
        ])
    _migrate(db, "head")
    with db.connect() as conn, conn.begin():
        outcomes = remember_many(conn, [
            NonceUse("LTAIkey", "n-1", 2_000, 900_000),  # still in use: a replay
            NonceUse("LTAIkey", "n-2", 2_000, 900_000),  # expired at 1,000: free again
            NonceUse("LTAIkey", "n-3", 2_000, 900_000),  # never seen
        ])
    assert outcomes == [False, True, True]
    with db.connect() as conn, conn.begin():
        assert remember_many(conn, [NonceUse("LTAIother", f"bulk-{i}", 2_000, 900_000) for i in (0, 1_234, 2_499)]) == [
            False, False, False]
    with db.connect() as conn:
        assert not sa.inspect(conn).has_table("signature_nonces")
