"""GenerateOTAUploadURL, CreateOTAFirmware, QueryOTAFirmware, ListOTAFirmware,
ModifyOTAFirmware, DeleteOTAFirmware."""

from __future__ import annotations

from typing import Any

from otaplane.openapi.actions.common import PRODUCT_KEY, paging
from otaplane.openapi.params import Bool, Enum, Int, Param, Str, StructList
from otaplane.openapi.registry import action
from otaplane.services.firmware import MAX_FILE_BYTES, FileSpec, Firmware, NewFirmware, SIGN_METHODS
from otaplane.timefmt import utc_iso_ms

FILE_SUFFIXES = ("bin", "dav", "apk", "tar", "gz", "tar.gz", "zip", "gzip", "tar.xz", "pack")
VERSION = Str(min_len=1, max_len=64, pattern=r"[A-Za-z0-9._-]+",
              pattern_hint="may contain only letters, digits, '.', '_' and '-'")
FIRMWARE_NAME = Str(min_len=1, max_len=40, pattern=r"[^\W_][\w()-]*",
                    pattern_hint="must start with a letter or digit and contain only letters, digits, _ ( ) -")
FIRMWARE_ID = Param("FirmwareId", Str(min_len=1, max_len=64), required=True, aliases=("FirmwareID",))
URL = Str(min_len=1, max_len=2048)
HEX_SIGN = Str(min_len=32, max_len=64, pattern=r"[0-9A-Fa-f]+", pattern_hint="must be a hex digest")


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def _simple_info(fw: Firmware) -> dict[str, Any]:
    return _drop_none({
        "FirmwareId": fw.firmware_id,
        "FirmwareName": fw.name,
        "FirmwareDesc": fw.description,
        "DestVersion": fw.dest_version,
        "SrcVersion": fw.src_version,
        "ProductKey": fw.product_key,
        "ProductName": fw.product_name,
        "ModuleName": fw.module_name,
        "Type": fw.type,
        "SignMethod": fw.sign_method,
        "FirmwareSign": fw.sign,
        "FirmwareSize": fw.size,
        "Status": fw.status,
        "UtcCreate": utc_iso_ms(fw.created_ms),
        "UtcModified": utc_iso_ms(fw.modified_ms),
    })


@action("GenerateOTAUploadURL", Param("FileSuffix", Enum(FILE_SUFFIXES), default="bin"))
def generate_upload_url(services, tenant, p):
    form, created_ms = services.firmware.new_upload(tenant, p["FileSuffix"])
    data = {
        "Key": form.key,
        "Host": form.host,
        "Policy": form.policy,
        "OSSAccessKeyId": form.access_key_id,
        "Signature": form.signature,
        "FirmwareUrl": form.object_url,
        "ObjectStorage": form.object_storage,
        "UtcCreate": utc_iso_ms(created_ms),
    }
    if form.object_storage != "OSS":
        # Not an OSS-compatible store: clients must post exactly these form fields.
        data["FormFields"] = form.fields
    return {"Data": data}


@action(
    "CreateOTAFirmware",
    Param("FirmwareName", FIRMWARE_NAME, required=True),
    Param("DestVersion", VERSION, required=True),
    # Optional in the platform's metadata, but a package there belongs to one product (the console
    # makes product-less packages from before be assigned one before any use) and its ModuleName
    # is that product's: without it, MissingProductKey rather than a package no job could use.
    PRODUCT_KEY,
    Param("FirmwareUrl", URL),
    Param("SrcVersion", VERSION),
    Param("ModuleName", Str(min_len=1, max_len=64), default="default"),
    Param("Type", Int(choices=(0, 1)), default=0),
    Param("SignMethod", Enum(tuple(SIGN_METHODS)), default="MD5"),
    Param("FirmwareSign", HEX_SIGN),
    Param("FirmwareSize", Int(min=1, max=MAX_FILE_BYTES * 20)),
    Param("FirmwareDesc", Str(max_len=100)),
    Param("Udi", Str(max_len=4096)),
    Param("NeedToVerify", Bool(), default=True),
    Param(
        "MultiFiles",
        StructList(
            {"Name": Str(min_len=1, max_len=32), "Url": URL, "Size": Int(min=1, max=MAX_FILE_BYTES),
             "SignValue": HEX_SIGN, "FileMd5": Str(min_len=32, max_len=32, pattern=r"[0-9A-Fa-f]+")},
            required_fields=("Name", "Url"),
            max_items=20,
        ),
    ),
)
def create_firmware(services, tenant, p):
    files = [FileSpec(f["Name"], f["Url"], f.get("Size"), f.get("SignValue"), f.get("FileMd5"))
             for f in p["MultiFiles"] or []]
    fw = services.firmware.create(
        tenant,
        NewFirmware(
            product_key=p["ProductKey"], name=p["FirmwareName"], dest_version=p["DestVersion"],
            firmware_url=p["FirmwareUrl"], files=files, src_version=p["SrcVersion"],
            module_name=p["ModuleName"], type=p["Type"], sign_method=p["SignMethod"],
            firmware_sign=p["FirmwareSign"], firmware_size=p["FirmwareSize"],
            description=p["FirmwareDesc"], udi=p["Udi"], need_to_verify=p["NeedToVerify"],
        ),
    )
    return {"Data": {"FirmwareId": fw.firmware_id, "UtcCreate": utc_iso_ms(fw.created_ms)}}


# Firmware (memoized by FirmwareService.get while its row is unchanged) -> its _simple_info.
_SIMPLE_INFO_MEMO: dict[int, tuple[Firmware, dict[str, Any]]] = {}


def _memo_simple_info(fw: Firmware) -> dict[str, Any]:
    """_simple_info(fw), a fresh copy, built once per Firmware object (keyed by identity; the
    entry holds the object, so its id is not reused while the entry lives)."""
    entry = _SIMPLE_INFO_MEMO.get(id(fw))
    if entry is None or entry[0] is not fw:
        if len(_SIMPLE_INFO_MEMO) >= 1024:
            _SIMPLE_INFO_MEMO.clear()
        entry = _SIMPLE_INFO_MEMO[id(fw)] = (fw, _simple_info(fw))
    return dict(entry[1])


@action("QueryOTAFirmware", FIRMWARE_ID, quick_read=True)
def query_firmware(services, tenant, p):
    fw = services.firmware.get(tenant, p["FirmwareId"])
    info = _memo_simple_info(fw)
    if fw.blob_key:
        info["FirmwareUrl"] = services.firmware.download_url(fw.blob_key)
    if fw.udi is not None:
        info["Udi"] = fw.udi
    info["VerifyProgress"] = fw.verify_progress
    if fw.files:
        info["MultiFiles"] = [
            {"Name": f.name, "Url": services.firmware.download_url(f.blob_key), "Size": f.size,
             "SignValue": f.sign_value, "FileMd5": f.file_md5}
            for f in fw.files
        ]
    return {"FirmwareInfo": info}


@action("ListOTAFirmware", *paging(100), Param("ProductKey", Str(max_len=32)), Param("DestVersion", VERSION))
def list_firmware(services, tenant, p):
    page = services.firmware.page(tenant, p["CurrentPage"], p["PageSize"], p["ProductKey"], p["DestVersion"])
    return {
        "FirmwareInfo": {"SimpleFirmwareInfo": [_simple_info(fw) for fw in page.items]},
        "CurrentPage": page.current_page,
        "PageSize": page.page_size,
        "PageCount": page.page_count,
        "Total": page.total,
    }


@action(
    "ModifyOTAFirmware",
    FIRMWARE_ID,
    PRODUCT_KEY,
    Param("FirmwareName", FIRMWARE_NAME),
    Param("FirmwareDesc", Str(max_len=100)),
    Param("FirmwareUdi", Str(max_len=4096)),
)
def modify_firmware(services, tenant, p):
    services.firmware.modify(tenant, p["FirmwareId"], p["ProductKey"], p["FirmwareName"],
                             p["FirmwareDesc"], p["FirmwareUdi"])
    return {}


@action("DeleteOTAFirmware", FIRMWARE_ID)
def delete_firmware(services, tenant, p):
    services.firmware.delete(tenant, p["FirmwareId"])
    return {}


ACTIONS = (generate_upload_url, create_firmware, query_firmware, list_firmware, modify_firmware, delete_firmware)
