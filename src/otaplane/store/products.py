"""Queries for products. Every query is scoped to one instance row (tenancy)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from otaplane.store.prepared import Prepared
from otaplane.store.schema import devices, products


def insert(conn: Connection, values: dict[str, Any]) -> int:
    return conn.execute(sa.insert(products).values(**values).returning(products.c.id)).scalar_one()


def name_taken(conn: Connection, instance_pk: int, name: str, except_key: str | None = None) -> bool:
    query = sa.select(products.c.id).where(
        products.c.instance_pk == instance_pk, products.c.product_name == name
    )
    if except_key:
        query = query.where(products.c.product_key != except_key)
    return conn.execute(query).first() is not None


def product_key_exists(conn: Connection, product_key: str) -> bool:
    return conn.execute(sa.select(products.c.id).where(products.c.product_key == product_key)).first() is not None


_DEVICE_COUNT = (
    sa.select(sa.func.count())
    .select_from(devices)
    .where(devices.c.product_id == products.c.id)
    .scalar_subquery()
    .label("device_count")
)


# Built once and run lean (store.prepared): QueryProduct runs it on every request.
_GET = Prepared(
    sa.select(products, _DEVICE_COUNT).where(
        products.c.instance_pk == sa.bindparam("p_instance_pk"),
        products.c.product_key == sa.bindparam("p_product_key"),
    )
)


def get(conn: Connection, instance_pk: int, product_key: str) -> Mapping[str, Any] | None:
    return _GET.first(conn, p_instance_pk=instance_pk, p_product_key=product_key)


def page(
    conn: Connection, instance_pk: int, offset: int, limit: int, commodity_code: str | None
) -> tuple[int, list[RowMapping]]:
    """(total, rows) newest first; id breaks ties so pages never overlap."""
    condition = products.c.instance_pk == instance_pk
    if commodity_code:
        condition = sa.and_(condition, products.c.aliyun_commodity_code == commodity_code)
    total = conn.execute(sa.select(sa.func.count()).select_from(products).where(condition)).scalar_one()
    rows = conn.execute(
        sa.select(products, _DEVICE_COUNT)
        .where(condition)
        .order_by(products.c.created_ms.desc(), products.c.id.desc())
        .offset(offset)
        .limit(limit)
    ).all()
    return total, [row._mapping for row in rows]


def update(conn: Connection, product_id: int, values: dict[str, Any]) -> None:
    conn.execute(sa.update(products).where(products.c.id == product_id).values(**values))


def delete(conn: Connection, product_id: int) -> None:
    conn.execute(sa.delete(products).where(products.c.id == product_id))
