"""Device authentication at MQTT CONNECT, as the Aliyun device SDKs compute it.

    username = DeviceName&ProductKey
    clientId = <id>|securemode=3,signmethod=hmacsha1,timestamp=...|
    password = hex(HMAC_<signmethod>(DeviceSecret,
                   "clientId<id>deviceName<dn>productKey<pk>[timestamp<ts>]"))

Pure functions only: the broker looks the secret up and calls `verify`.

What the SDKs send (device-protocol.md, section 2) decides the leniency here: the content uses
the clientId before the first `|`; `timestamp` is signed only when the clientId carries one and
is never checked for freshness (the C SDKs hard-code 2050); empty items and a trailing comma in
the extension list are fine; the hex digest is compared ignoring case (the C SDKs send it in
upper case, the Python SDK in lower case).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

SIGN_METHODS = {"hmacmd5": hashlib.md5, "hmacsha1": hashlib.sha1, "hmacsha256": hashlib.sha256}
# The platform's default when a clientId names no signmethod.
DEFAULT_SIGN_METHOD = "hmacmd5"
# securemode=-2 is dynamic registration (a ProductSecret signature), which otaplane does not offer.
DYNAMIC_REGISTRATION_MODES = {"-2"}


@dataclass(frozen=True)
class DeviceLogin:
    """What a CONNECT claims: which device, and how its password was signed."""

    product_key: str
    device_name: str
    client_id: str  # the part before the first `|`: the one that is signed
    sign_method: str
    timestamp: str | None
    secure_mode: str | None
    extensions: dict[str, str] = field(default_factory=dict)


class LoginRefused(ValueError):
    """The CONNECT cannot be a device login at all (malformed, unsupported)."""


def parse_username(username: str | None) -> tuple[str, str]:
    """`DeviceName&ProductKey` -> (product_key, device_name)."""
    if not username:
        raise LoginRefused("no username")
    device_name, sep, product_key = username.rpartition("&")
    if not sep or not device_name or not product_key:
        raise LoginRefused("username is not DeviceName&ProductKey")
    return product_key, device_name


def parse_client_id(client_id: str | None) -> tuple[str, dict[str, str]]:
    """`id|k=v,k=v,|` -> (id, {k: v}). Items without `=` and empty items are skipped."""
    raw = client_id or ""
    bare, sep, rest = raw.partition("|")
    if not sep:
        return bare, {}
    # The extensions end at the closing `|`; tolerate a missing one.
    body = rest[: rest.rindex("|")] if "|" in rest else rest
    extensions: dict[str, str] = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if eq and key:
            extensions[key] = value.strip()
    return bare, extensions


def parse_login(client_id: str | None, username: str | None) -> DeviceLogin:
    product_key, device_name = parse_username(username)
    bare, extensions = parse_client_id(client_id)
    method = (extensions.get("signmethod") or DEFAULT_SIGN_METHOD).lower()
    if method not in SIGN_METHODS:
        raise LoginRefused(f"unsupported signmethod {method!r}")
    secure_mode = extensions.get("securemode")
    if secure_mode in DYNAMIC_REGISTRATION_MODES:
        raise LoginRefused("dynamic registration (securemode=-2) is not supported")
    return DeviceLogin(
        product_key=product_key,
        device_name=device_name,
        client_id=bare,
        sign_method=method,
        timestamp=extensions.get("timestamp") or None,
        secure_mode=secure_mode,
        extensions=extensions,
    )


def sign_content(client_id: str, device_name: str, product_key: str, timestamp: str | None) -> str:
    """The signed string: the parameters sorted by name, each name followed by its value."""
    content = f"clientId{client_id}deviceName{device_name}productKey{product_key}"
    return content + (f"timestamp{timestamp}" if timestamp is not None else "")


def password_for(login: DeviceLogin, device_secret: str) -> str:
    """The password a device with this secret sends for this login (lowercase hex)."""
    content = sign_content(login.client_id, login.device_name, login.product_key, login.timestamp)
    digest = SIGN_METHODS[login.sign_method]
    return hmac.new(device_secret.encode(), content.encode(), digest).hexdigest()


def verify(login: DeviceLogin, device_secret: str, password: str | bytes | None) -> bool:
    """Constant-time, case-insensitive comparison of the sent password with the expected one."""
    if password is None:
        return False
    if isinstance(password, bytes):
        try:
            password = password.decode()
        except UnicodeDecodeError:
            return False
    expected = password_for(login, device_secret)
    return hmac.compare_digest(expected.encode(), password.lower().encode())
