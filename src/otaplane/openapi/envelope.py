"""Response bodies: the RPC envelope in JSON or XML, and the optional lower-camel dialect."""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import orjson
import xmltodict

from otaplane.errors import ApiError

JSON_TYPE = "application/json;charset=utf-8"
XML_TYPE = "text/xml;charset=utf-8"
_JSON_TYPE_BYTES = JSON_TYPE.encode("latin-1")
_XML_TYPE_BYTES = XML_TYPE.encode("latin-1")
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _encode_body(body: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON. orjson writes what json writes here (keys in order, no spaces, no
    ASCII escaping) in a seventh of the time; what it refuses (an integer past 64 bits, a key
    that is not a string) goes through json."""
    try:
        return orjson.dumps(body)
    except TypeError:  # orjson.JSONEncodeError included
        return _encode_json(body).encode("utf-8")


class Reply(NamedTuple):
    """A response, ready for the wire: the gateway sends it with an `x-acs-request-id` header."""

    status: int
    content_type: bytes
    body: bytes


def lower_camel(value: Any) -> Any:
    """`FirmwareInfo` -> `firmwareInfo`, recursively (private-cloud clients expect it)."""
    if isinstance(value, dict):
        return {(k[:1].lower() + k[1:]): lower_camel(v) for k, v in value.items()}
    if isinstance(value, list):
        return [lower_camel(v) for v in value]
    return value


# Characters XML 1.0 cannot carry at all (not even escaped): most C0 controls and U+FFFE/FFFF.
_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_scalar(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Stored values may hold control characters (JSON is fine with them); keep XML well-formed.
        return _XML_ILLEGAL.sub("\ufffd", value)
    if isinstance(value, dict):
        return {k: _xml_scalar(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_xml_scalar(v) for v in value]
    return value


def _anchor(code: str) -> str:
    """The heading anchor of a code in docs/errors.md (all Missing<Name> share one row)."""
    return "missing" if code.startswith("Missing") else code.lower().replace(".", "")


def render(body: dict[str, Any], root: str, fmt: str, status: int) -> Reply:
    if fmt == "XML":
        text = xmltodict.unparse({root: _xml_scalar(body)}, full_document=True)
        return Reply(status, _XML_TYPE_BYTES, text.encode("utf-8"))
    return Reply(status, _JSON_TYPE_BYTES, _encode_body(body))


def success(action: str, request_id: str, payload: dict[str, Any], fmt: str, camel: bool) -> Reply:
    body: dict[str, Any] = {"RequestId": request_id, "Success": True, "Code": ""}
    body.update(payload)
    if camel:
        body = lower_camel(body)
    return render(body, f"{action}Response", fmt, 200)


def failure(
    action: str | None, request_id: str, error: ApiError, fmt: str, camel: bool, host: str
) -> Reply:
    spec = error.spec
    if spec.gateway:
        body = {
            "RequestId": request_id,
            "HostId": host,
            "Code": spec.code,
            "Message": error.message,
            "Recommend": f"See docs/errors.md#{_anchor(spec.code)} in the otaplane repository",
        }
        # The POP shape, in the configured case like every other answer: a client of the camel
        # dialect reads code/message (aliyun-python-sdk-core, which reads Code/Message only, is
        # for the default dialect; it cannot read a camel success either).
        if camel:
            body = lower_camel(body)
        return render(body, "Error", fmt, spec.http_status)
    body = {"RequestId": request_id, "Success": False, "Code": spec.code, "ErrorMessage": error.message}
    if camel:
        body = lower_camel(body)
    return render(body, f"{action or 'Unknown'}Response", fmt, 200)
