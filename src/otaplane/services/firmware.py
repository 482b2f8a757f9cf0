"""Firmware packages: upload slots, creation against the real stored object, reads, changes.

otaplane never trusts a client's size or checksum: CreateOTAFirmware streams the uploaded
object, computes both, and refuses a package whose declared values disagree.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import ceil
from typing import Any, NamedTuple

from sqlalchemy.exc import IntegrityError

from otaplane import errors, ids
from otaplane.blobs import BlobDigest, BlobStore, BlobStoreUnavailable, UploadForm
from otaplane.services.modules import module_row, product_row
from otaplane.services.row_memo import RowMemo
from otaplane.services.tenancy import Tenant
from otaplane.store import Database
from otaplane.store import accounts as account_store
from otaplane.store import firmware as store
from otaplane.store import jobs as job_store
from otaplane.store import uploads as upload_store
from otaplane.timefmt import now_ms

log = logging.getLogger("otaplane.firmware")

MAX_FILE_BYTES = 1000 * 1024 * 1024  # the platform's HTTPS download limit per file
MAX_PACKAGES_PER_INSTANCE = 500
UPLOAD_POLICY_TTL_S = 60  # "upload within 1 minute"
CLOCK_SKEW_S = 60  # between the replica that signed a form and the one that receives it
UPLOAD_ADOPTION_GRACE_MS = 60 * 60 * 1000  # "call CreateOTAFirmware within 60 minutes"
SINGLE_FILE_ONLY = "describes a single-file package; MultiFiles.N give each file's own"

STATUS_NO_VERIFY = -1
STATUS_UNVERIFIED = 0

SIGN_METHODS = {"MD5": "Md5", "SHA256": "SHA256"}  # parameter value -> wire/stored form


@dataclass(frozen=True)
class FileSpec:
    """One file of a multi-file package as the client declared it."""

    name: str
    url: str
    size: int | None = None
    sign_value: str | None = None
    file_md5: str | None = None


@dataclass(frozen=True)
class NewFirmware:
    product_key: str
    name: str
    dest_version: str
    firmware_url: str | None = None
    files: list[FileSpec] = field(default_factory=list)
    src_version: str | None = None
    module_name: str = "default"
    type: int = 0
    sign_method: str = "MD5"
    firmware_sign: str | None = None
    firmware_size: int | None = None
    description: str | None = None
    udi: str | None = None
    need_to_verify: bool = True


@dataclass(frozen=True)
class StoredFile:
    name: str
    blob_key: str
    size: int
    sign_value: str
    file_md5: str


class Firmware(NamedTuple):
    """A package as clients see it. A NamedTuple, not a frozen dataclass: immutable alike, and
    built in a seventh of the time (a frozen dataclass sets each of its 21 fields through
    object.__setattr__), which a package read for the first time pays."""

    firmware_id: str
    name: str
    description: str | None
    dest_version: str
    src_version: str | None
    product_key: str
    product_name: str
    module_name: str
    module_is_default: bool
    type: int
    sign_method: str
    sign: str | None
    size: int
    blob_key: str | None
    udi: str | None
    status: int
    verify_progress: int
    created_ms: int
    modified_ms: int
    files: tuple[StoredFile, ...]
    md5: str | None = None  # of the single file, whatever the sign method


@dataclass(frozen=True)
class FirmwarePage:
    current_page: int
    page_size: int
    total: int
    items: list[Firmware]

    @property
    def page_count(self) -> int:
        return ceil(self.total / self.page_size)


def _firmware(row, files) -> Firmware:
    # Positional, in field order: keywords cost a NamedTuple's __new__ a third more.
    return Firmware(
        row["firmware_id"], row["name"], row["description"], row["dest_version"], row["src_version"],
        row["product_key"], row["product_name"], row["module_name"], bool(row["module_is_default"]),
        row["type"], row["sign_method"], row["sign"], row["size"], row["blob_key"], row["udi"],
        row["status"], row["verify_progress"], row["created_ms"], row["modified_ms"],
        tuple([StoredFile(f["name"], f["blob_key"], f["size"], f["sign_value"], f["file_md5"]) for f in files]),
        row["md5"],
    )


_MULTI_FILE = object()  # FirmwareService._single_file_package of a multi-file package's row


def _sign_of(digest: BlobDigest, method: str) -> str:
    return digest.sha256 if method == "SHA256" else digest.md5


class FirmwareService:
    def __init__(self, db: Database, blobs: BlobStore, download_ttl_s: int):
        self.db = db
        self.blobs = blobs
        self.download_ttl_s = download_ttl_s
        # A single-file package's row -> its Firmware, built once per row value (see get()).
        self._single_file_packages = RowMemo(lambda row: _firmware(row, []))

    # --- uploads --------------------------------------------------------------------------------
    def new_upload(self, tenant: Tenant, suffix: str) -> tuple[UploadForm, int]:
        """A signed upload slot for one object under the tenant's own prefix."""
        key = f"ota/{tenant.instance_id}/{secrets.token_hex(12)}.{suffix}"
        now = now_ms()
        form = self.blobs.upload_form(key, MAX_FILE_BYTES, UPLOAD_POLICY_TTL_S)
        with self.db.begin() as conn:
            upload_store.record(conn, key, tenant.instance_pk, now)
        return form, now

    def _owned_key(self, conn, tenant: Tenant, url: str) -> str:
        key = self.blobs.key_from_url(url)
        if key is None or not upload_store.owned_by(conn, key, tenant.instance_pk):
            raise errors.FirmwareUrlInvalid(url=url)
        return key

    def _digest(self, key: str, url: str) -> BlobDigest:
        digest = self.blobs.digest(key)
        if digest is None:
            raise errors.FirmwareFileNotFound(url=url)
        if digest.size == 0:  # as FirmwareSize and MultiFiles.N.Size, which must be >= 1
            raise errors.FirmwareFileEmpty(url=url)
        if digest.size > MAX_FILE_BYTES:
            raise errors.FirmwareTooLarge(limit=MAX_FILE_BYTES, actual=digest.size)
        return digest

    # --- create ---------------------------------------------------------------------------------
    def create(self, tenant: Tenant, new: NewFirmware) -> Firmware:
        if new.type == 1 and not new.src_version:
            raise errors.missing("SrcVersion")
        if new.type == 1 and new.src_version == new.dest_version:
            raise errors.SrcVersionSameAsDest()
        if new.firmware_url and new.files:
            raise errors.FirmwareUrlConflict()
        if not new.firmware_url and not new.files:
            raise errors.missing("FirmwareUrl")
        if new.files:  # FirmwareSize and FirmwareSign describe a single file; MultiFiles.N give each file's
            if new.firmware_size is not None:
                raise errors.invalid("FirmwareSize", SINGLE_FILE_ONLY)
            if new.firmware_sign:
                raise errors.invalid("FirmwareSign", SINGLE_FILE_ONLY)
        names = [f.name for f in new.files]
        for name in names:
            if names.count(name) > 1:
                raise errors.MultiFileNameDuplicated(name=name)
        method = SIGN_METHODS[new.sign_method]

        with self.db.connect() as conn:
            product = product_row(conn, tenant, new.product_key)
            module = module_row(conn, product["id"], new.module_name)
            self._check_name_and_quota(conn, tenant, new.name)
            single_key = self._owned_key(conn, tenant, new.firmware_url) if new.firmware_url else None
            file_keys = [self._owned_key(conn, tenant, f.url) for f in new.files]

        # Hash outside any transaction: a 1000 MB object takes seconds to read.
        values: dict = {"size": 0, "sign": None, "blob_key": single_key}
        if single_key:
            digest = self._digest(single_key, new.firmware_url)
            actual_sign = _sign_of(digest, method)
            if new.firmware_size is not None and new.firmware_size != digest.size:
                raise errors.FirmwareSizeMismatch(what="FirmwareSize", given=new.firmware_size, actual=digest.size)
            if new.firmware_sign and new.firmware_sign.lower() != actual_sign:
                raise errors.FirmwareSignMismatch(what="FirmwareSign", method=method, actual=actual_sign)
            values.update(size=digest.size, sign=actual_sign, md5=digest.md5)
        stored_files = []
        for spec, key in zip(new.files, file_keys):
            digest = self._digest(key, spec.url)
            actual_sign = _sign_of(digest, method)
            label = f"MultiFiles {spec.name!r}"
            if spec.size is not None and spec.size != digest.size:
                raise errors.FirmwareSizeMismatch(what=f"{label} Size", given=spec.size, actual=digest.size)
            if spec.sign_value and spec.sign_value.lower() != actual_sign:
                raise errors.FirmwareSignMismatch(what=f"{label} SignValue", method=method, actual=actual_sign)
            if spec.file_md5 and spec.file_md5.lower() != digest.md5:
                raise errors.FirmwareSignMismatch(what=f"{label} FileMd5", method="Md5", actual=digest.md5)
            stored_files.append(
                {"name": spec.name, "blob_key": key, "size": digest.size, "sign_value": actual_sign,
                 "file_md5": digest.md5}
            )
            values["size"] += digest.size

        now = now_ms()
        firmware_id = ids.random_alnum(26)
        adopted = [(single_key, new.firmware_url)] if single_key else []
        adopted += [(key, spec.url) for spec, key in zip(new.files, file_keys)]
        try:
            with self.db.begin() as conn:
                # Creates in the instance take turns from here: the quota counted below sees every
                # other create's package (unheld, creates on several replicas each counted 499 and
                # all inserted). First, so the upload rows below are always locked after it.
                account_store.hold_instance(conn, tenant.instance_pk)
                # The objects were hashed outside any transaction: a collector or the deletion of
                # another package may have removed one since. Its upload row decides, under lock.
                for key, url in adopted:
                    if not upload_store.lock(conn, key, tenant.instance_pk):
                        if upload_store.withdrawn(conn, key, tenant.instance_pk):
                            raise errors.FirmwareUploadWithdrawn(url=url)
                        raise errors.FirmwareFileNotFound(url=url)
                self._check_name_and_quota(conn, tenant, new.name)
                store.insert(
                    conn,
                    {
                        **values,
                        "firmware_id": firmware_id,
                        "instance_pk": tenant.instance_pk,
                        "product_id": product["id"],
                        "module_id": module["id"],
                        "name": new.name,
                        "description": new.description,
                        "dest_version": new.dest_version,
                        "src_version": new.src_version,
                        "type": new.type,
                        "sign_method": method,
                        "udi": new.udi,
                        "need_to_verify": new.need_to_verify,
                        "status": STATUS_UNVERIFIED if new.need_to_verify else STATUS_NO_VERIFY,
                        "verify_progress": 0,
                        "created_ms": now,
                        "modified_ms": now,
                    },
                    stored_files,
                )
        except IntegrityError:
            self._explain_refused_insert(tenant, new)
            raise
        return self.get(tenant, firmware_id)

    def _explain_refused_insert(self, tenant: Tenant, new: NewFirmware) -> None:
        """Raise the business error behind a refused package INSERT: a concurrent create took
        the name, or the product or module was deleted while the object was being hashed."""
        with self.db.connect() as conn:
            if store.name_taken(conn, tenant.instance_pk, new.name):
                raise errors.FirmwareNameExists() from None
            product = product_row(conn, tenant, new.product_key)
            module_row(conn, product["id"], new.module_name)

    def _check_name_and_quota(self, conn, tenant: Tenant, name: str) -> None:
        if store.name_taken(conn, tenant.instance_pk, name):
            raise errors.FirmwareNameExists()
        if store.count_in_instance(conn, tenant.instance_pk) >= MAX_PACKAGES_PER_INSTANCE:
            raise errors.FirmwareCountExceeded(limit=MAX_PACKAGES_PER_INSTANCE)

    # --- read -----------------------------------------------------------------------------------
    def get(self, tenant: Tenant, firmware_id: str) -> Firmware:
        with self.db.connect() as conn:
            found = store.get_built(conn, tenant.instance_pk, firmware_id, self._single_file_package)
            if found is None:
                raise errors.FirmwareNotFound()
            if found is not _MULTI_FILE:
                return found
            # A multi-file package: its files are rows of their own.
            row = store.get(conn, tenant.instance_pk, firmware_id)
            if row is None:  # deleted in between (outside a read snapshot)
                raise errors.FirmwareNotFound()
            return _firmware(row, store.files_of(conn, row["id"]))

    def _single_file_package(self, row: Mapping[str, Any]) -> Firmware | object:
        """The Firmware of a single-file package's row, built once per row value; _MULTI_FILE
        for a multi-file package, whose Firmware needs its files too."""
        if row["blob_key"] is None:
            return _MULTI_FILE
        return self._single_file_packages.get(row)

    def page(self, tenant: Tenant, current_page: int, page_size: int,
             product_key: str | None, dest_version: str | None) -> FirmwarePage:
        with self.db.connect() as conn:
            product_id = product_row(conn, tenant, product_key)["id"] if product_key else None
            total, rows = store.page(conn, tenant.instance_pk, (current_page - 1) * page_size, page_size,
                                     product_id, dest_version)
        return FirmwarePage(current_page, page_size, total, [_firmware(r, []) for r in rows])

    def download_url(self, blob_key: str) -> str:
        return self.blobs.presigned_get(blob_key, self.download_ttl_s)

    # --- change ---------------------------------------------------------------------------------
    def modify(self, tenant: Tenant, firmware_id: str, product_key: str, name: str | None,
               description: str | None, udi: str | None) -> None:
        try:
            with self.db.begin() as conn:
                row = store.get(conn, tenant.instance_pk, firmware_id)
                if row is None or row["product_key"] != product_key:
                    raise errors.FirmwareNotFound()
                values: dict = {"modified_ms": now_ms()}
                if name is not None:
                    if store.name_taken(conn, tenant.instance_pk, name, except_pk=row["id"]):
                        raise errors.FirmwareNameExists()
                    values["name"] = name
                if description is not None:
                    values["description"] = description
                if udi is not None:
                    values["udi"] = udi
                store.update(conn, row["id"], values)
        except IntegrityError:
            raise errors.FirmwareNameExists() from None

    def delete(self, tenant: Tenant, firmware_id: str) -> None:
        with self.db.begin() as conn:
            # Locked before the checks: a job (or push) of the package that another replica is
            # creating is either committed and seen below, or waits and then finds no package.
            # Unlocked, the DELETE waited for that job's commit and then took it away with it.
            if not store.lock_for_delete(conn, tenant.instance_pk, firmware_id):
                raise errors.FirmwareNotFound()
            row = store.get(conn, tenant.instance_pk, firmware_id)
            if row is None:
                raise errors.FirmwareNotFound()
            # Deleting a package deletes its jobs and their tasks: not while a task still runs.
            if job_store.running_jobs_of_firmware(conn, row["id"]) or \
                    job_store.firmware_has_unfinished_tasks(conn, row["id"]):
                raise errors.FirmwareHasRunningJob()
            keys = store.delete(conn, row["id"])
        self._remove_unreferenced(keys)

    def _remove_unreferenced(self, keys: list[str]) -> None:
        """Delete the objects no package refers to any more, and their upload records. Best
        effort: an object the store fails to delete (S3 unreachable) keeps its record, so the
        collector of abandoned uploads tries again later; the caller's change stands."""
        # An upload whose form may still be posted (UPLOAD_POLICY_TTL_S after GenerateOTAUploadURL)
        # keeps its record, withdrawn, for the collector of abandoned uploads, which deletes what a
        # late post stores: forgotten now, such an object would be nobody's.
        forms_valid_since = now_ms() - (UPLOAD_POLICY_TTL_S + CLOCK_SKEW_S) * 1000
        for key in sorted(set(keys)):
            with self.db.begin() as conn:
                upload_store.lock(conn, key)  # a create adopting it goes first, or finds it gone
                if upload_store.is_referenced(conn, key):
                    continue
                record = upload_store.forget(conn, key, created_before_ms=forms_valid_since)
                if record is None:  # its form may still be posted (or there is no record)
                    upload_store.withdraw(conn, key, now_ms())
            try:
                self.blobs.delete(key)
            except BlobStoreUnavailable as problem:
                log.warning("object %s not deleted, left for the next collection: %s", key, problem)
                if record is not None:
                    with self.db.begin() as conn:
                        upload_store.record(conn, key, record["instance_pk"], record["created_ms"])
                return  # the store is down: the other keys stay recorded too, for the next collection

    def collect_abandoned_uploads(self) -> int:
        """Delete uploads that no package adopted within the grace period."""
        with self.db.connect() as conn:
            keys = upload_store.abandoned(conn, now_ms() - UPLOAD_ADOPTION_GRACE_MS)
        self._remove_unreferenced(keys)
        return len(keys)
