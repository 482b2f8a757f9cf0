"""OTA modules: named firmware slots of a product (`default` always exists)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError

from otaplane import errors
from otaplane.services.tenancy import Tenant
from otaplane.store import Database
from otaplane.store import accounts as account_store
from otaplane.store import modules as store
from otaplane.store import products as product_store
from otaplane.timefmt import now_ms

MAX_CUSTOM_MODULES = 10


@dataclass(frozen=True)
class Module:
    product_key: str
    module_name: str
    alias_name: str | None
    description: str | None
    is_default: bool
    created_ms: int
    modified_ms: int


def product_row(conn, tenant: Tenant, product_key: str):
    row = product_store.get(conn, tenant.instance_pk, product_key)
    if row is None:
        raise errors.NotExistedProduct()
    return row


def module_row(conn, product_id: int, name: str):
    row = store.get(conn, product_id, name)
    if row is None:
        raise errors.ModuleNotFound(name=name)
    return row


class ModuleService:
    def __init__(self, db: Database):
        self.db = db

    def create(self, tenant: Tenant, product_key: str, name: str, alias: str | None, desc: str | None) -> None:
        try:
            with self.db.begin() as conn:
                # Creates take turns, so the count below sees every other create's module
                # (unheld, creates on several replicas each counted 9 and all inserted).
                account_store.hold_instance(conn, tenant.instance_pk)
                product = product_row(conn, tenant, product_key)
                if store.get(conn, product["id"], name) is not None:
                    raise errors.ModuleAlreadyExists(name=name)
                if store.count_custom(conn, product["id"]) >= MAX_CUSTOM_MODULES:
                    raise errors.ModuleCountExceeded(limit=MAX_CUSTOM_MODULES)
                store.insert(conn, product["id"], name, alias, desc, False, now_ms())
        except IntegrityError:  # a concurrent create of the same name won the race
            raise errors.ModuleAlreadyExists(name=name) from None

    def update(self, tenant: Tenant, product_key: str, name: str, alias: str | None, desc: str | None) -> None:
        with self.db.begin() as conn:
            module = module_row(conn, product_row(conn, tenant, product_key)["id"], name)
            values: dict = {"modified_ms": now_ms()}
            if alias is not None:
                values["alias_name"] = alias
            if desc is not None:
                values["description"] = desc
            store.update(conn, module["id"], values)

    def delete(self, tenant: Tenant, product_key: str, name: str) -> None:
        with self.db.begin() as conn:
            module = module_row(conn, product_row(conn, tenant, product_key)["id"], name)
            if module["is_default"]:
                raise errors.DefaultModuleUndeletable()
            if store.has_firmware(conn, module["id"]):
                raise errors.ModuleHasFirmware()
            store.delete(conn, module["id"])

    def list(self, tenant: Tenant, product_key: str) -> list[Module]:
        with self.db.connect() as conn:
            product = product_row(conn, tenant, product_key)
            rows = store.list_for_product(conn, product["id"])
        return [
            Module(product_key, r["module_name"], r["alias_name"], r["description"], bool(r["is_default"]),
                   r["created_ms"], r["modified_ms"])
            for r in rows
        ]
