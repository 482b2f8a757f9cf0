"""Local-folder blob store that otaplane serves itself, speaking OSS V1 on the wire.

Uploads arrive as OSS PostObject forms at `{public_url}/oss/otaplane`; downloads are OSS V1
presigned URLs under the same prefix. So SDKs, consoles and devices written for Aliyun OSS work
against it unchanged. Files live under `root/<key>`; uploads stream into `root/.incoming/` and are
linked into place, so a reader never sees half an object, and each key is written once (as with
OSS's `x-oss-forbid-overwrite`): a form posted again gets 409 FileAlreadyExists.
"""

from __future__ import annotations

import datetime
import email.utils
import errno
import functools
import hashlib
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable, Response
from starlette.routing import Route

from otaplane import ids
from otaplane.blobs.base import BlobDigest, UploadForm
from otaplane.blobs.oss_signing import (
    OssError,
    SizeRange,
    build_policy,
    presigned_url,
    quote_key,
    sign_policy,
    verify_post,
    verify_presigned,
)

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
_HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
INCOMING_DIR = ".incoming"  # segments starting with "." are never valid keys, so never served
# An upload temp file unwritten for this long belongs to a process that died (sweep_incoming).
INCOMING_IDLE_S = 24 * 3600
FIELDS_CAP = 64 * 1024  # form fields before `file` are held in memory: keep them small
CHUNK = 1024 * 1024
DOWNLOAD_CHUNK = 1024 * 1024  # per read of a GET (see _ObjectResponse)
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

    That excludes `..`, absolute paths, backslashes, NUL and our own `.incoming` folder.
    """
    return 0 < len(key) <= MAX_KEY_LENGTH and _KEY.fullmatch(key) is not None


class LocalBlobStore:
    def __init__(self, root: Path | str, public_url: str, secret: str):
        self.root = Path(root).resolve()
        self._folders_inside: dict[Path, bool] = {}  # key folder -> resolves inside root
        self.public_url = public_url.rstrip("/")
        self.host = self.public_url + ROUTE_PREFIX
        self._secret = secret
        self._host_id = urlsplit(self.public_url).netloc or BUCKET

    # --- BlobStore ---------------------------------------------------------------------------

    def upload_form(self, key: str, max_bytes: int, expires_in_s: int) -> UploadForm:
        self._check_key(key)
        policy = build_policy(key, max_bytes, int((time.time() + expires_in_s) * 1000))
        signature = sign_policy(self._secret, policy)
        return UploadForm(
            key=key,
            host=self.host,
            policy=policy,
            access_key_id=ACCESS_KEY_ID,
            signature=signature,
            object_url=self.object_url(key),
            object_storage="OSS",
            fields={"key": key, "policy": policy, "OSSAccessKeyId": ACCESS_KEY_ID, "Signature": signature},
        )

    def object_url(self, key: str) -> str:
        self._check_key(key)
        return f"{self.host}/{quote_key(key)}"

    def key_from_url(self, url: str) -> str | None:
        base = url.split("#", 1)[0].split("?", 1)[0]
        if not base.startswith(self.host + "/"):
            return None
        key = unquote(base[len(self.host) + 1 :])
        return key if is_valid_key(key) else None

    def digest(self, key: str) -> BlobDigest | None:
        handle = self._open(key)
        if handle is None:
            return None
        md5, sha256, size = hashlib.md5(), hashlib.sha256(), 0
        with handle:
            while chunk := handle.read(CHUNK):
                md5.update(chunk)
                sha256.update(chunk)
                size += len(chunk)
        return BlobDigest(size=size, md5=md5.hexdigest(), sha256=sha256.hexdigest())

    def read_range(self, key: str, offset: int, length: int) -> bytes | None:
        handle = self._open(key)
        if handle is None:
            return None
        with handle:
            handle.seek(offset)
            return handle.read(length)

    def read(self, key: str, max_bytes: int) -> bytes | None:
        handle = self._open(key)
        if handle is None:
            return None
        with handle:
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"object is larger than {max_bytes} bytes")
        return data

    def presigned_get(self, key: str, expires_in_s: int) -> str:
        self._check_key(key)
        expires = int(time.time()) + expires_in_s
        return presigned_url(self.host, BUCKET, key, ACCESS_KEY_ID, self._secret, expires)

    def delete(self, key: str) -> None:
        if path := self._path(key):
            path.unlink(missing_ok=True)

    def routes(self) -> list[Route]:
        return [
            Route(ROUTE_PREFIX, self._post_object, methods=["POST"]),
            Route(ROUTE_PREFIX + "/", self._post_object, methods=["POST"]),
            Route(ROUTE_PREFIX + "/{key:path}", self._get_object, methods=["GET", "HEAD"]),
            # Any other method on these paths (PutObject, DeleteObject, ListObjects, a CORS
            # preflight): OSS's XML 405, not Starlette's plain-text one. Routes are tried in order.
            Route(ROUTE_PREFIX, self._not_allowed, methods=_HTTP_METHODS),
            Route(ROUTE_PREFIX + "/{key:path}", self._not_allowed, methods=_HTTP_METHODS),
        ]

    def sweep_incoming(self, idle_s: float = INCOMING_IDLE_S) -> int:
        """Delete upload temp files nobody has written for `idle_s`: those of a process that
        died mid-upload (a live upload writes as its bytes arrive). How many were deleted."""
        deleted = 0
        cutoff = time.time() - idle_s
        try:
            entries = list(os.scandir(self.root / INCOMING_DIR))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.name.endswith(".part") and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    deleted += 1
            except FileNotFoundError:  # committed or discarded meanwhile
                continue
        if deleted:
            log.info("deleted %d abandoned upload temp file(s) in %s", deleted, self.root / INCOMING_DIR)
        return deleted

    async def _not_allowed(self, request: Request) -> Response:
        allowed = "POST" if request.url.path.rstrip("/") == ROUTE_PREFIX else "GET, HEAD"
        error = OssError(405, "MethodNotAllowed", "The specified method is not allowed against this resource.",
                         {"Allow": allowed})
        return self._error(error)

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _check_key(key: str) -> None:
        if not is_valid_key(key):
            raise ValueError(f"invalid blob key {key!r}")

    def _path(self, key: str) -> Path | None:
        """The file of a key; None for an invalid key or one whose folder leads outside root
        (a symlinked folder). The folder is resolved once and remembered: resolving every path
        component per request was a tenth of a busy server's CPU. The file itself may still be a
        symlink: reads open it with O_NOFOLLOW (`_open`), and unlink and rename never follow one."""
        if not is_valid_key(key):
            return None
        path = self.root / key
        folder = path.parent
        inside = self._folders_inside.get(folder)
        if inside is None:
            inside = folder.resolve().is_relative_to(self.root)
            if len(self._folders_inside) >= 10_000:
                self._folders_inside.clear()
            self._folders_inside[folder] = inside
        return path if inside else None

    def _open_descriptor(self, path: Path) -> int | None:
        """The file opened for reading, never through a symlink (a blob never is one): None when
        it is a symlink; FileNotFoundError and the like when it is missing or not a file."""
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as problem:
            if problem.errno == errno.ELOOP:
                return None
            raise

    def _open(self, key: str) -> IO[bytes] | None:
        """The object's file for reading; None when there is none to read."""
        path = self._path(key)
        if path is None:
            return None
        try:
            descriptor = self._open_descriptor(path)
            if descriptor is None:
                return None
            handle = os.fdopen(descriptor, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            handle.close()
            return None
        return handle

    def _open_object(self, key: str, whole: bool) -> tuple[Path, os.stat_result, bytes | None]:
        """In a worker thread: the key's file, its stat, and the content of a small file when
        `whole` (one thread hop per GET)."""
        path = self._path(key)
        if path is None:
            raise _invalid_name()
        descriptor = self._open_descriptor(path)
        if descriptor is None:  # the file is a symlink
            raise _invalid_name()
        try:
            return (path, *_stat_and_small_read(descriptor, whole))
        finally:
            os.close(descriptor)

    def _error(self, exc: OssError) -> Response:
        request_id = ids.oss_request_id()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n'
            f"  <Code>{escape(exc.code)}</Code>\n  <Message>{escape(exc.message)}</Message>\n"
            f"  <RequestId>{request_id}</RequestId>\n  <HostId>{escape(self._host_id)}</HostId>\n</Error>\n"
        )
        headers = {**exc.headers, "x-oss-request-id": request_id}
        return Response(body, exc.status, media_type="application/xml", headers=headers)

    # --- GET / HEAD --------------------------------------------------------------------------

    async def _get_object(self, request: Request) -> Response:
        key = request.path_params["key"]
        # HEAD may come with a URL presigned for GET (that is all a device ever gets).
        methods = ("HEAD", "GET") if request.method == "HEAD" else ("GET",)
        try:
            verify_presigned(request.query_params, BUCKET, key, ACCESS_KEY_ID, self._secret, time.time(), methods)
            whole = request.method == "GET" and not any(h in request.headers for h in _CONDITIONAL_HEADERS)
            try:
                path, st, content = await anyio.to_thread.run_sync(self._open_object, key, whole)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                path, st, content = None, None, None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise OssError(404, "NoSuchKey", "The specified key does not exist.")
            # FileResponse streams from disk and answers Range (206, multipart/byteranges) itself.
            response = _ObjectResponse(path, stat_result=st, headers={"x-oss-request-id": ids.oss_request_id()})
            precondition = precondition_status(request.headers, response.headers["etag"], int(st.st_mtime))
            if precondition == 412:
                raise OssError(412, "PreconditionFailed",
                               "At least one of the pre-conditions you specified did not hold.")
            if precondition == 304:
                kept = ("etag", "last-modified", "x-oss-request-id")
                return Response(status_code=304, headers={name: response.headers[name] for name in kept})
            if response.range_not_satisfiable(request.headers):
                raise OssError(416, "InvalidRange", "The requested range cannot be satisfied.",
                               {"Content-Range": f"bytes */{st.st_size}"})
        except OssError as exc:
            return self._error(exc)
        if content is not None and len(content) == st.st_size:
            # A small package, read in the same worker-thread hop as the stat: the same headers,
            # without FileResponse's three more hops (open, read, close) per download.
            return Response(content, headers=dict(response.headers))
        return response

    # --- POST (PostObject) -------------------------------------------------------------------

    async def _post_object(self, request: Request) -> Response:
        upload: _Upload | None = None
        try:
            upload = await self._receive(request)
            await anyio.to_thread.run_sync(upload.commit)
        except OssError as exc:
            return self._error(exc)
        except ClientDisconnect:
            return self._error(OssError(400, "IncompleteBody", "The client closed the connection."))
        finally:
            if upload is not None:
                upload.discard()  # a no-op once committed
        status = _SUCCESS_STATUSES.get(upload.fields.get("success_action_status", ""), 204)
        headers = {"x-oss-request-id": ids.oss_request_id()}
        if status != 201:
            return Response(status_code=status, headers=headers)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<PostResponse>'
            f"<Bucket>{BUCKET}</Bucket><Location>{escape(self.object_url(upload.key))}</Location>"
            f"<Key>{escape(upload.key)}</Key></PostResponse>\n"
        )
        return Response(body, 201, media_type="application/xml", headers=headers)

    async def _receive(self, request: Request) -> _Upload:
        """Streams the form: fields first (checked before any file byte is written), then the file."""
        media_type, params = parse_options_header(request.headers.get("content-type", ""))
        if media_type != b"multipart/form-data" or not params.get(b"boundary"):
            raise _malformed()
        form = _FormReader()
        try:
            parser = MultipartParser(params[b"boundary"], form.callbacks())
        except (FormParserError, ValueError):
            raise _malformed() from None
        upload: _Upload | None = None
        try:
            async for chunk in request.stream():
                _feed(parser.write, chunk)
                if form.file_started and upload is None:
                    target, sizes = self._authorize(form.fields)
                    upload = await anyio.to_thread.run_sync(
                        _Upload.open, self.root / INCOMING_DIR, target, form.fields, sizes
                    )
                if upload is not None and form.file_data:
                    await upload.write(form.take_file_data())
            _feed(parser.finalize)
            if upload is None:
                self._authorize(form.fields)  # reports missing or bad fields first
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

    def _authorize(self, fields: dict[str, str]) -> tuple[Path, SizeRange]:
        """Where the file may go and how big it may be, or OssError: all before any file byte."""
        sizes = verify_post(self._secret, fields, time.time(), BUCKET, ACCESS_KEY_ID)
        target = self._path(fields["key"])
        if target is None:
            raise _invalid_name()
        if target.exists():  # refused before the file is sent; commit checks again, atomically
            raise _already_exists()
        return target, sizes


# Requests with conditions (precondition_status) or ranges (FileResponse): never the small-file path.
_CONDITIONAL_HEADERS = ("range", "if-range", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since")
SMALL_OBJECT_BYTES = 256 * 1024


def _stat_and_small_read(descriptor: int, whole: bool) -> tuple[os.stat_result, bytes | None]:
    """stat, and the whole content when `whole` and the file is small (one thread hop for both)."""
    st = os.fstat(descriptor)
    if not (whole and stat.S_ISREG(st.st_mode) and st.st_size <= SMALL_OBJECT_BYTES):
        return st, None
    parts = []
    while chunk := os.read(descriptor, SMALL_OBJECT_BYTES + 1):
        parts.append(chunk)
    return st, b"".join(parts)


class _ObjectResponse(FileResponse):
    """Starlette's FileResponse with bigger reads. It reads each chunk in a worker thread and
    writes it to the socket: at its 64 KiB those two per chunk were most of a download's time
    (200 MB package: about 35-40% of nginx's MB/s; 1 MiB: 75-130%, see bench/firmware.py).
    The price: a download holds up to one chunk in memory beyond the kernel's socket buffer."""

    chunk_size = DOWNLOAD_CHUNK

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        """A Range that cannot be parsed is ignored: the whole object, 200, as OSS and S3 answer
        (RFC 9110 14.2 lets a server ignore it; Starlette would answer a plain-text 400)."""
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []

    def range_not_satisfiable(self, headers) -> bool:
        """A Range that FileResponse would use and that starts past the end (`bytes=<size>-`: a
        finished download resumed): 416, answered with OSS's XML InvalidRange instead of the
        plain one FileResponse builds. If-Range is weighed as FileResponse weighs it: a Range it
        turns off gets the whole object."""
        http_range = headers.get("range")
        if http_range is None:
            return False
        if_range = headers.get("if-range")
        if if_range is not None and not self._should_use_range(if_range):
            return False
        try:
            self._parse_range_header(http_range, self.stat_result.st_size)
        except RangeNotSatisfiable:
            return True
        return False


def precondition_status(headers, etag: str, mtime_s: int) -> int | None:
    """412 or 304 when a GET/HEAD's conditions say so (OSS GetObject: If-Match, If-None-Match,
    If-Modified-Since, If-Unmodified-Since), None to answer normally. Weighed in RFC 9110
    13.2.2's order: a date condition counts only without its ETag counterpart, and a date that
    cannot be parsed is ignored. FileResponse weighs only Range and If-Range."""
    if_match = headers.get("if-match")
    if if_match is not None:
        if not _etag_listed(if_match, etag, weak=False):
            return 412
    elif (since := _http_date(headers.get("if-unmodified-since"))) is not None and mtime_s > since:
        return 412
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if _etag_listed(if_none_match, etag, weak=True):
            return 304
    elif (since := _http_date(headers.get("if-modified-since"))) is not None and mtime_s <= since:
        return 304
    return None


def _etag_listed(header: str, etag: str, weak: bool) -> bool:
    """Whether an If-Match / If-None-Match list names the ETag (`*` names any). If-Match compares
    strongly (a W/ tag never matches), If-None-Match weakly (W/ ignored)."""
    for candidate in (item.strip() for item in header.split(",")):
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            if not weak:
                continue
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def _http_date(value: str | None) -> int | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:  # HTTP dates are GMT, whether or not they say so
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return int(parsed.timestamp())


def _invalid_name() -> OssError:
    return OssError(400, "InvalidObjectName", "The specified object name is not valid.")


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


class _Upload:
    """A temp file in root/.incoming that becomes the object only on commit (fsync + link)."""

    def __init__(self, handle: IO[bytes], temp: Path, target: Path, fields: dict[str, str], sizes: SizeRange):
        self.handle, self.temp, self.target = handle, temp, target
        self.key, self.fields, self.sizes = fields["key"], fields, sizes
        self.size = 0
        self.committed = False

    @classmethod
    def open(cls, incoming: Path, target: Path, fields: dict[str, str], sizes: SizeRange) -> "_Upload":
        incoming.mkdir(parents=True, exist_ok=True)
        temp = incoming / f"{uuid.uuid4().hex}.part"
        return cls(open(temp, "xb"), temp, target, fields, sizes)

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.sizes.max_bytes:  # stop as soon as the limit is passed
            raise OssError(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size.")
        await anyio.to_thread.run_sync(self.handle.write, data)

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        _publish_once(self.temp, self.target)
        self.committed = True
        _fsync_dir(self.target.parent)

    def discard(self) -> None:
        self.handle.close()
        if not self.committed:
            self.temp.unlink(missing_ok=True)


def _publish_once(temp: Path, target: Path) -> None:
    """Make the temp file the object, whole and at once, unless the key already holds one.

    Objects are written once: CreateOTAFirmware checks an object's size and digest once and
    downloads, the chunk cache and devices rely on them after that, so an upload form posted
    again (it stays valid for its whole policy lifetime) must not replace what a package
    adopted. A hard link appears atomically and fails when the name is taken."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise _already_exists() from None
    except FileNotFoundError:  # idle for a day mid-upload: sweep_incoming took the temp file
        message = "Your socket connection to the server was not read from or written to within the timeout period."
        raise OssError(400, "RequestTimeout", message) from None
    except OSError as exc:  # a file system without hard links (FAT, some network shares)
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        if target.exists():
            raise _already_exists() from None
        os.replace(temp, target)  # atomic, but two racing uploads may both get here
        return
    temp.unlink()


def _already_exists() -> OssError:
    message = "The object you specified already exists and can not be overwritten."
    return OssError(409, "FileAlreadyExists", message)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
