"""The services one process runs, built once from Settings and handed to every handler."""

from __future__ import annotations

from dataclasses import dataclass

from otaplane.blobs import BlobStore
from otaplane.blobs.factory import open_blob_store
from otaplane.secretbox import SecretBox
from otaplane.services.accounts import AccountService
from otaplane.services.device_ota import DeviceOtaService
from otaplane.services.devices import DeviceService
from otaplane.services.dispatcher import Dispatcher
from otaplane.services.firmware import FirmwareService
from otaplane.services.jobs import JobService
from otaplane.services.modules import ModuleService
from otaplane.services.products import ProductService
from otaplane.settings import Settings
from otaplane.store import Database
from otaplane.store.nonce_file import NonceFile
from otaplane.store.nonces import NonceWriter


@dataclass
class Services:
    settings: Settings
    db: Database
    box: SecretBox
    blobs: BlobStore
    accounts: AccountService
    products: ProductService
    modules: ModuleService
    firmware: FirmwareService
    devices: DeviceService
    device_ota: DeviceOtaService
    jobs: JobService
    dispatcher: Dispatcher
    # Signature nonces: a file beside an embedded SQLite database, else the database's table
    # (group commit by a writer thread, started on first use).
    nonces: NonceFile | NonceWriter

    @classmethod
    def build(cls, settings: Settings) -> Services:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url())
        box = SecretBox.from_settings(settings.master_key, settings.data_dir)
        blobs = open_blob_store(settings, box)
        firmware = FirmwareService(db, blobs, settings.download_url_ttl_seconds)
        devices = DeviceService(db, box)
        minute_ms = settings.job_minute_ms()
        device_ota = DeviceOtaService(db, devices, firmware, minute_ms, settings.push_again_quiet_ms())
        return cls(
            settings=settings,
            db=db,
            box=box,
            blobs=blobs,
            accounts=AccountService(db, box),
            products=ProductService(db, box),
            modules=ModuleService(db),
            firmware=firmware,
            devices=devices,
            device_ota=device_ota,
            jobs=JobService(db, blobs, minute_ms),
            dispatcher=Dispatcher(db, minute_ms, on_pushed=device_ota.notify_pushed),
            nonces=_nonce_memory(db),
        )

    def close(self) -> None:
        self.nonces.close()
        self.db.dispose()


def _nonce_memory(db: Database) -> NonceFile | NonceWriter:
    if db.sqlite_path:
        return NonceFile.beside(db.sqlite_path)
    return NonceWriter(db)
