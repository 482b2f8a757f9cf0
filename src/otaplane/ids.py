"""Generated identifiers and secrets, in the shapes the platform uses."""

from __future__ import annotations

import secrets
import string
import uuid

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


def request_id() -> str:
    return str(uuid.uuid4()).upper()
