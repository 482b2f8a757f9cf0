"""ChunkCache: small reads served from aligned chunks read once."""

from __future__ import annotations

import os

from otaplane.blobs.chunk_cache import ChunkCache


class CountingStore:
    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects
        self.reads: list[tuple[str, int, int]] = []

    def read_range(self, key, offset, length):
        self.reads.append((key, offset, length))
        data = self.objects.get(key)
        return None if data is None else data[offset:offset + length]


def test_blocks_of_a_file_read_back_whole_with_one_read_per_chunk():
    content = os.urandom(10_000)
    store = CountingStore({"k": content})
    cache = ChunkCache(store, chunk_bytes=4096, max_chunks=8)
    received, offset = b"", 0
    while offset < len(content):
        block = cache.read("k", offset, 1000)  # blocks that straddle chunk boundaries
        assert block
        received += block
        offset += len(block)
    assert received == content
    assert store.reads == [("k", 0, 4096), ("k", 4096, 4096), ("k", 8192, 4096)]
    assert cache.read("k", 3000, 3000) == content[3000:6000]  # cached: no more reads
    assert len(store.reads) == 3
    assert cache.read("k", len(content), 100) == b""  # past the end
    assert cache.read("missing", 0, 10) is None


def test_the_least_recently_used_chunks_go_first():
    store = CountingStore({"k": bytes(range(256)) * 64})  # 16 KB
    cache = ChunkCache(store, chunk_bytes=4096, max_chunks=2)
    cache.read("k", 0, 10)
    cache.read("k", 4096, 10)
    cache.read("k", 0, 10)  # chunk 0 used again
    cache.read("k", 8192, 10)  # evicts chunk 1
    cache.read("k", 0, 10)
    assert [offset for _, offset, _ in store.reads] == [0, 4096, 8192]
    cache.read("k", 4096, 10)
    assert [offset for _, offset, _ in store.reads] == [0, 4096, 8192, 4096]
