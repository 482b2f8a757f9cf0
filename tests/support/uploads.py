"""Upload a file the way a browser or script does with GenerateOTAUploadURL's answer."""

from __future__ import annotations

import httpx


def form_fields(data: dict) -> dict[str, str]:
    """The form fields to post: the backend's own list when given, else the OSS names."""
    if data.get("FormFields"):
        return dict(data["FormFields"])
    return {
        "key": data["Key"],
        "policy": data["Policy"],
        "OSSAccessKeyId": data["OSSAccessKeyId"],
        "Signature": data["Signature"],
        "success_action_status": "200",
    }


def post_upload(data: dict, content: bytes, filename: str = "firmware.bin") -> httpx.Response:
    """POST the fields, then the file last (as OSS PostObject requires)."""
    return httpx.post(
        data["Host"],
        data=form_fields(data),
        files={"file": (filename, content, "application/octet-stream")},
        timeout=60,
    )
