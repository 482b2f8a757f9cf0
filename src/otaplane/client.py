"""A small signed RPC client for otaplane (or any endpoint of the same API), used by the CLI.

It signs with V1 exactly as the official core SDK does, so the CLI exercises the same gateway
path as every other client.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from otaplane.openapi import signing
from otaplane.openapi.registry import API_VERSION


class ApiCallError(Exception):
    """The server refused a call: `code` is the gateway or business error code."""

    def __init__(self, code: str, message: str, status: int):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass
class Credentials:
    access_key_id: str
    access_key_secret: str

    @classmethod
    def from_file(cls, path: Path) -> "Credentials":
        """The pair in a JSON file such as admin-credentials.json; ValueError saying what is wrong."""
        try:
            data = json.loads(path.read_text())
            return cls(str(data["AccessKeyId"]), str(data["AccessKeySecret"]))
        except (OSError, ValueError, KeyError, TypeError) as problem:
            raise ValueError(f"{path} holds no AccessKey pair ({type(problem).__name__}: {problem})") from None


def _flatten(params: dict[str, Any]) -> dict[str, str]:
    """`{"MultiFiles": [{"Name": "a"}]}` -> `{"MultiFiles.1.Name": "a"}`, booleans as true/false."""
    flat: dict[str, str] = {}
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, list):
            for index, item in enumerate(value, start=1):
                if isinstance(item, dict):
                    for key, sub in item.items():
                        if sub is not None:
                            flat[f"{name}.{index}.{key}"] = str(sub)
                else:
                    flat[f"{name}.{index}"] = str(item)
        elif isinstance(value, bool):
            flat[name] = "true" if value else "false"
        else:
            flat[name] = str(value)
    return flat


def _upper_camel(value: Any) -> Any:
    """The keys of a `--response-case camel` answer as the API names them (firmwareInfo ->
    FirmwareInfo), so the commands read one shape whatever the server's setting."""
    if isinstance(value, dict):
        return {key[:1].upper() + key[1:]: _upper_camel(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_upper_camel(item) for item in value]
    return value


class OtaplaneClient:
    def __init__(self, endpoint: str, credentials: Credentials, timeout_s: float = 600,
                 instance_id: str | None = None):
        self.endpoint = endpoint.rstrip("/")
        self.instance_id = instance_id  # IotInstanceId of every call; None: the account's default instance
        if "://" not in self.endpoint:
            self.endpoint = "http://" + self.endpoint
        self.credentials = credentials
        self.http = httpx.Client(timeout=timeout_s)

    def call(self, action: str, params: dict[str, Any] | None = None, method: str = "POST") -> dict[str, Any]:
        query = {
            "Action": action,
            "Version": API_VERSION,
            "Format": "JSON",
            "AccessKeyId": self.credentials.access_key_id,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureVersion": "1.0",
            "SignatureNonce": uuid.uuid4().hex,
            "Timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **_flatten({"IotInstanceId": self.instance_id, **(params or {})}),
        }
        string_to_sign = signing.v1_string_to_sign(method, query)
        query["Signature"] = signing.v1_signature(self.credentials.access_key_secret, string_to_sign)
        try:
            response = self.http.request(method, f"{self.endpoint}/?{urlencode(query)}")
        except httpx.HTTPError as problem:  # refused, unreachable, timed out, not an HTTP URL
            raise ApiCallError("EndpointUnreachable", f"{self.endpoint}: {type(problem).__name__}: {problem}",
                               0) from None
        try:
            body = response.json()
        except ValueError:
            raise ApiCallError("InvalidResponse", response.text[:200], response.status_code) from None
        if isinstance(body, dict) and "requestId" in body:  # a server answering lower-camel keys
            body = _upper_camel(body)
        if response.status_code >= 400:
            raise ApiCallError(body.get("Code", ""), body.get("Message", ""), response.status_code)
        if body.get("Success") is False:
            raise ApiCallError(body.get("Code", ""), body.get("ErrorMessage", ""), response.status_code)
        return body

    def close(self) -> None:
        self.http.close()
