"""Queries for devices, their reported module versions and batch registrations."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, RowMapping

from otaplane.store.prepared import Prepared
from otaplane.store.schema import (
    channel_nodes,
    device_applies,
    device_modules,
    devices,
    products,
)

_DETAIL = sa.select(
    devices,
    products.c.product_key,
    products.c.product_name,
    products.c.node_type,
    products.c.instance_pk,
).join(products, products.c.id == devices.c.product_id)


def insert_many(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(sa.insert(devices), rows)


def by_iot_id(conn: Connection, instance_pk: int, iot_id: str) -> RowMapping | None:
    row = conn.execute(_DETAIL.where(devices.c.iot_id == iot_id, products.c.instance_pk == instance_pk)).first()
    return row._mapping if row else None


def by_name(conn: Connection, product_key: str, device_name: str) -> RowMapping | None:
    """Not tenant-scoped: the device channel authenticates with ProductKey + DeviceName alone."""
    row = conn.execute(
        _DETAIL.where(products.c.product_key == product_key, devices.c.device_name == device_name)
    ).first()
    return row._mapping if row else None


def name_of(conn: Connection, device_id: int) -> str | None:
    """`ProductKey/DeviceName`, for log lines."""
    row = conn.execute(sa.select(products.c.product_key, devices.c.device_name)
                       .join(products, products.c.id == devices.c.product_id).where(devices.c.id == device_id)).first()
    return f"{row.product_key}/{row.device_name}" if row else None


def names_taken(conn: Connection, product_id: int, names: list[str]) -> set[str]:
    taken: set[str] = set()
    for start in range(0, len(names), 500):
        chunk = names[start:start + 500]
        taken.update(conn.execute(
            sa.select(devices.c.device_name).where(devices.c.product_id == product_id,
                                                   devices.c.device_name.in_(chunk))).scalars())
    return taken


def count_for_product(conn: Connection, product_id: int) -> int:
    return conn.execute(
        sa.select(sa.func.count()).select_from(devices).where(devices.c.product_id == product_id)
    ).scalar_one()


def page(conn: Connection, condition, offset: int, limit: int) -> tuple[int, list[RowMapping]]:
    total = conn.execute(
        sa.select(sa.func.count()).select_from(devices.join(products, products.c.id == devices.c.product_id))
        .where(condition)
    ).scalar_one()
    rows = conn.execute(
        _DETAIL.where(condition).order_by(devices.c.created_ms.desc(), devices.c.id.desc()).offset(offset).limit(limit)
    ).all()
    return total, [row._mapping for row in rows]


def of_product(product_id: int):
    return devices.c.product_id == product_id


def of_apply(apply_id: int, instance_pk: int):
    return sa.and_(devices.c.apply_id == apply_id, products.c.instance_pk == instance_pk)


def delete(conn: Connection, device_id: int) -> None:
    conn.execute(sa.delete(device_modules).where(device_modules.c.device_id == device_id))
    conn.execute(sa.delete(devices).where(devices.c.id == device_id))


def update(conn: Connection, device_id: int, values: dict[str, Any]) -> None:
    conn.execute(sa.update(devices).where(devices.c.id == device_id).values(**values))


def _set_module_version(dialect) -> Prepared:
    """The upsert of a module's version, which adds no row to a device with `p_max_modules` rows
    (a module it has is still updated): rowcount 0 when refused. Two transactions adding modules
    to one device at once (two replicas) may each pass the count: a device's own reports are one
    at a time in a process, so the overshoot stays within the number of processes."""
    device, module = sa.bindparam("p_device", type_=sa.Integer), sa.bindparam("p_module", type_=sa.String)
    of_device = device_modules.c.device_id == device
    known = sa.exists().where(of_device, device_modules.c.module_name == module)
    count = sa.select(sa.func.count()).select_from(device_modules).where(of_device).scalar_subquery()
    room = count < sa.bindparam("p_max_modules", type_=sa.Integer)
    row = sa.select(device, module, sa.bindparam("p_version", type_=sa.String),
                    sa.bindparam("p_now", type_=sa.BigInteger)).where(sa.or_(known, room))
    statement = dialect.insert(device_modules).from_select(["device_id", "module_name", "version", "modified_ms"], row)
    return Prepared(statement.on_conflict_do_update(
        index_elements=[device_modules.c.device_id, device_modules.c.module_name],
        set_={"version": statement.excluded.version, "modified_ms": statement.excluded.modified_ms},
    ))


# Every version report runs these: prepared statements (store/prepared.py).
_SET_MODULE_VERSION = {"postgresql": _set_module_version(postgresql), "sqlite": _set_module_version(sqlite)}
_SEEN = Prepared(sa.update(devices).where(devices.c.id == sa.bindparam("p_device"))
                 .values(last_seen_ms=sa.bindparam("p_now")))


def set_module_version(conn: Connection, device_id: int, module: str, version: str, now_ms: int,
                       max_modules: int) -> bool:
    """Inside a transaction begun on `conn`; False (nothing written) when the module is new to the
    device and it has `max_modules` modules already."""
    prepared = _SET_MODULE_VERSION["postgresql" if conn.dialect.name == "postgresql" else "sqlite"]
    return prepared.rowcount(conn, p_device=device_id, p_module=module, p_version=version, p_now=now_ms,
                             p_max_modules=max_modules) > 0


# PostgreSQL: the two statements above in one round trip (a data-modifying CTE runs once,
# referenced or not).
_VERSION_AND_SEEN_PG = Prepared(_SET_MODULE_VERSION["postgresql"].statement.add_cte(_SEEN.statement.cte("seen")))


def set_module_version_and_seen(conn: Connection, device_id: int, module: str, version: str, now_ms: int,
                                max_modules: int) -> bool:
    """`set_module_version` and `mark_seen` (seen either way): inside a transaction begun on `conn`."""
    if conn.dialect.name == "postgresql":
        return _VERSION_AND_SEEN_PG.rowcount(conn, p_device=device_id, p_module=module, p_version=version,
                                             p_now=now_ms, p_max_modules=max_modules) > 0
    recorded = set_module_version(conn, device_id, module, version, now_ms, max_modules)
    mark_seen(conn, device_id, now_ms)
    return recorded


def mark_seen(conn: Connection, device_id: int, now_ms: int) -> None:
    """Inside a transaction begun on `conn`."""
    _SEEN.rowcount(conn, p_device=device_id, p_now=now_ms)


def module_versions(conn: Connection, device_id: int) -> list[RowMapping]:
    rows = conn.execute(
        sa.select(device_modules).where(device_modules.c.device_id == device_id).order_by(device_modules.c.module_name)
    ).all()
    return [row._mapping for row in rows]


def insert_apply(conn: Connection, apply_id: int, product_id: int, count: int, status: str, now_ms: int) -> None:
    conn.execute(sa.insert(device_applies).values(apply_id=apply_id, product_id=product_id, count=count,
                                                  status=status, created_ms=now_ms))


def get_apply(conn: Connection, apply_id: int, instance_pk: int) -> RowMapping | None:
    row = conn.execute(
        sa.select(device_applies, products.c.product_key)
        .join(products, products.c.id == device_applies.c.product_id)
        .where(device_applies.c.apply_id == apply_id, products.c.instance_pk == instance_pk)
    ).first()
    return row._mapping if row else None


def names_of_apply(conn: Connection, apply_id: int) -> list[str]:
    return list(conn.execute(
        sa.select(devices.c.device_name).where(devices.c.apply_id == apply_id).order_by(devices.c.id)).scalars())


def mark_disconnected(conn: Connection, device_id: int, now_ms: int, online_ms: int | None = None) -> None:
    condition = devices.c.id == device_id
    if online_ms is not None:
        condition = sa.and_(condition, devices.c.online_ms == online_ms)
    conn.execute(sa.update(devices).where(condition).values(online=False, last_seen_ms=now_ms))


def mark_disconnected_many(conn: Connection, connections: list[tuple[int, int]], now_ms: int) -> None:
    if connections:
        conn.execute(
            sa.update(devices)
            .where(devices.c.id == sa.bindparam("p_id"), devices.c.online_ms == sa.bindparam("p_online"))
            .values(online=False, last_seen_ms=sa.bindparam("p_now")),
            [{"p_id": d, "p_online": o, "p_now": now_ms} for d, o in connections],
        )


def by_names(conn: Connection, names: list[tuple[str, str]]) -> list[RowMapping]:
    """Rows of many (product_key, device_name); not tenant-scoped (the device channel)."""
    found: list[RowMapping] = []
    for start in range(0, len(names), 200):
        chunk = names[start:start + 200]
        rows = conn.execute(_DETAIL.where(sa.tuple_(products.c.product_key, devices.c.device_name).in_(chunk)))
        found.extend(row._mapping for row in rows)
    return found


def mark_connected_many(conn: Connection, connections: list[tuple[int, str | None]], now_ms: int,
                        node_id: str) -> None:
    if connections:
        conn.execute(
            sa.update(devices)
            .where(devices.c.id == sa.bindparam("p_id"))
            .values(online=True, online_ms=sa.bindparam("p_now"), last_seen_ms=sa.bindparam("p_now"),
                    ip_address=sa.bindparam("p_ip"), online_node=sa.bindparam("p_node"),
                    active_ms=sa.func.coalesce(devices.c.active_ms, sa.bindparam("p_now"))),
            [{"p_id": d, "p_ip": ip, "p_now": now_ms, "p_node": node_id} for d, ip in connections],
        )


def node_heartbeat(conn: Connection, node_id: str, now_ms: int) -> bool:
    """The channel process `node_id` is alive at now_ms. False when it was not known (its first
    beat, or another process took it for dead and released its devices)."""
    if conn.execute(sa.update(channel_nodes).where(channel_nodes.c.node_id == node_id)
                    .values(heartbeat_ms=now_ms)).rowcount == 0:
        conn.execute(sa.insert(channel_nodes).values(node_id=node_id, heartbeat_ms=now_ms))
        return False
    return True


def release_dead_nodes(conn: Connection, stale_before_ms: int) -> int:
    """Devices held by channel processes silent since before `stale_before_ms` go OFFLINE (the
    process died without closing them), and those processes are forgotten. Returns the devices."""
    dead = sa.select(channel_nodes.c.node_id).where(channel_nodes.c.heartbeat_ms < stale_before_ms)
    released = conn.execute(
        sa.update(devices).where(devices.c.online.is_(True), devices.c.online_node.in_(dead)).values(online=False)
    ).rowcount
    conn.execute(sa.delete(channel_nodes).where(channel_nodes.c.heartbeat_ms < stale_before_ms))
    return released


def forget_node(conn: Connection, node_id: str) -> None:
    conn.execute(sa.delete(channel_nodes).where(channel_nodes.c.node_id == node_id))




def existing_ids(conn: Connection, device_ids: list[int]) -> list[int]:
    return list(conn.execute(sa.select(devices.c.id).where(devices.c.id.in_(device_ids))).scalars())


def delete_applies_of_product(conn: Connection, product_id: int) -> None:
    conn.execute(sa.delete(device_applies).where(device_applies.c.product_id == product_id))
