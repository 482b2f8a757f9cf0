"""Replay protection in the store: remember_many and the group-committing NonceWriter (SQLite;
tests/e2e/test_replicas.py covers both backends across processes), and the event loop's reads."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import sqlalchemy as sa

from otaplane.store import Database
from otaplane.store import nonces
from otaplane.store.nonces import NonceUse, NonceWriter, digest, remember_many
from otaplane.store.schema import signature_nonces

TTL_MS = 900_000


@pytest.fixture()
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'nonces.db'}")
    database.upgrade()
    yield database
    database.dispose()


def _nonce() -> str:
    return uuid.uuid4().hex


def _recorded(db: Database) -> set[int]:
    with db.connect() as conn:
        return {r.digest for r in conn.execute(sa.select(signature_nonces))}


def _digests(pairs) -> set[int]:
    return {digest(key_id, nonce) for key_id, nonce in pairs}


@pytest.mark.parametrize("expect_fresh", [False, True])
def test_remember_many_new_used_and_repeated(db, expect_fresh):
    a, b = _nonce(), _nonce()
    with db.connect() as conn, conn.begin():
        assert remember_many(conn, [NonceUse("k", a, 1000, TTL_MS)]) == [True]
    uses = [NonceUse("k", b, 2000, TTL_MS), NonceUse("k", b, 2000, TTL_MS), NonceUse("other", b, 2000, TTL_MS)]
    with db.connect() as conn, conn.begin():
        assert remember_many(conn, uses, expect_fresh=expect_fresh) == [True, False, True]
    with db.connect() as conn:
        if expect_fresh:
            with pytest.raises(nonces.SomeNonceUsed), conn.begin():
                remember_many(conn, [NonceUse("k", a, 3000, TTL_MS), NonceUse("k", _nonce(), 3000, TTL_MS)],
                              expect_fresh=True)
            conn.rollback()
        fresh = _nonce()
        with conn.begin():
            assert remember_many(conn, [NonceUse("k", a, 3000, TTL_MS), NonceUse("k", fresh, 3000, TTL_MS)]) == [
                False, True]
    assert _digests({("k", a), ("k", b), ("other", b), ("k", fresh)}) == _recorded(db)


def test_the_digest_separates_key_and_nonce():
    """Length-prefixed: moving characters between the key and the nonce changes the digest."""
    assert digest("ab", "c") != digest("a", "bc")
    assert digest("k", "n") == digest("k", "n")
    assert -2**63 <= digest("k", "n" * 128) < 2**63  # fits a signed BIGINT


def test_on_sqlite_the_digest_is_the_rowid(db):
    """INTEGER PRIMARY KEY: no separate primary-key index to write on every insert."""
    with db.connect() as conn:
        indexes = conn.exec_driver_sql("PRAGMA index_list('signature_nonce_digests')").all()
    assert [row[1] for row in indexes] == ["ix_signature_nonce_digests_expires_ms"]


def test_an_expired_nonce_is_taken_over(db):
    n = _nonce()
    with db.connect() as conn, conn.begin():
        assert remember_many(conn, [NonceUse("k", n, 1000, 10)]) == [True]
    with db.connect() as conn, conn.begin():
        assert remember_many(conn, [NonceUse("k", n, 1005, 10)]) == [False]  # still within its lifetime
    with db.connect() as conn, conn.begin():
        assert remember_many(conn, [NonceUse("k", n, 2000, 10)]) == [True]  # expired: used again
    with db.connect() as conn, conn.begin():
        assert remember_many(conn, [NonceUse("k", n, 2001, 10)]) == [False]


def test_writer_group_commits_and_answers_each_request(db):
    writer = NonceWriter(db)
    used = _nonce()

    async def scenario():
        assert await writer.remember("k", used, 1000, TTL_MS) is True
        fresh = [_nonce() for _ in range(50)]
        results = await asyncio.gather(
            *(writer.remember("k", n, 2000, TTL_MS) for n in fresh),
            writer.remember("k", used, 2000, TTL_MS),  # a replay among new ones
            writer.remember("k", fresh[0], 2000, TTL_MS),  # repeated within the batch
        )
        assert results == [True] * 50 + [False, False]
        return fresh

    try:
        fresh = asyncio.run(scenario())
    finally:
        writer.close()
    # Committed, and seen by another connection (another replica would see them the same way).
    assert _digests({("k", used)} | {("k", n) for n in fresh}) == _recorded(db)


def test_writer_refuses_once_closed(db):
    writer = NonceWriter(db)

    async def scenario():
        assert await writer.remember("k", _nonce(), 1000, TTL_MS) is True
        writer.close()
        with pytest.raises(RuntimeError):
            await writer.remember("k", _nonce(), 1000, TTL_MS)

    asyncio.run(scenario())


def test_a_failed_batch_fails_its_requests_and_the_writer_goes_on(db, monkeypatch):
    writer = NonceWriter(db)
    original = nonces.remember_many

    def broken(conn, uses, expect_fresh=False):
        raise sa.exc.OperationalError("INSERT", {}, Exception("disk I/O error"))

    async def scenario():
        monkeypatch.setattr(nonces, "remember_many", broken)
        with pytest.raises(sa.exc.OperationalError):
            await writer.remember("k", _nonce(), 1000, TTL_MS)
        monkeypatch.setattr(nonces, "remember_many", original)
        assert await writer.remember("k", _nonce(), 1000, TTL_MS) is True

    try:
        asyncio.run(scenario())
    finally:
        writer.close()


def test_loop_reads_see_writes_committed_before_the_turn(db):
    """The reads of one loop turn share a snapshot; the next turn sees what was committed since."""
    with db.begin() as conn:
        conn.execute(sa.insert(signature_nonces).values(digest=1, expires_ms=1))

    def count() -> int:
        with db.loop_reads():
            with db.connect() as conn:
                return conn.execute(sa.select(sa.func.count()).select_from(signature_nonces)).scalar_one()

    async def scenario():
        assert count() == 1
        with db.begin() as conn:  # another connection commits during the turn
            conn.execute(sa.insert(signature_nonces).values(digest=2, expires_ms=1))
        await asyncio.sleep(0)  # next turn
        assert count() == 2

    asyncio.run(scenario())
