"""Signature nonce memory, in the database so that every replica sees every nonce."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from otaplane.store.schema import signature_nonces as nonces


def _insert_new(dialect):
    return (
        dialect.insert(nonces)
        .values(access_key_id=sa.bindparam("p_key_id"), nonce=sa.bindparam("p_nonce"),
                expires_ms=sa.bindparam("p_expires_ms"))
        .on_conflict_do_nothing()
        .returning(nonces.c.nonce)  # rowcount is not reliable here with psycopg 3
    )


# Built once: this runs on every signed request, and building a statement costs more than running it.
# (Parameter names differ from column names: SQLAlchemy reserves those in INSERT/UPDATE.)
_INSERT_NEW = {"postgresql": _insert_new(postgresql), "sqlite": _insert_new(sqlite)}
_TAKE_OVER_EXPIRED = (
    sa.update(nonces)
    .where(nonces.c.access_key_id == sa.bindparam("p_key_id"), nonces.c.nonce == sa.bindparam("p_nonce"),
           nonces.c.expires_ms < sa.bindparam("p_now_ms"))
    .values(expires_ms=sa.bindparam("p_expires_ms"))
    .returning(nonces.c.nonce)
)


def remember(conn: Connection, key_id: str, nonce: str, now_ms: int, ttl_ms: int) -> bool:
    """Record a nonce; False when it was already used within its lifetime.

    The primary key makes the check atomic across processes: of two requests racing with one
    nonce, only one inserts it.
    """
    insert = _INSERT_NEW["postgresql" if conn.dialect.name == "postgresql" else "sqlite"]
    values = {"p_key_id": key_id, "p_nonce": nonce, "p_expires_ms": now_ms + ttl_ms}
    if conn.execute(insert, values).first() is not None:
        return True
    # Used before: accept again only once the old record has expired (taken over atomically).
    taken_over = conn.execute(_TAKE_OVER_EXPIRED, {**values, "p_now_ms": now_ms}).first()
    return taken_over is not None


def purge_expired(conn: Connection, now_ms: int) -> int:
    return conn.execute(sa.delete(nonces).where(nonces.c.expires_ms < now_ms)).rowcount
