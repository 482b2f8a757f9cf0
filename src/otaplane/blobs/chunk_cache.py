"""Small reads of immutable objects, served from a shared cache of aligned chunks.

A device downloading a package over MQTT asks for 5 KB blocks one after the other; on S3 each
would be its own ranged GET. Reading aligned 64 KB chunks once and keeping the most recent ones
turns ~13 round trips per chunk into one. Objects never change under a key (each upload gets its
own), so a cached chunk is never stale; a deleted object is never asked for (its package is gone
first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from otaplane.blobs.base import BlobStore

CHUNK_BYTES = 64 * 1024
MAX_CHUNKS = 256  # 16 MB: one MQTT-downloadable package whole, or the current chunks of many


class ChunkCache:
    def __init__(self, blobs: BlobStore, chunk_bytes: int = CHUNK_BYTES, max_chunks: int = MAX_CHUNKS):
        self.blobs = blobs
        self.chunk_bytes = chunk_bytes
        self.max_chunks = max_chunks
        self._chunks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()  # called from worker threads

    def read(self, key: str, offset: int, length: int) -> bytes | None:
        """`blobs.read_range(key, offset, length)`, through the cache; None when absent."""
        parts = []
        position, end = offset, offset + length
        while position < end:
            index = position // self.chunk_bytes
            chunk = self._chunk(key, index)
            if chunk is None:
                return None if not parts else b"".join(parts)
            start = position - index * self.chunk_bytes
            piece = chunk[start:start + (end - position)]
            if not piece:
                break  # past the end of the object
            parts.append(piece)
            position += len(piece)
            if len(chunk) < self.chunk_bytes:
                break  # the object's last chunk
        return b"".join(parts)

    def _chunk(self, key: str, index: int) -> bytes | None:
        with self._lock:
            chunk = self._chunks.get((key, index))
            if chunk is not None:
                self._chunks.move_to_end((key, index))
                return chunk
        chunk = self.blobs.read_range(key, index * self.chunk_bytes, self.chunk_bytes)
        if chunk is None:
            return None
        with self._lock:
            self._chunks[(key, index)] = chunk
            while len(self._chunks) > self.max_chunks:
                self._chunks.popitem(last=False)
        return chunk
