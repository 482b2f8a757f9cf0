"""Queries for firmware packages and their files. Every read is scoped to one instance."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from otaplane.store.database import hold_rows
from otaplane.store.prepared import Prepared
from otaplane.store.schema import firmware, firmware_files, ota_modules, products

# A package row joined with the names clients see next to it.
_DETAIL = (
    sa.select(
        firmware,
        products.c.product_key,
        products.c.product_name,
        ota_modules.c.module_name,
        ota_modules.c.is_default.label("module_is_default"),
    )
    .join(products, products.c.id == firmware.c.product_id)
    .join(ota_modules, ota_modules.c.id == firmware.c.module_id)
)


def insert(conn: Connection, values: dict[str, Any], files: list[dict[str, Any]]) -> int:
    firmware_pk = conn.execute(sa.insert(firmware).values(**values).returning(firmware.c.id)).scalar_one()
    if files:
        conn.execute(
            sa.insert(firmware_files),
            [{**f, "firmware_pk": firmware_pk, "position": i} for i, f in enumerate(files)],
        )
    return firmware_pk


# Built once and run lean (store.prepared): QueryOTAFirmware runs it on every request, and
# building it anew (with its cache key) cost more than running it.
_GET = Prepared(
    _DETAIL.where(
        firmware.c.instance_pk == sa.bindparam("p_instance_pk"),
        firmware.c.firmware_id == sa.bindparam("p_firmware_id"),
    )
)


def get(conn: Connection, instance_pk: int, firmware_id: str) -> Mapping[str, Any] | None:
    return _GET.first(conn, p_instance_pk=instance_pk, p_firmware_id=firmware_id)


def get_built(conn: Connection, instance_pk: int, firmware_id: str, build: Callable[[Mapping[str, Any]], Any]) -> Any:
    """build(get(...)) without its row copy while the read cache keeps it (Prepared.first_built)."""
    return _GET.first_built(conn, build, p_instance_pk=instance_pk, p_firmware_id=firmware_id)


_FILES_OF = (
    sa.select(firmware_files)
    .where(firmware_files.c.firmware_pk == sa.bindparam("p_firmware_pk"))
    .order_by(firmware_files.c.position)
)


def files_of(conn: Connection, firmware_pk: int) -> list[RowMapping]:
    rows = conn.execute(_FILES_OF, {"p_firmware_pk": firmware_pk}).all()
    return [row._mapping for row in rows]


def name_taken(conn: Connection, instance_pk: int, name: str, except_pk: int | None = None) -> bool:
    query = sa.select(firmware.c.id).where(firmware.c.instance_pk == instance_pk, firmware.c.name == name)
    if except_pk is not None:
        query = query.where(firmware.c.id != except_pk)
    return conn.execute(query).first() is not None


def count_in_instance(conn: Connection, instance_pk: int) -> int:
    return conn.execute(
        sa.select(sa.func.count()).select_from(firmware).where(firmware.c.instance_pk == instance_pk)
    ).scalar_one()


def count_for_product(conn: Connection, product_id: int) -> int:
    return conn.execute(
        sa.select(sa.func.count()).select_from(firmware).where(firmware.c.product_id == product_id)
    ).scalar_one()


def page(
    conn: Connection, instance_pk: int, offset: int, limit: int,
    product_id: int | None, dest_version: str | None,
) -> tuple[int, list[RowMapping]]:
    """(total, rows) newest first; the id breaks ties so pages never overlap or skip."""
    conditions = [firmware.c.instance_pk == instance_pk]
    if product_id is not None:
        conditions.append(firmware.c.product_id == product_id)
    if dest_version is not None:
        conditions.append(firmware.c.dest_version == dest_version)
    total = conn.execute(sa.select(sa.func.count()).select_from(firmware).where(*conditions)).scalar_one()
    rows = conn.execute(
        _DETAIL.where(*conditions)
        .order_by(firmware.c.created_ms.desc(), firmware.c.id.desc())
        .offset(offset)
        .limit(limit)
    ).all()
    return total, [row._mapping for row in rows]


def lock_for_delete(conn: Connection, instance_pk: int, firmware_id: str) -> bool:
    """Hold the package's row until the transaction ends, against every writer that refers to
    it (run it first): on PostgreSQL `FOR UPDATE`, which waits for a transaction that inserted a
    job or a push of the package (its foreign key check holds `FOR KEY SHARE`) and makes later
    ones wait; on SQLite a write, which takes the database's write lock. False: no such package
    (deleted meanwhile included)."""
    return hold_rows(conn, firmware, firmware.c.instance_pk == instance_pk, firmware.c.firmware_id == firmware_id)


def update(conn: Connection, firmware_pk: int, values: dict[str, Any]) -> None:
    conn.execute(sa.update(firmware).where(firmware.c.id == firmware_pk).values(**values))


def delete(conn: Connection, firmware_pk: int) -> list[str]:
    """Delete a package; returns the blob keys it referred to."""
    keys = [row.blob_key for row in conn.execute(
        sa.select(firmware_files.c.blob_key).where(firmware_files.c.firmware_pk == firmware_pk))]
    single = conn.execute(sa.select(firmware.c.blob_key).where(firmware.c.id == firmware_pk)).scalar()
    if single:
        keys.append(single)
    conn.execute(sa.delete(firmware_files).where(firmware_files.c.firmware_pk == firmware_pk))
    conn.execute(sa.delete(firmware).where(firmware.c.id == firmware_pk))
    return keys
