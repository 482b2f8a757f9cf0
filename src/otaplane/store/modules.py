"""Queries for OTA modules (scoped by product row id, which callers resolve per tenant)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from otaplane.store.schema import firmware, ota_modules as modules

DEFAULT_MODULE = "default"


def insert(conn: Connection, product_id: int, name: str, alias: str | None, desc: str | None,
           is_default: bool, now_ms: int) -> int:
    return conn.execute(
        sa.insert(modules)
        .values(product_id=product_id, module_name=name, name_folded=name.lower(), alias_name=alias,
                description=desc, is_default=is_default, created_ms=now_ms, modified_ms=now_ms)
        .returning(modules.c.id)
    ).scalar_one()


def get(conn: Connection, product_id: int, name: str) -> RowMapping | None:
    row = conn.execute(
        sa.select(modules).where(modules.c.product_id == product_id, modules.c.name_folded == name.lower())
    ).first()
    return row._mapping if row else None


def list_for_product(conn: Connection, product_id: int) -> list[RowMapping]:
    rows = conn.execute(
        sa.select(modules)
        .where(modules.c.product_id == product_id)
        .order_by(modules.c.is_default.desc(), modules.c.created_ms, modules.c.id)
    ).all()
    return [row._mapping for row in rows]


def count_custom(conn: Connection, product_id: int) -> int:
    return conn.execute(
        sa.select(sa.func.count()).select_from(modules)
        .where(modules.c.product_id == product_id, modules.c.is_default.is_(False))
    ).scalar_one()


def update(conn: Connection, module_id: int, values: dict) -> None:
    conn.execute(sa.update(modules).where(modules.c.id == module_id).values(**values))


def has_firmware(conn: Connection, module_id: int) -> bool:
    return conn.execute(sa.select(firmware.c.id).where(firmware.c.module_id == module_id).limit(1)).first() is not None


def delete(conn: Connection, module_id: int) -> None:
    conn.execute(sa.delete(modules).where(modules.c.id == module_id))


def delete_for_product(conn: Connection, product_id: int) -> None:
    conn.execute(sa.delete(modules).where(modules.c.product_id == product_id))
