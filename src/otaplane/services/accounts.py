"""Accounts, their instances and AccessKeys (secrets encrypted at rest, shown once)."""

from __future__ import annotations

from dataclasses import dataclass

from otaplane import errors, ids
from otaplane.secretbox import SecretBox
from otaplane.services.tenancy import Tenant
from otaplane.store import Database
from otaplane.store import accounts as store
from otaplane.store.accounts import KeyRecord
from otaplane.timefmt import now_ms

DEFAULT_ACCOUNT = "default"


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

    def _ensure_account(self, conn, name: str) -> int:
        account_id = store.find_account(conn, name)
        if account_id is None:
            now = now_ms()
            account_id = store.insert_account(conn, name, now)
            store.insert_instance(conn, account_id, ids.instance_id(), True, now)
        return account_id

    def create_key(self, account: str, description: str = "") -> NewKey:
        """A new key pair; the account (and its default instance) is created when new."""
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

    def list_keys(self, account: str | None = None) -> list[KeyRecord]:
        with self.db.connect() as conn:
            return store.list_keys(conn, account)

    def revoke_key(self, key_id: str) -> bool:
        with self.db.begin() as conn:
            return store.revoke_key(conn, key_id, now_ms())

    def active_key(self, conn, key_id: str) -> ActiveKey:
        """The account and plain secret of an active key, or the gateway's refusal."""
        record = store.get_key(conn, key_id)
        if record is None:
            raise errors.InvalidAccessKeyIdNotFound()
        if record.status != "active":
            raise errors.InvalidAccessKeyIdInactive()
        return ActiveKey(record.account_id, self.box.decrypt(record.secret_encrypted))

    def tenant(self, conn, account_id: int, iot_instance_id: str | None) -> Tenant:
        found = store.find_instance(conn, account_id, iot_instance_id)
        if found is None:
            raise errors.InstanceNotFound()
        return Tenant(account_id, found[0], found[1])
