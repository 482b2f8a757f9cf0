"""Upgrade jobs over the wire: the 15 job actions through all three official client variants,
with real devices on the server's MQTT channel taking the pushes and reporting progress and
versions (../shared/reference/device-protocol.md).

Variants: legacy `aliyun-python-sdk-core` + `aliyunsdkiot` request classes (signature V1), the Tea
`alibabacloud-iot20180120` client with V3 signatures, and the Tea client with V1 (`v2`). Each
variant works in an account of its own with one product and one package (NeedToVerify=false)
shared by its tests; every test registers and connects its own devices, and tests that select
devices product-wide (ALL, GRAY, dynamic) filter them by a SrcVersion only their devices report.

Timers (task timeout and retry, ScheduleTime, MaximumPerMinute pacing) run at the end on a server
of their own whose job "minute" is one second, with the Tea V3 client only.

Every answer is checked against the contract's field tree (the job subset of
/work/shared/contract/aliyun-iot-actions.json, copied below); for Tea, the SDK's parsed model
(`from_map`) must give back exactly the raw body, so nothing is dropped or misnested.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from aliyunsdkcore.acs_exception.exceptions import ServerException as LegacyServerException
from Tea.exceptions import TeaException

from tests.conftest import BACKENDS
from tests.e2e.test_products_sdk import assert_shape
from tests.support.clients import RawSigner, SdkCaller, iot_models, legacy_call, legacy_client, tea_client
from tests.support.devices import Device, connect
from tests.support.uploads import post_upload
from tests.support.waiting import eventually

# --- the contract ------------------------------------------------------------------------------
# Response trees of the shared contract for the job actions ("scalar" = any non-container value,
# [tree] = a list of items shaped like tree). One deliberate difference: the shared file writes
# QueryOTAJob's SrcVersions.SrcVersion (a list of strings in the Tea model and on the wire) as a
# scalar; here it is [S], and the copy test below accepts exactly that difference.
S = "scalar"
_ENVELOPE = {"Code": S, "ErrorMessage": S, "RequestId": S, "Success": S}
_CREATED = {**_ENVELOPE, "Data": {"JobId": S, "UtcCreate": S}}
_TAGS = {"OtaTagDTO": [{"Key": S, "Value": S}]}
_SIMPLE_JOB = {
    "FirmwareId": S, "JobId": S, "JobStatus": S, "JobType": S, "ProductKey": S, "SelectionType": S,
    "Tags": _TAGS, "TargetSelection": S, "UtcCreate": S, "UtcEndTime": S, "UtcModified": S, "UtcStartTime": S,
}
_PAGING = {"CurrentPage": S, "PageCount": S, "PageSize": S, "Total": S}
CONTRACT: dict[str, dict[str, Any]] = {
    "CreateOTAVerifyJob": _CREATED,
    "CreateOTAStaticUpgradeJob": _CREATED,
    "CreateOTADynamicUpgradeJob": _CREATED,
    "QueryOTAJob": {**_ENVELOPE, "Data": {
        "DestVersion": S, "DownloadProtocol": S, "DynamicMode": S, "FirmwareId": S, "GrayPercent": S,
        "GroupId": S, "GroupName": S, "JobDesc": S, "JobId": S, "JobStatus": S, "JobType": S,
        "MaximumPerMinute": S, "MultiModuleMode": S, "Name": S, "NeedConfirm": S, "NeedPush": S,
        "OverwriteMode": S, "ProductKey": S, "RetryCount": S, "RetryInterval": S, "SelectionType": S,
        "SrcVersions": {"SrcVersion": [S]}, "Tags": _TAGS, "TargetSelection": S, "TimeoutInMinutes": S,
        "UtcCreate": S, "UtcEndTime": S, "UtcModified": S, "UtcScheduleFinishTime": S, "UtcScheduleTime": S,
        "UtcStartTime": S,
    }},
    "UpdateOTAJob": dict(_ENVELOPE),
    "ListOTAJobByFirmware": {**_ENVELOPE, **_PAGING, "Data": {"SimpleOTAJobInfo": [_SIMPLE_JOB]}},
    "ListOTAJobByDevice": {**_ENVELOPE, **_PAGING, "Data": {"SimpleOTAJobInfo": [_SIMPLE_JOB]}},
    "ListOTATaskByJob": {**_ENVELOPE, **_PAGING, "Data": {"SimpleOTATaskInfo": [{
        "DestVersion": S, "DeviceName": S, "FirmwareId": S, "IotId": S, "JobId": S, "ProductKey": S,
        "ProductName": S, "Progress": S, "SrcVersion": S, "TaskDesc": S, "TaskId": S, "TaskStatus": S,
        "Timeout": S, "UtcCreate": S, "UtcModified": S,
    }]}},
    "ListOTAUnfinishedTaskByDevice": {**_ENVELOPE, "Data": {"SimpleOTATaskInfo": [{
        "DestVersion": S, "DeviceName": S, "FirmwareId": S, "IotId": S, "JobId": S, "ModuleName": S,
        "ProductKey": S, "ProductName": S, "SrcVersion": S, "TaskId": S, "TaskStatus": S, "UtcCreate": S,
        "UtcModified": S,
    }]}},
    "CancelOTATaskByJob": dict(_ENVELOPE),
    "CancelOTATaskByDevice": dict(_ENVELOPE),
    "CancelOTAStrategyByJob": dict(_ENVELOPE),
    "ReupgradeOTATask": dict(_ENVELOPE),
    "ConfirmOTATask": dict(_ENVELOPE),
    "QueryOTAFirmware": {**_ENVELOPE, "FirmwareInfo": {
        "DestVersion": S, "FirmwareDesc": S, "FirmwareId": S, "FirmwareName": S, "FirmwareSign": S,
        "FirmwareSize": S, "FirmwareUrl": S, "ModuleName": S,
        "MultiFiles": [{"FileMd5": S, "Name": S, "SignValue": S, "Size": S, "Url": S}], "ProductKey": S,
        "ProductName": S, "SignMethod": S, "SrcVersion": S, "Status": S, "Type": S, "Udi": S, "UtcCreate": S,
        "UtcModified": S, "VerifyProgress": S,
    }},
    "DeleteOTAFirmware": dict(_ENVELOPE),
    # Not in the shared file: ../shared/reference/openapi.md §4 (note AccessKeyId and FileUrl).
    "GenerateDeviceNameListURL": {**_ENVELOPE, "Data": {
        "AccessKeyId": S, "FileUrl": S, "Host": S, "Key": S, "ObjectStorage": S, "Policy": S, "Signature": S,
        "UtcCreate": S,
    }},
}
SHARED_CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract" / "aliyun-iot-actions.json"
UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
JOB_ID = re.compile(r"^[A-Za-z0-9]{24}$")


def test_contract_copy_matches_the_shared_contract():
    if not SHARED_CONTRACT.exists():
        pytest.skip("the shared contract file is not available here")
    full = json.loads(SHARED_CONTRACT.read_text())
    for action, tree in CONTRACT.items():
        if action == "GenerateDeviceNameListURL":
            assert action not in full  # if it is added there, compare it here too
            continue
        expected = full[action]["response"]
        if action == "QueryOTAJob":
            expected = json.loads(json.dumps(expected))
            assert expected["Data"]["SrcVersions"] == {"SrcVersion": S}
            expected["Data"]["SrcVersions"] = {"SrcVersion": [S]}
        assert expected == tree, action


# --- the three client variants -----------------------------------------------------------------
class GatewayError(Exception):
    """What an SDK raised for an HTTP 4xx/5xx answer."""

    def __init__(self, code: str, http_status: int | None, raised: BaseException):
        super().__init__(f"{code} (HTTP {http_status})")
        self.code = code
        self.http_status = http_status
        self.raised = raised


class Api:
    """One SDK variant bound to one account, built with the SDK's own request classes.
    `call(action, params)` returns the raw JSON body the SDK received (wire key names)."""

    def __init__(self, variant: str, endpoint: str, key_id: str, secret: str):
        self.variant = variant
        self.endpoint = endpoint
        self.key = (key_id, secret)
        if variant == "legacy-v1":
            self._legacy = legacy_client(key_id, secret)
        else:
            self._tea = tea_client(endpoint, key_id, secret, "v2" if variant == "tea-v2" else "v3")
            self._methods = {name.replace("_", "").lower(): name for name in dir(self._tea)
                             if not name.startswith("_") and not name.endswith(("_async", "_with_options"))}
            self._raw: list[dict] = []
            original = self._tea.call_api

            def recording_call_api(params, request, runtime):
                result = original(params, request, runtime)
                self._raw.append(result["body"])
                return result

            self._tea.call_api = recording_call_api

    def call(self, action: str, params: dict | None = None) -> dict:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        if self.variant == "legacy-v1":
            module = importlib.import_module(f"aliyunsdkiot.request.v20180120.{action}Request")
            request = getattr(module, f"{action}Request")()
            for name, value in params.items():
                # The legacy classes name a repeated parameter's setter with an extra "s".
                setter = getattr(request, f"set_{name}s", None) if isinstance(value, list) else None
                (setter or getattr(request, f"set_{name}"))(value)
            try:
                body = legacy_call(self._legacy, self.endpoint, request)
            except LegacyServerException as exc:
                raise GatewayError(exc.get_error_code(), exc.get_http_status(), exc) from exc
        else:
            request = getattr(iot_models, f"{action}Request")().from_map(params)
            try:
                response = getattr(self._tea, self._methods[action.lower()])(request)
            except TeaException as exc:
                status = getattr(exc, "status_code", None) or (exc.data or {}).get("statusCode")
                raise GatewayError(exc.code, status, exc) from exc
            body = self._raw[-1]
            assert response.status_code == 200
            # The model parsed from the body gives it back unchanged: every key known, nested right.
            assert not _diff(response.body.to_map(), body), (action, _diff(response.body.to_map(), body))
        if action in CONTRACT:
            assert_shape(body, CONTRACT[action])
        return body

    def ok(self, action: str, params: dict | None = None) -> dict:
        body = self.call(action, params)
        assert body["Success"] is True, (action, body)
        assert body["Code"] == "" and "ErrorMessage" not in body, body
        return body

    def fails(self, action: str, code: str, params: dict | None = None) -> dict:
        """A business error: HTTP 200, Success=false, the given Code, the envelope only."""
        body = self.call(action, params)
        assert (body["Success"], body["Code"]) == (False, code), (action, body)
        assert body["ErrorMessage"] and set(body) == {"RequestId", "Success", "Code", "ErrorMessage"}, body
        return body

    def refused(self, action: str, code: str, params: dict | None = None, status: int = 400) -> GatewayError:
        """A gateway error: the SDK raises, with this Code and a 4xx status."""
        with pytest.raises(GatewayError) as caught:
            self.call(action, params)
        error = caught.value
        assert (error.code, error.http_status) == (code, status), (action, params, error)
        return error


def _diff(parsed: Any, raw: Any, path: str = "$") -> list[str]:
    """Where the SDK's model (`to_map` after `from_map`) differs from the raw body."""
    if isinstance(parsed, dict) and isinstance(raw, dict):
        # Tea models always carry their list fields: an absent list comes back as [] (not a loss).
        out = [f"{path}.{k}: {'lost' if k in raw else 'added'}" for k in set(parsed) ^ set(raw)
               if not (k in parsed and parsed[k] == [])]
        return out + [d for k in set(parsed) & set(raw) for d in _diff(parsed[k], raw[k], f"{path}.{k}")]
    if isinstance(parsed, list) and isinstance(raw, list) and len(parsed) == len(raw):
        return [d for i, (a, b) in enumerate(zip(parsed, raw)) for d in _diff(a, b, f"{path}[{i}]")]
    return [] if parsed == raw else [f"{path}: {parsed!r} != {raw!r}"]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"




class Lab:
    """A variant's account on a server: one product, one package with NeedToVerify=false
    (Status -1, upgradable at once), and the devices the tests connect."""

    def __init__(self, server, api: Api):
        self.server = server
        self.api = api
        self.product_key = api.ok("CreateProduct", {"ProductName": unique("jobs_"), "NodeType": 0})["ProductKey"]
        self.firmware_id = self.firmware(verify=False)
        self.iot_ids: dict[str, str] = {}
        self.secrets: dict[str, str] = {}
        self.opened: list[Device] = []

    def firmware(self, verify: bool, version: str = "2.0.0") -> str:
        generated = self.api.ok("GenerateOTAUploadURL", {"FileSuffix": "bin"})["Data"]
        assert post_upload(generated, b"firmware " + uuid.uuid4().bytes * 50).status_code in (200, 204)
        body = self.api.ok("CreateOTAFirmware", {
            "ProductKey": self.product_key, "FirmwareName": unique("fw-"), "DestVersion": version,
            "FirmwareUrl": generated["FirmwareUrl"], "NeedToVerify": verify})
        return body["Data"]["FirmwareId"]

    def devices(self, count: int, version: str = "1.0.0") -> list[Device]:
        """Register, connect over MQTT and report `version`; returns once the server has it."""
        devices = []
        for _ in range(count):
            name = unique("dev-")
            data = self.api.ok("RegisterDevice", {"ProductKey": self.product_key, "DeviceName": name})["Data"]
            self.iot_ids[name] = data["IotId"]
            self.secrets[name] = data["DeviceSecret"]
            device = connect(self.server.mqtt_port, self.product_key, name, data["DeviceSecret"])
            self.opened.append(device)
            device.inform(version)
            devices.append(device)
        for device in devices:
            eventually(lambda: self.api.ok("QueryDeviceDetail", {
                "ProductKey": self.product_key, "DeviceName": device.device_name})["Data"].get(
                "FirmwareVersion") == version)
        return devices

    def static_job(self, selection: str, firmware_id: str | None = None, **params) -> str:
        body = self.api.ok("CreateOTAStaticUpgradeJob", {
            "ProductKey": self.product_key, "FirmwareId": firmware_id or self.firmware_id,
            "TargetSelection": selection, **params})
        assert JOB_ID.match(body["Data"]["JobId"]) and UTC_MS.match(body["Data"]["UtcCreate"]), body
        return body["Data"]["JobId"]

    def job(self, job_id: str) -> dict:
        return self.api.ok("QueryOTAJob", {"JobId": job_id})["Data"]

    def tasks(self, job_id: str, **filters) -> dict[str, dict]:
        body = self.api.ok("ListOTATaskByJob", {"JobId": job_id, "CurrentPage": 1, "PageSize": 100, **filters})
        items = body["Data"]["SimpleOTATaskInfo"]
        assert body["Total"] == len(items), body
        return {task["DeviceName"]: task for task in items}

    def statuses(self, job_id: str) -> dict[str, str]:
        return {name: task["TaskStatus"] for name, task in self.tasks(job_id).items()}

    def wait_statuses(self, job_id: str, expected: dict[str, str], timeout: float = 10) -> dict[str, dict]:
        def check():
            tasks = self.tasks(job_id)
            assert {n: t["TaskStatus"] for n, t in tasks.items()} == expected
            return tasks

        return eventually(check, timeout)

    def wait_job(self, job_id: str, status: str, timeout: float = 10) -> dict:
        def check():
            job = self.job(job_id)
            assert job["JobStatus"] == status, job
            return job

        return eventually(check, timeout)

    def firmware_state(self, firmware_id: str) -> tuple[int, int]:
        info = self.api.ok("QueryOTAFirmware", {"FirmwareId": firmware_id})["FirmwareInfo"]
        return info["Status"], info["VerifyProgress"]

    def unfinished(self, **ref) -> list[dict]:
        return self.api.ok("ListOTAUnfinishedTaskByDevice", ref)["Data"]["SimpleOTATaskInfo"]

    def close(self) -> None:
        for device in self.opened:
            device.close()


@pytest.fixture(scope="module", params=SdkCaller.VARIANTS)
def lab(request, server):
    key_id, secret = server.create_key(unique(f"jobs-{request.param}-"))
    lab = Lab(server, Api(request.param, server.endpoint, key_id, secret))
    yield lab
    lab.close()


def names(devices: list[Device]) -> list[str]:
    return [d.device_name for d in devices]


def upload_device_list(data: dict, csv_text: str) -> None:
    """Post a CSV with GenerateDeviceNameListURL's answer, as an OSS PostObject form (the answer
    says AccessKeyId; the form field is OSSAccessKeyId)."""
    form = {"key": data["Key"], "policy": data["Policy"], "OSSAccessKeyId": data["AccessKeyId"],
            "Signature": data["Signature"], "success_action_status": "200"}
    uploaded = httpx.post(data["Host"], data=form, timeout=30,
                          files={"file": ("devices.csv", csv_text.encode(), "text/csv")})
    assert uploaded.status_code in (200, 204), uploaded.text


def expect_push(device: Device, version: str = "2.0.0") -> dict:
    push = device.expect(device.upgrade_topic).json()
    assert (push["code"], push["message"], push["data"]["version"]) == ("1000", "success", version), push
    assert push["data"]["url"] and len(push["data"]["md5"]) == 32 and push["data"]["size"] > 0, push
    return push


# --- 1 + 2: a verify job end to end ----------------------------------------------------------
def test_verify_job_end_to_end(lab):
    api = lab.api
    first, second = lab.devices(2)
    firmware_id = lab.firmware(verify=True)
    assert lab.firmware_state(firmware_id) == (0, 0)
    # An unverified package goes into no upgrade job.
    api.fails("CreateOTAStaticUpgradeJob", "iot.ota.FirmwareNotVerified", {
        "ProductKey": lab.product_key, "FirmwareId": firmware_id, "TargetSelection": "SPECIFIC",
        "TargetDeviceName": [first.device_name]})

    created = api.ok("CreateOTAVerifyJob", {
        "ProductKey": lab.product_key, "FirmwareId": firmware_id, "TargetDeviceName": names([first, second]),
        "TimeoutInMinutes": 5, "Tag": [{"Key": "stage", "Value": "verify run"}]})["Data"]
    job_id = created["JobId"]
    assert JOB_ID.match(job_id) and UTC_MS.match(created["UtcCreate"])
    assert lab.firmware_state(firmware_id) == (2, 0)

    job = lab.job(job_id)
    assert job["JobType"] == "VERFIY_FIRMWARE"  # sic, as on the platform
    assert (job["JobStatus"], job["SelectionType"], job["TargetSelection"]) == ("IN_PROGRESS", "STATIC", "SPECIFIC")
    assert (job["FirmwareId"], job["ProductKey"], job["DestVersion"]) == (firmware_id, lab.product_key, "2.0.0")
    assert job["Name"] == api.ok("QueryOTAFirmware", {"FirmwareId": firmware_id})["FirmwareInfo"]["FirmwareName"]
    assert job["Tags"] == {"OtaTagDTO": [{"Key": "stage", "Value": "verify run"}]}
    assert job["SrcVersions"] == {"SrcVersion": []}
    assert (job["TimeoutInMinutes"], job["NeedConfirm"], job["NeedPush"]) == (5, False, True)
    assert UTC_MS.match(job["UtcCreate"]) and UTC_MS.match(job["UtcStartTime"]) and "UtcEndTime" not in job

    # While it verifies: no second verify job, no upgrade job, no deleting the package.
    api.fails("CreateOTAVerifyJob", "iot.ota.FirmwareVerifying", {
        "ProductKey": lab.product_key, "FirmwareId": firmware_id, "TargetDeviceName": [first.device_name]})
    api.fails("CreateOTAStaticUpgradeJob", "iot.ota.FirmwareNotVerified", {
        "ProductKey": lab.product_key, "FirmwareId": firmware_id, "TargetSelection": "SPECIFIC",
        "TargetDeviceName": [first.device_name]})
    api.fails("DeleteOTAFirmware", "iot.ota.FirmwareHasRunningJob", {"FirmwareId": firmware_id})

    sign = api.ok("QueryOTAFirmware", {"FirmwareId": firmware_id})["FirmwareInfo"]["FirmwareSign"]
    for device in (first, second):
        assert expect_push(device)["data"]["md5"] == sign
    tasks = lab.wait_statuses(job_id, {first.device_name: "NOTIFIED", second.device_name: "NOTIFIED"})
    for task in tasks.values():
        assert (task["Progress"], task["Timeout"], task["SrcVersion"], task["DestVersion"]) == \
            ("0.00", "5", "1.0.0", "2.0.0"), task
        assert (task["JobId"], task["FirmwareId"], task["ProductKey"]) == (job_id, firmware_id, lab.product_key)
        assert task["IotId"] == lab.iot_ids[task["DeviceName"]] and task["ProductName"].startswith("jobs_")
        assert UTC_MS.match(task["UtcCreate"]) and UTC_MS.match(task["UtcModified"])

    first.progress(50)
    eventually(lambda: lab.tasks(job_id)[first.device_name]["Progress"] == "50.00")
    assert lab.statuses(job_id)[first.device_name] == "IN_PROGRESS"
    first.inform("2.0.0")
    task = lab.wait_statuses(job_id, {first.device_name: "SUCCEEDED", second.device_name: "NOTIFIED"})
    assert task[first.device_name]["Progress"] == "100.00"
    assert lab.firmware_state(firmware_id) == (2, 50)

    second.progress(100)
    second.inform("2.0.0")
    lab.wait_statuses(job_id, {first.device_name: "SUCCEEDED", second.device_name: "SUCCEEDED"})
    assert lab.firmware_state(firmware_id) == (1, 100)
    done = lab.wait_job(job_id, "COMPLETED")
    assert UTC_MS.match(done["UtcEndTime"])
    api.fails("CreateOTAVerifyJob", "iot.ota.FirmwareAlreadyVerified", {
        "ProductKey": lab.product_key, "FirmwareId": firmware_id, "TargetDeviceName": [first.device_name]})
    listed = api.ok("ListOTAJobByFirmware", {"FirmwareId": firmware_id, "CurrentPage": 1, "PageSize": 10})
    assert (listed["Total"], listed["PageCount"], listed["CurrentPage"], listed["PageSize"]) == (1, 1, 1, 10)
    [simple] = listed["Data"]["SimpleOTAJobInfo"]
    assert (simple["JobId"], simple["JobType"], simple["JobStatus"]) == (job_id, "VERFIY_FIRMWARE", "COMPLETED")
    # A verified package can now be rolled out; it can be deleted (with its jobs) once none runs.
    upgrade_id = lab.static_job("SPECIFIC", firmware_id, TargetDeviceName=[lab.devices(1)[0].device_name])
    api.fails("DeleteOTAFirmware", "iot.ota.FirmwareHasRunningJob", {"FirmwareId": firmware_id})
    api.ok("CancelOTATaskByJob", {"JobId": upgrade_id, "CancelQueuedTask": True, "CancelNotifiedTask": True})
    lab.wait_job(upgrade_id, "COMPLETED")
    api.ok("DeleteOTAFirmware", {"FirmwareId": firmware_id})
    for gone in (job_id, upgrade_id):
        api.fails("QueryOTAJob", "iot.ota.JobNotFound", {"JobId": gone})
        api.fails("ListOTATaskByJob", "iot.ota.JobNotFound", {"JobId": gone})


def test_failed_verification_and_a_new_verify_job(lab):
    api = lab.api
    [device] = lab.devices(1)
    firmware_id = lab.firmware(verify=True)
    params = {"ProductKey": lab.product_key, "FirmwareId": firmware_id, "TargetDeviceName": [device.device_name]}
    job_id = api.ok("CreateOTAVerifyJob", params)["Data"]["JobId"]
    expect_push(device)
    device.progress(-1, "flash write error")
    tasks = lab.wait_statuses(job_id, {device.device_name: "FAILED"})
    assert "flash write error" in tasks[device.device_name]["TaskDesc"]
    assert lab.firmware_state(firmware_id) == (3, 0)  # verification failed
    lab.wait_job(job_id, "COMPLETED")
    api.fails("CreateOTAStaticUpgradeJob", "iot.ota.FirmwareNotVerified", {
        **params, "TargetSelection": "SPECIFIC"})
    # A failed package may be verified again; cancelling that run leaves it unverified.
    again = api.ok("CreateOTAVerifyJob", params)["Data"]["JobId"]
    assert lab.firmware_state(firmware_id) == (2, 0)
    expect_push(device)
    lab.wait_statuses(again, {device.device_name: "NOTIFIED"})
    api.ok("CancelOTATaskByJob", {"JobId": again, "CancelNotifiedTask": True})
    assert lab.firmware_state(firmware_id) == (0, 0)


def test_no_verify_job_for_a_package_that_needs_none(lab):
    [device] = lab.devices(1)
    lab.api.fails("CreateOTAVerifyJob", "iot.ota.FirmwareNoNeedVerify", {
        "ProductKey": lab.product_key, "FirmwareId": lab.firmware_id, "TargetDeviceName": [device.device_name]})


# --- 3: static jobs ----------------------------------------------------------------------------
def test_static_specific_failure_report_and_reupgrade(lab):
    api = lab.api
    failing, wrong_version, fine = lab.devices(3)
    job_id = lab.static_job("SPECIFIC", TargetDeviceName=names([failing, wrong_version, fine]),
                            TimeoutInMinutes=10, MaximumPerMinute=100, Tag=[{"Key": "k.1", "Value": "one"}])
    job = lab.job(job_id)
    assert (job["JobType"], job["TargetSelection"], job["MaximumPerMinute"]) == ("UPGRADE_FIRMWARE", "SPECIFIC", 100)
    assert job["Tags"]["OtaTagDTO"] == [{"Key": "k.1", "Value": "one"}]
    for device in (failing, wrong_version, fine):
        expect_push(device)
    lab.wait_statuses(job_id, dict.fromkeys(names([failing, wrong_version, fine]), "NOTIFIED"))

    failing.progress(-3, "md5 mismatch")
    wrong_version.progress(100)
    eventually(lambda: lab.tasks(job_id)[wrong_version.device_name]["Progress"] == "100.00")
    wrong_version.inform("1.5.0")  # restarted on neither the version it ran nor the package's
    fine.progress(30)
    fine.inform("2.0.0")
    tasks = lab.wait_statuses(job_id, {failing.device_name: "FAILED", wrong_version.device_name: "FAILED",
                                       fine.device_name: "SUCCEEDED"})
    assert "md5 mismatch" in tasks[failing.device_name]["TaskDesc"]
    assert tasks[wrong_version.device_name]["TaskDesc"] == "report version is not conform"
    assert "TaskDesc" not in tasks[fine.device_name]
    assert set(lab.tasks(job_id, TaskStatus="FAILED")) == {failing.device_name, wrong_version.device_name}
    assert set(lab.tasks(job_id, DeviceNames=[fine.device_name])) == {fine.device_name}
    lab.wait_job(job_id, "COMPLETED")

    # ReupgradeOTATask: only FAILED/CANCELED tasks; the job runs again and the device gets a new push.
    api.fails("ReupgradeOTATask", "iot.ota.TaskCanNotReupgrade",
              {"JobId": job_id, "TaskId": [tasks[fine.device_name]["TaskId"]]})
    api.ok("ReupgradeOTATask", {"JobId": job_id, "TaskId": [tasks[failing.device_name]["TaskId"]]})
    assert lab.job(job_id)["JobStatus"] == "IN_PROGRESS"
    expect_push(failing)
    lab.wait_statuses(job_id, {failing.device_name: "NOTIFIED", wrong_version.device_name: "FAILED",
                               fine.device_name: "SUCCEEDED"})
    failing.inform("2.0.0")
    lab.wait_statuses(job_id, {failing.device_name: "SUCCEEDED", wrong_version.device_name: "FAILED",
                               fine.device_name: "SUCCEEDED"})
    lab.wait_job(job_id, "COMPLETED")

    # A device busy in another job cannot be re-upgraded here.
    other_job = lab.static_job("SPECIFIC", TargetDeviceName=[wrong_version.device_name])
    api.fails("ReupgradeOTATask", "iot.ota.DeviceHasUnfinishedTask",
              {"JobId": job_id, "TaskId": [tasks[wrong_version.device_name]["TaskId"]]})
    api.ok("CancelOTATaskByJob", {"JobId": other_job, "CancelQueuedTask": True, "CancelNotifiedTask": True})


def test_specific_by_device_list_file(lab):
    api = lab.api
    listed = lab.devices(2)
    [other] = lab.devices(1)
    data = api.ok("GenerateDeviceNameListURL")["Data"]
    assert set(data) == {"Key", "Host", "Policy", "AccessKeyId", "Signature", "FileUrl", "ObjectStorage",
                         "UtcCreate"}  # AccessKeyId and FileUrl: not the firmware upload's names
    assert data["FileUrl"].endswith(data["Key"]) and UTC_MS.match(data["UtcCreate"])
    upload_device_list(data, "DeviceName\n" + "".join(f"{name}\n" for name in names(listed)))

    job_id = lab.static_job("SPECIFIC", DnListFileUrl=data["FileUrl"])
    for device in listed:
        expect_push(device)
    other.expect_nothing(other.upgrade_topic, within=0.5)
    lab.wait_statuses(job_id, dict.fromkeys(names(listed), "NOTIFIED"))

    # Either the list or the names, not both; a list that was never uploaded is refused.
    lab.api.refused("CreateOTAStaticUpgradeJob", "InvalidParameter", {
        "ProductKey": lab.product_key, "FirmwareId": lab.firmware_id, "TargetSelection": "SPECIFIC",
        "DnListFileUrl": data["FileUrl"], "TargetDeviceName": [other.device_name]})
    specific = {"ProductKey": lab.product_key, "FirmwareId": lab.firmware_id, "TargetSelection": "SPECIFIC"}
    empty = api.ok("GenerateDeviceNameListURL")["Data"]
    api.fails("CreateOTAStaticUpgradeJob", "iot.ota.DnListFileNotFound",
              {**specific, "DnListFileUrl": empty["FileUrl"]})
    api.fails("CreateOTAStaticUpgradeJob", "iot.ota.InvalidDnListFileUrl",
              {**specific, "DnListFileUrl": "https://example.invalid/ota/devices.csv"})
    unknown = api.ok("GenerateDeviceNameListURL")["Data"]
    upload_device_list(unknown, f"{other.device_name}\nno-such-device-z\n")
    api.fails("CreateOTAStaticUpgradeJob", "iot.ota.DeviceNotExisted",
              {**specific, "DnListFileUrl": unknown["FileUrl"]})
    other.expect_nothing(other.upgrade_topic, within=0.2)

    # ListOTAUnfinishedTaskByDevice: by IotId, or by ProductKey + DeviceName.
    device = listed[0]
    by_iot_id = lab.unfinished(IotId=lab.iot_ids[device.device_name])
    by_name = lab.unfinished(ProductKey=lab.product_key, DeviceName=device.device_name)
    assert by_iot_id == by_name and len(by_name) == 1
    assert (by_name[0]["JobId"], by_name[0]["TaskStatus"], by_name[0]["ModuleName"]) == (job_id, "NOTIFIED", "default")
    assert lab.unfinished(ProductKey=lab.product_key, DeviceName=device.device_name, TaskStatus="QUEUED") == []
    assert len(lab.unfinished(IotId=lab.iot_ids[device.device_name], TaskStatusList=["QUEUED", "NOTIFIED"])) == 1
    api.fails("ListOTAUnfinishedTaskByDevice", "iot.device.NullDeviceName", {"ProductKey": lab.product_key})

    # CancelOTATaskByJob needs a flag; the NOTIFIED ones go with CancelNotifiedTask.
    api.fails("CancelOTATaskByJob", "iot.ota.CancelParamRequired", {"JobId": job_id})
    api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelQueuedTask": True})
    assert lab.statuses(job_id) == dict.fromkeys(names(listed), "NOTIFIED")
    api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelNotifiedTask": True})
    tasks = lab.wait_statuses(job_id, dict.fromkeys(names(listed), "CANCELED"))
    assert all(t["TaskDesc"] for t in tasks.values())
    assert lab.unfinished(IotId=lab.iot_ids[device.device_name]) == []
    lab.wait_job(job_id, "COMPLETED")


def test_gray_and_src_version_filters(lab):
    api = lab.api
    gray_version, all_version = unique("1.3."), unique("1.5.")
    gray_pool = lab.devices(4, gray_version)
    all_pool = lab.devices(2, all_version)
    params = {"ProductKey": lab.product_key, "FirmwareId": lab.firmware_id, "TargetSelection": "GRAY",
              "SrcVersion": [gray_version]}
    for bad in ("0", "100.5", "12.3456", "abc", "-5", "1e1", "+5", " 5", "nan"):
        api.refused("CreateOTAStaticUpgradeJob", "InvalidParameter", {**params, "GrayPercent": bad})
    api.refused("CreateOTAStaticUpgradeJob", "MissingGrayPercent", params)

    gray_id = lab.static_job("GRAY", GrayPercent="50", SrcVersion=[gray_version])
    job = lab.job(gray_id)
    assert (job["TargetSelection"], job["GrayPercent"], job["SrcVersions"]) == \
        ("GRAY", "50", {"SrcVersion": [gray_version]})
    gray_tasks = lab.tasks(gray_id)
    assert len(gray_tasks) == 2 and set(gray_tasks) <= set(names(gray_pool))
    assert {t["SrcVersion"] for t in gray_tasks.values()} == {gray_version}

    all_id = lab.static_job("ALL", SrcVersion=[all_version])
    assert set(lab.tasks(all_id)) == set(names(all_pool))
    for device in all_pool:
        expect_push(device)
    for job_id in (gray_id, all_id):
        api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelQueuedTask": True, "CancelNotifiedTask": True,
                                      "CancelInProgressTask": True})
        eventually(lambda: set(lab.statuses(job_id).values()) == {"CANCELED"})


def test_need_confirm_and_cancel_by_device(lab):
    api = lab.api
    first, second = lab.devices(2)
    job_id = lab.static_job("SPECIFIC", TargetDeviceName=names([first, second]), NeedConfirm=True)
    assert lab.job(job_id)["NeedConfirm"] is True
    tasks = lab.wait_statuses(job_id, {first.device_name: "CONFIRM", second.device_name: "CONFIRM"})
    first.expect_nothing(first.upgrade_topic, within=0.5)  # nothing is pushed before the confirmation

    # ConfirmOTATask is POST only (the SDKs post it; a signed GET is not routed).
    signer = RawSigner(lab.server.base_url, *api.key)
    refused = signer.v1("ConfirmOTATask", {"TaskId.1": tasks[first.device_name]["TaskId"]}, method="GET")
    assert refused.status_code == 404 and refused.json()["Code"] == "InvalidAction.NotFound", refused.text
    assert lab.statuses(job_id)[first.device_name] == "CONFIRM"
    api.fails("ConfirmOTATask", "iot.ota.TaskNotFound", {"TaskId": ["NoSuchTask0000000000000300"]})

    api.ok("ConfirmOTATask", {"TaskId": [tasks[first.device_name]["TaskId"]]})
    expect_push(first)
    lab.wait_statuses(job_id, {first.device_name: "NOTIFIED", second.device_name: "CONFIRM"})
    # A verification must run on every device it names: a busy one is refused.
    api.fails("CreateOTAVerifyJob", "iot.ota.DeviceHasUnfinishedTask", {
        "ProductKey": lab.product_key, "FirmwareId": lab.firmware(verify=True),
        "TargetDeviceName": [first.device_name]})
    # CancelUnconfirmedTask=false keeps the unconfirmed task out of a QUEUED cancel.
    api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelQueuedTask": True, "CancelUnconfirmedTask": False})
    assert lab.statuses(job_id) == {first.device_name: "NOTIFIED", second.device_name: "CONFIRM"}
    api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelUnconfirmedTask": True})
    assert lab.statuses(job_id) == {first.device_name: "NOTIFIED", second.device_name: "CANCELED"}

    api.ok("CancelOTATaskByDevice", {"ProductKey": lab.product_key, "FirmwareId": lab.firmware_id,
                                     "DeviceName": [first.device_name], "JobId": job_id})
    assert lab.statuses(job_id) == {first.device_name: "CANCELED", second.device_name: "CANCELED"}
    api.fails("CancelOTATaskByDevice", "iot.ota.DeviceNotExisted", {
        "ProductKey": lab.product_key, "FirmwareId": lab.firmware_id, "DeviceName": ["no-such-device-x"]})

    # Re-upgraded in a job that needs confirmation: it waits for one again.
    api.ok("ReupgradeOTATask", {"JobId": job_id, "TaskId": [tasks[second.device_name]["TaskId"]]})
    assert lab.statuses(job_id)[second.device_name] == "CONFIRM"
    second.expect_nothing(second.upgrade_topic, within=0.3)
    api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelQueuedTask": True})  # QUEUED also takes CONFIRM
    assert lab.statuses(job_id)[second.device_name] == "CANCELED"
    lab.wait_job(job_id, "COMPLETED")


def _crc16_arc_bitwise(data: bytes) -> int:
    """CRC-16/ARC bit by bit (the server uses a table): poly 0x8005 reflected, init 0."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _block(device: Device, stream_id: int, offset: int, size: int, file_id: int = 1) -> tuple[dict, bytes]:
    """Ask one block as LSDK4 does (QoS 0, its trailing comma included); (header, data), CRC checked."""
    base = f"/sys/{device.product_key}/{device.device_name}/thing/file"
    device.publish(f"{base}/download", '{"id":"1","version":"1.0","params":{"fileToken":"default","fileInfo":'
                   f'{{"streamId":{stream_id},"fileId":{file_id},}},"fileBlock":{{"size":{size},"offset":{offset}}}}}}}',
                   qos=0)
    reply = device.expect(f"{base}/download_reply").payload
    length = int.from_bytes(reply[:2], "big")
    header, data, crc = json.loads(reply[2:2 + length]), reply[2 + length:-2], int.from_bytes(reply[-2:], "little")
    assert crc == _crc16_arc_bitwise(data), (header, len(data))
    return header, data


def test_download_protocol_mqtt_end_to_end(lab):
    """DownloadProtocol=MQTT: the push names a stream instead of a URL, and the device reads the
    package block by block on thing/file/download (device-protocol.md, LSDK4's downloader)."""
    assert _crc16_arc_bitwise(b"123456789") == 0xBB3D  # the catalogue's check value
    [device] = lab.devices(1)
    job_id = lab.static_job("SPECIFIC", TargetDeviceName=[device.device_name], DownloadProtocol="MQTT")
    assert lab.job(job_id)["DownloadProtocol"] == "MQTT"
    push = device.expect(device.upgrade_topic).json()["data"]
    assert "url" not in push and push["dProtocol"] == "mqtt" and push["streamFileId"] == 1, push
    assert isinstance(push["streamId"], int) and push["signMethod"] == "Md5" and len(push["md5"]) == 32, push

    received, offset = b"", 0
    while offset < push["size"]:
        header, data = _block(device, push["streamId"], offset, 1000)
        assert header["code"] == 200, header
        assert header["data"] == {"bSize": len(data), "bOffset": offset, "fileLength": push["size"],
                                  "fileToken": "default"}, header
        received += data
        offset += len(data)
    assert len(received) == push["size"] and hashlib.md5(received).hexdigest() == push["md5"]

    # Past the end, an unknown stream and a second file are refused in the reply's header.
    assert _block(device, push["streamId"], push["size"], 1000)[0]["code"] == 400
    assert _block(device, 2**31 - 7, 0, 1000)[0]["code"] == 404
    assert _block(device, push["streamId"], 0, 1000, file_id=2)[0]["code"] == 404

    device.progress(100)
    device.inform("2.0.0")
    lab.wait_statuses(job_id, {device.device_name: "SUCCEEDED"})


def test_list_jobs_by_firmware_and_device_paging(lab):
    api = lab.api
    firmware_id = lab.firmware(verify=False, version="3.0.0")
    [device] = lab.devices(1)
    created = [lab.static_job("SPECIFIC", firmware_id, TargetDeviceName=[device.device_name],
                              Tag=[{"Key": "n", "Value": str(i)}]) for i in range(5)]
    # The device is busy with the first job's task: the later jobs get a FAILED task for it.
    statuses = [lab.statuses(job_id)[device.device_name] for job_id in created]
    assert statuses[0] in ("QUEUED", "NOTIFIED") and statuses[1:] == ["FAILED"] * 4
    assert "unfinished task" in lab.tasks(created[1])[device.device_name]["TaskDesc"]

    for action, extra, size in (("ListOTAJobByFirmware", {}, 2),
                                ("ListOTAJobByDevice", {"ProductKey": lab.product_key,
                                                        "DeviceName": device.device_name}, 2)):
        seen = []
        for page in (1, 2, 3, 4):
            body = api.ok(action, {"FirmwareId": firmware_id, "CurrentPage": page, "PageSize": size, **extra})
            assert (body["Total"], body["PageCount"], body["CurrentPage"], body["PageSize"]) == (5, 3, page, size)
            assert all(type(body[k]) is int for k in ("Total", "PageCount", "CurrentPage", "PageSize"))
            seen += body["Data"].get("SimpleOTAJobInfo", [])
        assert [j["JobId"] for j in seen] == list(reversed(created)), action  # newest first, no gap
        assert [j["Tags"]["OtaTagDTO"][0]["Value"] for j in seen] == ["4", "3", "2", "1", "0"]
        assert {(j["JobType"], j["SelectionType"], j["TargetSelection"], j["FirmwareId"]) for j in seen} == \
            {("UPGRADE_FIRMWARE", "STATIC", "SPECIFIC", firmware_id)}
    api.fails("ListOTAJobByFirmware", "iot.common.InvalidPageParams",
              {"FirmwareId": firmware_id, "CurrentPage": 1, "PageSize": 201})
    api.fails("ListOTAJobByDevice", "iot.common.InvalidPageParams", {
        "FirmwareId": firmware_id, "ProductKey": lab.product_key, "DeviceName": device.device_name,
        "CurrentPage": 1, "PageSize": 101})
    api.fails("ListOTAJobByFirmware", "iot.ota.FirmwareNotFound",
              {"FirmwareId": "NoSuchFirmware", "CurrentPage": 1, "PageSize": 10})
    api.ok("CancelOTATaskByJob", {"JobId": created[0], "CancelQueuedTask": True, "CancelNotifiedTask": True})


def test_dynamic_job_update_and_cancel_strategy(lab):
    api = lab.api
    version, later_version = unique("1.7."), unique("1.8.")
    firmware_id = lab.firmware(verify=False, version="4.0.0")
    [early] = lab.devices(1, version)
    params = {"ProductKey": lab.product_key, "FirmwareId": firmware_id}
    api.refused("CreateOTADynamicUpgradeJob", "MissingSrcVersion", params)
    api.fails("CreateOTADynamicUpgradeJob", "iot.ota.GroupNotSupported",
              {**params, "SrcVersion": [version], "GroupId": "g1", "GroupType": "LINK_PLATFORM_DYNAMIC"})
    job_id = api.ok("CreateOTADynamicUpgradeJob", {**params, "SrcVersion": [version], "DynamicMode": 1,
                                                   "TimeoutInMinutes": 20})["Data"]["JobId"]
    api.fails("CreateOTADynamicUpgradeJob", "iot.ota.DynamicJobExisted", {**params, "SrcVersion": [version]})
    job = lab.job(job_id)
    assert (job["SelectionType"], job["TargetSelection"], job["DynamicMode"], job["JobStatus"]) == \
        ("DYNAMIC", "ALL", 1, "IN_PROGRESS")
    assert job["SrcVersions"] == {"SrcVersion": [version]}
    expect_push(early, "4.0.0")  # matched when the job was created

    # UpdateOTAJob: pace, timeout, versions and tags; the job's kind and selection must match.
    api.ok("UpdateOTAJob", {"JobId": job_id, "MaximumPerMinute": 500, "TargetSelection": "ALL",
                            "UpgradeType": "DYNAMIC", "TimeoutInMinutes": 30,
                            "SrcVersionList": [version, later_version], "Tags": [{"Key": "wave", "Value": "2"}]})
    job = lab.job(job_id)
    assert (job["MaximumPerMinute"], job["TimeoutInMinutes"]) == (500, 30)
    assert job["SrcVersions"] == {"SrcVersion": [version, later_version]}
    assert job["Tags"] == {"OtaTagDTO": [{"Key": "wave", "Value": "2"}]}
    api.refused("UpdateOTAJob", "InvalidParameter", {"JobId": job_id, "MaximumPerMinute": 500,
                                                     "TargetSelection": "ALL", "UpgradeType": "STATIC"})
    api.refused("UpdateOTAJob", "InvalidParameter", {"JobId": job_id, "MaximumPerMinute": 5,
                                                     "TargetSelection": "ALL", "UpgradeType": "DYNAMIC"})

    # A device that reports a matching version later gets a task of its own.
    [later] = lab.devices(1, later_version)
    expect_push(later, "4.0.0")
    lab.wait_statuses(job_id, {early.device_name: "NOTIFIED", later.device_name: "NOTIFIED"})

    api.ok("CancelOTAStrategyByJob", {"JobId": job_id})
    assert lab.job(job_id)["JobStatus"] == "CANCELED"
    [too_late] = lab.devices(1, version)
    too_late.expect_nothing(too_late.upgrade_topic, within=0.5)
    assert set(lab.statuses(job_id)) == {early.device_name, later.device_name}
    api.fails("CancelOTAStrategyByJob", "iot.ota.JobFinished", {"JobId": job_id})
    api.fails("UpdateOTAJob", "iot.ota.JobFinished", {"JobId": job_id, "MaximumPerMinute": 100,
                                                      "TargetSelection": "ALL", "UpgradeType": "DYNAMIC"})
    # Its tasks go on until cancelled.
    early.inform("4.0.0")
    lab.wait_statuses(job_id, {early.device_name: "SUCCEEDED", later.device_name: "NOTIFIED"})
    api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelNotifiedTask": True})
    lab.wait_statuses(job_id, {early.device_name: "SUCCEEDED", later.device_name: "CANCELED"})

    # A static job has no strategy to cancel.
    [device] = lab.devices(1)
    static_id = lab.static_job("SPECIFIC", TargetDeviceName=[device.device_name])
    api.fails("CancelOTAStrategyByJob", "iot.ota.NotDynamicJob", {"JobId": static_id})
    api.ok("CancelOTATaskByJob", {"JobId": static_id, "CancelQueuedTask": True, "CancelNotifiedTask": True})


def test_scheduled_job_is_planned_until_its_time(lab):
    api = lab.api
    [device] = lab.devices(1)
    schedule = int(time.time() * 1000) + 10 * 60_000
    job_id = lab.static_job("SPECIFIC", TargetDeviceName=[device.device_name], ScheduleTime=schedule,
                            ScheduleFinishTime=schedule + 2 * 3_600_000)
    job = lab.job(job_id)
    assert job["JobStatus"] == "PLANNED" and "UtcStartTime" not in job
    assert UTC_MS.match(job["UtcScheduleTime"]) and UTC_MS.match(job["UtcScheduleFinishTime"])
    assert lab.statuses(job_id) == {device.device_name: "QUEUED"}
    device.expect_nothing(device.upgrade_topic, within=0.3)
    # A planned job's tasks are "scheduled": CancelQueuedTask leaves them, CancelScheduledTask takes them.
    api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelQueuedTask": True})
    assert lab.statuses(job_id) == {device.device_name: "QUEUED"}
    api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelScheduledTask": True})
    assert lab.statuses(job_id) == {device.device_name: "CANCELED"}


# --- 4: error paths ----------------------------------------------------------------------------
@pytest.mark.parametrize("action, params", [
    ("QueryOTAJob", {}),
    ("ListOTATaskByJob", {"CurrentPage": 1, "PageSize": 10}),
    ("CancelOTATaskByJob", {"CancelQueuedTask": True}),
    ("CancelOTAStrategyByJob", {}),
    ("ReupgradeOTATask", {"TaskId": ["NoSuchTask"]}),
    ("UpdateOTAJob", {"MaximumPerMinute": 100, "TargetSelection": "ALL", "UpgradeType": "STATIC"}),
])
def test_unknown_job_id(lab, action, params):
    lab.api.fails(action, "iot.ota.JobNotFound", {"JobId": "NoSuchJob000000000000200", **params})


def test_task_list_paging(lab):
    api = lab.api
    devices = lab.devices(3)
    job_id = lab.static_job("SPECIFIC", TargetDeviceName=names(devices), NeedConfirm=True)
    default = api.ok("ListOTATaskByJob", {"JobId": job_id})  # paging is optional here: page 1 of 10
    assert (default["Total"], default["CurrentPage"], default["PageSize"], default["PageCount"]) == (3, 1, 10, 1)
    seen = []
    for page in (1, 2):
        body = api.ok("ListOTATaskByJob", {"JobId": job_id, "CurrentPage": page, "PageSize": 2})
        assert (body["Total"], body["PageCount"], body["CurrentPage"], body["PageSize"]) == (3, 2, page, 2)
        seen += [t["DeviceName"] for t in body["Data"]["SimpleOTATaskInfo"]]
    assert sorted(seen) == sorted(names(devices))
    assert lab.tasks(job_id, TaskStatus="CONFIRM").keys() == set(names(devices))
    assert lab.tasks(job_id, TaskStatus="SUCCEEDED") == {}
    for page, size in ((1, 101), (0, 10), (1001, 100)):  # the last: CurrentPage x PageSize > 100000
        api.fails("ListOTATaskByJob", "iot.common.InvalidPageParams",
                  {"JobId": job_id, "CurrentPage": page, "PageSize": size})
    api.refused("ListOTATaskByJob", "InvalidParameter", {"JobId": job_id, "TaskStatus": "DONE"})
    api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelUnconfirmedTask": True})


def test_create_refusals(lab):
    api = lab.api
    [device] = lab.devices(1)
    base = {"ProductKey": lab.product_key, "FirmwareId": lab.firmware_id, "TargetSelection": "SPECIFIC",
            "TargetDeviceName": [device.device_name]}
    now = int(time.time() * 1000)
    for extra in ({"MaximumPerMinute": 5}, {"MaximumPerMinute": 10_001},
                  {"ScheduleTime": now + 60_000},  # less than 5 minutes ahead
                  {"ScheduleTime": now + 8 * 24 * 3_600_000},  # more than 7 days ahead
                  {"TimeoutInMinutes": 0}, {"TimeoutInMinutes": 1441},
                  {"RetryInterval": 7, "RetryCount": 1}, {"OverwriteMode": 3},
                  {"TargetSelection": "SOME"}, {"SrcVersion": ["1.0.0"]},  # SrcVersion is not for SPECIFIC
                  {"Tag": [{"Key": "bad key!", "Value": "v"}]}):
        api.refused("CreateOTAStaticUpgradeJob", "InvalidParameter", {**base, **extra})
    api.refused("CreateOTAStaticUpgradeJob", "MissingRetryCount", {**base, "RetryInterval": 10})
    api.refused("CreateOTAStaticUpgradeJob", "MissingFirmwareId", {**base, "FirmwareId": None})
    api.refused("CreateOTAStaticUpgradeJob", "MissingTargetSelection", {**base, "TargetSelection": None})
    api.refused("CreateOTAVerifyJob", "InvalidParameter", {
        "ProductKey": lab.product_key, "FirmwareId": lab.firmware_id,
        "TargetDeviceName": [f"d{i}" for i in range(11)]})

    api.fails("CreateOTAStaticUpgradeJob", "iot.ota.GroupNotSupported",
              {**base, "TargetSelection": "GROUP", "TargetDeviceName": None, "GroupId": "g1",
               "GroupType": "LINK_PLATFORM"})
    api.fails("CreateOTAStaticUpgradeJob", "iot.ota.DeviceNotExisted",
              {**base, "TargetDeviceName": [device.device_name, "no-such-device-y"]})
    api.fails("CreateOTAStaticUpgradeJob", "iot.ota.NoDeviceToUpgrade",
              {**base, "TargetSelection": "ALL", "TargetDeviceName": None, "SrcVersion": [unique("9.")]})
    api.fails("CreateOTAStaticUpgradeJob", "iot.ota.FirmwareNotFound", {**base, "FirmwareId": "NoSuchFirmware"})
    api.fails("CreateOTAStaticUpgradeJob", "iot.prod.NotExistedProduct", {**base, "ProductKey": "a1NoSuchPrd"})
    # Nothing was created by any of these.
    assert lab.unfinished(ProductKey=lab.product_key, DeviceName=device.device_name) == []


# --- job timers: a server whose job "minute" is one second (one client variant is enough) ---------
FAST_QUIET_S = 2.0  # its quiet period before a push goes again after a version report (10 s in production)


@pytest.fixture(scope="module", params=BACKENDS)
def fast(request, make_server):
    server = make_server(request.param, "--rate-limit", "0", env={
        "OTAPLANE_JOB_MINUTE_SECONDS": "1", "OTAPLANE_PUSH_AGAIN_QUIET_SECONDS": str(FAST_QUIET_S)})
    lab = Lab(server, Api("tea-v3", server.endpoint, *server.create_key("jobs-timers")))
    yield lab
    lab.close()


def test_timeout_fails_the_task_and_the_retry_pushes_again(fast):
    [device] = fast.devices(1)
    job_id = fast.static_job("SPECIFIC", TargetDeviceName=[device.device_name], TimeoutInMinutes=2,
                             RetryInterval=0, RetryCount=1)
    job = fast.job(job_id)
    assert (job["TimeoutInMinutes"], job["RetryCount"], job["RetryInterval"]) == (2, 1, 0)
    first = expect_push(device)
    device.progress(10)
    fast.wait_statuses(job_id, {device.device_name: "IN_PROGRESS"})
    # Two "minutes" later the task times out; its one retry sends the package again.
    second = device.expect(device.upgrade_topic, timeout=8).json()
    assert second["id"] != first["id"] and second["data"]["version"] == "2.0.0"
    fast.wait_statuses(job_id, {device.device_name: "NOTIFIED"})
    device.progress(20)
    tasks = fast.wait_statuses(job_id, {device.device_name: "FAILED"}, timeout=8)  # no retry left
    assert tasks[device.device_name]["TaskDesc"] == "upgrade timed out"
    fast.wait_job(job_id, "COMPLETED")


def test_a_device_that_lost_the_push_gets_it_again_when_it_reports_its_old_version(fast):
    """It took the push and restarted before any progress: its task stayed NOTIFIED for good
    (never pushed again, no timeout before a first progress) (found by an audit)."""
    [device] = fast.devices(1)
    job_id = fast.static_job("SPECIFIC", TargetDeviceName=[device.device_name])
    first = expect_push(device)
    fast.wait_statuses(job_id, {device.device_name: "NOTIFIED"})
    time.sleep(FAST_QUIET_S)
    device = restart(fast, device)  # power lost; booted again, still on the version it ran
    device.inform("1.0.0")
    again = device.expect(device.upgrade_topic).json()
    assert again["id"] != first["id"] and again["data"]["version"] == "2.0.0"  # a new message
    device.progress(100)
    device.inform("2.0.0")
    fast.wait_statuses(job_id, {device.device_name: "SUCCEEDED"})


def test_a_device_that_reports_its_old_version_on_the_same_connection_gets_the_push_again(fast):
    """Its download failed without a word (no failure progress) and it reported the version it
    runs again, without reconnecting: the push went undelivered again, but the embedded broker
    sends a message id once per connection, so it waited for the device's next connect (found by
    a review). A push sent again is a new message, with an id of its own."""
    [device] = fast.devices(1)
    job_id = fast.static_job("SPECIFIC", TargetDeviceName=[device.device_name])
    first = expect_push(device)
    fast.wait_statuses(job_id, {device.device_name: "NOTIFIED"})
    time.sleep(FAST_QUIET_S)
    device.inform("1.0.0")
    again = device.expect(device.upgrade_topic, timeout=8).json()
    assert again["id"] != first["id"] and again["data"]["version"] == "2.0.0"
    device.progress(100)
    device.inform("2.0.0")
    fast.wait_statuses(job_id, {device.device_name: "SUCCEEDED"})


def restart(lab: Lab, device: Device) -> Device:
    """The device disconnects and connects again (a reboot)."""
    device.close()
    device = connect(lab.server.mqtt_port, lab.product_key, device.device_name, lab.secrets[device.device_name])
    lab.opened.append(device)
    return device


def test_a_device_that_restarts_at_once_after_the_push_gets_it_again_when_the_quiet_period_ends(fast):
    """It took the push and restarted before any progress, within the quiet period after the push:
    the one version report it makes on reconnecting was dropped (the quiet period keeps the push
    from going twice to a device that reports as it goes out, or while it downloads), so the push
    never went again and the task stayed NOTIFIED for good (found by an audit). Now it goes when
    the quiet period ends; a device that reports progress meanwhile (it has the push) is not sent
    it twice."""
    device, busy = fast.devices(2)
    job_id = fast.static_job("SPECIFIC", TargetDeviceName=names([device, busy]))
    first = expect_push(device)
    pushed_at = time.monotonic()
    expect_push(busy)
    fast.wait_statuses(job_id, {device.device_name: "NOTIFIED", busy.device_name: "NOTIFIED"})
    device = restart(fast, device)
    device.inform("1.0.0")  # at once, before any progress: the report it makes on every connect
    busy.progress(10)
    busy = restart(fast, busy)  # its connection broke while it downloads
    busy.inform("1.0.0")
    busy.progress(20)
    # Not before the quiet period ends (the report came within it) ...
    device.expect_nothing(device.upgrade_topic, within=max(0.0, pushed_at + FAST_QUIET_S - 0.5 - time.monotonic()))
    # ... but then, the same package, in a new message.
    again = device.expect(device.upgrade_topic, timeout=FAST_QUIET_S + 8).json()
    assert again["id"] != first["id"] and again["data"]["version"] == "2.0.0"
    busy.expect_nothing(busy.upgrade_topic, within=FAST_QUIET_S)
    assert fast.statuses(job_id) == {device.device_name: "NOTIFIED", busy.device_name: "IN_PROGRESS"}
    for each in (device, busy):
        each.progress(100)
        each.inform("2.0.0")
    fast.wait_statuses(job_id, {device.device_name: "SUCCEEDED", busy.device_name: "SUCCEEDED"})


def test_planned_job_starts_at_its_schedule_time(fast):
    [device] = fast.devices(1)
    fast.api.refused("CreateOTAStaticUpgradeJob", "InvalidParameter", {
        "ProductKey": fast.product_key, "FirmwareId": fast.firmware_id, "TargetSelection": "SPECIFIC",
        "TargetDeviceName": [device.device_name], "ScheduleTime": int(time.time() * 1000) + 3_000})
    job_id = fast.static_job("SPECIFIC", TargetDeviceName=[device.device_name],
                             ScheduleTime=int(time.time() * 1000) + 5_500)  # five "minutes" and a bit
    assert fast.job(job_id)["JobStatus"] == "PLANNED"
    device.expect_nothing(device.upgrade_topic, within=2)
    assert device.expect(device.upgrade_topic, timeout=10).json()["data"]["version"] == "2.0.0"
    job = fast.wait_job(job_id, "IN_PROGRESS")
    assert UTC_MS.match(job["UtcStartTime"]) and job["UtcStartTime"] >= job["UtcScheduleTime"]
    device.inform("2.0.0")
    fast.wait_job(job_id, "COMPLETED")


def test_maximum_per_minute_paces_the_pushes(fast):
    devices = fast.devices(3)
    job_id = fast.static_job("SPECIFIC", TargetDeviceName=names(devices), MaximumPerMinute=10)  # one per 6 s
    eventually(lambda: "NOTIFIED" in fast.statuses(job_id).values())
    pushed = [d for d in devices if d.inbox.qsize()]
    assert len(pushed) == 1
    for device in devices:
        if device not in pushed:
            device.expect_nothing(device.upgrade_topic, within=1)  # the next slot is 6 s after the first
    statuses = fast.statuses(job_id)
    assert sorted(statuses.values()) == ["NOTIFIED", "QUEUED", "QUEUED"], statuses
    fast.api.ok("CancelOTATaskByJob", {"JobId": job_id, "CancelQueuedTask": True, "CancelNotifiedTask": True})
    assert set(fast.statuses(job_id).values()) == {"CANCELED"}
