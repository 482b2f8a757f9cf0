"""The nonce file beside an embedded SQLite database (store.nonce_file): fresh, used, expired,
purged, imported from the database's table, shared by processes, damaged and full.
tests/e2e/test_replicas.py covers it end to end across two server processes."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from otaplane.server import prepare
from otaplane.services.container import Services
from otaplane.settings import Settings
from otaplane.store import nonce_file
from otaplane.store.nonce_file import NonceFile, NonceFileFull
from otaplane.store.nonces import NonceWriter, digest
from otaplane.store.schema import signature_nonces

TTL_MS = 900_000


@pytest.fixture()
def memory(tmp_path):
    nonces = NonceFile(tmp_path / "otaplane.db.nonces")
    yield nonces
    nonces.close()


def test_a_nonce_is_fresh_once_per_key(memory):
    nonce = uuid.uuid4().hex
    assert memory.remember("LTAIa", nonce, 1_000, TTL_MS)
    assert not memory.remember("LTAIa", nonce, 2_000, TTL_MS)
    assert memory.remember("LTAIb", nonce, 2_000, TTL_MS)  # another key's nonce is another nonce
    assert memory.in_use() == 2


def test_a_nonce_is_used_until_its_expiry_then_taken_over(memory):
    assert memory.remember("k", "n", 1_000, 100)
    assert not memory.remember("k", "n", 1_100, 100)  # expires at 1_100: still used then
    assert memory.remember("k", "n", 1_101, 100)  # taken over, now used until 1_201
    assert not memory.remember("k", "n", 1_201, 100)


def test_purge_drops_only_the_expired(memory):
    for i in range(3_000):  # more than one purge chunk
        memory.remember("k", f"old-{i}", 1_000, 100)
    memory.remember("k", "young", 1_000, 10_000)
    assert memory.purge_expired(2_000) == 3_000
    assert memory.in_use() == 1
    assert not memory.remember("k", "young", 2_000, 100)
    assert memory.remember("k", "old-7", 2_000, 100)


def test_purge_reads_a_bounded_slice_per_call_and_wraps_around(memory):
    for i in range(1_000):
        memory.remember("k", f"old-{i}", 1_000, 100)
    dropped = [memory.purge_expired(2_000, budget=300) for _ in range(4)]
    assert dropped[:3] == [300, 300, 300] and sum(dropped) == 1_000
    assert memory.in_use() == 0 and memory.purge_expired(2_000, budget=300) == 0
    memory.remember("k", "new", 3_000, 100)
    assert memory.purge_expired(4_000, budget=300) == 1  # started over from the beginning


def test_imported_table_rows_stay_used(memory):
    rows = [(digest("k", "from-table"), 5_000), (digest("k", "expired"), 500)]
    assert memory.import_rows(rows) == 2
    assert not memory.remember("k", "from-table", 1_000, TTL_MS)
    assert memory.remember("k", "expired", 1_000, TTL_MS)


def test_prepare_moves_the_tables_nonces_into_the_file(tmp_path):
    """A server of an older version kept its nonces in SQLite: after an upgrade they stay used."""
    services = Services.build(Settings(data_dir=tmp_path))
    try:
        assert isinstance(services.nonces, NonceFile)
        services.db.upgrade()
        with services.db.begin() as conn:
            conn.execute(sa.insert(signature_nonces), [
                {"digest": digest("LTAIold", "seen-before"), "expires_ms": 2**62},
            ])
        prepare(services)
        assert not services.nonces.remember("LTAIold", "seen-before", 1_000, TTL_MS)
        with services.db.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(signature_nonces)).scalar() == 0
    finally:
        services.close()


def test_postgresql_keeps_the_database_writer():
    from types import SimpleNamespace

    from otaplane.services.container import _nonce_memory

    assert isinstance(_nonce_memory(SimpleNamespace(is_sqlite=False, sqlite_path=None)), NonceWriter)


def _remember_all(path: str, nonces: list[str], start, results) -> None:
    memory = NonceFile(Path(path))
    start.wait()
    results.put(sum(memory.remember("LTAIrace", nonce, 1_000, TTL_MS) for nonce in nonces))


def test_two_processes_racing_with_the_same_nonces_accept_each_once(tmp_path):
    nonces = [uuid.uuid4().hex for _ in range(3_000)]
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_remember_all, args=(str(tmp_path / "race.nonces"), nonces, start, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    start.set()
    accepted = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert sum(accepted) == len(nonces)


def test_a_forked_child_opens_its_own_handle(memory):
    assert memory.remember("k", "parent", 1_000, TTL_MS)
    pid = os.fork()
    if pid == 0:  # the child: the parent's nonce is used, its own is fresh
        os._exit(0 if not memory.remember("k", "parent", 1_000, TTL_MS)
                 and memory.remember("k", "child", 1_000, TTL_MS) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not memory.remember("k", "child", 1_000, TTL_MS)


def test_a_damaged_file_is_moved_aside_and_started_over(tmp_path, caplog):
    path = tmp_path / "otaplane.db.nonces"
    path.write_bytes(b"not an LMDB file" * 1000)
    memory = NonceFile(path)
    try:
        assert memory.remember("k", "n", 1_000, TTL_MS)
    finally:
        memory.close()
    assert [p.name for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert "moved to" in caplog.text


def test_a_full_file_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(nonce_file, "MAP_SIZE", 64 * 1024)
    memory = NonceFile(tmp_path / "small.nonces")
    try:
        with pytest.raises(NonceFileFull):
            for i in range(10_000):
                memory.remember("k", f"n{i}", 1_000, TTL_MS)
    finally:
        memory.close()
