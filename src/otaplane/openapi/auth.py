"""Who signed this request? Signature V1 or V3, clock window and replay protection.

`Authenticator.authenticate` looks up the key, checks the signature and only then records the
nonce, so that a forged request can never burn a legitimate client's nonce.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import NamedTuple

from otaplane import errors
from otaplane.openapi import signing
from otaplane.services.accounts import AccountService, ActiveKey
from otaplane.store.nonce_file import NonceFile, NonceFileFull, NonceFileUnavailable
from otaplane.store.nonces import NonceWriter
from otaplane.timefmt import parse_utc_seconds

log = logging.getLogger("otaplane.gateway")


class SignedRequest(NamedTuple):
    """The parts of an HTTP request that take part in a signature."""

    method: str
    path: str
    query: list[tuple[str, str]]  # decoded, in order
    params: Mapping[str, str]  # query merged with a form body
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class Caller(NamedTuple):
    access_key_id: str
    account_id: int


def _check_clock(timestamp: str | None, window_s: int, now_s: float) -> float:
    if not timestamp:
        raise errors.missing("Timestamp")
    seconds = parse_utc_seconds(timestamp)
    if seconds is None:
        raise errors.InvalidTimeStampFormat()
    if abs(now_s - seconds) > window_s:
        raise errors.InvalidTimeStampExpired()
    return seconds


# SDKs send 32 hex digits or a UUID; anything past 128 characters is not a nonce but garbage.
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


class Claim(NamedTuple):
    """Who a request says signed it, read before any lookup."""

    access_key_id: str
    nonce: str
    v3: dict[str, str] | None = None  # the parsed Authorization header of a V3 request
    v3_signed_headers: tuple[str, ...] = ()


def claim_of(req: SignedRequest) -> Claim:
    """The checks that need no key: the signature's parameters or headers are all there."""
    authorization = req.headers.get("authorization", "")
    if authorization.startswith("ACS3-"):
        return _claim_v3(req, authorization)
    return _claim_v1(req)


def verify(req: SignedRequest, claim: Claim, key: ActiveKey, window_s: int, now_s: float) -> float:
    """The clock window and the signature, with the claimed key's secret: the request's own time."""
    if claim.v3 is None:
        return _verify_v1(req, key, window_s, now_s)
    return _verify_v3(req, claim, key, window_s, now_s)


def nonce_ttl_ms(signed_at_s: float, window_s: int, now_s: float) -> int:
    """How long a nonce stays used: until its request fails the clock check anyway. A request
    dated ahead of the server's clock passes it until its own time plus the window, later than
    now plus the window: counted from now, its nonce expired first and it could be replayed."""
    return int((window_s + max(0.0, signed_at_s - now_s)) * 1000)


class Authenticator:
    """Who signed this request: claim, key lookup, clock and signature, then the nonce.

    The key comes from the key cache (AccountService.cached_key) or, on a miss, from the
    database through `run_db` (the gateway runs it inline on SQLite, in a worker thread on
    PostgreSQL). The nonce is recorded only after the signature checks out, so that a forged
    request can never burn a legitimate client's nonce, and it is committed (store.nonce_file
    beside SQLite, else group commit in the database, store.nonces.NonceWriter) before the
    request goes on: it stays used whatever happens next.
    """

    def __init__(self, accounts: AccountService, nonces: NonceFile | NonceWriter, window_s: int, run_db):
        self.accounts = accounts
        self.nonces = nonces
        # The nonce file records a nonce in microseconds, inline; the database's writer is awaited.
        self._remember_now = nonces.remember if isinstance(nonces, NonceFile) else None
        self.window_s = window_s
        self.run_db = run_db

    def authenticate_now(self, req: SignedRequest) -> Caller | None:
        """`authenticate` without a suspension, when it needs no database: the key is in the
        cache and nonces go to the nonce file. None: call `authenticate`."""
        if self._remember_now is None:
            return None
        claim = claim_of(req)
        key = self.accounts.cached_key(claim.access_key_id)
        if key is None:
            return None
        return self._check(req, claim, key, time.time())

    async def authenticate(self, req: SignedRequest) -> Caller:
        now_s = time.time()
        claim = claim_of(req)
        key = self.accounts.cached_key(claim.access_key_id)
        if key is None:
            key = await self.run_db(self.accounts.active_key, claim.access_key_id)
        if self._remember_now is not None:
            return self._check(req, claim, key, now_s)
        signed_at = verify(req, claim, key, self.window_s, now_s)
        ttl_ms = nonce_ttl_ms(signed_at, self.window_s, now_s)
        if not await self.nonces.remember(claim.access_key_id, claim.nonce, int(now_s * 1000), ttl_ms):
            raise errors.SignatureNonceUsed()
        return Caller(claim.access_key_id, key.account_id)

    def _check(self, req: SignedRequest, claim: Claim, key: ActiveKey, now_s: float) -> Caller:
        """Clock, signature, then the nonce, into the nonce file."""
        signed_at = verify(req, claim, key, self.window_s, now_s)
        try:
            fresh = self._remember_now(claim.access_key_id, claim.nonce, int(now_s * 1000),
                                       nonce_ttl_ms(signed_at, self.window_s, now_s))
        except NonceFileFull:
            log.error("the nonce file is full: signed requests are refused until nonces expire")
            raise errors.ServiceUnavailable() from None
        except NonceFileUnavailable as exc:
            # Without the nonce file no replay can be refused: refuse the request (503, which
            # clients retry), never let it through unchecked.
            log.error("the nonce file failed, signed requests are refused: %s", exc)
            raise errors.ServiceUnavailable() from None
        if not fresh:
            raise errors.SignatureNonceUsed()
        return Caller(claim.access_key_id, key.account_id)


def _claim_v1(req: SignedRequest) -> Claim:
    params = req.params
    key_id = _require(params, "AccessKeyId")
    _require(params, "Signature")
    method = params.get("SignatureMethod", "HMAC-SHA1")
    if method != "HMAC-SHA1":
        raise errors.InvalidSignatureMethod(method=method)
    return Claim(key_id, _check_nonce(_require(params, "SignatureNonce")))


def _verify_v1(req: SignedRequest, key: ActiveKey, window_s: int, now_s: float) -> float:
    params = req.params
    signed_at = _check_clock(params.get("Timestamp"), window_s, now_s)
    string_to_sign = signing.v1_string_to_sign(req.method, params)
    if not signing.signatures_equal(signing.v1_signature(key.secret, string_to_sign), params["Signature"]):
        raise errors.SignatureDoesNotMatch(sts=string_to_sign)
    return signed_at


def _claim_v3(req: SignedRequest, authorization: str) -> Claim:
    fields = signing.parse_v3_authorization(authorization)
    if fields is None:
        raise errors.IncompleteSignature(detail="Malformed Authorization header.")
    key_id = fields["Credential"]
    signed_headers = [h.strip().lower() for h in fields["SignedHeaders"].split(";") if h.strip()]
    for needed in ("host", "x-acs-date", "x-acs-signature-nonce"):
        if needed not in signed_headers:
            raise errors.IncompleteSignature(detail=f"The header {needed} must be signed.")
    # Every x-acs-* header is signed, as the SDKs do: otherwise the action (x-acs-action) or the
    # version could be swapped under a valid signature.
    for name in req.headers:
        if name.startswith("x-acs-") and name not in signed_headers:
            raise errors.IncompleteSignature(detail=f"The header {name} must be signed.")
    nonce = signing.v3_header_value(req.headers, "x-acs-signature-nonce")
    if not nonce:
        raise errors.missing("SignatureNonce")
    return Claim(key_id, _check_nonce(nonce), fields, tuple(signed_headers))


def _verify_v3(req: SignedRequest, claim: Claim, key: ActiveKey, window_s: int, now_s: float) -> float:
    signed_at = _check_clock(signing.v3_header_value(req.headers, "x-acs-date"), window_s, now_s)
    body_hash = hashlib.sha256(req.body).hexdigest()
    claimed_hash = req.headers.get("x-acs-content-sha256", body_hash)
    if claimed_hash != body_hash:
        raise errors.ContentSha256Mismatch()
    canonical = signing.v3_canonical_request(
        req.method, req.path, req.query, req.headers, list(claim.v3_signed_headers), claimed_hash
    )
    string_to_sign = signing.v3_string_to_sign(canonical)
    if not signing.signatures_equal(signing.v3_signature(key.secret, string_to_sign), claim.v3["Signature"]):
        raise errors.SignatureDoesNotMatchV3(sts=string_to_sign.replace("\n", " "))
    return signed_at
