"""Queries for accounts, their instances and AccessKeys."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from otaplane.store.database import hold_rows
from otaplane.store.prepared import Prepared
from otaplane.store.schema import access_keys, accounts, instances


@dataclass(frozen=True)
class KeyRecord:
    access_key_id: str
    account_id: int
    account_name: str
    secret_encrypted: str
    status: str
    description: str
    created_ms: int
    revoked_ms: int | None


@dataclass(frozen=True)
class InstanceRecord:
    instance_id: str
    account_name: str
    is_default: bool
    created_ms: int


def list_instances(conn: Connection, account_name: str | None) -> list[InstanceRecord]:
    query = (sa.select(instances.c.instance_id, accounts.c.name.label("account_name"), instances.c.is_default,
                       instances.c.created_ms)
             .join(accounts, accounts.c.id == instances.c.account_id)
             .order_by(accounts.c.name, instances.c.created_ms, instances.c.id))
    if account_name:
        query = query.where(accounts.c.name == account_name)
    return [InstanceRecord(**row._mapping) for row in conn.execute(query)]


def find_account(conn: Connection, name: str) -> int | None:
    return conn.execute(sa.select(accounts.c.id).where(accounts.c.name == name)).scalar()


def insert_account(conn: Connection, name: str, now_ms: int) -> int:
    return conn.execute(
        sa.insert(accounts).values(name=name, created_ms=now_ms).returning(accounts.c.id)
    ).scalar_one()


def insert_instance(conn: Connection, account_id: int, instance_id: str, is_default: bool, now_ms: int) -> int:
    return conn.execute(
        sa.insert(instances)
        .values(account_id=account_id, instance_id=instance_id, is_default=is_default, created_ms=now_ms)
        .returning(instances.c.id)
    ).scalar_one()


# Statements on every signed request's path are built once: building one costs several times
# more than running it (the compiled form is cached by SQLAlchemy either way).
_INSTANCE_OF_ACCOUNT = sa.select(instances.c.id, instances.c.instance_id).where(
    instances.c.account_id == sa.bindparam("p_account_id")
)
_NAMED_INSTANCE = _INSTANCE_OF_ACCOUNT.where(instances.c.instance_id == sa.bindparam("p_instance_id"))
_DEFAULT_INSTANCE = _INSTANCE_OF_ACCOUNT.where(instances.c.is_default.is_(True))


def find_instance(conn: Connection, account_id: int, instance_id: str | None) -> tuple[int, str] | None:
    """(row id, IotInstanceId) of the named instance, or of the default one when None."""
    if instance_id:
        params = {"p_account_id": account_id, "p_instance_id": instance_id}
        row = conn.execute(_NAMED_INSTANCE, params).first()
    else:
        row = conn.execute(_DEFAULT_INSTANCE, {"p_account_id": account_id}).first()
    return (row.id, row.instance_id) if row else None


def insert_key(
    conn: Connection, account_id: int, key_id: str, secret_encrypted: str, description: str, now_ms: int
) -> None:
    conn.execute(
        sa.insert(access_keys).values(
            access_key_id=key_id,
            account_id=account_id,
            secret_encrypted=secret_encrypted,
            status="active",
            description=description,
            created_ms=now_ms,
        )
    )


_KEY_COLUMNS = (
    access_keys.c.access_key_id,
    access_keys.c.account_id,
    accounts.c.name.label("account_name"),
    access_keys.c.secret_encrypted,
    access_keys.c.status,
    access_keys.c.description,
    access_keys.c.created_ms,
    access_keys.c.revoked_ms,
)
_KEYS_JOIN = access_keys.join(accounts, accounts.c.id == access_keys.c.account_id)
# Prepared (store.prepared): every signed request whose key's cache entry has expired reads it
# (once a second per key and server process), and on SQLite inside the read cache.
_KEY_BY_ID = Prepared(
    sa.select(*_KEY_COLUMNS)
    .select_from(_KEYS_JOIN)
    .where(access_keys.c.access_key_id == sa.bindparam("p_key_id"))
)


def get_key(conn: Connection, key_id: str) -> KeyRecord | None:
    row = _KEY_BY_ID.first(conn, p_key_id=key_id)
    return KeyRecord(**row) if row else None


def list_keys(conn: Connection, account_name: str | None) -> list[KeyRecord]:
    query = sa.select(*_KEY_COLUMNS).select_from(_KEYS_JOIN).order_by(access_keys.c.created_ms)
    if account_name:
        query = query.where(accounts.c.name == account_name)
    return [KeyRecord(**row._mapping) for row in conn.execute(query)]


def oldest_key_secret(conn: Connection) -> str | None:
    """The encrypted secret of the first AccessKey stored (usually the first start's admin key)."""
    query = sa.select(access_keys.c.secret_encrypted).order_by(access_keys.c.created_ms, access_keys.c.access_key_id)
    return conn.execute(query.limit(1)).scalar_one_or_none()


def count_keys(conn: Connection) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(access_keys)).scalar_one()


def revoke_key(conn: Connection, key_id: str, now_ms: int) -> bool:
    result = conn.execute(
        sa.update(access_keys)
        .where(access_keys.c.access_key_id == key_id, access_keys.c.status == "active")
        .values(status="revoked", revoked_ms=now_ms)
    )
    return result.rowcount == 1


def hold_instance(conn: Connection, instance_pk: int) -> None:
    """Take turns with every other transaction that counts the instance's packages or modules
    against a limit and then inserts one (run it first): each sees the others' inserts. On
    PostgreSQL `FOR NO KEY UPDATE`, so inserts that merely refer to the instance never wait for
    it; on SQLite the write lock (the instances table has no cached reads to invalidate)."""
    hold_rows(conn, instances, instances.c.id == instance_pk, no_key=True)
