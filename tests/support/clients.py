"""The official SDKs pointed at a test server, and a raw signer built on the official util."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from types import SimpleNamespace
from datetime import datetime, timezone
from urllib.parse import urlencode

import httpx
from aliyunsdkcore.client import AcsClient
from alibabacloud_iot20180120 import models as iot_models  # noqa: F401  (re-exported for tests)
from alibabacloud_iot20180120.client import Client as TeaClient
from alibabacloud_openapi_util.client import Client as OpenApiUtil
from alibabacloud_tea_openapi import models as open_api_models

API_VERSION = "2018-01-20"


def legacy_client(access_key_id: str, secret: str) -> AcsClient:
    """aliyun-python-sdk-core (signature V1); set the endpoint on each request."""
    return AcsClient(access_key_id, secret, "cn-shanghai")


def legacy_call(client: AcsClient, endpoint: str, request) -> dict:
    request.set_endpoint(endpoint)
    return json.loads(client.do_action_with_exception(request))


def tea_client(endpoint: str, access_key_id: str, secret: str, signature: str = "v3") -> TeaClient:
    """alibabacloud-iot20180120: V3 (ACS3-HMAC-SHA256) by default, V1 with signature='v2'."""
    config = open_api_models.Config(
        access_key_id=access_key_id,
        access_key_secret=secret,
        endpoint=endpoint,
        protocol="http",
        region_id="cn-shanghai",
    )
    if signature == "v2":
        config.signature_algorithm = "v2"
    return TeaClient(config)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RawSigner:
    """Signed raw HTTP requests for error cases the SDKs never send (signed by the official util)."""

    def __init__(self, base_url: str, access_key_id: str, secret: str):
        self.base_url = base_url
        self.access_key_id = access_key_id
        self.secret = secret

    def v1_params(self, action: str, params: dict[str, str], method: str = "POST", **common: str) -> dict:
        signed = {
            "Action": action,
            "Version": API_VERSION,
            "Format": "JSON",
            "AccessKeyId": self.access_key_id,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureVersion": "1.0",
            "SignatureNonce": uuid.uuid4().hex,
            "Timestamp": utc_now(),
            **common,
            **params,
        }
        signed = {k: v for k, v in signed.items() if v is not None}
        signed["Signature"] = OpenApiUtil.get_rpcsignature(signed, method, self.secret)
        return signed

    def v1(self, action: str, params: dict[str, str] | None = None, method: str = "POST", **common) -> httpx.Response:
        signed = self.v1_params(action, params or {}, method, **common)
        return httpx.request(method, f"{self.base_url}/?{urlencode(signed)}", timeout=30)

    def v3_headers(self, action: str, query: dict[str, str], body: bytes = b"", **overrides: str) -> dict:
        host = self.base_url.split("://", 1)[1]
        headers = {
            "host": host,
            "x-acs-action": action,
            "x-acs-version": API_VERSION,
            "x-acs-date": utc_now(),
            "x-acs-signature-nonce": uuid.uuid4().hex,
            "x-acs-content-sha256": hashlib.sha256(body).hexdigest(),
            "accept": "application/json",
            **overrides,
        }
        return headers

    def v3(self, action: str, query: dict[str, str] | None = None, body: bytes = b"",
           method: str = "POST", headers: dict | None = None, secret: str | None = None) -> httpx.Response:
        query = query or {}
        headers = headers or self.v3_headers(action, query, body)
        # The util only reads these four attributes of the Tea request object.
        request = SimpleNamespace(method=method, pathname="/", query=dict(query), headers=dict(headers))
        authorization = OpenApiUtil.get_authorization(
            request, "ACS3-HMAC-SHA256", headers["x-acs-content-sha256"], self.access_key_id,
            secret or self.secret,
        )
        headers = {**headers, "Authorization": authorization}
        return httpx.request(method, f"{self.base_url}/?{urlencode(query)}", headers=headers,
                             content=body, timeout=30)


class SdkCaller:
    """One call shape over the three official client variants, using each SDK's own request
    classes (so parameter flattening and signing are the SDK's, not ours).

    `call(action, params)` returns the response body as a dict with the wire's key names;
    gateway errors surface as the SDK's own exceptions.
    """

    VARIANTS = ("legacy-v1", "tea-v3", "tea-v2")

    def __init__(self, variant: str, endpoint: str, access_key_id: str, secret: str):
        self.variant = variant
        self.endpoint = endpoint
        if variant == "legacy-v1":
            self._legacy = legacy_client(access_key_id, secret)
        else:
            self._tea = tea_client(endpoint, access_key_id, secret, "v2" if variant == "tea-v2" else "v3")
            self._methods = {name.replace("_", "").lower(): name for name in dir(self._tea)
                             if not name.startswith("_") and not name.endswith(("_async", "_with_options"))}

    def call(self, action: str, params: dict | None = None) -> dict:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        if self.variant == "legacy-v1":
            return self._call_legacy(action, params)
        request = getattr(iot_models, f"{action}Request")().from_map(params)
        response = getattr(self._tea, self._methods[action.lower()])(request)
        return response.body.to_map()

    def _call_legacy(self, action: str, params: dict) -> dict:
        import importlib

        module = importlib.import_module(f"aliyunsdkiot.request.v20180120.{action}Request")
        request = getattr(module, f"{action}Request")()
        for name, value in params.items():
            setter = getattr(request, f"set_{name}s", None) if isinstance(value, list) else None
            (setter or getattr(request, f"set_{name}"))(value)
        return legacy_call(self._legacy, self.endpoint, request)


def wait_until_revoked(base_url: str, key_id: str, secret: str, timeout_s: float = 3.0) -> None:
    """A running server refuses a revoked key within its key cache's TTL (1 s): poll until it
    does, for at most `timeout_s`. Until then the key works; once refused, it is refused with
    InvalidAccessKeyId.Inactive (callers then check that every client variant is refused)."""
    signer = RawSigner(base_url, key_id, secret)
    deadline = time.monotonic() + timeout_s
    while True:
        response = signer.v1("QueryProductList", {"CurrentPage": "1", "PageSize": "1"})
        if response.status_code != 200:
            assert response.status_code == 400, response.text
            assert response.json()["Code"] == "InvalidAccessKeyId.Inactive", response.text
            return
        assert time.monotonic() < deadline, f"{base_url} still accepts the key {timeout_s} s after its revocation"
        time.sleep(0.05)
