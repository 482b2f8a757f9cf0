"""OSS V1 signatures, as pure functions: PostObject policies and presigned GET URLs.

These are the wire formats the official SDKs and devices already speak (openapi.md §8), so the
local blob store can hand out URLs that look and verify exactly like Aliyun OSS ones.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from otaplane.openapi.signing import hmac_digest, percent_encode
from otaplane.timefmt import parse_utc_seconds, utc_iso_ms

# OSS caps a PostObject upload at 5 GB; a policy without content-length-range gets this.
POST_OBJECT_MAX_BYTES = 5 * 1024**3
_EXPIRES = re.compile(r"[0-9]{1,19}")  # a presigned URL's Expires: Unix seconds


class OssError(Exception):
    """A refusal in OSS terms: rendered as the `<Error><Code>…` XML with this HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}  # extra response headers (416: Content-Range)


@dataclass(frozen=True)
class SizeRange:
    min_bytes: int
    max_bytes: int


def sign(secret: str, string_to_sign: str) -> str:
    """base64(HMAC-SHA1(secret, string_to_sign)): the V1 signature of both policies and URLs."""
    # From the secret's padded blocks hashed once (signing.hmac_digest): OpenSSL 3 sets up a MAC
    # context on every one-shot HMAC, and a package read for the first time signs its URL.
    digest = hmac_digest(secret.encode(), string_to_sign.encode(), "sha1")
    return base64.b64encode(digest).decode()


# --- PostObject V1 -----------------------------------------------------------------------------


def build_policy(key: str, max_bytes: int, expires_at_ms: int, min_bytes: int = 0) -> str:
    """The base64 policy allowing exactly `key`, min..max bytes, until expires_at_ms."""
    document = {
        "expiration": utc_iso_ms(expires_at_ms),
        "conditions": [["content-length-range", min_bytes, max_bytes], ["eq", "$key", key]],
    }
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()


def sign_policy(secret: str, policy: str) -> str:
    return sign(secret, policy)


def verify_post(
    secret: str, fields: Mapping[str, str], now_s: float, bucket: str, access_key_id: str
) -> SizeRange:
    """Checks a PostObject form's credentials and policy (fields keyed by lower-case name).

    Returns the allowed file size range; raises OssError with OSS's code and status otherwise.
    """
    missing = [name for name in ("key", "policy", "ossaccesskeyid", "signature") if not fields.get(name)]
    if missing:
        raise OssError(400, "InvalidArgument", f"The form field(s) {', '.join(missing)} are missing.")
    if fields["ossaccesskeyid"] != access_key_id:
        raise OssError(403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.")
    if not hmac.compare_digest(sign_policy(secret, fields["policy"]).encode(), fields["signature"].encode()):
        raise OssError(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )
    return check_policy(fields["policy"], fields, now_s, bucket)


def check_policy(policy: str, fields: Mapping[str, str], now_s: float, bucket: str) -> SizeRange:
    """Expiration and every condition of a (signature-checked) policy against the form fields."""
    document = _decode_policy(policy)
    expiration = document.get("expiration")
    expires_at = parse_utc_seconds(expiration) if isinstance(expiration, str) else None
    if expires_at is None:
        raise OssError(400, "InvalidPolicyDocument", f"Invalid Policy: Invalid 'expiration' value: {expiration!r}.")
    if expires_at <= now_s:
        raise OssError(403, "AccessDenied", "Invalid according to Policy: Policy expired.")
    conditions = document.get("conditions", [])
    if not isinstance(conditions, list):
        raise OssError(400, "InvalidPolicyDocument", "Invalid Policy: 'conditions' must be a list.")
    sizes = SizeRange(0, POST_OBJECT_MAX_BYTES)
    for condition in conditions:
        sizes = _check_condition(condition, fields, bucket, sizes)
    return sizes


def policy_expiration(policy: str) -> float:
    """The expiration (Unix seconds) of a policy that check_policy accepted."""
    return parse_utc_seconds(_decode_policy(policy)["expiration"])


def _decode_policy(policy: str) -> dict[str, Any]:
    try:
        document = json.loads(base64.b64decode(policy, validate=True))
    except (binascii.Error, ValueError):
        raise OssError(400, "InvalidPolicyDocument", "Invalid Policy: Invalid JSON.") from None
    if not isinstance(document, dict):
        raise OssError(400, "InvalidPolicyDocument", "Invalid Policy: Invalid JSON.")
    return document


def _check_condition(condition: Any, fields: Mapping[str, str], bucket: str, sizes: SizeRange) -> SizeRange:
    # {"key": "value"} is OSS's short form of ["eq", "$key", "value"].
    if isinstance(condition, dict) and len(condition) == 1:
        ((name, expected),) = condition.items()
        condition = ["eq", "$" + str(name), expected]
    if not isinstance(condition, list) or not condition:
        raise _invalid_condition(condition)
    operator = str(condition[0]).lower()
    if operator == "content-length-range" and len(condition) == 3:
        low, high = condition[1], condition[2]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (low, high)) or low > high:
            raise _invalid_condition(condition)
        return SizeRange(max(sizes.min_bytes, low), min(sizes.max_bytes, high))
    if operator in ("eq", "starts-with") and len(condition) == 3:
        name, expected = condition[1], condition[2]
        if not isinstance(name, str) or not name.startswith("$") or not isinstance(expected, str):
            raise _invalid_condition(condition)
        field = name[1:].lower()
        actual = bucket if field == "bucket" else fields.get(field, "")
        ok = actual == expected if operator == "eq" else actual.startswith(expected)
        if not ok:
            raise OssError(
                403, "AccessDenied", f"Invalid according to Policy: Policy Condition failed: {json.dumps(condition)}"
            )
        return sizes
    raise _invalid_condition(condition)


def _invalid_condition(condition: Any) -> OssError:
    return OssError(400, "InvalidPolicyDocument", f"Invalid Policy: Invalid Condition: {json.dumps(condition)}")


# --- Presigned GET V1 --------------------------------------------------------------------------


def url_string_to_sign(method: str, expires: int | str, bucket: str, key: str) -> str:
    # No Content-MD5, Content-Type, x-oss-* header or subresource: a plain device download.
    return f"{method}\n\n\n{expires}\n/{bucket}/{key}"


# Characters quote(..., safe="/") leaves as they are: every key otaplane makes, and every key
# the local store accepts (local.is_valid_key), is made of them only.
_LITERAL_IN_PATH = re.compile(r"[A-Za-z0-9_.~/-]*").fullmatch


def quote_key(key: str) -> str:
    if _LITERAL_IN_PATH(key):  # nothing to escape: a regex match costs a third of quote()
        return key
    return quote(key, safe="/")


def _quote_base64(text: str) -> str:
    """quote(text, safe='') of base64 text, whose only reserved characters are + / =."""
    return text.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")


# Memoized: QueryOTAFirmware signs its package's URL on every call, and the calls of one second
# (one `expires`) share it; signing and quoting cost ~5 us.
@functools.lru_cache(maxsize=4096)
def presigned_url(
    base_url: str, bucket: str, key: str, access_key_id: str, secret: str, expires: int, method: str = "GET"
) -> str:
    """`<base_url>/<quoted key>?Expires=…&OSSAccessKeyId=…&Signature=…` (base_url is the bucket's URL)."""
    signature = sign(secret, url_string_to_sign(method, expires, bucket, key))
    query = f"Expires={expires}&OSSAccessKeyId={percent_encode(access_key_id)}&Signature={_quote_base64(signature)}"
    return f"{base_url}/{quote_key(key)}?{query}"


def verify_presigned(
    query: Mapping[str, str],
    bucket: str,
    key: str,
    access_key_id: str,
    secret: str,
    now_s: float,
    methods: Iterable[str] = ("GET",),
) -> None:
    """Checks a presigned URL's query (already URL-decoded); raises OssError when refused."""
    expires, signature, key_id = query.get("Expires"), query.get("Signature"), query.get("OSSAccessKeyId")
    if not expires or not signature or not key_id:
        raise OssError(403, "AccessDenied", "You have no right to access this object because of bucket acl.")
    # ASCII digits only and at most 19 of them: str.isdigit() also passes '²' and 5,000-digit
    # strings, on which int() raises (an unsigned 500).
    if not _EXPIRES.fullmatch(expires):
        raise OssError(403, "AccessDenied", "Invalid Expires.")
    if int(expires) < now_s:
        raise OssError(403, "AccessDenied", "Request has expired.")
    if key_id != access_key_id:
        raise OssError(403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.")
    # An unencoded '+' in the query decodes to a space; base64 never contains spaces.
    given = signature.replace(" ", "+").encode()
    for method in methods:
        if hmac.compare_digest(sign(secret, url_string_to_sign(method, expires, bucket, key)).encode(), given):
            return
    raise OssError(
        403, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."
    )
