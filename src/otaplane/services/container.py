"""The services one process runs, built once from Settings and handed to every handler."""

from __future__ import annotations

from dataclasses import dataclass

from otaplane.secretbox import SecretBox
from otaplane.services.accounts import AccountService
from otaplane.services.products import ProductService
from otaplane.settings import Settings
from otaplane.store import Database


@dataclass
class Services:
    settings: Settings
    db: Database
    box: SecretBox
    accounts: AccountService
    products: ProductService

    @classmethod
    def build(cls, settings: Settings) -> "Services":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url())
        box = SecretBox.from_settings(settings.master_key, settings.data_dir)
        return cls(
            settings=settings,
            db=db,
            box=box,
            accounts=AccountService(db, box),
            products=ProductService(db, box),
        )

    def close(self) -> None:
        self.db.dispose()
