"""Accounts, their instances and AccessKeys (secrets encrypted at rest, shown once)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from otaplane import errors, ids
from otaplane.secretbox import SecretBox
from otaplane.services.tenancy import Tenant
from otaplane.store import Database
from otaplane.store import accounts as store
from otaplane.store.accounts import KeyRecord
from otaplane.timefmt import now_ms

DEFAULT_ACCOUNT = "default"
# How long a key record read from the database is reused (key cache): a revoked key is refused
# by every replica within this time, not at once (README.md, "Keys").
KEY_CACHE_TTL_S = 1.0
# Bounds on the caches below (a full cache is emptied and fills again).
_MAX_CACHED_KEYS = 10_000
_MAX_CACHED_TENANTS = 10_000


# The columns' sizes (store/schema.py): longer values would fail in PostgreSQL, not in SQLite.
MAX_ACCOUNT_NAME = 64
MAX_KEY_DESCRIPTION = 256


class InvalidAccountInput(ValueError):
    """An operator's account name or key description that cannot be stored (the CLI says why)."""


@dataclass(frozen=True)
class NewKey:
    account: str
    access_key_id: str
    access_key_secret: str


@dataclass(frozen=True)
class ActiveKey:
    account_id: int
    secret: str


class AccountService:
    def __init__(self, db: Database, box: SecretBox):
        self.db = db
        self.box = box
        # key id -> (monotonic expiry, the active key or None for a key that is not active)
        self._keys: dict[str, tuple[float, ActiveKey | None]] = {}
        # (account id, IotInstanceId or None for the default) -> Tenant. Instances never
        # disappear and an account's default never changes: found ones are kept for good.
        self._tenants: dict[tuple[int, str | None], Tenant] = {}

    def _ensure_account(self, conn, name: str) -> int:
        if not 0 < len(name) <= MAX_ACCOUNT_NAME or not name.isprintable():
            raise InvalidAccountInput(f"an account name is 1 to {MAX_ACCOUNT_NAME} printable characters, not {name!r}")
        account_id = store.find_account(conn, name)
        if account_id is None:
            now = now_ms()
            account_id = store.insert_account(conn, name, now)
            store.insert_instance(conn, account_id, ids.instance_id(), True, now)
        return account_id

    def create_key(self, account: str, description: str = "") -> NewKey:
        """A new key pair; the account (and its default instance) is created when new."""
        if len(description) > MAX_KEY_DESCRIPTION:
            raise InvalidAccountInput(f"a key description is at most {MAX_KEY_DESCRIPTION} characters")
        key_id, secret = ids.access_key_id(), ids.access_key_secret()
        with self.db.begin() as conn:
            account_id = self._ensure_account(conn, account)
            store.insert_key(conn, account_id, key_id, self.box.encrypt(secret), description, now_ms())
        return NewKey(account, key_id, secret)

    def create_first_admin_key(self) -> NewKey | None:
        """On first start only: a default account with one key. None when keys exist."""
        with self.db.connect() as conn:
            if store.count_keys(conn) > 0:
                return None
        return self.create_key(DEFAULT_ACCOUNT, "admin key created on first start")

    def check_master_key(self) -> None:
        """ValueError unless this process's master key decrypts the stored secrets. A process with
        another key (a fresh master.key of another data directory on a shared PostgreSQL database)
        would store secrets that the servers cannot read, and read none of theirs: every request
        signed with such a key fails with InternalError."""
        with self.db.connect() as conn:
            token = store.oldest_key_secret(conn)
        if token is None:
            return
        try:
            self.box.decrypt(token)
        except RuntimeError:
            raise ValueError(
                "the database's secrets were stored with another master key: use the servers' one "
                "(their --data-dir with its master.key, or OTAPLANE_MASTER_KEY)") from None

    def create_instance(self, account: str) -> str:
        """Another IotInstanceId for the account (created if new): its own products, firmware,
        devices and jobs, reached by passing IotInstanceId with any of the account's keys."""
        instance_id = ids.instance_id()
        with self.db.begin() as conn:
            store.insert_instance(conn, self._ensure_account(conn, account), instance_id, False, now_ms())
        return instance_id

    def list_instances(self, account: str | None = None) -> list[store.InstanceRecord]:
        with self.db.connect() as conn:
            return store.list_instances(conn, account)

    def list_keys(self, account: str | None = None) -> list[KeyRecord]:
        with self.db.connect() as conn:
            return store.list_keys(conn, account)

    def revoke_key(self, key_id: str) -> bool:
        with self.db.begin() as conn:
            revoked = store.revoke_key(conn, key_id, now_ms())
        self._keys.pop(key_id, None)  # at once in this process; other processes within the TTL
        return revoked

    def cached_key(self, key_id: str) -> ActiveKey | None:
        """`active_key` from the key cache, without the database; None when not cached."""
        entry = self._keys.get(key_id)
        if entry is None or entry[0] < time.monotonic():
            return None
        if entry[1] is None:
            raise errors.InvalidAccessKeyIdInactive()
        return entry[1]

    def active_key(self, key_id: str, conn=None) -> ActiveKey:
        """The account and plain secret of an active key, or the gateway's refusal.

        Reads the database (on `conn`, or a connection of its own) and refreshes the key cache
        (`cached_key`) for KEY_CACHE_TTL_S. Unknown keys are not cached: a key created while
        the server runs works at once.
        """
        if conn is None:
            with self.db.connect() as own:
                record = store.get_key(own, key_id)
        else:
            record = store.get_key(conn, key_id)
        if record is None:
            raise errors.InvalidAccessKeyIdNotFound()
        key = None
        if record.status == "active":
            key = ActiveKey(record.account_id, self.box.decrypt(record.secret_encrypted))
        if len(self._keys) >= _MAX_CACHED_KEYS:
            self._keys.clear()
        self._keys[key_id] = (time.monotonic() + KEY_CACHE_TTL_S, key)
        if key is None:
            raise errors.InvalidAccessKeyIdInactive()
        return key

    def tenant_by_name(self, account: str, iot_instance_id: str | None = None) -> Tenant:
        """The tenant an operator names on the command line."""
        with self.db.connect() as conn:
            account_id = store.find_account(conn, account)
            if account_id is None:
                raise errors.InstanceNotFound("The specified account does not exist.")
            return self.tenant(conn, account_id, iot_instance_id)

    def cached_tenant(self, account_id: int, iot_instance_id: str | None) -> Tenant | None:
        """`tenant` from the cache, without the database; None when not cached."""
        return self._tenants.get((account_id, iot_instance_id or None))

    def tenant(self, conn, account_id: int, iot_instance_id: str | None) -> Tenant:
        cache_key = (account_id, iot_instance_id or None)
        tenant = self._tenants.get(cache_key)
        if tenant is not None:
            return tenant
        found = store.find_instance(conn, account_id, iot_instance_id)
        if found is None:
            raise errors.InstanceNotFound()  # not cached: the instance may be created later
        if len(self._tenants) >= _MAX_CACHED_TENANTS:
            self._tenants.clear()
        tenant = self._tenants[cache_key] = Tenant(account_id, found[0], found[1])
        return tenant
