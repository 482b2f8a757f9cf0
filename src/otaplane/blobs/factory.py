"""Pick the blob backend from Settings.blob_url: empty = local folder, s3://bucket?... = S3."""

from __future__ import annotations

from otaplane.blobs.base import BlobStore
from otaplane.blobs.cors import parse_origins
from otaplane.secretbox import SecretBox
from otaplane.settings import Settings


def open_blob_store(settings: Settings, box: SecretBox) -> BlobStore:
    url = settings.blob_url.strip()
    cors_origins = parse_origins(settings.cors_origins)  # the endpoints otaplane serves; S3's own: its bucket's rules
    if not url or url.startswith("file:"):
        from otaplane.blobs.local import LocalBlobStore

        root = settings.data_dir / "blobs" if not url else url.removeprefix("file://").removeprefix("file:")
        return LocalBlobStore(
            root=root,
            public_url=settings.resolved_public_url(),
            secret=box.derive("otaplane local blob signing v1"),
            cors_origins=cors_origins,
        )
    if url.startswith("s3://"):
        from otaplane.blobs.s3 import S3BlobStore

        store = S3BlobStore.from_url(url)
        if not store.direct_uploads:  # forms otaplane receives, as the local store's (blobs.s3)
            store.receive_uploads(box.derive("otaplane local blob signing v1"), settings.resolved_public_url(),
                                  settings.data_dir / "upload-incoming", cors_origins)
        return store
    raise ValueError(f"unsupported OTAPLANE_BLOB_URL {url!r}: use an empty value, file://DIR or s3://BUCKET?...")
