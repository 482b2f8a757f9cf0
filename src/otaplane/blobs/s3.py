"""Any S3-compatible object store through boto3: uploads in, presigned GET out.

OTAPLANE_BLOB_URL=s3://BUCKET[/PREFIX/]?endpoint_url=URL&region=REGION&addressing_style=path|virtual
&uploads=otaplane|direct. Credentials come only from the standard AWS chain (env, shared config,
instance role): secrets never belong in a URL that ends up in logs and process listings.

Uploads: by default (`uploads=otaplane`) GenerateOTAUploadURL hands out an OSS PostObject form
that otaplane receives itself (blobs.post_object) and puts into the bucket: the official SDKs'
answer carries only the OSS form fields, which an S3 POST cannot use, and no form can replace an
object after CreateOTAFirmware measured it. `uploads=direct` hands out S3's presigned POST
instead (its fields in the answer's FormFields, which otaplane's CLI uses): the bytes go
straight to the bucket, but a form may overwrite its object until it expires.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from otaplane.blobs.base import BlobDigest, BlobStoreUnavailable, UploadForm
from otaplane.blobs.post_object import PostObjectReceiver, Upload, already_exists

CHUNK = 1024 * 1024
# SigV4 presigned URLs cannot live longer than 7 days; S3 rejects them outright beyond that.
MAX_PRESIGN_S = 7 * 24 * 3600
_DEFAULT_PORTS = {"http": 80, "https": 443}
# PutObject with If-None-Match: * on a key that holds an object (409: another write in flight).
_WRITTEN_MEANWHILE = ("PreconditionFailed", "ConditionalRequestConflict")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


class S3BlobStore:
    def __init__(self, client: BaseClient, bucket: str, prefix: str = "", direct_uploads: bool = False):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = client.meta.endpoint_url.rstrip("/")
        self.direct_uploads = direct_uploads  # the URL's uploads=direct: S3 presigned POST forms
        self._uploads: PostObjectReceiver | None = None

    def receive_uploads(self, secret: str, public_url: str, incoming: Path, cors_origins: tuple[str, ...] = ()) -> None:
        """Hand out OSS PostObject forms that otaplane receives at `public_url` (signed with
        `secret`, staged in `incoming`; from browsers of `cors_origins`) and puts into the
        bucket, instead of S3 presigned POSTs."""
        self._uploads = PostObjectReceiver(secret, public_url, incoming, exists=self.exists,
                                           publish=self._publish, object_url=self.object_url,
                                           cors_origins=cors_origins)

    def routes(self) -> list:
        return self._uploads.routes() if self._uploads else []

    def sweep_incoming(self) -> int:
        return self._uploads.sweep_incoming() if self._uploads else 0

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("HeadObject", exc) from exc
        except BotoCoreError as exc:
            raise self._fail("HeadObject", exc) from exc
        return True

    def _publish(self, upload: Upload) -> None:
        """Put a received upload into the bucket, unless the key holds an object (write once).

        One PutObject (S3 takes up to 5 GB in one; uploads stop at 1000 MiB), not boto3's
        multipart upload_file: its `If-None-Match: *` makes the store itself refuse a second
        write of the key (two replicas receiving one form at the same instant), and the object's
        ETag is its MD5, as on OSS, where a multipart upload's is not. A store that ignores the
        condition still has the HEAD check before it."""
        upload.finish()
        if self.exists(upload.key):
            raise already_exists()
        try:
            with open(upload.temp, "rb") as body:
                self.client.put_object(Bucket=self.bucket, Key=self._full(upload.key), Body=body, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _WRITTEN_MEANWHILE:
                raise already_exists() from None
            raise self._fail("PutObject", exc) from exc
        except BotoCoreError as exc:
            raise self._fail("PutObject", exc) from exc

    @classmethod
    def from_url(
        cls, url: str, *, connect_timeout_s: float = 5, read_timeout_s: float = 15, max_attempts: int = 2
    ) -> "S3BlobStore":
        parts = urlsplit(url)
        if "@" in parts.netloc:  # said without the URL: it would print the secret
            raise ValueError("the s3 blob URL must not carry credentials: the AWS environment or config provides them")
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"expected s3://BUCKET[/PREFIX/]?endpoint_url=...&region=..., got {url!r}")
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint_url", "region", "prefix", "addressing_style", "uploads"}
        if unknown:
            # Catch typos and refuse credentials smuggled into the URL alike.
            raise ValueError(f"unsupported s3 blob URL parameter(s): {', '.join(sorted(unknown))}")
        if query.get("uploads", "otaplane") not in ("otaplane", "direct"):
            raise ValueError("uploads= is otaplane (forms received by otaplane, the default) or direct")
        if parts.path.strip("/") and "prefix" in query:
            raise ValueError("give the s3 key prefix once: as the URL's path or as prefix=, not both")
        prefix = parts.path.strip("/") or query.get("prefix", "").strip("/")
        endpoint_url = query.get("endpoint_url") or None
        # Self-hosted stores (MinIO, Ceph, moto) rarely have wildcard DNS, so default to path-style there.
        style = query.get("addressing_style") or ("path" if endpoint_url else "auto")
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": style},
            # Small timeouts and retries: a dead store must fail a request quickly, not hang it (a
            # socket read waits at most read_timeout; a hung endpoint fails a request in ~30 s).
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
        )
        session = boto3.session.Session(region_name=query.get("region") or None)
        client = session.client("s3", endpoint_url=endpoint_url, config=config)
        return cls(client, parts.netloc, prefix + "/" if prefix else "",  # a folder: "fw" means "fw/..."
                   direct_uploads=query.get("uploads") == "direct")

    def _full(self, key: str) -> str:
        return self.prefix + key

    def _fail(self, action: str, exc: Exception) -> BlobStoreUnavailable:
        return BlobStoreUnavailable(f"S3 {action} on bucket {self.bucket!r} at {self.endpoint} failed: {exc}")

    def upload_form(self, key: str, max_bytes: int, expires_in_s: int) -> UploadForm:
        if self._uploads is not None:
            return self._uploads.upload_form(key, max_bytes, expires_in_s, self.object_url(key))
        full = self._full(key)
        post = self.client.generate_presigned_post(
            Bucket=self.bucket,
            Key=full,
            Conditions=[["content-length-range", 0, max_bytes], ["eq", "$key", full]],
            ExpiresIn=expires_in_s,
        )
        fields: dict[str, str] = dict(post["fields"])
        # x-amz-credential is "AKID/date/region/s3/aws4_request"; SigV2 stores name it AWSAccessKeyId.
        credential = fields.get("x-amz-credential", "").split("/")[0] or fields.get("AWSAccessKeyId", "")
        return UploadForm(
            key=key,  # the caller's key: key_from_url(object_url) gives it back, prefix or not
            host=post["url"],
            policy=fields["policy"],
            access_key_id=credential,
            signature=fields.get("x-amz-signature") or fields.get("signature", ""),
            object_url=self.object_url(key),
            object_storage="S3",
            fields=fields,
        )

    def object_url(self, key: str) -> str:
        # Path-style on purpose: one stable spelling whatever the addressing style in use.
        return f"{self.endpoint}/{quote(self.bucket)}/{quote(self._full(key), safe='/~')}"

    def key_from_url(self, url: str) -> str | None:
        try:
            parts = urlsplit(url)
            origin = _origin(url)
        except ValueError:  # e.g. a non-numeric port
            return None
        scheme, host, port = _origin(self.endpoint)
        base_path = urlsplit(self.endpoint).path.rstrip("/")
        if origin == (scheme, host, port):
            # Path-style: ENDPOINT/bucket/key (query string, if any, is a presigned signature).
            head = f"{base_path}/{quote(self.bucket)}/"
        elif origin == (scheme, f"{self.bucket}.{host}".lower(), port):
            head = f"{base_path}/"  # virtual-host style: bucket.ENDPOINT/key
        else:
            return None
        if not parts.path.startswith(head):
            return None
        full = unquote(parts.path[len(head):])
        if not full or not full.startswith(self.prefix) or full == self.prefix:
            return None
        return full[len(self.prefix):]

    def digest(self, key: str) -> BlobDigest | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
            size, md5, sha256 = 0, hashlib.md5(), hashlib.sha256()
            # Streamed: firmware can be hundreds of MB and must never sit in memory whole.
            for chunk in body.iter_chunks(CHUNK):
                size += len(chunk)
                md5.update(chunk)
                sha256.update(chunk)
        except ClientError as exc:
            # Only S3's own NoSuchKey means "absent": a bare 404 could be a proxy or a wrong endpoint.
            if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return None
            raise self._fail("GetObject", exc) from exc
        except BotoCoreError as exc:
            raise self._fail("GetObject", exc) from exc
        return BlobDigest(size=size, md5=md5.hexdigest(), sha256=sha256.hexdigest())

    def read(self, key: str, max_bytes: int) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
            data = body.read(max_bytes + 1)
            body.close()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return None
            raise self._fail("GetObject", exc) from exc
        except BotoCoreError as exc:
            raise self._fail("GetObject", exc) from exc
        if len(data) > max_bytes:
            raise ValueError(f"object is larger than {max_bytes} bytes")
        return data

    def read_range(self, key: str, offset: int, length: int) -> bytes | None:
        if length <= 0:
            return b""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key),
                                          Range=f"bytes={offset}-{offset + length - 1}")["Body"]
            data = body.read()
            body.close()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "NoSuchKey":
                return None
            if code == "InvalidRange":  # the offset is at or past the end
                return b""
            raise self._fail("GetObject", exc) from exc
        except BotoCoreError as exc:
            raise self._fail("GetObject", exc) from exc
        return data

    def presigned_get(self, key: str, expires_in_s: int) -> str:
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._full(key)},
            ExpiresIn=min(expires_in_s, MAX_PRESIGN_S),
        )

    def delete(self, key: str) -> None:
        try:
            # S3 DeleteObject already answers 204 for a missing key, so this is idempotent.
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("DeleteObject", exc) from exc

    def check(self) -> None:
        """Fail fast (e.g. at startup) if the bucket is unreachable or the credentials are refused."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("HeadBucket", exc) from exc
