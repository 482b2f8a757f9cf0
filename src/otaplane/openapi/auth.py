"""Who signed this request? Signature V1 or V3, clock window and replay protection.

`authenticate` runs in a worker thread with a database connection: it looks up the key,
checks the signature and only then records the nonce, so that a forged request can never
burn a legitimate client's nonce.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from otaplane import errors
from otaplane.openapi import signing
from otaplane.services.accounts import AccountService, ActiveKey
from otaplane.store import nonces
from otaplane.timefmt import parse_utc_seconds


@dataclass(frozen=True)
class SignedRequest:
    """The parts of an HTTP request that take part in a signature."""

    method: str
    path: str
    query: list[tuple[str, str]]  # decoded, in order
    params: Mapping[str, str]  # query merged with a form body
    headers: Mapping[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True)
class Caller:
    access_key_id: str
    account_id: int


def _check_clock(timestamp: str | None, window_s: int, now_s: float) -> None:
    if not timestamp:
        raise errors.missing("Timestamp")
    seconds = parse_utc_seconds(timestamp)
    if seconds is None:
        raise errors.InvalidTimeStampFormat()
    if abs(now_s - seconds) > window_s:
        raise errors.InvalidTimeStampExpired()


# The nonce column is VARCHAR(128): PostgreSQL refuses longer values (SDKs send 32 hex / a UUID).
MAX_NONCE_LENGTH = 128


def _check_nonce(nonce: str) -> str:
    if len(nonce) > MAX_NONCE_LENGTH:
        raise errors.invalid("SignatureNonce", f"must be at most {MAX_NONCE_LENGTH} characters")
    return nonce


def _require(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if not value:
        raise errors.missing(name)
    return value


def authenticate(
    req: SignedRequest, conn: Connection, accounts: AccountService, window_s: int
) -> Caller:
    now_s = time.time()
    authorization = req.headers.get("authorization", "")
    if authorization.startswith("ACS3-"):
        key_id, key, nonce = _verify_v3(req, conn, accounts, authorization, window_s, now_s)
    else:
        key_id, key, nonce = _verify_v1(req, conn, accounts, window_s, now_s)
    # Committed at once: the nonce stays used whatever happens next.
    with accounts.db.write_turn():
        fresh = nonces.remember(conn, key_id, nonce, int(now_s * 1000), window_s * 1000)
        conn.commit()
    if not fresh:
        raise errors.SignatureNonceUsed()
    return Caller(key_id, key.account_id)


def _verify_v1(req, conn, accounts, window_s, now_s) -> tuple[str, ActiveKey, str]:
    params = req.params
    key_id = _require(params, "AccessKeyId")
    signature = _require(params, "Signature")
    method = params.get("SignatureMethod", "HMAC-SHA1")
    if method != "HMAC-SHA1":
        raise errors.InvalidSignatureMethod(method=method)
    nonce = _check_nonce(_require(params, "SignatureNonce"))
    key = accounts.active_key(conn, key_id)
    _check_clock(params.get("Timestamp"), window_s, now_s)
    string_to_sign = signing.v1_string_to_sign(req.method, params)
    if not signing.signatures_equal(signing.v1_signature(key.secret, string_to_sign), signature):
        raise errors.SignatureDoesNotMatch(sts=string_to_sign)
    return key_id, key, nonce


def _verify_v3(req, conn, accounts, authorization, window_s, now_s) -> tuple[str, ActiveKey, str]:
    fields = signing.parse_v3_authorization(authorization)
    if fields is None:
        raise errors.IncompleteSignature(detail="Malformed Authorization header.")
    key_id = fields["Credential"]
    signed_headers = [h.strip().lower() for h in fields["SignedHeaders"].split(";") if h.strip()]
    for needed in ("host", "x-acs-date", "x-acs-signature-nonce"):
        if needed not in signed_headers:
            raise errors.IncompleteSignature(detail=f"The header {needed} must be signed.")
    nonce = req.headers.get("x-acs-signature-nonce", "")
    if not nonce:
        raise errors.missing("SignatureNonce")
    _check_nonce(nonce)
    key = accounts.active_key(conn, key_id)
    _check_clock(req.headers.get("x-acs-date"), window_s, now_s)
    body_hash = hashlib.sha256(req.body).hexdigest()
    claimed_hash = req.headers.get("x-acs-content-sha256", body_hash)
    if claimed_hash != body_hash:
        raise errors.ContentSha256Mismatch()
    canonical = signing.v3_canonical_request(
        req.method, req.path, req.query, req.headers, signed_headers, claimed_hash
    )
    string_to_sign = signing.v3_string_to_sign(canonical)
    if not signing.signatures_equal(signing.v3_signature(key.secret, string_to_sign), fields["Signature"]):
        raise errors.SignatureDoesNotMatchV3(sts=string_to_sign.replace("\n", " "))
    return key_id, key, nonce
