"""What the firmware service needs from object storage, whatever the backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class BlobStoreUnavailable(RuntimeError):
    """The object store could not be reached or refused us (down, wrong bucket, bad credentials):
    the request that needed it is answered 503 ServiceUnavailable (openapi.gateway)."""


@dataclass(frozen=True)
class UploadForm:
    """A browser-style form POST upload (OSS PostObject V1 names, as GenerateOTAUploadURL answers).

    `fields` are the exact form fields to send before the `file` field; for OSS-compatible
    backends they are {key, policy, OSSAccessKeyId, Signature}, other backends may differ.
    """

    key: str
    host: str  # the URL to POST the form to
    policy: str  # base64 policy document
    access_key_id: str
    signature: str
    object_url: str  # canonical, unsigned URL of the object once uploaded (FirmwareUrl)
    object_storage: str  # "OSS" for the local store, "S3" for s3
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BlobDigest:
    size: int
    md5: str  # lowercase hex
    sha256: str  # lowercase hex


class BlobStore(Protocol):
    def upload_form(self, key: str, max_bytes: int, expires_in_s: int) -> UploadForm:
        """Signed form-POST parameters that allow uploading exactly `key`, up to max_bytes."""

    def object_url(self, key: str) -> str:
        """The canonical (unsigned) URL of an object: what CreateOTAFirmware receives back."""

    def key_from_url(self, url: str) -> str | None:
        """The key of one of our objects given its canonical or presigned URL, else None."""

    def digest(self, key: str) -> BlobDigest | None:
        """Size, MD5 and SHA-256 of a stored object (streamed, never loaded whole); None if absent."""

    def presigned_get(self, key: str, expires_in_s: int) -> str:
        """A download URL valid for expires_in_s seconds (OSS V1 query form for the local store)."""

    def read(self, key: str, max_bytes: int) -> bytes | None:
        """A small object whole (device lists); None if absent. Larger than max_bytes: ValueError."""

    def read_range(self, key: str, offset: int, length: int) -> bytes | None:
        """Up to `length` bytes from `offset` (fewer at the end, none past it); None if absent."""

    def delete(self, key: str) -> None:
        """Remove an object; no error when it is already gone."""
