"""Object storage for firmware files: the BlobStore protocol and its backends (local, s3)."""

from otaplane.blobs.base import BlobDigest, BlobStore, BlobStoreUnavailable, UploadForm

__all__ = ["BlobDigest", "BlobStore", "BlobStoreUnavailable", "UploadForm"]
