"""Signature nonce memory, in the database so that every replica sees every nonce."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from otaplane.store.schema import signature_nonces as nonces


def remember(conn: Connection, key_id: str, nonce: str, now_ms: int, ttl_ms: int) -> bool:
    """Record a nonce; False when it was already used within its lifetime.

    The primary key makes the check atomic across processes: of two requests racing with one
    nonce, only one inserts it.
    """
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    inserted = conn.execute(
        dialect.insert(nonces)
        .values(access_key_id=key_id, nonce=nonce, expires_ms=now_ms + ttl_ms)
        .on_conflict_do_nothing()
        .returning(nonces.c.nonce)  # rowcount is not reliable here with psycopg 3
    ).first()
    if inserted is not None:
        return True
    # Used before: accept again only once the old record has expired (taken over atomically).
    taken_over = conn.execute(
        sa.update(nonces)
        .where(nonces.c.access_key_id == key_id, nonces.c.nonce == nonce, nonces.c.expires_ms < now_ms)
        .values(expires_ms=now_ms + ttl_ms)
        .returning(nonces.c.nonce)
    ).first()
    return taken_over is not None


def purge_expired(conn: Connection, now_ms: int) -> int:
    return conn.execute(sa.delete(nonces).where(nonces.c.expires_ms < now_ms)).rowcount
