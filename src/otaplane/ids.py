"""Generated identifiers and secrets, in the shapes the platform uses."""

from __future__ import annotations

import os
import secrets
import string
import threading

_ALNUM = string.ascii_letters + string.digits


def random_alnum(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def access_key_id() -> str:
    return "LTAI" + random_alnum(20)


def access_key_secret() -> str:
    return random_alnum(30)


def product_key() -> str:
    # Platform ProductKeys look like `a1BwAGV8Vxk`: 11 characters starting with a lower letter.
    return "a1" + random_alnum(9)


def product_secret() -> str:
    return random_alnum(16)


def instance_id() -> str:
    return "iot-" + secrets.token_hex(4)


_random = threading.local()  # per thread: `pool` (bytes from os.urandom) and `offset` in it


def _random_16() -> bytes:
    """16 bytes from os.urandom, fetched 4 KiB at a time: one system call per 256 requests
    instead of one per request (each costs several microseconds on a VM)."""
    pool = getattr(_random, "pool", b"")
    offset = getattr(_random, "offset", 0)
    if offset + 16 > len(pool):
        pool = _random.pool = os.urandom(4096)
        offset = 0
    _random.offset = offset + 16
    return pool[offset:offset + 16]


def _forget_random_pool() -> None:  # a forked child must not repeat its parent's bytes
    global _random
    _random = threading.local()


os.register_at_fork(after_in_child=_forget_random_pool)


def request_id() -> str:
    """`str(uuid.uuid4()).upper()`, built without the UUID object (every request makes one)."""
    raw = bytearray(_random_16())
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex().upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
