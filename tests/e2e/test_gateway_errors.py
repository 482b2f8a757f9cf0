"""The gateway's answers to bad, odd and hostile requests, over raw signed HTTP (openapi.md 2-3).

Requests are signed with the official alibabacloud_openapi_util (RawSigner), and the expected
strings-to-sign are rebuilt here from the reference text, independently of otaplane's code.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import uuid
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from urllib.parse import quote, urlencode

import httpx
import pytest
from aliyunsdkcore.acs_exception.exceptions import ServerException
from aliyunsdkiot.request.v20180120.QueryProductListRequest import QueryProductListRequest
from alibabacloud_openapi_util.client import Client as OpenApiUtil

from tests.conftest import BACKENDS
from tests.support.clients import API_VERSION, RawSigner, legacy_call, legacy_client

FORM = "application/x-www-form-urlencoded"
PAGE = {"CurrentPage": "1", "PageSize": "10"}
GATEWAY_KEYS = {"RequestId", "HostId", "Code", "Message", "Recommend"}


# --- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gw_key(server) -> tuple[str, str]:
    """An account of this module's own: the products it creates disturb no other test."""
    return server.create_key("tests-gateway-errors")


@pytest.fixture
def signer(server, gw_key) -> RawSigner:
    return RawSigner(server.base_url, *gw_key)


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=30) as client:
        yield client


def qs(params) -> str:
    """Query string with %20 for spaces (RFC 3986 style, as core sends it)."""
    return urlencode(params, quote_via=quote)


def send(server, params, method: str = "POST", body: bytes | None = None, headers=None,
         client: httpx.Client | None = None) -> httpx.Response:
    url = f"{server.base_url}/?{qs(params)}" if params else f"{server.base_url}/"
    return (client or httpx).request(method, url, content=body, headers=headers, timeout=30)


def ts(delta: timedelta = timedelta()) -> str:
    return (datetime.now(timezone.utc) + delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3986(text: str) -> str:
    # quote() always keeps A-Za-z0-9_.- literal; '~' is added, nothing else.
    return quote(text, safe="~")


def reference_v1_sts(method: str, params: dict[str, str]) -> str:
    """openapi.md 2/V1, steps 1-3, written from the text."""
    pairs = sorted((k, v) for k, v in params.items() if k != "Signature")
    canonical = "&".join(f"{rfc3986(k)}={rfc3986(v)}" for k, v in pairs)
    return f"{method}&%2F&{rfc3986(canonical)}"


def reference_v3_sts(method: str, query: dict[str, str], headers: dict[str, str]) -> str:
    """openapi.md 2/V3, from the text: every header the client signed, sorted."""
    names = sorted(h.lower() for h in headers)
    lowered = {k.lower(): v for k, v in headers.items()}
    canonical_query = "&".join(f"{rfc3986(k)}={rfc3986(v)}" for k, v in sorted(query.items()))
    canonical_headers = "".join(f"{n}:{lowered[n].strip()}\n" for n in names)
    canonical = "\n".join(
        [method, "/", canonical_query, canonical_headers, ";".join(names), lowered["x-acs-content-sha256"]]
    )
    return "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical.encode()).hexdigest()


def assert_request_id(response: httpx.Response, request_id: str) -> None:
    assert str(uuid.UUID(request_id)).upper() == request_id.upper()
    assert response.headers["x-acs-request-id"] == request_id


def gateway_error(response: httpx.Response, status: int, code: str, message: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == GATEWAY_KEYS, body
    assert body["Code"] == code, body
    if message is not None:
        assert body["Message"] == message, body
    assert_request_id(response, body["RequestId"])
    return body


def business_error(response: httpx.Response, code: str) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["Success"] is False, body
    assert body["Code"] == code, body
    assert body["ErrorMessage"]
    assert_request_id(response, body["RequestId"])
    return body


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json;charset=utf-8"
    body = response.json()
    assert body["Success"] is True, body
    assert_request_id(response, body["RequestId"])
    return body


# --- V1 signature -------------------------------------------------------------------------------
def test_v1_bad_signature_message_carries_the_reference_string_to_sign(server, gw_key):
    key_id, _secret = gw_key
    params = RawSigner(server.base_url, key_id, "not-the-secret").v1_params(
        "QueryProductList", {**PAGE, "Description": "a b*c~d/e+f", "Uni": "中文 ✓"}
    )
    body = gateway_error(send(server, params), 400, "SignatureDoesNotMatch")
    sts = reference_v1_sts("POST", params)
    assert body["Message"] == (
        "Specified signature is not matched with our calculation. server string to sign is:" + sts
    )
    assert body["Message"].split(":")[1] == sts  # what core compares


def test_v1_bad_signature_get_uses_the_get_method(server, gw_key):
    params = RawSigner(server.base_url, gw_key[0], "wrong").v1_params("QueryProductList", PAGE, "GET")
    body = gateway_error(send(server, params, "GET"), 400, "SignatureDoesNotMatch")
    assert body["Message"].split(":")[1] == reference_v1_sts("GET", params)


def test_v1_signature_for_another_method_is_refused(server, signer):
    params = signer.v1_params("QueryProductList", PAGE, "GET")
    gateway_error(send(server, params, "POST"), 400, "SignatureDoesNotMatch")


def test_v1_tampered_parameter_is_refused(server, signer):
    params = signer.v1_params("QueryProductList", PAGE)
    params["PageSize"] = "11"
    body = gateway_error(send(server, params), 400, "SignatureDoesNotMatch")
    assert "%26PageSize%3D11%26" in body["Message"]


def test_core_sdk_reports_a_wrong_secret_as_invalid_access_key_secret(server, gw_key):
    request = QueryProductListRequest()
    request.set_CurrentPage(1)
    request.set_PageSize(10)
    with pytest.raises(ServerException) as info:
        legacy_call(legacy_client(gw_key[0], "not-the-secret"), server.endpoint, request)
    assert info.value.get_http_status() == 400
    assert info.value.get_error_code() == "InvalidAccessKeySecret"
    # ... and the right secret works through the same path.
    good = QueryProductListRequest()
    good.set_CurrentPage(1)
    good.set_PageSize(10)
    assert legacy_call(legacy_client(*gw_key), server.endpoint, good)["Success"] is True


def test_v1_space_as_plus_or_percent20_is_the_same_value(server, signer):
    for quote_via in (quote, None):
        params = signer.v1_params("QueryProductList", {**PAGE, "ResourceGroupId": "a b"})
        encoded = urlencode(params, quote_via=quote_via) if quote_via else urlencode(params)
        assert ("%20" in encoded) == (quote_via is quote)
        ok(httpx.post(f"{server.base_url}/?{encoded}", timeout=30))


def test_v1_empty_signature_type_is_signed(server, signer):
    ok(send(server, signer.v1_params("QueryProductList", {**PAGE, "SignatureType": "", "RegionId": "cn-shanghai"})))


def test_v1_params_in_a_form_body_are_signed_and_used(server, signer):
    name = "form_" + uuid.uuid4().hex[:8]
    business = {"ProductName": name, "NodeType": "1", "Description": "from a form body"}
    signed = signer.v1_params("CreateProduct", business)
    query = {k: v for k, v in signed.items() if k not in business}
    body = qs(business).encode()
    created = ok(send(server, query, body=body, headers={"content-type": FORM}))
    assert created["Data"]["ProductName"] == name
    assert created["Data"]["NodeType"] == 1
    # A body that is not a form is not read as parameters: the signature no longer covers them.
    signed = signer.v1_params("CreateProduct", {**business, "ProductName": name + "x"})
    query = {k: v for k, v in signed.items() if k not in business}
    gateway_error(send(server, query, body=qs({**business, "ProductName": name + "x"}).encode(),
                       headers={"content-type": "text/plain"}), 400, "SignatureDoesNotMatch")


def test_v1_every_parameter_in_a_form_body(server, signer):
    """Action, Version and the signature's own parameters too: a signed request posted as a
    form, with nothing in the query string."""
    name = "form_" + uuid.uuid4().hex[:8]
    signed = signer.v1_params("CreateProduct", {"ProductName": name, "NodeType": "0"})
    created = ok(send(server, {}, body=qs(signed).encode(), headers={"content-type": FORM}))
    assert created["Data"]["ProductName"] == name
    queried = send(server, {}, body=qs(signer.v1_params("QueryProduct", {"ProductKey": created["ProductKey"],
                                                                        "Format": "XML"})).encode(),
                   headers={"content-type": FORM})
    assert queried.status_code == 200
    assert queried.text.lstrip().startswith("<?xml") and "<QueryProductResponse>" in queried.text


# --- V3 signature -------------------------------------------------------------------------------
def test_v3_bad_signature(server, signer):
    headers = signer.v3_headers("QueryProductList", PAGE)
    response = signer.v3("QueryProductList", PAGE, headers=headers, secret="not-the-secret")
    body = gateway_error(response, 400, "SignatureDoesNotMatch")
    assert "server StringToSign is [" in body["Message"]
    sts = reference_v3_sts("POST", PAGE, headers)
    assert body["Message"] == (
        "Specified signature does not match our calculation. server StringToSign is ["
        + sts.replace("\n", " ") + "]"
    )


def test_v3_tampered_query_is_refused(server, signer):
    headers = signer.v3_headers("QueryProductList", PAGE)
    request = SimpleNamespace(method="POST", pathname="/", query=dict(PAGE), headers=dict(headers))
    authorization = OpenApiUtil.get_authorization(
        request, "ACS3-HMAC-SHA256", headers["x-acs-content-sha256"], signer.access_key_id, signer.secret
    )
    response = httpx.post(f"{server.base_url}/?{qs({**PAGE, 'PageSize': '11'})}",
                          headers={**headers, "Authorization": authorization}, timeout=30)
    gateway_error(response, 400, "SignatureDoesNotMatch")
    response = httpx.post(f"{server.base_url}/?{qs(PAGE)}",
                          headers={**headers, "Authorization": authorization}, timeout=30)
    ok(response)


def test_v3_content_sha256_not_matching_the_body(server, signer):
    wrong = hashlib.sha256(b"something else").hexdigest()
    headers = signer.v3_headers("QueryProductList", PAGE, **{"x-acs-content-sha256": wrong})
    gateway_error(signer.v3("QueryProductList", PAGE, headers=headers), 400, "InvalidParameter.ContentSha256")
    # A body sent under the empty-body hash.
    body = qs(PAGE).encode()
    headers = signer.v3_headers("QueryProductList", {}, b"", **{"content-type": FORM})
    gateway_error(signer.v3("QueryProductList", {}, body=body, headers=headers), 400,
                  "InvalidParameter.ContentSha256")


def test_v3_form_body_with_signed_payload_hash(server, signer):
    name = "v3form_" + uuid.uuid4().hex[:8]
    body = qs({"ProductName": name, "NodeType": "0", "Description": "v3 form body"}).encode()
    headers = signer.v3_headers("CreateProduct", {}, body, **{"content-type": FORM})
    created = ok(signer.v3("CreateProduct", {}, body=body, headers=headers))
    assert created["Data"]["ProductName"] == name
    body = qs(PAGE).encode()
    headers = signer.v3_headers("QueryProductList", {}, body, **{"content-type": FORM})
    assert ok(signer.v3("QueryProductList", {}, body=body, headers=headers))["Data"]["PageSize"] == 10


def test_v3_malformed_authorization(server, signer):
    headers = signer.v3_headers("QueryProductList", PAGE)
    for authorization in ("ACS3-HMAC-SHA256", "ACS3-HMAC-SHA256 Credential=x",
                          "ACS3-HMAC-SM3 Credential=x,SignedHeaders=host,Signature=y"):
        response = httpx.post(f"{server.base_url}/?{qs(PAGE)}",
                              headers={**headers, "Authorization": authorization}, timeout=30)
        gateway_error(response, 400, "IncompleteSignature")


def test_v3_nonce_and_date_must_be_signed(server, signer):
    headers = signer.v3_headers("QueryProductList", PAGE)
    authorization = (f"ACS3-HMAC-SHA256 Credential={signer.access_key_id},"
                     f"SignedHeaders=host;x-acs-action,Signature=00")
    response = httpx.post(f"{server.base_url}/?{qs(PAGE)}",
                          headers={**headers, "Authorization": authorization}, timeout=30)
    gateway_error(response, 400, "IncompleteSignature")


# --- keys, nonces, clock ------------------------------------------------------------------------
def test_unknown_access_key_v1(server):
    response = RawSigner(server.base_url, "LTAI" + uuid.uuid4().hex[:20], "x").v1("QueryProductList", PAGE)
    gateway_error(response, 404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")


def test_unknown_access_key_v3(server):
    response = RawSigner(server.base_url, "LTAI" + uuid.uuid4().hex[:20], "x").v3("QueryProductList", PAGE)
    gateway_error(response, 404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")


NONCE_USED = "Specified signature nonce was used already."


def test_replayed_nonce_v1(server, signer):
    params = signer.v1_params("QueryProductList", PAGE)
    ok(send(server, params))
    gateway_error(send(server, params), 400, "SignatureNonceUsed", NONCE_USED)
    gateway_error(send(server, params), 400, "SignatureNonceUsed", NONCE_USED)


def test_replayed_nonce_v1_with_a_fresh_signature(server, signer):
    nonce = uuid.uuid4().hex
    ok(send(server, signer.v1_params("QueryProductList", PAGE, SignatureNonce=nonce)))
    again = signer.v1_params("QueryProductList", {**PAGE, "PageSize": "20"}, SignatureNonce=nonce)
    gateway_error(send(server, again), 400, "SignatureNonceUsed", NONCE_USED)


def test_replayed_nonce_v3(server, signer):
    headers = signer.v3_headers("QueryProductList", PAGE)
    ok(signer.v3("QueryProductList", PAGE, headers=headers))
    gateway_error(signer.v3("QueryProductList", PAGE, headers=headers), 400, "SignatureNonceUsed", NONCE_USED)


def raw_request(server, target: str, headers: list[tuple[str, str]], body: bytes = b"",
                close_early: bool = False) -> tuple[int, dict] | None:
    """A request written on a socket as given: repeated headers, values with trailing blanks
    (an HTTP client would merge or trim them). close_early: the body is cut short, no answer."""
    head = [f"POST {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
    declared = len(body) * 2 if close_early else len(body)
    head += [f"Content-Length: {declared}", "Connection: close", "", ""]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall("\r\n".join(head).encode("latin-1") + body)
        if close_early:
            return None
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def v3_signed(signer: RawSigner, action: str, query: dict) -> list[tuple[str, str]]:
    headers = signer.v3_headers(action, query)
    request = SimpleNamespace(method="POST", pathname="/", query=dict(query), headers=dict(headers))
    authorization = OpenApiUtil.get_authorization(request, "ACS3-HMAC-SHA256", headers["x-acs-content-sha256"],
                                                  signer.access_key_id, signer.secret)
    return [*headers.items(), ("Authorization", authorization)]


@pytest.mark.parametrize("blank", [" ", "  ", "\t", "\xa0"])
def test_a_v3_nonce_with_blanks_around_it_is_the_same_nonce(server, signer, blank):
    """The signature trims header values, so `nonce ` signs as `nonce`: recorded untrimmed, each
    blank made it a fresh nonce, and one captured request could be replayed again and again."""
    headers = v3_signed(signer, "QueryProductList", PAGE)
    status, body = raw_request(server, f"/?{qs(PAGE)}", headers)
    assert (status, body.get("Success")) == (200, True), body
    padded = [(name, value + blank if name == "x-acs-signature-nonce" else value) for name, value in headers]
    status, body = raw_request(server, f"/?{qs(PAGE)}", padded)
    assert (status, body["Code"]) == (400, "SignatureNonceUsed"), body


def test_a_repeated_action_header_is_refused(server, signer):
    """The signature was checked on the last x-acs-action and the first one was run: a signed
    QueryProduct with `x-acs-action: DeleteProduct` put in front deleted the product."""
    product_key = signer.v1("CreateProduct", {"ProductName": f"dup_{uuid.uuid4().hex[:8]}",
                                              "NodeType": "0"}).json()["ProductKey"]
    query = {"ProductKey": product_key}
    headers = v3_signed(signer, "QueryProduct", query)
    status, body = raw_request(server, f"/?{qs(query)}", [("x-acs-action", "DeleteProduct"), *headers])
    assert (status, body["Code"]) == (400, "InvalidParameter"), body
    assert "x-acs-action" in body["Message"]
    assert signer.v1("QueryProduct", query).json()["Success"]  # still there


def test_every_x_acs_header_must_be_signed(server, signer):
    headers = signer.v3_headers("QueryProductList", PAGE)
    authorization = (f"ACS3-HMAC-SHA256 Credential={signer.access_key_id},"
                     f"SignedHeaders=host;x-acs-date;x-acs-signature-nonce,Signature=00")
    response = httpx.post(f"{server.base_url}/?{qs(PAGE)}", headers={**headers, "Authorization": authorization},
                          timeout=30)
    body = gateway_error(response, 400, "IncompleteSignature")
    assert "must be signed" in body["Message"]


def test_a_client_gone_mid_body_is_not_a_server_error(server, signer):
    params = signer.v1_params("QueryProductList", PAGE)
    raw_request(server, "/", [("Content-Type", "application/x-www-form-urlencoded")],
                body=qs(params).encode(), close_early=True)
    time.sleep(0.5)
    assert "ClientDisconnect" not in server.logs() and "failed unexpectedly" not in server.logs()


@pytest.mark.parametrize("backend", BACKENDS)  # the nonce file, and the database's nonce table
def test_a_request_dated_ahead_keeps_its_nonce_until_its_own_window_ends(make_server, backend):
    """The clock check lets a request dated ahead of the server through until its own time plus
    the window; its nonce was kept only for the window from its arrival, so in between it could
    be sent again (V1 and V3)."""
    window_s = 4
    fast = make_server(backend, "--rate-limit", "0", env={"OTAPLANE_SIGNATURE_WINDOW_SECONDS": str(window_s)})
    signer = RawSigner(fast.base_url, *fast.create_key("clock-ahead"))
    ahead = (datetime.now(timezone.utc) + timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    params = signer.v1_params("QueryProductList", PAGE, Timestamp=ahead)
    v3_headers = [(name, ahead if name == "x-acs-date" else value) for name, value in
                  signer.v3_headers("QueryProductList", PAGE).items()]
    request = SimpleNamespace(method="POST", pathname="/", query=dict(PAGE), headers=dict(v3_headers))
    v3_headers.append(("Authorization", OpenApiUtil.get_authorization(
        request, "ACS3-HMAC-SHA256", dict(v3_headers)["x-acs-content-sha256"], signer.access_key_id, signer.secret)))
    ok(send(fast, params))
    assert raw_request(fast, f"/?{qs(PAGE)}", v3_headers)[0] == 200
    time.sleep(window_s + 1)  # the window from arrival is over; the request's own is not
    gateway_error(send(fast, params), 400, "SignatureNonceUsed", NONCE_USED)
    status, body = raw_request(fast, f"/?{qs(PAGE)}", v3_headers)
    assert (status, body["Code"]) == (400, "SignatureNonceUsed"), body


@pytest.mark.parametrize("request_bytes", [
    b"GET /?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # past httptools' URL limit
    b"NOT AN HTTP REQUEST\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
])
def test_a_request_http_cannot_parse_gets_the_gateways_error_body(server, request_bytes):
    """uvicorn answered these in plain text; clients read a Code and a RequestId (found by an audit)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request_bytes)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)
    assert error["Code"] == "InvalidParameter" and error["RequestId"]


def test_nonces_are_per_access_key(server, signer, gw_key):
    other = RawSigner(server.base_url, *server.create_key("tests-gateway-nonce"))
    nonce = uuid.uuid4().hex
    ok(send(server, signer.v1_params("QueryProductList", PAGE, SignatureNonce=nonce)))
    ok(send(server, other.v1_params("QueryProductList", PAGE, SignatureNonce=nonce)))


def test_forged_request_does_not_burn_the_nonce(server, signer, gw_key):
    nonce = uuid.uuid4().hex
    forged = RawSigner(server.base_url, gw_key[0], "wrong").v1_params(
        "QueryProductList", PAGE, SignatureNonce=nonce
    )
    gateway_error(send(server, forged), 400, "SignatureDoesNotMatch")
    ok(send(server, signer.v1_params("QueryProductList", PAGE, SignatureNonce=nonce)))


EXPIRED = "Specified time stamp or date value is expired."


@pytest.mark.parametrize("minutes", [-20, 20])
def test_stale_timestamp_v1(server, signer, minutes):
    params = signer.v1_params("QueryProductList", PAGE, Timestamp=ts(timedelta(minutes=minutes)))
    gateway_error(send(server, params), 400, "InvalidTimeStamp.Expired", EXPIRED)


@pytest.mark.parametrize("minutes", [-20, 20])
def test_stale_date_v3(server, signer, minutes):
    headers = signer.v3_headers("QueryProductList", PAGE, **{"x-acs-date": ts(timedelta(minutes=minutes))})
    gateway_error(signer.v3("QueryProductList", PAGE, headers=headers), 400, "InvalidTimeStamp.Expired", EXPIRED)


@pytest.mark.parametrize("minutes", [-10, 10])
def test_timestamp_within_the_window(server, signer, minutes):
    ok(send(server, signer.v1_params("QueryProductList", PAGE, Timestamp=ts(timedelta(minutes=minutes)))))


def test_timestamp_with_milliseconds(server, signer):
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.123Z")
    ok(send(server, signer.v1_params("QueryProductList", PAGE, Timestamp=now)))


@pytest.mark.parametrize(
    "timestamp",
    [
        "yesterday",
        "2024-01-01 00:00:00",
        "2024-13-01T00:00:00Z",
        "2024-01-32T00:00:00Z",
        "2024-01-01T25:00:00Z",
        "1704067200",
        "Z",
        "ZZ",
        "T00:00:00Z",
        "2024-01-01T00:00:00+08:00Z",
        "９999-01-01T00:00:00Z",
    ],
)
def test_malformed_timestamp(server, signer, timestamp):
    body = gateway_error(send(server, signer.v1_params("QueryProductList", PAGE, Timestamp=timestamp)), 400,
                         "InvalidTimeStamp.Format")
    assert body["Message"] == "Specified time stamp or date value is not well formatted."


def test_timestamp_without_zone_is_malformed(server, signer):
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    gateway_error(send(server, signer.v1_params("QueryProductList", PAGE, Timestamp=now)), 400,
                  "InvalidTimeStamp.Format")


def test_malformed_date_v3(server, signer):
    headers = signer.v3_headers("QueryProductList", PAGE, **{"x-acs-date": "Mon, 01 Jan 2024 00:00:00 GMT"})
    gateway_error(signer.v3("QueryProductList", PAGE, headers=headers), 400, "InvalidTimeStamp.Format")


@pytest.mark.parametrize("name", ["AccessKeyId", "Signature", "SignatureNonce", "Timestamp"])
def test_missing_common_parameter(server, signer, name):
    params = signer.v1_params("QueryProductList", PAGE, **{name: None})
    if name == "Signature":
        params.pop("Signature")
    else:
        assert name not in params
    gateway_error(send(server, params), 400, f"Missing{name}", f"{name} is mandatory for this action.")


@pytest.mark.parametrize("name", ["AccessKeyId", "Signature", "SignatureNonce", "Timestamp"])
def test_empty_common_parameter_is_missing(server, signer, name):
    params = signer.v1_params("QueryProductList", PAGE, **{name: ""})
    if name == "Signature":
        params["Signature"] = ""
    gateway_error(send(server, params), 400, f"Missing{name}")


def test_unsupported_signature_method(server, signer):
    params = signer.v1_params("QueryProductList", PAGE, SignatureMethod="HMAC-SHA256")
    gateway_error(send(server, params), 400, "InvalidSignatureMethod")


def test_v3_missing_nonce(server, signer):
    headers = signer.v3_headers("QueryProductList", PAGE, **{"x-acs-signature-nonce": ""})
    gateway_error(signer.v3("QueryProductList", PAGE, headers=headers), 400, "MissingSignatureNonce")


# --- actions and parameters ---------------------------------------------------------------------
def test_missing_required_action_parameter(server, signer):
    gateway_error(signer.v1("QueryProduct"), 400, "MissingProductKey", "ProductKey is mandatory for this action.")
    gateway_error(signer.v3("QueryProduct"), 400, "MissingProductKey", "ProductKey is mandatory for this action.")
    gateway_error(signer.v1("QueryProduct", {"ProductKey": ""}), 400, "MissingProductKey")


def test_missing_paging_parameters(server, signer):
    gateway_error(signer.v1("QueryProductList", {"PageSize": "10"}), 400, "MissingCurrentPage")
    gateway_error(signer.v1("QueryProductList", {"CurrentPage": "1"}), 400, "MissingPageSize")


@pytest.mark.parametrize("page", [{"CurrentPage": "abc"}, {"CurrentPage": "0"}, {"PageSize": "201"},
                                  {"PageSize": "-1"}, {"PageSize": "1e3"}])
def test_bad_page_parameters_are_a_business_error(server, signer, page):
    body = business_error(signer.v1("QueryProductList", {**PAGE, **page}), "iot.common.InvalidPageParams")
    assert body["ErrorMessage"].startswith("The page parameters are invalid: ")
    business_error(signer.v3("QueryProductList", {**PAGE, **page}), "iot.common.InvalidPageParams")


@pytest.mark.parametrize("token", ["0", "x", "1000001", "922337203685477582", "\u00b2"])
def test_a_next_token_this_server_never_issued_is_refused(server, signer, token):
    """QueryDevice's NextToken is a page number held to CurrentPage's bounds (found by the fuzz:
    a huge one overflowed PostgreSQL's OFFSET, a 500; '²' passed str.isdigit() and failed int())."""
    created = signer.v1("CreateProduct", {"ProductName": f"tok_{uuid.uuid4().hex[:8]}", "NodeType": "0"}).json()
    query = {"ProductKey": created["ProductKey"], "NextToken": token}
    body = gateway_error(signer.v1("QueryDevice", query), 400, "InvalidParameter")
    assert body["Message"].startswith("The specified parameter NextToken is not valid: ")
    assert signer.v1("QueryDevice", {**query, "NextToken": "1000000"}).json()["Success"]  # the last page allowed


@pytest.mark.parametrize("node_type", ["7", "-1", "x", "1.0", "99999999999999999999"])
def test_invalid_parameter(server, signer, node_type):
    body = gateway_error(signer.v1("CreateProduct", {"ProductName": "valid_name", "NodeType": node_type}), 400,
                         "InvalidParameter")
    assert body["Message"].startswith("The specified parameter NodeType is not valid: ")


def test_invalid_product_name_is_a_business_error(server, signer):
    for name in ("abc", "a" * 31, "bad-name", "名字名字"):
        business_error(signer.v1("CreateProduct", {"ProductName": name, "NodeType": "0"}),
                       "iot.prod.InvalidFormattedProductName")


def test_booleans_any_case(server, signer):
    for value in ("True", "FALSE", "true"):
        name = "bool_" + uuid.uuid4().hex[:8]
        ok(signer.v1("CreateProduct", {"ProductName": name, "NodeType": "0", "PublishAuto": value, "Id2": value}))
        ok(signer.v3("CreateProduct", {"ProductName": name + "v3", "NodeType": "0", "PublishAuto": value}))


def test_unknown_action(server, signer):
    message = "Specified api is not found, please check your url and method."
    gateway_error(signer.v1("NoSuchAction"), 404, "InvalidAction.NotFound", message)
    gateway_error(signer.v3("NoSuchAction"), 404, "InvalidAction.NotFound", message)
    gateway_error(signer.v1("queryproductlist", PAGE), 404, "InvalidAction.NotFound")


def test_invalid_version(server, signer):
    message = "Specified parameter Version is not valid."
    gateway_error(signer.v1("QueryProductList", PAGE, Version="2017-01-01"), 400, "InvalidVersion", message)
    headers = signer.v3_headers("QueryProductList", PAGE, **{"x-acs-version": "2017-01-01"})
    gateway_error(signer.v3("QueryProductList", PAGE, headers=headers), 400, "InvalidVersion", message)


def test_missing_action(server, signer, http):
    gateway_error(send(server, signer.v1_params("QueryProductList", PAGE, Action=None)), 400, "MissingAction",
                  "Action is mandatory for this action.")
    gateway_error(http.post(f"{server.base_url}/"), 400, "MissingAction")
    gateway_error(http.get(f"{server.base_url}/"), 400, "MissingAction")


def test_missing_version(server, signer):
    gateway_error(send(server, signer.v1_params("QueryProductList", PAGE, Version=None)), 400, "MissingVersion")


def test_a_v1_action_comes_from_its_signed_parameters_only(server, signer):
    """The Tea SDK's V3 sends Action only as a (signed) header; V1 signs its parameters only, so
    an action from a V1 request's header could be changed by anyone on the way. Every V1 client
    sends it as a parameter (the headers too, which then do not count)."""
    params = signer.v1_params("QueryProductList", PAGE, Action=None, Version=None)
    gateway_error(send(server, params, headers={"x-acs-action": "QueryProductList", "x-acs-version": API_VERSION}),
                  400, "MissingAction")
    signed = signer.v1_params("QueryProductList", PAGE)
    ok(send(server, signed, headers={"x-acs-action": "DeleteProduct"}))  # the parameter decides


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_http_methods_get_an_error_body(server, signer, method):
    params = signer.v1_params("QueryProductList", PAGE, method)
    body = gateway_error(send(server, params, method), 400, "UnsupportedHTTPMethod")
    assert body["Message"] == "This http method is not supported."


def test_options_and_head_are_not_server_errors(server, signer, http):
    for method in ("OPTIONS", "HEAD"):
        response = http.request(method, f"{server.base_url}/?{qs(signer.v1_params('QueryProductList', PAGE))}")
        assert 400 <= response.status_code < 500, (method, response.status_code)
        assert_request_id(response, response.headers["x-acs-request-id"])


def test_get_works_like_post(server, signer):
    assert ok(signer.v1("QueryProductList", PAGE, method="GET"))["Data"]["CurrentPage"] == 1
    assert ok(signer.v3("QueryProductList", PAGE, method="GET"))["Data"]["CurrentPage"] == 1


# --- XML ----------------------------------------------------------------------------------------
def test_xml_success(server, signer):
    response = signer.v1("QueryProductList", PAGE, Format="XML")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    root = ET.fromstring(response.content)
    assert root.tag == "QueryProductListResponse"
    assert root.findtext("Success") == "true"
    request_id = root.findtext("RequestId")
    assert_request_id(response, request_id)
    assert root.find("Data/CurrentPage").text == "1"
    assert root.find("Data/PageSize").text == "10"


def test_xml_format_is_case_insensitive(server, signer):
    response = signer.v1("QueryProductList", PAGE, Format="xml")
    assert ET.fromstring(response.content).tag == "QueryProductListResponse"


def test_xml_success_with_data(server, signer):
    name = "xml_" + uuid.uuid4().hex[:8]
    response = signer.v1("CreateProduct", {"ProductName": name, "NodeType": "0",
                                           "Description": "<b>&amp; 'quotes' \"too\"</b>"}, Format="XML")
    assert response.status_code == 200, response.text
    root = ET.fromstring(response.content)
    assert root.tag == "CreateProductResponse"
    assert root.findtext("Success") == "true"
    assert root.findtext("Data/ProductName") == name
    assert root.findtext("Data/Description") == "<b>&amp; 'quotes' \"too\"</b>"
    assert root.findtext("ProductKey") == root.findtext("Data/ProductKey")


def test_xml_gateway_error(server, signer):
    response = signer.v1("NoSuchAction", Format="XML")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/xml")
    root = ET.fromstring(response.content)
    assert root.tag == "Error"
    assert root.findtext("Code") == "InvalidAction.NotFound"
    assert root.findtext("Message")
    assert_request_id(response, root.findtext("RequestId"))

    response = RawSigner(server.base_url, signer.access_key_id, "wrong").v1("QueryProductList", PAGE, Format="XML")
    assert response.status_code == 400
    root = ET.fromstring(response.content)
    assert (root.tag, root.findtext("Code")) == ("Error", "SignatureDoesNotMatch")


def test_xml_business_error(server, signer):
    response = signer.v1("QueryProductList", {**PAGE, "CurrentPage": "abc"}, Format="XML")
    assert response.status_code == 200
    root = ET.fromstring(response.content)
    assert root.tag == "QueryProductListResponse"
    assert root.findtext("Success") == "false"
    assert root.findtext("Code") == "iot.common.InvalidPageParams"
    assert_request_id(response, root.findtext("RequestId"))


# --- request ids --------------------------------------------------------------------------------
def test_every_response_has_a_request_id(server, signer, http):
    responses = [
        signer.v1("QueryProductList", PAGE),
        signer.v3("QueryProductList", PAGE),
        signer.v1("QueryProductList", {**PAGE, "CurrentPage": "x"}),
        signer.v1("NoSuchAction"),
        signer.v1("QueryProduct"),
        http.post(f"{server.base_url}/"),
        http.put(f"{server.base_url}/"),
    ]
    ids = set()
    for response in responses:
        body = response.json()
        assert_request_id(response, body["RequestId"])
        ids.add(body["RequestId"])
    assert len(ids) == len(responses)


# --- size limits --------------------------------------------------------------------------------
def test_five_megabyte_body_is_refused(server, signer):
    big = b"Description=" + b"a" * (5 * 1024 * 1024)
    params = signer.v1_params("QueryProductList", PAGE)
    response = send(server, params, body=big, headers={"content-type": FORM})
    body = gateway_error(response, 400, "InvalidParameter")
    assert "Body" in body["Message"]


def test_five_megabyte_chunked_body_is_refused(server, signer):
    def chunks():
        for _ in range(5):
            yield b"a" * (1024 * 1024)

    params = signer.v1_params("QueryProductList", PAGE)
    response = httpx.post(f"{server.base_url}/?{qs(params)}", content=chunks(),
                          headers={"content-type": "application/octet-stream"}, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    assert_request_id(response, response.json()["RequestId"])


def test_body_just_under_the_limit_is_read(server, signer):
    business = {**PAGE, "ResourceGroupId": "g"}
    signed = signer.v1_params("QueryProductList", business)
    query = {k: v for k, v in signed.items() if k not in business}
    body = (qs(business) + "&Pad=" + "a" * (3 * 1024 * 1024)).encode()
    # Pad is in the body but not signed: the server must have read it to refuse the signature.
    gateway_error(send(server, query, body=body, headers={"content-type": FORM}), 400, "SignatureDoesNotMatch")


# --- garbage sweep ------------------------------------------------------------------------------
LONG = 100_000
# Non-ASCII 100k strings cost ~50 ms to sign on each side: only for a few parameters.
LONG_UNICODE = ["中" * LONG]
LONG_UNICODE_FOR = {"Description", "CurrentPage", "ProductKey"}
GARBAGE_VALUES: list[str] = [
    "",
    " ",
    "  padded  ",
    "a" * LONG,
    "0" * LONG,
    "%" * LONG,
    "中文",
    "😀" * 300,
    "\u202eRTL",
    "\ufeffBOM",
    "\ufffd",
    "\x00",
    "a\x00b",
    "\x01\x02\x1f\x7f",
    "\r\n",
    "\t",
    "%",
    "%zz",
    "%00",
    "%%%",
    "%E4%B8",
    "+",
    "&=&=",
    "-1",
    "0",
    "1e3",
    "99999999999999999999",
    "-9223372036854775809",
    "true",
    "null",
    "<x>&amp;</x>",
    "'; DROP TABLE products; --",
    "../../etc/passwd",
    '{"a":1}',
    "\\",
]

SWEEP = [
    ("CreateProduct", {"ProductName": "$name", "NodeType": "0"},
     ["ProductName", "NodeType", "Description", "AliyunCommodityCode", "DataFormat", "AuthType", "NetType",
      "ProtocolType", "CategoryKey", "Id2", "ValidateType", "PublishAuto", "IotInstanceId"]),
    ("QueryProductList", PAGE, ["CurrentPage", "PageSize", "AliyunCommodityCode", "ResourceGroupId",
                                "IotInstanceId"]),
    ("QueryProduct", {"ProductKey": "a1xxxxxxxxx"}, ["ProductKey"]),
    ("QueryProductList", PAGE, ["Action", "Version", "Format", "SignatureNonce", "Timestamp",
                                "SignatureMethod", "SignatureVersion", "RegionId", "SignatureType",
                                "AccessKeyId"]),
]


def _sane(response: httpx.Response, what: str) -> dict:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    assert response.headers["content-type"].startswith("application/json"), f"{what}: {response.text[:300]}"
    body = response.json()
    assert body["RequestId"], what
    assert response.headers["x-acs-request-id"] == body["RequestId"], what
    return body


def _base(params: dict[str, str]) -> dict[str, str]:
    return {k: ("p_" + uuid.uuid4().hex[:10] if v == "$name" else v) for k, v in params.items()}


@pytest.mark.parametrize(
    "action, base, name",
    [(action, base, name) for action, base, names in SWEEP for name in names],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_garbage_values_never_break_the_server(server, signer, http, action, base, name):
    for value in GARBAGE_VALUES + (LONG_UNICODE if name in LONG_UNICODE_FOR else []):
        params = {**_base(base), name: value}
        signed = signer.v1_params(action, params)
        what = f"{action} {name}={value[:20]!r}"
        if len(value) > 1000:
            # Too long for a URL: everything but the common parameters goes in a form body.
            common = {"Action", "Version", "Format", "AccessKeyId", "Signature", "SignatureNonce",
                      "SignatureMethod", "SignatureVersion", "Timestamp"} - {name}
            query = {k: v for k, v in signed.items() if k in common}
            rest = {k: v for k, v in signed.items() if k not in common}
            response = http.post(f"{server.base_url}/?{qs(query)}", content=qs(rest).encode(),
                                 headers={"content-type": FORM})
        else:
            response = http.post(f"{server.base_url}/?{qs(signed)}")
        body = _sane(response, what)
        if name in ("CurrentPage", "PageSize", "NodeType", "ProductName") and value in ("", "\x00", "%"):
            assert body.get("Success") is not True, what


@pytest.mark.parametrize(
    "action, params, name",
    [("CreateProduct", {"ProductName": "$name", "NodeType": "0"}, "Description"),
     ("CreateProduct", {"ProductName": "$name", "NodeType": "0"}, "ProductName"),
     ("QueryProductList", PAGE, "CurrentPage"),
     ("QueryProduct", {"ProductKey": "a1xxxxxxxxx"}, "ProductKey"),
     ("QueryProductList", PAGE, "SignatureNonce")],
)
def test_nul_is_an_invalid_parameter_on_every_backend(server, signer, action, params, name):
    for value in ("\x00", "a\x00b", "abc\x00"):
        response = send(server, signer.v1_params(action, {**_base(params), name: value}))
        body = gateway_error(response, 400, "InvalidParameter")
        assert body["Message"] == f"The specified parameter {name} is not valid: must not contain NUL characters"


def test_overlong_nonce_is_an_invalid_parameter(server, signer):
    ok(send(server, signer.v1_params("QueryProductList", PAGE, SignatureNonce="n" * 128)))
    body = gateway_error(send(server, signer.v1_params("QueryProductList", PAGE, SignatureNonce="n" * 129)), 400,
                         "InvalidParameter")
    assert "SignatureNonce" in body["Message"]
    headers = signer.v3_headers("QueryProductList", PAGE, **{"x-acs-signature-nonce": "n" * 129})
    gateway_error(signer.v3("QueryProductList", PAGE, headers=headers), 400, "InvalidParameter")


XML_GARBAGE = ["", " ", "中文😀", "\x01\x02\x1f", "\x0b\x0c", "\ufffe\uffff", "\x7f\x80\x9f", "<x>&amp;]]>",
               "\n\t", "\ud7ff\ue000", "a" * 5000]


def test_xml_stays_well_formed_whatever_the_values(server, signer, http):
    for value in XML_GARBAGE:
        name = "xml_" + uuid.uuid4().hex[:8]
        for action, params in (
            ("CreateProduct", {"ProductName": name, "NodeType": "0", "Description": value[:100]}),
            ("CreateProduct", {"ProductName": name + "c", "NodeType": "0", "CategoryKey": value[:64]}),
            ("CreateProduct", {"ProductName": value, "NodeType": "0"}),
            ("QueryProductList", {**PAGE, "CurrentPage": value}),
            ("QueryProduct", {"ProductKey": value}),
            ("NoSuchAction" + value[:10], {}),
        ):
            signed = signer.v1_params(action, params, Format="XML")
            response = http.post(f"{server.base_url}/?{qs(signed)}")
            what = f"{action} {value[:20]!r}"
            assert response.status_code < 500, (what, response.text)
            root = ET.fromstring(response.content)  # well-formed
            assert root.findtext("RequestId") == response.headers["x-acs-request-id"], what
            if "Description" in params and root.findtext("Success") == "true":
                # Same length: characters XML cannot carry are replaced, not dropped.
                assert len(root.findtext("Data/Description") or "") == len(params["Description"]), what


def test_garbage_keys_never_break_the_server(server, signer, http):
    keys = ["CurrentPage.0", "CurrentPage.-1", "CurrentPage.999999999", "PageSize.1", "PageSize.1.Key",
            "X.0", "X.-1", "X.999999999", "X.1.", "X..1", "", " ", "中文", "\x00", "a" * 1000, "%", "Tag.1.Key",
            "Signature.1", "Action.1"]
    for key in keys:
        signed = signer.v1_params("QueryProductList", {**PAGE, key: "v"})
        body = _sane(http.post(f"{server.base_url}/?{qs(signed)}"), repr(key[:20]))
        if "\x00" in key:
            assert body["Code"] == "InvalidParameter", body
        else:
            assert body.get("Success") is True, (key, body)


def test_repeated_keys_never_break_the_server(server, signer, http):
    for name in ("CurrentPage", "PageSize", "Action", "SignatureNonce", "Signature", "AccessKeyId"):
        signed = signer.v1_params("QueryProductList", PAGE)
        pairs = list(signed.items())
        pairs.insert(0, (name, "1" if name in PAGE else "other"))
        _sane(http.post(f"{server.base_url}/?{urlencode(pairs, quote_via=quote)}"), name)
    # Same key in the query and in the form body.
    signed = signer.v1_params("QueryProductList", PAGE)
    _sane(http.post(f"{server.base_url}/?{qs(signed)}", content=b"CurrentPage=2&CurrentPage=x",
                    headers={"content-type": FORM}), "query+body")


def test_undecodable_bytes_never_break_the_server(server, signer, http):
    for raw in ("%FF", "%C3", "%ED%A0%80", "%C0%AF", "%FF%FE"):
        # The server decodes invalid UTF-8 to U+FFFD; sign what it will see.
        decoded = bytes.fromhex(raw.replace("%", "")).decode("utf-8", "replace")
        signed = signer.v1_params("QueryProductList", {**PAGE, "ResourceGroupId": decoded})
        query = qs({k: v for k, v in signed.items() if k != "ResourceGroupId"})
        body = _sane(http.post(f"{server.base_url}/?{query}&ResourceGroupId={raw}"), raw)
        assert body.get("Success") is True, (raw, body)
        body = _sane(http.post(f"{server.base_url}/?{qs(signed)}", content=f"X={raw}".encode() + b"\xff\xfe",
                               headers={"content-type": FORM}), raw)


def test_garbage_v3_headers_never_break_the_server(server, signer, http):
    for name in ("x-acs-date", "x-acs-signature-nonce", "x-acs-action", "x-acs-version", "host"):
        for value in ("", " ", "a" * 4000, "%00", "\t"):
            headers = signer.v3_headers("QueryProductList", PAGE, **{name: value})
            try:
                response = signer.v3("QueryProductList", PAGE, headers=headers)
            except httpx.LocalProtocolError:
                continue  # httpx refuses to send it at all
            _sane(response, f"{name}={value[:20]!r}")
    for authorization in (
        "ACS3-",
        "ACS3-HMAC-SHA256 " + "," * 1000,
        "ACS3-HMAC-SHA256 Credential=,SignedHeaders=,Signature=",
        "ACS3-HMAC-SHA256 Credential=" + "a" * 4000 + ",SignedHeaders=host;x-acs-date;x-acs-signature-nonce,Signature=x",
    ):
        headers = signer.v3_headers("QueryProductList", PAGE)
        response = http.post(f"{server.base_url}/?{qs(PAGE)}", headers={**headers, "Authorization": authorization})
        _sane(response, authorization[:30])
        assert 400 <= response.status_code < 500, response.text


def test_server_still_healthy_after_the_sweep(server, signer):
    assert ok(signer.v1("QueryProductList", PAGE))["Data"]["PageSize"] == 10
