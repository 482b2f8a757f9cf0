"""OSS PostObject uploads received by otaplane itself: the form's policy and signature checked
before any file byte is kept, the file streamed to a temp file, then handed to the store.

The local store publishes the temp file into its folder; the S3 store (by default) uploads it to
the bucket. Either way the client speaks plain OSS PostObject V1, which is all the official SDKs'
GenerateOTAUploadURL answer carries (Key, Policy, OSSAccessKeyId, Signature, Host): an S3 POST
would need x-amz-* fields they drop. Each key is written once, as under OSS's
`x-oss-forbid-overwrite`: a form posted again gets 409 FileAlreadyExists.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from otaplane import ids
from otaplane.blobs.base import BlobStoreUnavailable, UploadForm
from otaplane.blobs.cors import cors_middleware
from otaplane.blobs.oss_signing import OssError, SizeRange, build_policy, policy_expiration, sign_policy, verify_post

try:  # python-multipart >= 0.0.13 renamed its import package
    from python_multipart import MultipartParser
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header
except ModuleNotFoundError:  # pragma: no cover
    from multipart import MultipartParser  # type: ignore[no-redef]
    from multipart.exceptions import FormParserError  # type: ignore[no-redef]
    from multipart.multipart import parse_options_header  # type: ignore[no-redef]

log = logging.getLogger("otaplane.blobs")

BUCKET = "otaplane"
ACCESS_KEY_ID = "otaplane-local"  # not a secret: only the signing secret is
ROUTE_PREFIX = f"/oss/{BUCKET}"
HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
# An upload temp file unwritten for this long belongs to a process that died (sweep_incoming).
INCOMING_IDLE_S = 24 * 3600
# An unlocked upload temp file this old belongs to a process that died: a live upload holds its
# file's lock from a moment after creating it (Upload.open) until it is gone (sweep_incoming).
INCOMING_UNLOCKED_S = 60
# A form's post must end this long after its policy expired, or it is refused (RequestTimeout):
# a package adopts an upload within the hour after GenerateOTAUploadURL, after which the
# collector forgets the upload (services.firmware.UPLOAD_ADOPTION_GRACE_MS, a few minutes more),
# so an object that landed later would be nobody's, kept for good.
UPLOAD_TIME_LIMIT_S = 55 * 60
FIELDS_CAP = 64 * 1024  # form fields before `file` are held in memory: keep them small
MAX_KEY_LENGTH = 1023  # OSS's own limit
# `/`-separated segments, each 1-255 of [A-Za-z0-9._-] not starting with a dot: one regex
# for the whole key (a split and a match per segment cost 2.5 times as much).
_KEY = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}/)*[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
_SUCCESS_STATUSES = {"200": 200, "201": 201, "204": 204}


# Memoized: every QueryOTAFirmware and every download checks its package's key again, and a
# polled package's key is checked again and again.
@functools.lru_cache(maxsize=4096)
def is_valid_key(key: str) -> bool:
    """Conservative: `/`-separated segments of [A-Za-z0-9._-], none empty or starting with a dot.

    That excludes `..`, absolute paths, backslashes, NUL and dot folders such as `.incoming`.
    """
    return 0 < len(key) <= MAX_KEY_LENGTH and _KEY.fullmatch(key) is not None


def oss_error_response(exc: OssError, host_id: str) -> Response:
    """An OssError as OSS answers it: `<Error><Code>…` XML, its status and extra headers."""
    request_id = ids.oss_request_id()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n'
        f"  <Code>{escape(exc.code)}</Code>\n  <Message>{escape(exc.message)}</Message>\n"
        f"  <RequestId>{request_id}</RequestId>\n  <HostId>{escape(host_id)}</HostId>\n</Error>\n"
    )
    headers = {**exc.headers, "x-oss-request-id": request_id}
    return Response(body, exc.status, media_type="application/xml", headers=headers)


def not_allowed(allowed: str) -> OssError:
    return OssError(405, "MethodNotAllowed", "The specified method is not allowed against this resource.",
                    {"Allow": allowed})


def invalid_name() -> OssError:
    return OssError(400, "InvalidObjectName", "The specified object name is not valid.")


def already_exists() -> OssError:
    message = "The object you specified already exists and can not be overwritten."
    return OssError(409, "FileAlreadyExists", message)


def too_late() -> OssError:
    message = ("The upload ended too late: a package must be created from it within an hour of "
               "GenerateOTAUploadURL. Generate a new upload URL and upload again.")
    return OssError(400, "RequestTimeout", message)


def swept_while_idle() -> OssError:
    message = "Your socket connection to the server was not read from or written to within the timeout period."
    return OssError(400, "RequestTimeout", message)


class PostObjectReceiver:
    """The POST endpoint at `{public_url}/oss/otaplane`, for a store that supplies:

    - `exists(key)`: whether the key holds an object (a form for it is refused early, 409);
    - `publish(upload)`: make the finished temp file the key's object, once (in a worker thread;
      raises OssError, e.g. already_exists(), or BlobStoreUnavailable);
    - `object_url(key)`: the object's URL (the 201 answer's Location).

    `cors_origins`: the browser origins allowed to post forms (blobs.cors); none: no CORS.
    """

    def __init__(self, secret: str, public_url: str, incoming: Path, exists: Callable[[str], bool],
                 publish: Callable[[Upload], None], object_url: Callable[[str], str],
                 cors_origins: tuple[str, ...] = ()):
        self._secret = secret
        self.public_url = public_url.rstrip("/")
        self.host = self.public_url + ROUTE_PREFIX
        self.host_id = urlsplit(self.public_url).netloc or BUCKET
        self.incoming = incoming
        self._exists = exists
        self._publish = publish
        self._object_url = object_url
        # Route middleware: the store's download routes take it too, so one rule covers the bucket.
        self.middleware = cors_middleware(cors_origins, self.error)

    def upload_form(self, key: str, max_bytes: int, expires_in_s: int, object_url: str) -> UploadForm:
        if not is_valid_key(key):
            raise ValueError(f"invalid blob key {key!r}")
        policy = build_policy(key, max_bytes, int((time.time() + expires_in_s) * 1000))
        signature = sign_policy(self._secret, policy)
        return UploadForm(
            key=key,
            host=self.host,
            policy=policy,
            access_key_id=ACCESS_KEY_ID,
            signature=signature,
            object_url=object_url,
            object_storage="OSS",
            fields={"key": key, "policy": policy, "OSSAccessKeyId": ACCESS_KEY_ID, "Signature": signature},
        )

    def routes(self) -> list[Route]:
        cors = self.middleware
        return [
            Route(ROUTE_PREFIX, self.post_object, methods=["POST"], middleware=cors),
            Route(ROUTE_PREFIX + "/", self.post_object, methods=["POST"], middleware=cors),
            # Any other method on the bucket (ListObjects, a CORS preflight without CORS): OSS's
            # XML 405, not Starlette's plain-text one. Routes are tried in order; with CORS, its
            # middleware answers preflights here.
            Route(ROUTE_PREFIX, self._not_allowed, methods=HTTP_METHODS, middleware=cors),
            Route(ROUTE_PREFIX + "/", self._not_allowed, methods=HTTP_METHODS, middleware=cors),
        ]

    def error(self, exc: OssError) -> Response:
        return oss_error_response(exc, self.host_id)

    async def _not_allowed(self, request: Request) -> Response:
        return self.error(not_allowed("POST"))

    async def post_object(self, request: Request) -> Response:
        upload: Upload | None = None
        try:
            upload = await self._receive(request)
            if time.time() > upload.deadline_s:
                raise too_late()
            if not upload.temp.exists():
                raise swept_while_idle()
            await anyio.to_thread.run_sync(self._publish, upload)
        except OssError as exc:
            return self.error(exc)
        except ClientDisconnect:
            return self.error(OssError(400, "IncompleteBody", "The client closed the connection."))
        except (BlobStoreUnavailable, OSError) as problem:  # OSError: our disk (full, failing, read-only...)
            log.error("upload of %s not stored: %s", upload.key if upload else "a form", problem)
            return self.error(OssError(503, "ServiceUnavailable", "The object store is unavailable; try again."))
        finally:
            if upload is not None:
                upload.discard()  # the temp file, whatever publish() made of it
        status = _SUCCESS_STATUSES.get(upload.fields.get("success_action_status", ""), 204)
        headers = {"x-oss-request-id": ids.oss_request_id()}
        if status != 201:
            return Response(status_code=status, headers=headers)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<PostResponse>'
            f"<Bucket>{BUCKET}</Bucket><Location>{escape(self._object_url(upload.key))}</Location>"
            f"<Key>{escape(upload.key)}</Key></PostResponse>\n"
        )
        return Response(body, 201, media_type="application/xml", headers=headers)

    async def _receive(self, request: Request) -> Upload:
        """Streams the form: fields first (checked before any file byte is written), then the file."""
        media_type, params = parse_options_header(request.headers.get("content-type", ""))
        if media_type != b"multipart/form-data" or not params.get(b"boundary"):
            raise _malformed()
        form = _FormReader()
        try:
            parser = MultipartParser(params[b"boundary"], form.callbacks())
        except (FormParserError, ValueError):
            raise _malformed() from None
        upload: Upload | None = None
        try:
            async for chunk in request.stream():
                _feed(parser.write, chunk)
                if form.file_started and upload is None:
                    sizes = await self._authorize(form.fields)
                    upload = await anyio.to_thread.run_sync(Upload.open, self.incoming, form.fields, sizes)
                    upload.deadline_s = policy_expiration(form.fields["policy"]) + UPLOAD_TIME_LIMIT_S
                if upload is not None and form.file_data:
                    await upload.write(form.take_file_data())
            _feed(parser.finalize)
            if upload is None:
                await self._authorize(form.fields)  # reports missing or bad fields first
                raise OssError(400, "InvalidArgument", "The form field file is missing.")
            if not form.file_done:
                raise _malformed()
            if upload.size < upload.sizes.min_bytes:
                raise OssError(400, "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size.")
            return upload
        except BaseException:
            # Synchronous on purpose: this must also run when the request is being cancelled.
            if upload is not None:
                upload.discard()
            raise

    async def _authorize(self, fields: dict[str, str]) -> SizeRange:
        """How big the file may be, or OssError: all before any file byte."""
        sizes = verify_post(self._secret, fields, time.time(), BUCKET, ACCESS_KEY_ID)
        if not is_valid_key(fields["key"]):
            raise invalid_name()
        # Refused before the file is sent; publish() checks again, at the end.
        if await anyio.to_thread.run_sync(self._exists, fields["key"]):
            raise already_exists()
        return sizes

    def sweep_incoming(self, idle_s: float = INCOMING_IDLE_S, unlocked_s: float = INCOMING_UNLOCKED_S) -> int:
        """Delete the upload temp files of processes that died mid-upload: at once (after
        `unlocked_s`) when no process holds the file's lock, which a live upload does and the
        system releases when its process dies, so a crash does not hold up to 1000 MB for a day;
        and any nobody has written for `idle_s` (a file system without locks, a client silent
        that long: a live upload writes as its bytes arrive). How many were deleted."""
        deleted = 0
        now = time.time()
        try:
            entries = list(os.scandir(self.incoming))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if not entry.name.endswith(".part"):
                    continue
                modified = entry.stat().st_mtime
                if modified < now - idle_s:
                    os.unlink(entry.path)
                    deleted += 1
                elif modified < now - unlocked_s and _unlink_if_unlocked(entry.path):
                    deleted += 1
            except FileNotFoundError:  # published or discarded meanwhile
                continue
        if deleted:
            log.info("deleted %d abandoned upload temp file(s) in %s", deleted, self.incoming)
        return deleted


def _unlink_if_unlocked(path: str) -> bool:
    """Whether the temp file's lock was free (the upload that held it is over): then it is
    deleted here, under the lock. False while an upload holds it, or if locks are not to be had."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (EWOULDBLOCK), or a file system without locks: the idle rule decides
        os.close(descriptor)
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    finally:
        os.close(descriptor)
    return True


class Upload:
    """A form's file in a temp file of the incoming folder, until the store publishes it. Its
    lock (an flock on a descriptor of its own, as `handle` is closed before publishing) is held
    until the temp file is gone, so sweep_incoming tells it from a dead process's file."""

    def __init__(self, handle: IO[bytes], temp: Path, fields: dict[str, str], sizes: SizeRange,
                 lock: int | None = None):
        self.handle, self.temp, self._lock = handle, temp, lock
        self.key, self.fields, self.sizes = fields["key"], fields, sizes
        self.size = 0
        self._md5 = hashlib.md5()
        self.stat: os.stat_result | None = None  # of the finished file (finish())
        self.deadline_s = math.inf  # when its post must have ended (UPLOAD_TIME_LIMIT_S)

    @classmethod
    def open(cls, incoming: Path, fields: dict[str, str], sizes: SizeRange) -> Upload:
        incoming.mkdir(parents=True, exist_ok=True)
        temp = incoming / f"{uuid.uuid4().hex}.part"
        handle = open(temp, "xb")
        lock: int | None = os.open(temp, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without locks: the sweep's idle rule covers this upload
            os.close(lock)
            lock = None
        return cls(handle, temp, fields, sizes, lock)

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.sizes.max_bytes:  # stop as soon as the limit is passed
            raise OssError(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size.")
        await anyio.to_thread.run_sync(self._hash_and_write, data)

    def _hash_and_write(self, data: bytes) -> None:
        # Hashed as the bytes pass by, in the write's thread hop (hashlib releases the GIL): the
        # local store keeps the MD5 as the object's ETag, as OSS does, without reading it again.
        self._md5.update(data)
        self.handle.write(data)

    @property
    def md5_hex(self) -> str:
        return self._md5.hexdigest()

    def finish(self) -> None:
        """Every byte on disk (publish() calls it first)."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.stat = os.fstat(self.handle.fileno())
        self.handle.close()

    def discard(self) -> None:
        try:
            self.handle.close()
        except OSError:  # flushing what a full disk refused: the file goes all the same
            pass
        self.temp.unlink(missing_ok=True)
        if self._lock is not None:  # released once the file is gone: never a live file unlocked
            os.close(self._lock)
            self._lock = None


def _malformed() -> OssError:
    message = "The body of your POST request is not well-formed multipart/form-data."
    return OssError(400, "MalformedPOSTRequest", message)


def _feed(call: Callable[..., object], *args: bytes) -> None:
    try:
        call(*args)
    except FormParserError:
        raise _malformed() from None


class _FormReader:
    """python-multipart callbacks: collects small fields, hands file bytes over to the caller.

    Field names are case-insensitive (stored lower-case); fields after `file` are ignored, as OSS does.
    """

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.file_started = False
        self.file_done = False
        self.file_data: list[bytes] = []
        self._held = 0  # bytes of field names, headers and values kept in memory
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._value = bytearray()
        self._in_file = False
        self._name = ""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_val,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def take_file_data(self) -> bytes:
        data = b"".join(self.file_data)
        self.file_data.clear()
        return data

    def _hold(self, size: int) -> None:
        self._held += size
        if self._held > FIELDS_CAP:
            message = "Your POST request fields preceding the upload file were too large."
            raise OssError(400, "MaxPOSTPreDataLengthExceeded", message)

    def _part_begin(self) -> None:
        self._disposition = b""
        self._value = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        if not self.file_started:
            self._hold(end - start)
            self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        if not self.file_started:
            self._hold(end - start)
            self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        if self.file_started:
            return
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise _malformed()
        self._name = name.decode("utf-8", "replace").lower()
        if self._name == "file":
            self.file_started = self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.file_data.append(data[start:end])
        elif not self.file_started:
            self._hold(end - start)
            self._value += data[start:end]

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            self.file_done = True
        elif not self.file_started:
            try:
                self.fields.setdefault(self._name, self._value.decode("utf-8"))
            except UnicodeDecodeError:
                raise _malformed() from None
