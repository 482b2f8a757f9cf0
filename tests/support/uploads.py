"""Upload a file the way a browser or script does with GenerateOTAUploadURL's answer."""

from __future__ import annotations

import anyio
import httpx

from otaplane.blobs.local import INCOMING_DIR, LocalBlobStore
from otaplane.blobs.oss_signing import SizeRange
from otaplane.blobs.post_object import Upload


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


def store_as_received(store: LocalBlobStore, key: str, content: bytes) -> None:
    """Store an object as a received PostObject form does (its temp file streamed, then
    published by the store), without HTTP."""
    upload = Upload.open(store.root / INCOMING_DIR, {"key": key}, SizeRange(0, len(content)))
    try:
        anyio.run(upload.write, content)
        store._publish(upload)  # noqa: SLF001
    finally:
        upload.discard()
