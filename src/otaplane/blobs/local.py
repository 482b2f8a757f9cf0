"""Local-folder blob store that otaplane serves itself, speaking OSS V1 on the wire.

Uploads arrive as OSS PostObject forms at `{public_url}/oss/otaplane`; downloads are OSS V1
presigned URLs under the same prefix. So SDKs, consoles and devices written for Aliyun OSS work
against it unchanged. Files live under `root/<key>`; uploads stream into `root/.incoming/` and are
linked into place, so a reader never sees half an object, and each key is written once (as with
OSS's `x-oss-forbid-overwrite`): a form posted again gets 409 FileAlreadyExists. An uploaded
object's ETag is its MD5, as on OSS, kept beside it under `root/.md5/` (`_keep_md5`) before the
object appears.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import IO
from urllib.parse import unquote

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable, Response
from starlette.routing import Route

from otaplane import ids
from otaplane.blobs.base import BlobDigest, UploadForm
from otaplane.blobs.oss_signing import OssError, presigned_url, quote_key, verify_presigned
from otaplane.blobs.post_object import (  # noqa: F401  (BUCKET, ACCESS_KEY_ID, is_valid_key: this store's names too)
    ACCESS_KEY_ID,
    BUCKET,
    HTTP_METHODS,
    INCOMING_IDLE_S,
    ROUTE_PREFIX,
    PostObjectReceiver,
    Upload,
    already_exists,
    invalid_name,
    is_valid_key,
    not_allowed,
    oss_error_response,
    swept_while_idle,
)

log = logging.getLogger("otaplane.blobs")

INCOMING_DIR = ".incoming"  # segments starting with "." are never valid keys, so never served
MD5_DIR = ".md5"  # root/.md5/<key>: an uploaded object's MD5 (see _keep_md5)
LOCK_FILE = ".lock"  # root/.lock: held while an object and its MD5 appear or go (_key_lock)
CHUNK = 1024 * 1024
DOWNLOAD_CHUNK = 1024 * 1024  # per read of a GET (see _ObjectResponse)


class LocalBlobStore:
    def __init__(self, root: Path | str, public_url: str, secret: str, cors_origins: tuple[str, ...] = ()):
        self.root = Path(root).resolve()
        self._folders_inside: dict[Path, bool] = {}  # key folder -> resolves inside root
        self._md5_etags: dict[str, tuple[int, int, str]] = {}  # key -> size, mtime_ns and its MD5 ETag
        self._secret = secret
        self._uploads = PostObjectReceiver(secret, public_url, self.root / INCOMING_DIR, exists=self._exists,
                                           publish=self._publish, object_url=self.object_url,
                                           cors_origins=cors_origins)
        self.public_url = self._uploads.public_url
        self.host = self._uploads.host
        self._host_id = self._uploads.host_id

    # --- BlobStore ---------------------------------------------------------------------------

    def upload_form(self, key: str, max_bytes: int, expires_in_s: int) -> UploadForm:
        return self._uploads.upload_form(key, max_bytes, expires_in_s, self.object_url(key))

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
            # The object first: a crash in between leaves a sidecar without object (harmless),
            # and a form posted again meanwhile keeps the MD5 it writes (_publish).
            with self._key_lock():
                path.unlink(missing_ok=True)
                self._md5_path(key).unlink(missing_ok=True)
            self._md5_etags.pop(key, None)

    def routes(self) -> list[Route]:
        cors = self._uploads.middleware  # the bucket's CORS rule, if any (blobs.cors)
        return [
            *self._uploads.routes(),
            Route(ROUTE_PREFIX + "/{key:path}", self._get_object, methods=["GET", "HEAD"], middleware=cors),
            # PutObject, DeleteObject, a CORS preflight without CORS...: OSS's XML 405 (routes are
            # tried in order).
            Route(ROUTE_PREFIX + "/{key:path}", self._not_allowed, methods=HTTP_METHODS, middleware=cors),
        ]

    def sweep_incoming(self, idle_s: float = INCOMING_IDLE_S) -> int:
        return self._uploads.sweep_incoming(idle_s)

    async def _not_allowed(self, request: Request) -> Response:
        return self._error(not_allowed("GET, HEAD"))

    # --- uploads: PostObjectReceiver's store side ----------------------------------------------

    def _exists(self, key: str) -> bool:
        path = self._path(key)
        return path is not None and path.exists()

    def _publish(self, upload: Upload) -> None:
        target = self._path(upload.key)
        if target is None:
            raise invalid_name()
        upload.finish()
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._key_lock():
            # Checked again under the lock: the MD5 of an upload that loses the key must not
            # replace the winner's.
            if os.path.lexists(target):
                raise already_exists()
            self._keep_md5(upload)
            _publish_once(upload.temp, target)
            _fsync_dir(target.parent)

    @contextlib.contextmanager
    def _key_lock(self):
        """Held, by every thread and process on this folder (replicas), from an upload's MD5
        sidecar to its object, and around a delete: so two forms for one key never write each
        other's sidecar, and a delete never takes the sidecar of an object published meanwhile."""
        self.root.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            except OSError as problem:  # a network file system without locks: unlocked, as before
                log.warning("%s not locked: %s", self.root / LOCK_FILE, problem)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    # Why a sidecar file (root/.md5/<key>) and not an extended attribute: not every file system
    # keeps user xattrs (tmpfs before Linux 6.6, NFS, FAT; some copy and backup tools drop them),
    # and a sidecar works the same everywhere. It is written, durably, before the object appears
    # (under _key_lock, by the upload that finds the key free), so a crash at any point leaves
    # either the object with its MD5 or a sidecar without object: harmless (the next upload of
    # the key replaces it, the collector of abandoned uploads deletes it through delete()). It
    # names the size and mtime of the file it describes (a link keeps both): an object changed
    # behind our back falls back to the size-and-mtime ETag (as objects stored before MD5 ETags
    # do), never to a wrong MD5.
    def _keep_md5(self, upload: Upload) -> None:
        sidecar = self._md5_path(upload.key)
        temp = upload.temp.with_name(upload.temp.stem + ".md5.part")  # in .incoming: swept if we die here
        line = f"{upload.md5_hex.upper()} {upload.stat.st_size} {upload.stat.st_mtime_ns}\n"
        try:
            sidecar.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "x") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, sidecar)
            _fsync_dir(sidecar.parent)
        except OSError as problem:  # store the object all the same, with the older ETag
            log.warning("MD5 of %s not kept, its ETag derives from size and time: %s", upload.key, problem)
        finally:
            temp.unlink(missing_ok=True)

    def _md5_etag(self, key: str, st: os.stat_result) -> str | None:
        """The ETag OSS gives an uploaded object, `"<MD5 in uppercase hex>"`, from its sidecar;
        None when there is none, or it describes another file (other size or mtime). Remembered
        per key: reading the sidecar cost as much as opening and stat-ing the object."""
        known = self._md5_etags.get(key)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        etag = self._read_md5_etag(key, st)
        if etag is not None:  # not remembered when absent: only objects stored before MD5 ETags
            if len(self._md5_etags) >= 10_000:
                self._md5_etags.clear()
            self._md5_etags[key] = (st.st_size, st.st_mtime_ns, etag)
        return etag

    def _read_md5_etag(self, key: str, st: os.stat_result) -> str | None:
        try:
            with open(self._md5_path(key), "rb") as handle:
                fields = handle.read(_MD5_LINE_MAX).split()
        except OSError:
            return None
        if len(fields) != 3 or not _MD5_HEX.fullmatch(fields[0]):
            return None
        if fields[1:] != [b"%d" % st.st_size, b"%d" % st.st_mtime_ns]:
            return None
        return f'"{fields[0].decode()}"'

    # --- helpers -----------------------------------------------------------------------------

    def _md5_path(self, key: str) -> Path:
        return self.root / MD5_DIR / key

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

    def _open_object(self, key: str, whole: bool) -> tuple[Path, os.stat_result, bytes | None, str | None,
                                                         IO[bytes] | None]:
        """In a worker thread: the key's file, its stat, the content of a small file when `whole`,
        its stored MD5 ETag if any (one thread hop per GET), and the file still open to stream
        from when it is one and was not read whole (the caller closes it)."""
        path = self._path(key)
        if path is None:
            raise invalid_name()
        descriptor = self._open_descriptor(path)
        if descriptor is None:  # the file is a symlink
            raise invalid_name()
        handle = os.fdopen(descriptor, "rb")
        try:
            st, content = _stat_and_small_read(descriptor, whole)
            if not stat.S_ISREG(st.st_mode):
                handle.close()
                return path, st, content, None, None
            etag = self._md5_etag(key, st)
        except BaseException:
            handle.close()
            raise
        if content is not None and len(content) == st.st_size:
            handle.close()
            handle = None
        return path, st, content, etag, handle

    def _error(self, exc: OssError) -> Response:
        return oss_error_response(exc, self._host_id)

    # --- GET / HEAD --------------------------------------------------------------------------

    async def _get_object(self, request: Request) -> Response:
        key = request.path_params["key"]
        # HEAD may come with a URL presigned for GET (that is all a device ever gets).
        methods = ("HEAD", "GET") if request.method == "HEAD" else ("GET",)
        handle = None  # the object's open file, closed here unless a streaming response takes it
        try:
            verify_presigned(request.query_params, BUCKET, key, ACCESS_KEY_ID, self._secret, time.time(), methods)
            whole = request.method == "GET" and not any(h in request.headers for h in _CONDITIONAL_HEADERS)
            try:
                path, st, content, etag, handle = await anyio.to_thread.run_sync(self._open_object, key, whole)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                path, st, content, etag = None, None, None, None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise OssError(404, "NoSuchKey", "The specified key does not exist.")
            headers = {"x-oss-request-id": ids.oss_request_id()}
            if etag is not None:  # else FileResponse's own, from size and mtime
                headers["etag"] = etag
            # FileResponse streams from disk and answers Range (206, multipart/byteranges) itself,
            # weighing If-Range against the ETag given here.
            response = _ObjectResponse(path, handle, stat_result=st, headers=headers)
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
            if handle is None:
                # A small package, read in the same worker-thread hop as the stat: the same headers,
                # without FileResponse's further hops (read, close) per download.
                return Response(content, headers=dict(response.headers))
            handle = None  # the response's now: it closes it once sent
            return response
        except OssError as exc:
            return self._error(exc)
        finally:
            if handle is not None:
                handle.close()

# Requests with conditions (precondition_status) or ranges (FileResponse): never the small-file path.
_CONDITIONAL_HEADERS = ("range", "if-range", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since")
SMALL_OBJECT_BYTES = 256 * 1024
_MD5_HEX = re.compile(rb"[0-9A-F]{32}")
_MD5_LINE_MAX = 128  # "<32 hex> <size> <mtime_ns>\n" is under 80 bytes


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

    def __init__(self, path: Path, handle: IO[bytes] | None, **kwargs):
        super().__init__(path, **kwargs)
        self._handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._handle.close()

    @contextlib.asynccontextmanager
    async def _open_file(self):
        """The file that was stat-ed for the headers, not its path opened again: an object
        deleted in between (and its key's form posted again) was sent as none of its bytes, or
        as the new file's, under the old one's length and ETag. Once open, a deleted file
        still reads whole."""
        self._handle.seek(0)
        yield anyio.wrap_file(self._handle)

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


def _publish_once(temp: Path, target: Path) -> None:
    """Make the temp file the object, whole and at once, unless the key already holds one.

    Objects are written once: CreateOTAFirmware checks an object's size and digest once and
    downloads, the chunk cache and devices rely on them after that, so an upload form posted
    again (it stays valid for its whole policy lifetime) must not replace what a package
    adopted. A hard link appears atomically and fails when the name is taken."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise already_exists() from None
    except FileNotFoundError:  # idle for a day mid-upload: sweep_incoming took the temp file
        raise swept_while_idle() from None
    except OSError as exc:  # a file system without hard links (FAT, some network shares)
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        if target.exists():
            raise already_exists() from None
        os.replace(temp, target)  # atomic; racing uploads are kept apart by _key_lock
        return
    temp.unlink()


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
