"""Upgrade job and task actions: CreateOTAVerifyJob, CreateOTAStaticUpgradeJob,
CreateOTADynamicUpgradeJob, QueryOTAJob, UpdateOTAJob, ListOTAJobByFirmware, ListOTAJobByDevice,
ListOTATaskByJob, ListOTAUnfinishedTaskByDevice, CancelOTATaskByJob, CancelOTATaskByDevice,
CancelOTAStrategyByJob, ReupgradeOTATask, ConfirmOTATask, GenerateDeviceNameListURL."""

from __future__ import annotations

from typing import Any

from otaplane import errors
from otaplane.openapi.actions.common import PRODUCT_KEY, paging
from otaplane.openapi.actions.firmware import FIRMWARE_ID, VERSION
from otaplane.openapi.params import Bool, Enum, Int, ListOf, Param, Str, StructList
from otaplane.openapi.registry import action
from otaplane.services import task_flow
from otaplane.services.devices import DeviceRef
from otaplane.services.jobs import DYNAMIC, JobSpec, Tag, VERIFY, parse_gray_percent
from otaplane.timefmt import utc_iso_ms

JOB_ID = Param("JobId", Str(min_len=1, max_len=64), required=True)
DEVICE_NAME = Str(min_len=1, max_len=64)
TAG_FIELDS = {"Key": Str(min_len=1, max_len=30, pattern=r"[A-Za-z0-9.]+",
                         pattern_hint="may contain only letters, digits and '.'"),
              "Value": Str(min_len=1, max_len=1024)}
TASK_STATUS = Enum(task_flow.TASK_STATUSES)

# Shared by CreateOTAVerifyJob and both upgrade jobs.
TIMEOUT = Param("TimeoutInMinutes", Int(min=1, max=1440))
NEED_CONFIRM = Param("NeedConfirm", Bool(), default=False)
NEED_PUSH = Param("NeedPush", Bool(), default=True)
DOWNLOAD_PROTOCOL = Param("DownloadProtocol", Enum(("HTTPS", "MQTT")), default="HTTPS")
TAGS = Param("Tag", StructList(TAG_FIELDS, required_fields=("Key", "Value"), max_items=10))
# Shared by both upgrade jobs.
UPGRADE_PARAMS = (
    Param("SrcVersion", ListOf(VERSION, max_items=10, unique=True)),
    Param("RetryInterval", Int(choices=(0, 10, 30, 60, 1440))),
    Param("RetryCount", Int(choices=(1, 2, 5))),
    Param("MaximumPerMinute", Int(min=10, max=10_000), default=10_000),
    Param("OverwriteMode", Int(choices=(1, 2)), default=1),
    Param("MultiModuleMode", Bool(), default=False),
    # otaplane's extension: stop the rollout when this share of finished tasks failed.
    Param("AbortFailurePercent", Int(min=1, max=100)),
    Param("AbortMinimumCount", Int(min=1, max=1_000_000)),
)


def _tags(p: dict[str, Any], name: str = "Tag") -> list[Tag]:
    return [Tag(t["Key"], t["Value"]) for t in p[name] or []]


def _common(p: dict[str, Any]) -> dict[str, Any]:
    return {"firmware_id": p["FirmwareId"], "product_key": p["ProductKey"], "timeout_minutes": p["TimeoutInMinutes"],
            "need_confirm": p["NeedConfirm"], "need_push": p["NeedPush"],
            "download_protocol": p["DownloadProtocol"], "tags": _tags(p)}


def _upgrade(p: dict[str, Any]) -> dict[str, Any]:
    return {**_common(p), "src_versions": p["SrcVersion"] or [], "retry_interval": p["RetryInterval"],
            "retry_count": p["RetryCount"], "max_per_minute": p["MaximumPerMinute"],
            "overwrite_mode": p["OverwriteMode"], "multi_module": p["MultiModuleMode"],
            "abort_failure_percent": p["AbortFailurePercent"], "abort_minimum_count": p["AbortMinimumCount"]}


def _created(job_id: str, created_ms: int) -> dict[str, Any]:
    return {"Data": {"JobId": job_id, "UtcCreate": utc_iso_ms(created_ms)}}


def _tags_out(tags) -> dict[str, Any]:
    return {"OtaTagDTO": [{"Key": t["Key"], "Value": t["Value"]} for t in tags or []]}


def _utc(ms: int | None) -> str | None:
    return utc_iso_ms(ms) if ms is not None else None


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


@action("CreateOTAVerifyJob", FIRMWARE_ID, PRODUCT_KEY,
        Param("TargetDeviceName", ListOf(DEVICE_NAME, max_items=10, unique=True), required=True),
        TIMEOUT, NEED_CONFIRM, NEED_PUSH, DOWNLOAD_PROTOCOL, TAGS)
def create_verify_job(services, tenant, p):
    spec = JobSpec(**_common(p), job_type=VERIFY, target_selection="SPECIFIC", device_names=p["TargetDeviceName"])
    return _created(*services.jobs.create(tenant, spec))


@action("CreateOTAStaticUpgradeJob", FIRMWARE_ID, PRODUCT_KEY,
        Param("TargetSelection", Enum(("ALL", "SPECIFIC", "GRAY", "GROUP")), required=True),
        Param("TargetDeviceName", ListOf(DEVICE_NAME, max_items=200, unique=True)),
        Param("DnListFileUrl", Str(min_len=1, max_len=2048)),
        Param("GrayPercent", Str(min_len=1, max_len=16)),
        Param("GroupId", Str(max_len=64)), Param("GroupType", Str(max_len=32)),
        Param("ScheduleTime", Int(min=0)), Param("ScheduleFinishTime", Int(min=0)),
        TIMEOUT, NEED_CONFIRM, NEED_PUSH, DOWNLOAD_PROTOCOL, TAGS, *UPGRADE_PARAMS)
def create_static_job(services, tenant, p):
    selection = p["TargetSelection"]
    names, list_url, gray = p["TargetDeviceName"], p["DnListFileUrl"], None
    if selection == "SPECIFIC":
        if bool(names) == bool(list_url):
            raise errors.invalid("TargetDeviceName", "give either TargetDeviceName.N or DnListFileUrl for SPECIFIC")
        if p["SrcVersion"]:
            raise errors.invalid("SrcVersion", "cannot be used with TargetSelection SPECIFIC")
    elif names or list_url:
        raise errors.invalid("TargetDeviceName", "TargetDeviceName.N and DnListFileUrl are for TargetSelection SPECIFIC")
    if selection == "GRAY":
        if p["GrayPercent"] is None:
            raise errors.missing("GrayPercent")
        gray = parse_gray_percent(p["GrayPercent"])
    spec = JobSpec(**_upgrade(p), target_selection=selection, device_names=names or [], device_list_url=list_url,
                   gray_percent=gray, schedule_ms=p["ScheduleTime"], schedule_finish_ms=p["ScheduleFinishTime"])
    return _created(*services.jobs.create(tenant, spec))


@action("CreateOTADynamicUpgradeJob", FIRMWARE_ID, PRODUCT_KEY,
        Param("DynamicMode", Int(choices=(1, 2)), default=1),
        Param("GroupId", Str(max_len=64)), Param("GroupType", Str(max_len=32)),
        TIMEOUT, NEED_CONFIRM, NEED_PUSH, DOWNLOAD_PROTOCOL, TAGS, *UPGRADE_PARAMS)
def create_dynamic_job(services, tenant, p):
    if p["GroupId"]:
        raise errors.GroupTargetNotSupported()
    if not p["SrcVersion"]:
        raise errors.missing("SrcVersion")
    spec = JobSpec(**_upgrade(p), selection_type=DYNAMIC, target_selection="ALL", dynamic_mode=p["DynamicMode"])
    return _created(*services.jobs.create(tenant, spec))


def _job_info(job) -> dict[str, Any]:
    return _drop_none({
        "JobId": job["job_id"], "FirmwareId": job["firmware_id"], "ProductKey": job["product_key"],
        "Name": job["firmware_name"], "DestVersion": job["dest_version"], "JobDesc": job["description"],
        "JobStatus": job["status"], "JobType": job["job_type"], "SelectionType": job["selection_type"],
        "TargetSelection": job["target_selection"], "GrayPercent": job["gray_percent"],
        "DownloadProtocol": job["download_protocol"], "DynamicMode": job["dynamic_mode"],
        "MaximumPerMinute": job["max_per_minute"], "MultiModuleMode": bool(job["multi_module"]),
        "NeedConfirm": bool(job["need_confirm"]), "NeedPush": bool(job["need_push"]),
        "OverwriteMode": job["overwrite_mode"], "RetryCount": job["retry_count"],
        "RetryInterval": job["retry_interval"], "TimeoutInMinutes": job["timeout_minutes"],
        "SrcVersions": {"SrcVersion": list(job["src_versions"] or [])},
        "Tags": _tags_out(job["tags"]),
        "UtcCreate": _utc(job["created_ms"]), "UtcModified": _utc(job["modified_ms"]),
        "UtcStartTime": _utc(job["started_ms"]), "UtcEndTime": _utc(job["ended_ms"]),
        "UtcScheduleTime": _utc(job["schedule_ms"]), "UtcScheduleFinishTime": _utc(job["schedule_finish_ms"]),
    })


def _simple_job(job) -> dict[str, Any]:
    return _drop_none({
        "JobId": job["job_id"], "FirmwareId": job["firmware_id"], "ProductKey": job["product_key"],
        "JobStatus": job["status"], "JobType": job["job_type"], "SelectionType": job["selection_type"],
        "TargetSelection": job["target_selection"], "Tags": _tags_out(job["tags"]),
        "UtcCreate": _utc(job["created_ms"]), "UtcModified": _utc(job["modified_ms"]),
        "UtcStartTime": _utc(job["started_ms"]), "UtcEndTime": _utc(job["ended_ms"]),
    })


def _task_common(task) -> dict[str, Any]:
    return {
        "TaskId": task["task_id"], "JobId": task["job_id"], "FirmwareId": task["firmware_id"],
        "IotId": task["iot_id"], "ProductKey": task["product_key"], "ProductName": task["product_name"],
        "DeviceName": task["device_name"], "SrcVersion": task["src_version"], "DestVersion": task["dest_version"],
        "TaskStatus": task["status"], "UtcCreate": _utc(task["created_ms"]), "UtcModified": _utc(task["modified_ms"]),
    }


def _task_info(task) -> dict[str, Any]:
    return _drop_none({
        **_task_common(task),
        "Progress": f"{task['progress']:.2f}",
        "TaskDesc": task["description"],
        "Timeout": str(task["timeout_minutes"]) if task["timeout_minutes"] is not None else None,
    })


def _paged(page, key: str, render) -> dict[str, Any]:
    return {"Data": {key: [render(item) for item in page.items]}, "CurrentPage": page.current_page,
            "PageSize": page.page_size, "PageCount": page.page_count, "Total": page.total}


@action("QueryOTAJob", JOB_ID)
def query_job(services, tenant, p):
    return {"Data": _job_info(services.jobs.get(tenant, p["JobId"]))}


@action("UpdateOTAJob", JOB_ID, Param("MaximumPerMinute", Int(min=10, max=10_000), required=True),
        Param("TargetSelection", Enum(("ALL", "SPECIFIC", "GRAY", "GROUP")), required=True),
        Param("UpgradeType", Enum(("STATIC", "DYNAMIC")), required=True), TIMEOUT,
        Param("SrcVersionList", ListOf(VERSION, max_items=10, unique=True)),
        Param("Tags", StructList(TAG_FIELDS, required_fields=("Key", "Value"), max_items=10)))
def update_job(services, tenant, p):
    services.jobs.update(tenant, p["JobId"], p["MaximumPerMinute"], p["TargetSelection"], p["UpgradeType"],
                         p["TimeoutInMinutes"], p["SrcVersionList"], _tags(p, "Tags") if p["Tags"] else None)
    return {}


@action("ListOTAJobByFirmware", FIRMWARE_ID, *paging(200))
def list_jobs_by_firmware(services, tenant, p):
    page = services.jobs.page_by_firmware(tenant, p["FirmwareId"], p["CurrentPage"], p["PageSize"])
    return _paged(page, "SimpleOTAJobInfo", _simple_job)


@action("ListOTAJobByDevice", FIRMWARE_ID, PRODUCT_KEY, Param("DeviceName", DEVICE_NAME, required=True),
        *paging(100))
def list_jobs_by_device(services, tenant, p):
    page = services.jobs.page_by_device(tenant, p["FirmwareId"], p["ProductKey"], p["DeviceName"],
                                        p["CurrentPage"], p["PageSize"])
    return _paged(page, "SimpleOTAJobInfo", _simple_job)


@action("ListOTATaskByJob", JOB_ID, *paging(100, default_size=10), Param("TaskStatus", TASK_STATUS),
        Param("DeviceNames", ListOf(DEVICE_NAME, max_items=100)))
def list_tasks_by_job(services, tenant, p):
    if p["CurrentPage"] * p["PageSize"] > 100_000:
        raise errors.InvalidPageParams(reason="CurrentPage x PageSize must be at most 100000")
    page = services.jobs.tasks_page(tenant, p["JobId"], p["CurrentPage"], p["PageSize"], p["TaskStatus"],
                                    p["DeviceNames"])
    return _paged(page, "SimpleOTATaskInfo", _task_info)


UNFINISHED_STATUS = Enum(task_flow.UNFINISHED)


@action("ListOTAUnfinishedTaskByDevice", Param("IotId", Str(max_len=64)), Param("ProductKey", Str(max_len=32)),
        Param("DeviceName", DEVICE_NAME), Param("ModuleName", Str(min_len=1, max_len=64)),
        Param("TaskStatus", UNFINISHED_STATUS), Param("TaskStatusList", ListOf(UNFINISHED_STATUS, max_items=4)))
def list_unfinished_tasks(services, tenant, p):
    statuses = list(dict.fromkeys([*(p["TaskStatusList"] or []), *([p["TaskStatus"]] if p["TaskStatus"] else [])]))
    tasks = services.jobs.unfinished_tasks(tenant, DeviceRef(p["IotId"], p["ProductKey"], p["DeviceName"]),
                                           p["ModuleName"], statuses)
    return {"Data": {"SimpleOTATaskInfo": [_drop_none({**_task_common(t), "ModuleName": t["module_name"]})
                                           for t in tasks]}}


@action("CancelOTATaskByJob", JOB_ID, Param("CancelScheduledTask", Bool(), default=False),
        Param("CancelQueuedTask", Bool(), default=False), Param("CancelInProgressTask", Bool(), default=False),
        Param("CancelNotifiedTask", Bool(), default=False), Param("CancelUnconfirmedTask", Bool()))
def cancel_by_job(services, tenant, p):
    services.jobs.cancel_by_job(tenant, p["JobId"], scheduled=p["CancelScheduledTask"], queued=p["CancelQueuedTask"],
                                in_progress=p["CancelInProgressTask"], notified=p["CancelNotifiedTask"],
                                unconfirmed=p["CancelUnconfirmedTask"])
    return {}


@action("CancelOTATaskByDevice", PRODUCT_KEY, FIRMWARE_ID,
        Param("DeviceName", ListOf(DEVICE_NAME, max_items=200, unique=True), required=True),
        Param("JobId", Str(min_len=1, max_len=64)))
def cancel_by_device(services, tenant, p):
    services.jobs.cancel_by_device(tenant, p["ProductKey"], p["FirmwareId"], p["DeviceName"], p["JobId"])
    return {}


@action("CancelOTAStrategyByJob", JOB_ID)
def cancel_strategy(services, tenant, p):
    services.jobs.cancel_strategy(tenant, p["JobId"])
    return {}


TASK_IDS = Param("TaskId", ListOf(Str(min_len=1, max_len=64), max_items=10, unique=True), required=True)


@action("ReupgradeOTATask", JOB_ID, TASK_IDS)
def reupgrade(services, tenant, p):
    services.jobs.reupgrade(tenant, p["JobId"], p["TaskId"])
    return {}


@action("ConfirmOTATask", TASK_IDS, methods=("POST",))
def confirm(services, tenant, p):
    services.jobs.confirm(tenant, p["TaskId"])
    return {}


@action("GenerateDeviceNameListURL")
def generate_device_list_url(services, tenant, p):
    form, created_ms = services.jobs.new_device_list_upload(tenant)
    data = {"Key": form.key, "Host": form.host, "Policy": form.policy, "AccessKeyId": form.access_key_id,
            "Signature": form.signature, "FileUrl": form.object_url, "ObjectStorage": form.object_storage,
            "UtcCreate": utc_iso_ms(created_ms)}
    if form.object_storage != "OSS":
        data["FormFields"] = form.fields
    return {"Data": data}


ACTIONS = (create_verify_job, create_static_job, create_dynamic_job, query_job, update_job, list_jobs_by_firmware,
           list_jobs_by_device, list_tasks_by_job, list_unfinished_tasks, cancel_by_job, cancel_by_device,
           cancel_strategy, reupgrade, confirm, generate_device_list_url)
