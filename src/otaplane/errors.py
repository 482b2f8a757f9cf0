"""The error catalogue: every error otaplane answers with, as a value.

Two families, as on the real platform:
- gateway (POP) errors: HTTP 4xx/5xx, body keys Code/Message/HostId/Recommend;
- business (IoT) errors: HTTP 200, Success=false, body keys Code/ErrorMessage.

Services raise `ApiError(catalogue_entry, detail...)`; only the gateway turns it into a response.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorSpec:
    code: str
    message: str
    http_status: int = 200  # 200 = business error
    gateway: bool = False

    def __call__(self, message: str | None = None, **fmt: object) -> "ApiError":
        text = message if message is not None else self.message.format(**fmt)
        return ApiError(self, text)


class ApiError(Exception):
    def __init__(self, spec: ErrorSpec, message: str):
        super().__init__(f"{spec.code}: {message}")
        self.spec = spec
        self.message = message

    @property
    def code(self) -> str:
        return self.spec.code


def _gateway(code: str, status: int, message: str) -> ErrorSpec:
    return ErrorSpec(code, message, status, gateway=True)


def _business(code: str, message: str) -> ErrorSpec:
    return ErrorSpec(code, message)


# --- gateway (POP) errors -------------------------------------------------------------------
SignatureDoesNotMatch = _gateway(
    "SignatureDoesNotMatch", 400,
    "Specified signature is not matched with our calculation. server string to sign is:{sts}",
)
SignatureDoesNotMatchV3 = _gateway(
    "SignatureDoesNotMatch", 400,
    "Specified signature does not match our calculation. server StringToSign is [{sts}]",
)
InvalidAccessKeyIdNotFound = _gateway(
    "InvalidAccessKeyId.NotFound", 404, "Specified access key is not found."
)
InvalidAccessKeyIdInactive = _gateway(
    "InvalidAccessKeyId.Inactive", 400, "Specified access key is disabled."
)
SignatureNonceUsed = _gateway(
    "SignatureNonceUsed", 400, "Specified signature nonce was used already."
)
InvalidTimeStampExpired = _gateway(
    "InvalidTimeStamp.Expired", 400, "Specified time stamp or date value is expired."
)
InvalidTimeStampFormat = _gateway(
    "InvalidTimeStamp.Format", 400, "Specified time stamp or date value is not well formatted."
)
IncompleteSignature = _gateway(
    "IncompleteSignature", 400, "The request signature does not conform to Aliyun standards. {detail}"
)
InvalidSignatureMethod = _gateway(
    "InvalidSignatureMethod", 400, "Specified signature method is not supported: {method}."
)
ContentSha256Mismatch = _gateway(
    "InvalidParameter.ContentSha256", 400,
    "The x-acs-content-sha256 header does not match the SHA-256 of the request body.",
)
MissingParameter = _gateway("Missing{name}", 400, "{name} is mandatory for this action.")
InvalidParameter = _gateway(
    "InvalidParameter", 400, "The specified parameter {name} is not valid: {reason}"
)
InvalidAction = _gateway(
    "InvalidAction.NotFound", 404,
    "Specified api is not found, please check your url and method.",
)
InvalidVersion = _gateway("InvalidVersion", 400, "Specified parameter Version is not valid.")
UnsupportedHTTPMethod = _gateway(
    "UnsupportedHTTPMethod", 400, "This http method is not supported."
)
ThrottlingUser = _gateway(
    "Throttling.User", 400, "Request was denied due to user flow control."
)
ServiceUnavailable = _gateway(
    "ServiceUnavailable", 503, "The request has failed due to a temporary failure of the server."
)
InternalError = _gateway(
    "InternalError", 500,
    "The request processing has failed due to some unknown error, exception or failure.",
)


def missing(name: str) -> ApiError:
    spec = ErrorSpec(f"Missing{name}", MissingParameter.message, 400, gateway=True)
    return spec(name=name)


def invalid(name: str, reason: str) -> ApiError:
    return InvalidParameter(name=name, reason=reason)


# --- business (IoT) errors ------------------------------------------------------------------
SystemException = _business("iot.system.SystemException", "A system exception occurred.")
InstanceNotFound = _business(
    "iot.system.InstanceNotFound", "The specified instance does not exist."
)
InvalidPageParams = _business(
    "iot.common.InvalidPageParams", "The page parameters are invalid: {reason}"
)
InvalidFormattedParameter = _business(
    "iot.common.InvalidFormattedParameter", "The parameter {name} is in an invalid format: {reason}"
)
NotExistedProduct = _business("iot.prod.NotExistedProduct", "The specified product does not exist.")
AlreadyExistedProductName = _business(
    "iot.prod.AlreadyExistedProductName", "The product name already exists."
)
InvalidFormattedProductName = _business(
    "iot.prod.InvalidFormattedProductName",
    "The product name is invalid: 4-30 characters of letters, digits and underscores.",
)
# Not published by the platform; named in its style.
ProductHasDevices = _business(
    "iot.prod.ProductHasDevices", "The product still has devices; delete them first."
)
ProductHasFirmware = _business(
    "iot.prod.ProductHasFirmware", "The product still has OTA firmware; delete it first."
)

# OTA. Only FirmwareNotFound is published by the platform; the others are named in its style
# and listed in docs/errors.md.
FirmwareNotFound = _business("iot.ota.FirmwareNotFound", "The specified firmware does not exist.")
FirmwareNameExists = _business(
    "iot.ota.FirmwareNameExisted", "A firmware package with this name already exists in the instance."
)
FirmwareCountExceeded = _business(
    "iot.ota.FirmwareCountExceeded", "The instance already has the maximum of {limit} firmware packages."
)
SrcVersionSameAsDest = _business(
    "iot.ota.SrcVersionSameAsDestVersion", "SrcVersion must differ from DestVersion for a diff package."
)
FirmwareUrlInvalid = _business(
    "iot.ota.InvalidFirmwareUrl",
    "The URL {url!r} is not an object uploaded through GenerateOTAUploadURL in this instance.",
)
FirmwareFileNotFound = _business(
    "iot.ota.FirmwareFileNotFound", "No uploaded object exists at {url!r}; upload it first."
)
# Same code: the object is there, but its upload was withdrawn when the package that held it was
# deleted (a form posted again while still valid stores it all the same), so no package adopts it.
FirmwareUploadWithdrawn = _business(
    "iot.ota.FirmwareFileNotFound", "The upload at {url!r} was withdrawn when the package that held it was "
    "deleted; generate a new upload URL and upload the file again."
)
FirmwareFileEmpty = _business(
    "iot.ota.FirmwareFileEmpty", "The object at {url!r} is empty; a firmware file has at least one byte."
)
FirmwareSizeMismatch = _business(
    "iot.ota.FirmwareSizeMismatch", "{what} is {given} bytes but the uploaded object has {actual} bytes."
)
FirmwareSignMismatch = _business(
    "iot.ota.FirmwareSignMismatch", "{what} does not match the {method} of the uploaded object ({actual})."
)
FirmwareTooLarge = _business(
    "iot.ota.FirmwareTooLarge", "A firmware file may be at most {limit} bytes; this one has {actual}."
)
FirmwareUrlConflict = _business(
    "iot.ota.FirmwareUrlConflict", "Give either FirmwareUrl or MultiFiles, not both."
)
MultiFileNameDuplicated = _business(
    "iot.ota.MultiFileNameDuplicated", "MultiFiles names must be unique; {name!r} appears twice."
)
ModuleNotFound = _business("iot.ota.ModuleNotFound", "The OTA module {name!r} does not exist in the product.")
ModuleAlreadyExists = _business(
    "iot.ota.ModuleNameExisted", "The product already has a module named {name!r} (names ignore case)."
)
ModuleCountExceeded = _business(
    "iot.ota.ModuleCountExceeded", "A product may have at most {limit} custom OTA modules."
)
DefaultModuleUndeletable = _business(
    "iot.ota.DefaultModuleNotAllowedDelete", "The default module cannot be deleted."
)
ModuleHasFirmware = _business(
    "iot.ota.ModuleHasFirmware", "The module still has firmware packages; delete them first."
)
FirmwareProductMismatch = _business(
    "iot.ota.FirmwareProductMismatch", "The firmware package belongs to another product than the device."
)

FirmwareHasRunningJob = _business(
    "iot.ota.FirmwareHasRunningJob",
    "The package has upgrade jobs that are planned or running, or tasks not finished; cancel them first.",
)

# Upgrade jobs and tasks. Named in the platform's style (it publishes none of these).
JobNotFound = _business("iot.ota.JobNotFound", "The specified upgrade job does not exist.")
TaskNotFound = _business("iot.ota.TaskNotFound", "One or more of the specified TaskIds do not exist.")
FirmwareVerifying = _business(
    "iot.ota.FirmwareVerifying", "The package is being verified; wait for its verify job to end."
)
FirmwareAlreadyVerified = _business("iot.ota.FirmwareAlreadyVerified", "The package is already verified.")
FirmwareNeedsNoVerification = _business(
    "iot.ota.FirmwareNoNeedVerify", "The package was created with NeedToVerify=false; it needs no verify job."
)
FirmwareNotVerified = _business(
    "iot.ota.FirmwareNotVerified",
    "The package must be verified (CreateOTAVerifyJob) before it can go into an upgrade job.",
)
DynamicJobExists = _business(
    "iot.ota.DynamicJobExisted", "The package already has a running dynamic upgrade job; cancel it first."
)
DevicesNotFound = _business(
    "iot.ota.DeviceNotExisted", "{count} device(s) do not exist in the product: {names}."
)
NoDeviceToUpgrade = _business(
    "iot.ota.NoDeviceToUpgrade",
    "No device of the product matches the job (after the SrcVersion filter, and leaving out devices "
    "that already run the DestVersion).",
)
DeviceHasUnfinishedTask = _business(
    "iot.ota.DeviceHasUnfinishedTask", "Device {device} already has an unfinished upgrade task (job {job})."
)
GroupTargetNotSupported = _business(
    "iot.ota.GroupNotSupported", "TargetSelection GROUP is not supported: otaplane has no device groups yet."
)
DeviceListUrlInvalid = _business(
    "iot.ota.InvalidDnListFileUrl",
    "The URL {url!r} is not a device list uploaded through GenerateDeviceNameListURL in this instance.",
)
DeviceListFileNotFound = _business(
    "iot.ota.DnListFileNotFound", "No uploaded device list exists at {url!r}; upload it first."
)
DeviceListFileInvalid = _business(
    "iot.ota.InvalidDnListFile", "The device list file cannot be used: {reason}."
)
JobFinished = _business("iot.ota.JobFinished", "The job is already {status}.")
NotDynamicJob = _business("iot.ota.NotDynamicJob", "Only a dynamic upgrade job has a strategy to cancel.")
CancelFlagRequired = _business(
    "iot.ota.CancelParamRequired",
    "Set at least one of CancelScheduledTask, CancelQueuedTask, CancelInProgressTask, CancelNotifiedTask, "
    "CancelUnconfirmedTask to true.",
)
TaskNotReupgradable = _business(
    "iot.ota.TaskCanNotReupgrade", "Task {task} is neither FAILED nor CANCELED; only those can be upgraded again."
)

# Devices.
NotExistedDevice = _business("iot.device.NotExistedDevice", "The specified device does not exist.")
AlreadyExistedDeviceName = _business(
    "iot.device.AlreadyExistedDeviceName", "A device with this name already exists in the product."
)
InvalidFormattedDeviceName = _business(
    "iot.device.InvalidFormattedDeviceName",
    "The device name is invalid: 4-32 characters of letters, digits and - _ @ . :",
)
InvalidIoTId = _business("iot.device.InvalidIoTId", "The IotId is invalid.")
NullDeviceReference = _business(
    "iot.device.NullDeviceName", "Give either IotId, or ProductKey and DeviceName."
)
DeviceCountExceeded = _business(
    "iot.device.DeviceCountExceeded", "A product may have at most {limit} devices."
)
ApplyNotFound = _business("iot.device.ApplyIdNotFound", "The specified ApplyId does not exist.")
