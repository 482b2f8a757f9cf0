"""The OTA messages on the wire: lenient parsing of what devices send, and the payloads
otaplane sends them. Pure functions, no I/O.

Downstream payloads carry what every SDK accepts (device-protocol.md, "Always send"):
`code "1000"`, `message "success"`, a numeric `id`, and `data` with an int `size`, `version`,
`url`, lowercase-hex `md5` (even for SHA256 packages, for iotkit 3) and `sign`, and `signMethod`
exactly `Md5` or `SHA256`; `module` only when it is not `default`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from otaplane.services.device_ota import PendingPackage

# Bigger payloads are refused (no OTA message comes near it; the platform allows 256 KB).
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_VERSION_LENGTH = 64  # device_modules.version
MAX_MODULE_LENGTH = 64  # device_modules.module_name
# The platform's rule for module names (CreateOTAModule): a name outside it names no module.
MODULE_NAME = re.compile(r"[A-Za-z0-9._-]+")
MAX_DESC_LENGTH = 256  # stored; longer descriptions are cut
PROGRESS_STEPS = range(-4, 101)  # -4..-1 failures, 0 download started (LSDK4), 1..100 percent

_TRAILING_COMMA = re.compile(r",\s*([}\]])")


class MalformedMessage(ValueError):
    """A device message otaplane cannot use: logged and dropped."""


RequestId = int | str | None


@dataclass(frozen=True)
class VersionReport:
    request_id: RequestId
    module: str | None  # None = default
    version: str


@dataclass(frozen=True)
class ProgressReport:
    request_id: RequestId
    module: str | None
    step: int
    desc: str | None


@dataclass(frozen=True)
class FirmwareQuery:
    request_id: RequestId
    module: str | None


@dataclass(frozen=True)
class BlockRequest:
    """A block of a package file asked for over MQTT (`thing/file/download`)."""

    request_id: RequestId
    file_token: str
    stream_id: int
    file_id: int
    offset: int
    size: int


# The most one reply carries (the SDK asks 5 KB blocks by default; MQTT download is for packages
# of at most 16 MB).
MAX_BLOCK_BYTES = 128 * 1024


# --- upstream (device -> otaplane) ---------------------------------------------------------------
def loads_lenient(payload: bytes) -> Any:
    """JSON as the SDKs write it: LSDK4 leaves a trailing comma before `}` in some messages."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedMessage(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("payload is not UTF-8") from None
    try:
        return json.loads(text)
    except ValueError:
        pass
    except RecursionError:  # nested thousands deep: no message of the protocol is
        raise MalformedMessage("payload is nested too deep") from None
    try:
        return json.loads(_TRAILING_COMMA.sub(r"\1", text))
    except ValueError as exc:
        raise MalformedMessage(f"payload is not JSON: {exc}") from None
    except RecursionError:
        raise MalformedMessage("payload is nested too deep") from None


def _envelope(payload: bytes) -> tuple[RequestId, dict[str, Any]]:
    return _envelope_of(loads_lenient(payload))


def _envelope_of(body: Any) -> tuple[RequestId, dict[str, Any]]:
    if not isinstance(body, dict):
        raise MalformedMessage("payload is not a JSON object")
    request_id = body.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, (int, str, type(None))):
        raise MalformedMessage("id is neither a number nor a string")
    params = body.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise MalformedMessage("params is not an object")
    return request_id, params


def _text(value: Any, name: str, max_length: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MalformedMessage(f"{name} is not a non-empty string")
    if len(value) > max_length:
        raise MalformedMessage(f"{name} is longer than {max_length} characters")
    if "\x00" in value:
        raise MalformedMessage(f"{name} contains NUL")
    return value


def _module(params: dict[str, Any]) -> str | None:
    module = params.get("module")
    if module is None or module == "":
        return None
    module = _text(module, "module", MAX_MODULE_LENGTH)
    if not MODULE_NAME.fullmatch(module):
        raise MalformedMessage("module may contain only letters, digits, '.', '_' and '-'")
    return module


def _int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    """An integer as the SDKs send one: a JSON number or a decimal string (`"step": "-1"`)."""
    if isinstance(value, bool):
        raise MalformedMessage(f"{name} is not a number")
    try:
        number = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise MalformedMessage(f"{name} is not a number") from None
    if not isinstance(number, int) or number < minimum or (maximum is not None and number > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
        raise MalformedMessage(f"{name} is not an integer {bounds}")
    return number


def parse_inform(payload: bytes) -> VersionReport:
    """`{"id": 1, "params": {"version": "1.0.0", "module": "MCU"}}`; id int or string, module optional."""
    request_id, params = _envelope(payload)
    return VersionReport(request_id, _module(params), _text(params.get("version"), "version", MAX_VERSION_LENGTH))


def parse_progress(payload: bytes) -> ProgressReport:
    """`{"id": "1", "params": {"step": "-1", "desc": "...", "module": "MCU"}}`; step string or int."""
    request_id, params = _envelope(payload)
    step = _int(params.get("step"), "step", PROGRESS_STEPS.start, PROGRESS_STEPS.stop - 1)
    desc = params.get("desc")
    if desc is not None and not isinstance(desc, str):
        raise MalformedMessage("desc is not a string")
    if desc is not None:
        desc = desc.replace("\x00", "")[:MAX_DESC_LENGTH] or None
    return ProgressReport(request_id, _module(params), step, desc)


def parse_firmware_get(payload: bytes) -> FirmwareQuery:
    """`{"id": 1, "params": {}}` or with `"module"`; `version`/`method` may be there and are ignored."""
    request_id, params = _envelope(payload)
    return FirmwareQuery(request_id, _module(params))


def parse_legacy_request(payload: bytes) -> FirmwareQuery | None:
    """iotkit's `{"id": 1, "params": {"version": "1.0.0"}}` on `/ota/device/request/...`; None for
    an answer on that topic (it carries `code`: ours, coming back to a subscriber of the topic)."""
    body = loads_lenient(payload)
    if isinstance(body, dict) and "code" in body and "params" not in body:
        return None
    request_id, params = _envelope_of(body)
    return FirmwareQuery(request_id, _module(params))


def parse_block_request(payload: bytes) -> BlockRequest:
    """`{"id":"1","params":{"fileToken":"default","fileInfo":{"streamId":1397345,"fileId":1,},
    "fileBlock":{"size":5120,"offset":0}}}` (LSDK4 leaves that trailing comma)."""
    request_id, params = _envelope(payload)
    info, block = params.get("fileInfo"), params.get("fileBlock")
    if not isinstance(info, dict) or not isinstance(block, dict):
        raise MalformedMessage("fileInfo or fileBlock is not an object")
    token = params.get("fileToken", "")
    if not isinstance(token, str) or len(token) > 64:
        raise MalformedMessage("fileToken is not a string of at most 64 characters")
    return BlockRequest(request_id, token, _int(info.get("streamId"), "streamId", 0),
                        _int(info.get("fileId"), "fileId", 0), _int(block.get("offset"), "offset", 0),
                        _int(block.get("size"), "size", 1))


# --- downstream (otaplane -> device) -------------------------------------------------------------
def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def package_data(package: PendingPackage) -> dict[str, Any]:
    """The `data` object of a push or a firmware/get reply."""
    data: dict[str, Any] = {"size": package.size, "version": package.version}
    if package.files:
        data["files"] = [
            {"fileName": f.name, "fileSize": f.size, "fileUrl": f.url, "fileSign": f.sign.lower()}
            for f in package.files
        ]
    elif package.mqtt_stream is not None:  # DownloadProtocol MQTT: blocks on thing/file/download
        data["dProtocol"] = "mqtt"
        data["streamId"] = package.mqtt_stream
        data["streamFileId"] = 1
        data["md5"] = (package.md5 or "").lower()
        data["sign"] = (package.sign or "").lower()
    else:
        data["url"] = package.url
        data["md5"] = (package.md5 or "").lower()
        data["sign"] = (package.sign or "").lower()
    data["signMethod"] = package.sign_method
    if not package.module_is_default:
        data["module"] = package.module_name
    if package.is_diff:
        data["isDiff"] = 1
    ext: dict[str, Any] = {}
    if package.udi:
        ext["_package_udi"] = package.udi
    if ext:
        data["extData"] = ext
    return data


def _crc16_arc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC16_ARC = _crc16_arc_table()


def crc16_arc_python(data: bytes) -> int:
    """CRC-16/ARC (poly 0x8005 reflected, init 0), a byte at a time from a table: where fastcrc
    is missing, and what tests check fastcrc against."""
    crc = 0
    table = _CRC16_ARC
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


try:
    from fastcrc.crc16 import arc as crc16_arc  # what LSDK4 checks a downloaded block with
except ImportError:  # a platform without its wheel: the same CRC, ~1,500 times slower
    crc16_arc = crc16_arc_python


def block_reply(header: dict[str, Any], data: bytes = b"") -> bytes:
    """The binary answer on `thing/file/download_reply`: a 2-byte big-endian header length, the
    JSON header, the data, and its CRC-16/ARC, little-endian (the SDK reads a native uint16)."""
    head = _dumps(header)
    return len(head).to_bytes(2, "big") + head + data + crc16_arc(data).to_bytes(2, "little")


def legacy_request_reply(request_id: RequestId, package: PendingPackage | None) -> bytes:
    """The answer on `/ota/device/request/...`: the push of the pending package (iotkit handles it
    as one, once it finds a `url` in it), or `data: {}` under the request's id."""
    if package is not None:
        return upgrade_push(package)
    body: dict[str, Any] = {"code": "1000", "data": {}}
    if request_id is not None:
        body["id"] = request_id
    body["message"] = "success"
    return _dumps(body)


def upgrade_push(package: PendingPackage) -> bytes:
    """The message on `/ota/device/upgrade/{pk}/{dn}`."""
    return _dumps({"code": "1000", "data": package_data(package), "id": package.message_id, "message": "success"})


def firmware_get_reply(request_id: RequestId, package: PendingPackage | None) -> bytes:
    """The answer on `.../thing/ota/firmware/get_reply`: the pending package, or `data: {}`."""
    body: dict[str, Any] = {"code": 200, "data": package_data(package) if package else {}}
    if request_id is not None:
        body["id"] = request_id
    body["message"] = "success"
    body["method"] = "thing.ota.firmware.get"
    return _dumps(body)
