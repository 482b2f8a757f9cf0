"""The device registry actions (RegisterDevice, QueryDeviceDetail, ...) and
ListOTAModuleVersionsByDevice."""

from __future__ import annotations

from datetime import datetime, timezone
from math import ceil
from typing import Any

from otaplane import errors
from otaplane.openapi.actions.common import MAX_PAGE, PRODUCT_KEY, paging
from otaplane.openapi.params import Int, Param, Str
from otaplane.openapi.registry import action
from otaplane.services.devices import Device, DeviceRef
from otaplane.timefmt import utc_iso_ms

DEVICE_REF = (
    Param("IotId", Str(max_len=64)),
    Param("ProductKey", Str(max_len=32)),
    Param("DeviceName", Str(max_len=64)),
)
NICKNAME = Param("Nickname", Str(min_len=4, max_len=64))


def _ref(p: dict[str, Any]) -> DeviceRef:
    return DeviceRef(p["IotId"], p["ProductKey"], p["DeviceName"])


def _gmt(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _utc(ms: int | None) -> str | None:
    return utc_iso_ms(ms) if ms is not None else None


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


@action("RegisterDevice", PRODUCT_KEY, Param("DeviceName", Str(max_len=64)), NICKNAME)
def register_device(services, tenant, p):
    device = services.devices.register(tenant, p["ProductKey"], p["DeviceName"], p["Nickname"])
    return {"Data": _drop_none({
        "IotId": device.iot_id, "ProductKey": device.product_key, "DeviceName": device.device_name,
        "DeviceSecret": device.device_secret, "Nickname": device.nickname,
    })}


@action("BatchRegisterDevice", PRODUCT_KEY, Param("Count", Int(min=1, max=10_000), required=True))
def batch_register_device(services, tenant, p):
    return {"Data": {"ApplyId": services.devices.batch_register(tenant, p["ProductKey"], p["Count"])}}


@action("QueryBatchRegisterDeviceStatus", PRODUCT_KEY, Param("ApplyId", Int(min=1), required=True))
def query_batch_status(services, tenant, p):
    status, names = services.devices.apply_status(tenant, p["ProductKey"], p["ApplyId"])
    return {"Data": {"Status": status, "ValidList": {"Name": names}, "InvalidList": {"Name": []}}}


@action("QueryPageByApplyId", Param("ApplyId", Int(min=1), required=True), *paging(50, default_size=10))
def query_page_by_apply_id(services, tenant, p):
    page = services.devices.apply_page(tenant, p["ApplyId"], p["CurrentPage"], p["PageSize"])
    return {
        "ApplyDeviceList": {"ApplyDeviceInfo": [
            {"IotId": d.iot_id, "DeviceName": d.device_name, "DeviceSecret": d.device_secret, "DeviceId": d.iot_id}
            for d in page.items
        ]},
        "Page": page.current_page, "PageSize": page.page_size, "PageCount": page.page_count, "Total": page.total,
    }


def _detail(device: Device) -> dict[str, Any]:
    return _drop_none({
        "IotId": device.iot_id, "ProductKey": device.product_key, "ProductName": device.product_name,
        "DeviceName": device.device_name, "DeviceSecret": device.device_secret,
        "FirmwareVersion": device.firmware_version, "Status": device.status, "NodeType": device.node_type,
        "Nickname": device.nickname, "IpAddress": device.ip_address,
        "GmtCreate": _gmt(device.created_ms), "UtcCreate": _utc(device.created_ms),
        "GmtActive": _gmt(device.active_ms), "UtcActive": _utc(device.active_ms),
        "GmtOnline": _gmt(device.online_ms), "UtcOnline": _utc(device.online_ms), "Owner": True,
    })


@action("QueryDeviceDetail", *DEVICE_REF)
def query_device_detail(services, tenant, p):
    return {"Data": _detail(services.devices.get(tenant, _ref(p)))}


@action("QueryDeviceInfo", *DEVICE_REF)
def query_device_info(services, tenant, p):
    d = services.devices.get(tenant, _ref(p))
    return {"Data": _drop_none({"IotId": d.iot_id, "ProductKey": d.product_key, "DeviceName": d.device_name,
                                "DeviceSecret": d.device_secret, "Nickname": d.nickname})}


@action("QueryDevice", PRODUCT_KEY, *paging(50, default_size=10), Param("NextToken", Str(max_len=64)))
def query_device(services, tenant, p):
    current_page = p["CurrentPage"]
    if p["NextToken"]:  # our NextToken is simply the next page number
        # Held to CurrentPage's bounds: a token past them made PostgreSQL's OFFSET overflow (a 500).
        # ASCII digits: str.isdigit() passes '²', on which int() raises (a 500).
        if not (p["NextToken"].isascii() and p["NextToken"].isdigit()) or not 1 <= int(p["NextToken"]) <= MAX_PAGE:
            raise errors.invalid("NextToken", "is not a token this server issued")
        current_page = int(p["NextToken"])
    page = services.devices.page(tenant, p["ProductKey"], current_page, p["PageSize"])
    body: dict[str, Any] = {
        "Data": {"DeviceInfo": [_drop_none({
            "IotId": d.iot_id, "DeviceId": d.iot_id, "DeviceName": d.device_name, "DeviceSecret": d.device_secret,
            "DeviceStatus": d.status, "DeviceType": d.product_key, "ProductKey": d.product_key,
            "Nickname": d.nickname, "GmtCreate": _gmt(d.created_ms), "GmtModified": _gmt(d.modified_ms),
            "UtcCreate": _utc(d.created_ms), "UtcModified": _utc(d.modified_ms),
        }) for d in page.items]},
        "Page": page.current_page, "PageSize": page.page_size, "PageCount": page.page_count, "Total": page.total,
    }
    if page.current_page < page.page_count:
        body["NextToken"] = str(page.current_page + 1)
    return body


@action("DeleteDevice", *DEVICE_REF)
def delete_device(services, tenant, p):
    services.devices.delete(tenant, _ref(p))
    return {}


@action("GetDeviceStatus", *DEVICE_REF)
def get_device_status(services, tenant, p):
    device = services.devices.get(tenant, _ref(p))
    # When the status last changed: online since; offline since the last message (its disconnect).
    changed = device.online_ms if device.status == "ONLINE" else (device.last_seen_ms or device.created_ms)
    return {"Data": {"Status": device.status, "Timestamp": changed or device.created_ms}}


@action("ListOTAModuleVersionsByDevice", *DEVICE_REF, *paging(200))
def list_module_versions(services, tenant, p):
    device, versions = services.devices.module_versions(tenant, _ref(p))
    size, current = p["PageSize"], p["CurrentPage"]
    shown = versions[(current - 1) * size: current * size]
    return {
        "Data": {"SimpleOTAModuleInfo": [
            {"ProductKey": device.product_key, "DeviceName": device.device_name, "IotId": device.iot_id,
             "ModuleName": v.module_name, "ModuleVersion": v.version}
            for v in shown
        ]},
        "CurrentPage": current, "PageSize": size, "PageCount": ceil(len(versions) / size), "Total": len(versions),
    }


ACTIONS = (
    register_device, batch_register_device, query_batch_status, query_page_by_apply_id, query_device_detail,
    query_device_info, query_device, delete_device, get_device_status, list_module_versions,
)
