"""Write docs/errors.md from the error catalogue: `python scripts/errors_doc.py`.

tests/unit/test_error_docs.py fails when the file is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from otaplane import errors
from otaplane.errors import ErrorSpec

DOC = Path(__file__).parents[1] / "docs" / "errors.md"

# Codes (and messages) the platform publishes; the rest are otaplane's, named in its style.
PUBLISHED = {
    "SignatureDoesNotMatch", "InvalidAccessKeyId.NotFound", "InvalidAccessKeyId.Inactive", "SignatureNonceUsed",
    "InvalidTimeStamp.Expired", "InvalidTimeStamp.Format", "IncompleteSignature", "InvalidSignatureMethod",
    "Missing{name}", "InvalidParameter", "InvalidAction.NotFound", "InvalidVersion", "UnsupportedHTTPMethod",
    "Throttling.User", "InternalError", "iot.system.SystemException", "iot.system.InstanceNotFound",
    "iot.common.InvalidPageParams", "iot.common.InvalidFormattedParameter", "iot.prod.NotExistedProduct",
    "iot.prod.AlreadyExistedProductName", "iot.prod.InvalidFormattedProductName", "iot.ota.FirmwareNotFound",
    "iot.device.NotExistedDevice", "iot.device.AlreadyExistedDeviceName", "iot.device.InvalidFormattedDeviceName",
    "iot.device.InvalidIoTId", "iot.device.DeviceCountExceeded",
}

HEADER = """# Error catalogue

Generated from `src/otaplane/errors.py` by `scripts/errors_doc.py`; `tests/unit/test_error_docs.py`
fails when it is out of date.

Gateway errors are answered with an HTTP 4xx/5xx status and the body keys `RequestId`, `HostId`,
`Code`, `Message`, `Recommend`. Business errors are answered with HTTP 200 and `Success: false`,
`Code`, `ErrorMessage` (the platform's convention, so both SDKs hand the body to the caller).

Rule of thumb: a parameter that is missing (or empty) or fails its declared type, range, length or pattern
is a gateway error (`Missing<Name>`, `InvalidParameter`); a request that is well formed but breaks
a rule of the resource (a duplicate name, an unknown id, a checksum that does not match) is a
business error. Codes marked *otaplane* are not published by the platform and were named in its style.
"""


def _escape(text: str) -> str:
    return text.replace("{", "&lt;").replace("}", "&gt;").replace("|", "\\|")


def _anchor(code: str) -> str:
    return "missing" if code.startswith("Missing") else code.lower().replace(".", "")


def render() -> str:
    seen: dict[str, ErrorSpec] = {}
    for value in vars(errors).values():
        if isinstance(value, ErrorSpec) and value.code not in seen:
            seen[value.code] = value
    lines = [HEADER, "## Gateway errors", "", "| Code | HTTP | Message |", "|---|---|---|"]
    for spec in (s for s in seen.values() if s.gateway):
        mark = "" if spec.code in PUBLISHED else " *otaplane*"
        lines.append(f'| <a id="{_anchor(spec.code)}"></a>`{_escape(spec.code)}` | {spec.http_status} | '
                     f"{_escape(spec.message)}{mark} |")
    lines += ["", "## Business errors (HTTP 200, Success=false)", "", "| Code | Message |", "|---|---|"]
    for spec in (s for s in seen.values() if not s.gateway):
        mark = "" if spec.code in PUBLISHED else " *otaplane*"
        lines.append(f'| <a id="{_anchor(spec.code)}"></a>`{spec.code}` | {_escape(spec.message)}{mark} |')
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    DOC.write_text(render())
    sys.stdout.write(f"wrote {DOC}\n")
