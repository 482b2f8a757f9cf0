"""Objects handed out by GenerateOTAUploadURL, and the ones nobody adopted in time."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from otaplane.store.schema import firmware, firmware_files, ota_uploads as uploads


def record(conn: Connection, blob_key: str, instance_pk: int, now_ms: int) -> None:
    conn.execute(sa.insert(uploads).values(blob_key=blob_key, instance_pk=instance_pk, created_ms=now_ms))


def owned_by(conn: Connection, blob_key: str, instance_pk: int) -> bool:
    """Whether the key is the instance's upload (withdrawn or not: `lock` tells adoptable)."""
    return conn.execute(
        sa.select(uploads.c.blob_key).where(uploads.c.blob_key == blob_key, uploads.c.instance_pk == instance_pk)
    ).first() is not None


def lock(conn: Connection, blob_key: str, instance_pk: int | None = None) -> bool:
    """Hold the upload's row against every other adopter and collector until the transaction
    ends (run it first: on SQLite a write begins the transaction and takes the database's write
    lock; on PostgreSQL it takes the row's lock, and a later statement sees what a transaction
    that held it committed). With `instance_pk` (an adoption): False when there is no such row
    of that instance, or it is withdrawn; without: False when there is no row."""
    statement = sa.update(uploads).where(uploads.c.blob_key == blob_key).values(created_ms=uploads.c.created_ms)
    if instance_pk is not None:
        statement = statement.where(uploads.c.instance_pk == instance_pk, uploads.c.withdrawn_ms.is_(None))
    return conn.execute(statement).rowcount > 0


def withdrawn(conn: Connection, blob_key: str, instance_pk: int) -> bool:
    """Whether the instance's upload of the key was withdrawn (its package deleted)."""
    return conn.execute(
        sa.select(uploads.c.blob_key).where(uploads.c.blob_key == blob_key, uploads.c.instance_pk == instance_pk,
                                            uploads.c.withdrawn_ms.is_not(None))
    ).first() is not None


def withdraw(conn: Connection, blob_key: str, now_ms: int) -> None:
    """No package may adopt the key any more; the record stays for the collector."""
    conn.execute(sa.update(uploads).where(uploads.c.blob_key == blob_key).values(withdrawn_ms=now_ms))


def is_referenced(conn: Connection, blob_key: str) -> bool:
    """True while any package (single- or multi-file) still points at the object."""
    single = sa.select(firmware.c.id).where(firmware.c.blob_key == blob_key).limit(1)
    multi = sa.select(firmware_files.c.id).where(firmware_files.c.blob_key == blob_key).limit(1)
    return conn.execute(single).first() is not None or conn.execute(multi).first() is not None


def abandoned(conn: Connection, older_than_ms: int, limit: int = 500) -> list[str]:
    """Keys uploaded before the cut-off that no package refers to."""
    single = sa.select(firmware.c.id).where(firmware.c.blob_key == uploads.c.blob_key)
    multi = sa.select(firmware_files.c.id).where(firmware_files.c.blob_key == uploads.c.blob_key)
    rows = conn.execute(
        sa.select(uploads.c.blob_key)
        .where(uploads.c.created_ms < older_than_ms, ~sa.exists(single), ~sa.exists(multi))
        .limit(limit)
    )
    return [row.blob_key for row in rows]


def forget(conn: Connection, blob_key: str, created_before_ms: int) -> dict | None:
    """Delete the upload's record if made before the cut-off: what it held ({instance_pk,
    created_ms}), None if there is none or it is younger."""
    row = conn.execute(sa.delete(uploads)
                       .where(uploads.c.blob_key == blob_key, uploads.c.created_ms < created_before_ms)
                       .returning(uploads.c.instance_pk, uploads.c.created_ms)).first()
    return None if row is None else dict(row._mapping)
