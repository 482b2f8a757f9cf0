"""OTA modules with the official SDKs: default module, limits, case-insensitive names."""

from __future__ import annotations

import uuid

import pytest

from tests.support.clients import SdkCaller
from tests.support.uploads import post_upload


@pytest.fixture(params=SdkCaller.VARIANTS)
def sdk(request, server, admin_key) -> SdkCaller:
    return SdkCaller(request.param, server.endpoint, *admin_key)


def new_product(api: SdkCaller) -> str:
    return api.call("CreateProduct", {"ProductName": "m_" + uuid.uuid4().hex[:10], "NodeType": 0})["ProductKey"]


def test_module_lifecycle(sdk):
    product_key = new_product(sdk)
    listed = sdk.call("ListOTAModuleByProduct", {"ProductKey": product_key})
    assert isinstance(listed["Data"], list)
    assert [m["ModuleName"] for m in listed["Data"]] == ["default"]
    assert listed["Data"][0]["GmtCreate"].endswith(" GMT")

    assert sdk.call("CreateOTAModule", {"ProductKey": product_key, "ModuleName": "MCU",
                                        "AliasName": "main mcu", "Desc": "the MCU"})["Success"]
    again = sdk.call("CreateOTAModule", {"ProductKey": product_key, "ModuleName": "mcu"})
    assert (again["Success"], again["Code"]) == (False, "iot.ota.ModuleNameExisted")
    assert sdk.call("CreateOTAModule", {"ProductKey": product_key, "ModuleName": "DEFAULT"})["Code"] == \
        "iot.ota.ModuleNameExisted"

    assert sdk.call("UpdateOTAModule", {"ProductKey": product_key, "ModuleName": "MCU",
                                        "AliasName": "renamed", "Desc": "new"})["Success"]
    modules = {m["ModuleName"]: m for m in sdk.call("ListOTAModuleByProduct", {"ProductKey": product_key})["Data"]}
    assert modules["MCU"]["AliasName"] == "renamed" and modules["MCU"]["Desc"] == "new"
    assert modules["MCU"]["ProductKey"] == product_key

    refused = sdk.call("DeleteOTAModule", {"ProductKey": product_key, "ModuleName": "default"})
    assert refused["Code"] == "iot.ota.DefaultModuleNotAllowedDelete"
    assert sdk.call("DeleteOTAModule", {"ProductKey": product_key, "ModuleName": "MCU"})["Success"]
    missing = sdk.call("DeleteOTAModule", {"ProductKey": product_key, "ModuleName": "MCU"})
    assert missing["Code"] == "iot.ota.ModuleNotFound"


def test_at_most_ten_custom_modules(server, admin_key):
    api = SdkCaller("tea-v3", server.endpoint, *admin_key)
    product_key = new_product(api)
    for i in range(10):
        assert api.call("CreateOTAModule", {"ProductKey": product_key, "ModuleName": f"m{i}"})["Success"]
    body = api.call("CreateOTAModule", {"ProductKey": product_key, "ModuleName": "m10"})
    assert (body["Success"], body["Code"]) == (False, "iot.ota.ModuleCountExceeded")


def test_module_with_packages_cannot_be_deleted(server, admin_key):
    api = SdkCaller("tea-v3", server.endpoint, *admin_key)
    product_key = new_product(api)
    api.call("CreateOTAModule", {"ProductKey": product_key, "ModuleName": "wifi"})
    data = api.call("GenerateOTAUploadURL", {})["Data"]
    post_upload(data, b"wifi firmware")
    created = api.call("CreateOTAFirmware", {"ProductKey": product_key, "FirmwareName": "w" + uuid.uuid4().hex[:8],
                                             "DestVersion": "1.1", "FirmwareUrl": data["FirmwareUrl"],
                                             "ModuleName": "WIFI"})
    assert created["Success"], created
    info = api.call("QueryOTAFirmware", {"FirmwareId": created["Data"]["FirmwareId"]})["FirmwareInfo"]
    assert info["ModuleName"] == "wifi"
    body = api.call("DeleteOTAModule", {"ProductKey": product_key, "ModuleName": "wifi"})
    assert (body["Success"], body["Code"]) == (False, "iot.ota.ModuleHasFirmware")


def test_list_modules_answers_get_as_the_sdks_send_it(server, admin_key):
    from tests.support.clients import RawSigner

    raw = RawSigner(server.base_url, *admin_key)
    product_key = new_product(SdkCaller("tea-v3", server.endpoint, *admin_key))
    response = raw.v1("ListOTAModuleByProduct", {"ProductKey": product_key}, method="GET")
    assert response.status_code == 200 and response.json()["Data"][0]["ModuleName"] == "default"
