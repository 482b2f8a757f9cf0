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


_random = threading.local()  # per thread: `hex_pool` (os.urandom bytes in hex) and `hex_offset` in it


def _forget_random_pool() -> None:  # a forked child must not repeat its parent's bytes
    global _random
    _random = threading.local()


os.register_at_fork(after_in_child=_forget_random_pool)


# The request id's 13th hex digit is the version (4); the 17th carries the RFC 4122 variant in
# its top two bits (10xx): the random digit with those bits forced, as uuid4() does.
_VARIANT_DIGIT = {f"{n:X}": f"{(n & 0x3) | 0x8:X}" for n in range(16)}


def _random_hex_32() -> str:
    """32 upper-case hex digits (16 random bytes), cut from a pool of 4 KiB of os.urandom put in
    hex once: one system call and one hex conversion per 256 requests."""
    pool = getattr(_random, "hex_pool", "")
    offset = getattr(_random, "hex_offset", 0)
    if offset + 32 > len(pool):
        pool = _random.hex_pool = os.urandom(4096).hex().upper()
        offset = 0
    _random.hex_offset = offset + 32
    return pool[offset:offset + 32]


def request_id() -> str:
    """`str(uuid.uuid4()).upper()`, built without the UUID object (every request makes one)."""
    h = _random_hex_32()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:]}"


def oss_request_id() -> str:
    """24 upper-case hex digits, the shape of OSS's `x-oss-request-id` (every download makes one)."""
    return _random_hex_32()[:24]
