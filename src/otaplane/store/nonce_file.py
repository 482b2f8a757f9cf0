"""Signature nonce memory of the embedded setup: an LMDB file next to the SQLite database.

Every signed request records its nonce before its action runs, so this is the one write of
every request. In the SQLite database it was the dearest part of a signed request: each nonce
lands on a random B-tree page, and each commit writes those whole pages to the WAL and again at
the checkpoint, in a writer thread that fought the event loop for the GIL. LMDB (a memory-mapped
B+tree, https://www.symas.com/lmdb) records one in a few microseconds, in the calling thread, with no
thread hand-over: the event loop records it inline.

Processes that share the SQLite file share this one (it sits next to it, `<database>.nonces`):
LMDB's lock file serializes their writes, so of two processes racing with one nonce exactly one
records it. Durability is that of the database's `synchronous=NORMAL`: a process that dies keeps
every nonce it recorded (they are in the shared mapping); a power cut may lose the last ones.
A file that cannot be opened (damaged by a power cut) is moved aside and started over: nonces
only matter for the 15 minutes of the clock window.

One table, digest -> expiry. The server drops what expired by reading it, a bounded slice a second
in a worker thread (server.py): an index by expiry would make every request copy a second B-tree
path.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

import lmdb

from otaplane.store.nonces import digest_bytes

log = logging.getLogger("otaplane.nonces")

# The most the file may grow to (~40 bytes a nonce: about 25 million nonces in use). It is
# reserved address space; the file holds what is used (a sparse file where the system allows).
MAP_SIZE = 1 << 30
PURGE_CHUNK = 2000  # expired nonces dropped per write transaction: the event loop waits for none longer
# Records read per purge_expired() call (5-10 ms); the next call goes on from there. The server
# calls it every second: up to 1.2 million records a minute, beyond the insert rate of any server.
PURGE_SCAN = 20_000
_MS = struct.Struct(">q")  # big-endian: purge_expired compares the packed bytes as times


class NonceFileUnavailable(Exception):
    """The nonce file cannot record a nonce now: no signed request can be checked for replay."""


class NonceFileFull(NonceFileUnavailable):
    """The file holds MAP_SIZE of nonces still in use."""


class NonceFile:
    """`remember(...)` is True once the nonce is recorded as fresh, False when it was used."""

    def __init__(self, path: Path):
        self.path = path
        self._env: lmdb.Environment | None = None
        self._purge_from = b""  # where the next purge_expired() starts reading
        self._open_lock = threading.Lock()
        # An LMDB handle never crosses a fork: a child opens its own (cheaper than a getpid() per call).
        forget = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: setattr(forget(), "_env", None) if forget() else None)

    @classmethod
    def beside(cls, database_path: str) -> NonceFile:
        return cls(Path(f"{database_path}.nonces"))

    def _table(self):
        env = self._env
        if env is None:
            with self._open_lock:
                if self._env is None:
                    self._open()
            env = self._env
        return env, self._nonces

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            env = self._open_env()
        except lmdb.Error as exc:
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            log.warning("nonce file %s cannot be opened (%s); moved to %s, starting a new one", self.path, exc, aside)
            os.replace(self.path, aside)
            env = self._open_env()
        env.reader_check()  # read slots of processes that died
        self._nonces = env.open_db(b"nonces")
        self._env = env

    def _open_env(self) -> lmdb.Environment:
        # sync=False: like the database's synchronous=NORMAL, commits reach the disk with the
        # system's write-back (durable against a process crash, not a power cut).
        # writemap: records go straight into the shared mapping (no write() of each page).
        return lmdb.open(str(self.path), map_size=MAP_SIZE, subdir=False, max_dbs=1, sync=False,
                         metasync=False, writemap=True, readahead=False)

    def remember(self, key_id: str, nonce: str, now_ms: int, ttl_ms: int) -> bool:
        """Record the nonce, atomically across processes; an expired record is taken over."""
        key = digest_bytes(key_id, nonce)
        expires = _MS.pack(now_ms + ttl_ms)
        env, table = self._table()
        try:
            with env.begin(write=True, db=table) as txn:
                if txn.put(key, expires, overwrite=False):
                    return True
                if _MS.unpack(txn.get(key))[0] >= now_ms:  # still in use
                    return False
                txn.put(key, expires)
                return True
        except lmdb.MapFullError:
            raise NonceFileFull(f"{self.path} holds {MAP_SIZE} bytes of nonces in use") from None
        except lmdb.Error as exc:  # e.g. a page damaged by a power cut, in a file that still opens
            raise NonceFileUnavailable(f"{self.path}: {type(exc).__name__}: {exc}") from exc

    def import_rows(self, rows: Iterable[tuple[int, int]]) -> int:
        """Record (digest, expires_ms) rows of the database's nonce table (servers before this
        file kept their nonces there): the nonces they saw stay used. Returns how many."""
        env, table = self._table()
        count = 0
        with env.begin(write=True, db=table) as txn:
            for signed_digest, expires_ms in rows:
                count += txn.put(signed_digest.to_bytes(8, "big", signed=True), _MS.pack(expires_ms), overwrite=False)
        return count

    def purge_expired(self, now_ms: int, budget: int = PURGE_SCAN) -> int:
        """Drop records that expired before now_ms, reading at most `budget` of them: each call
        goes on where the last one stopped and wraps around, so one call holds the GIL briefly
        however big the file (the server calls it every second). Read in one snapshot,
        dropped a chunk per write transaction; a record taken over meanwhile is left alone."""
        env, table = self._table()
        limit = _MS.pack(now_ms)
        expired = []
        with env.begin(db=table) as txn:
            cursor = txn.cursor()
            if not (self._purge_from and cursor.set_range(self._purge_from)) and not cursor.first():
                return 0
            for _ in range(budget):
                key, expires = cursor.item()
                if expires < limit:
                    expired.append(key)
                if not cursor.next():
                    self._purge_from = b""  # the end: the next call starts over
                    break
            else:
                self._purge_from = cursor.key()
        dropped = 0
        for start in range(0, len(expired), PURGE_CHUNK):
            with env.begin(write=True, db=table) as txn:
                for key in expired[start:start + PURGE_CHUNK]:
                    value = txn.get(key)
                    if value is not None and value < limit:
                        dropped += txn.delete(key)
        return dropped

    def in_use(self) -> int:
        env, table = self._table()
        with env.begin(db=table) as txn:
            return txn.stat(table)["entries"]

    def close(self) -> None:
        with self._open_lock:
            if self._env is not None:
                self._env.close()
            self._env = None
