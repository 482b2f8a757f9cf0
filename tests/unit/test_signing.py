"""The published signature vectors (docs: openapi.md section 2) pinned on otaplane.openapi.signing."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from alibabacloud_openapi_util.client import Client as OpenApiUtil

from otaplane.openapi import signing

# --- V1: the official DescribeRegions vector -----------------------------------------------------
OFFICIAL_V1_PARAMS = {
    "AccessKeyId": "testid",
    "Action": "DescribeRegions",
    "Format": "XML",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
    "SignatureVersion": "1.0",
    "Timestamp": "2016-02-23T12:46:24Z",
    "Version": "2014-05-26",
}
OFFICIAL_V1_STS = (
    "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML"
    "%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"
    "%26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z%26Version%3D2014-05-26"
)
OFFICIAL_V1_SIGNATURE = "OLeaidS1JvxuMvnyHOwuJ+uX5qY="

# --- V1: the IoT vector (core's algorithm, empty SignatureType is signed) ------------------------
IOT_V1_PARAMS = {
    "AccessKeyId": "testAK",
    "Action": "QueryOTAFirmware",
    "FirmwareId": "fw1",
    "Format": "JSON",
    "RegionId": "cn-shanghai",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "0123456789abcdef0123456789abcdef",
    "SignatureType": "",
    "SignatureVersion": "1.0",
    "Timestamp": "2024-01-01T00:00:00Z",
    "Version": "2018-01-20",
}
IOT_V1_SIGNATURE = "bfmyyzn93NvtyCI+84ZdWAJeIA0="

# --- V3 vector ----------------------------------------------------------------------------------
V3_QUERY = [("FirmwareId", "fw1"), ("TargetDeviceName.1", "d 2*")]
V3_HEADERS = {
    "host": "127.0.0.1:8080",
    "x-acs-action": "QueryOTAFirmware",
    "x-acs-content-sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "x-acs-date": "2024-01-01T00:00:00Z",
    "x-acs-signature-nonce": "0123456789abcdef",
    "x-acs-version": "2018-01-20",
}
V3_SIGNED_HEADERS = sorted(V3_HEADERS)
V3_CANONICAL_QUERY = "FirmwareId=fw1&TargetDeviceName.1=d%202%2A"
V3_STS = "ACS3-HMAC-SHA256\n12c401325dfde14090856d953b58647e2f5e824b4e326dbb63a607912e392f0a"
V3_SIGNATURE = "e2916603f8c093d1e03bec7e48e3b4b2cb28ec6143f97ab73e6255090ccf1c8c"


def _v3_canonical_request(method: str = "POST", payload: str | None = None) -> str:
    return signing.v3_canonical_request(
        method, "/", V3_QUERY, V3_HEADERS, V3_SIGNED_HEADERS,
        payload if payload is not None else V3_HEADERS["x-acs-content-sha256"],
    )


# --- V1 -----------------------------------------------------------------------------------------
def test_v1_official_vector_string_to_sign():
    assert signing.v1_string_to_sign("GET", OFFICIAL_V1_PARAMS) == OFFICIAL_V1_STS


def test_v1_official_vector_signature():
    assert signing.v1_signature("testsecret", OFFICIAL_V1_STS) == OFFICIAL_V1_SIGNATURE


def test_v1_official_vector_ignores_the_signature_parameter():
    params = {**OFFICIAL_V1_PARAMS, "Signature": OFFICIAL_V1_SIGNATURE}
    assert signing.v1_string_to_sign("GET", params) == OFFICIAL_V1_STS


def test_v1_method_is_upper_cased():
    assert signing.v1_string_to_sign("get", OFFICIAL_V1_PARAMS) == OFFICIAL_V1_STS


def test_v1_iot_vector_signature():
    sts = signing.v1_string_to_sign("POST", IOT_V1_PARAMS)
    assert signing.v1_signature("testSecret", sts) == IOT_V1_SIGNATURE


def test_v1_iot_vector_signs_the_empty_signature_type():
    sts = signing.v1_string_to_sign("POST", IOT_V1_PARAMS)
    assert "%26SignatureType%3D%26" in sts
    without = {k: v for k, v in IOT_V1_PARAMS.items() if k != "SignatureType"}
    assert signing.v1_signature("testSecret", signing.v1_string_to_sign("POST", without)) != IOT_V1_SIGNATURE


def test_v1_iot_vector_depends_on_method_and_secret():
    sts_get = signing.v1_string_to_sign("GET", IOT_V1_PARAMS)
    assert sts_get.startswith("GET&%2F&")
    assert signing.v1_signature("testSecret", sts_get) != IOT_V1_SIGNATURE
    sts = signing.v1_string_to_sign("POST", IOT_V1_PARAMS)
    assert signing.v1_signature("testsecret", sts) != IOT_V1_SIGNATURE


@pytest.mark.parametrize(
    "params",
    [
        OFFICIAL_V1_PARAMS,
        IOT_V1_PARAMS,
        {**IOT_V1_PARAMS, "Description": "a b*c~d/e+f=g&h%i", "ProductName": "产品 ✓"},
        # Names whose order changes once encoded: '~' sorts after '%' but before 'é'.
        {**IOT_V1_PARAMS, "Xa~": "1", "Xa\u00e9": "2", "Xa b": "3", "Xa-": "4"},
    ],
)
def test_v1_matches_the_official_util(params):
    expected = OpenApiUtil.get_rpcsignature(dict(params), "POST", "testSecret")
    assert signing.v1_signature("testSecret", signing.v1_string_to_sign("POST", params)) == expected


# --- V3 -----------------------------------------------------------------------------------------
def test_v3_canonical_query():
    assert signing.canonical_query(V3_QUERY) == V3_CANONICAL_QUERY


def test_v3_canonical_query_is_sorted_whatever_the_input_order():
    assert signing.canonical_query(list(reversed(V3_QUERY))) == V3_CANONICAL_QUERY


def test_v3_canonical_request_layout():
    canonical = _v3_canonical_request()
    lines = canonical.split("\n")
    assert lines[0] == "POST"
    assert lines[1] == "/"
    assert lines[2] == V3_CANONICAL_QUERY
    assert lines[3:9] == [f"{name}:{V3_HEADERS[name]}" for name in V3_SIGNED_HEADERS]
    assert lines[9] == ""  # the canonical headers end with a newline
    assert lines[10] == ";".join(V3_SIGNED_HEADERS)
    assert lines[11] == V3_HEADERS["x-acs-content-sha256"]


def test_v3_string_to_sign():
    assert signing.v3_string_to_sign(_v3_canonical_request()) == V3_STS


def test_v3_signature():
    assert signing.v3_signature("testSecret", V3_STS) == V3_SIGNATURE


def test_v3_empty_path_means_root():
    canonical = signing.v3_canonical_request(
        "post", "", V3_QUERY, V3_HEADERS, V3_SIGNED_HEADERS, V3_HEADERS["x-acs-content-sha256"]
    )
    assert signing.v3_string_to_sign(canonical) == V3_STS


def test_v3_header_values_are_trimmed():
    padded = {**V3_HEADERS, "x-acs-action": "  QueryOTAFirmware\t"}
    canonical = signing.v3_canonical_request(
        "POST", "/", V3_QUERY, padded, V3_SIGNED_HEADERS, V3_HEADERS["x-acs-content-sha256"]
    )
    assert signing.v3_string_to_sign(canonical) == V3_STS


def test_v3_only_the_signed_headers_count():
    extra = {**V3_HEADERS, "user-agent": "something", "accept": "application/json"}
    canonical = signing.v3_canonical_request(
        "POST", "/", V3_QUERY, extra, V3_SIGNED_HEADERS, V3_HEADERS["x-acs-content-sha256"]
    )
    assert signing.v3_string_to_sign(canonical) == V3_STS


def test_v3_payload_hash_changes_the_signature():
    other = hashlib.sha256(b"x").hexdigest()
    assert signing.v3_string_to_sign(_v3_canonical_request(payload=other)) != V3_STS


def test_v3_empty_sha256_constant():
    assert signing.EMPTY_SHA256 == V3_HEADERS["x-acs-content-sha256"]


def test_v3_empty_value_gives_key_equals():
    assert signing.canonical_query([("B", ""), ("A", "1")]) == "A=1&B="


def test_v3_matches_the_official_util():
    request = SimpleNamespace(method="POST", pathname="/", query=dict(V3_QUERY), headers=dict(V3_HEADERS))
    authorization = OpenApiUtil.get_authorization(
        request, "ACS3-HMAC-SHA256", V3_HEADERS["x-acs-content-sha256"], "testAK", "testSecret"
    )
    assert authorization == (
        f"ACS3-HMAC-SHA256 Credential=testAK,SignedHeaders={';'.join(V3_SIGNED_HEADERS)},"
        f"Signature={V3_SIGNATURE}"
    )
    fields = signing.parse_v3_authorization(authorization)
    assert fields == {
        "Credential": "testAK",
        "SignedHeaders": ";".join(V3_SIGNED_HEADERS),
        "Signature": V3_SIGNATURE,
    }


# --- percent_encode -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, encoded",
    [
        ("", ""),
        ("abcXYZ019", "abcXYZ019"),
        ("-_.~", "-_.~"),
        (" ", "%20"),
        ("*", "%2A"),
        ("~", "~"),
        ("+", "%2B"),
        ("/", "%2F"),
        ("=", "%3D"),
        ("&", "%26"),
        ("%", "%25"),
        (":", "%3A"),
        ("!'()", "%21%27%28%29"),
        ("a b*c~", "a%20b%2Ac~"),
        ("é", "%C3%A9"),
        ("中", "%E4%B8%AD"),
        ("😀", "%F0%9F%98%80"),
        ("\x00", "%00"),
        ("\n", "%0A"),
    ],
)
def test_percent_encode(raw, encoded):
    assert signing.percent_encode(raw) == encoded


def test_percent_encode_agrees_with_core_for_every_ascii_character():
    # aliyun-python-sdk-core: urlencode (quote_plus), then '+'->%20, '*'->%2A, '%7E'->'~'.
    from urllib.parse import quote_plus

    for code in range(128):
        char = chr(code)
        core = quote_plus(char, safe="").replace("+", "%20").replace("*", "%2A").replace("%7E", "~")
        assert signing.percent_encode(char) == core, repr(char)


def test_canonical_query_encodes_names_too():
    assert signing.canonical_query([("a b", "c*d")]) == "a%20b=c%2Ad"


def test_canonical_query_sorts_by_name_before_encoding():
    # Reference: sort the pairs by name (byte order), then percent-encode. Once encoded,
    # "Xa%C3%A9" would sort before "Xa~", the raw order is the other way round.
    assert signing.canonical_query([("Xa\u00e9", "2"), ("Xa~", "1")]) == "Xa~=1&Xa%C3%A9=2"
    assert signing.canonical_query([("B", "1"), ("A.10", "x"), ("A.2", "y")]) == "A.10=x&A.2=y&B=1"


# --- parse_v3_authorization ---------------------------------------------------------------------
GOOD_AUTH = f"ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=host;x-acs-date,Signature={V3_SIGNATURE}"


@pytest.mark.parametrize(
    "value",
    [
        GOOD_AUTH,
        "  " + GOOD_AUTH + "  ",
        f"ACS3-HMAC-SHA256 Credential=AK1, SignedHeaders=host;x-acs-date, Signature={V3_SIGNATURE}",
        f"ACS3-HMAC-SHA256 Signature={V3_SIGNATURE},SignedHeaders=host;x-acs-date,Credential=AK1",
    ],
)
def test_parse_v3_authorization_good(value):
    assert signing.parse_v3_authorization(value) == {
        "Credential": "AK1",
        "SignedHeaders": "host;x-acs-date",
        "Signature": V3_SIGNATURE,
    }


def test_parse_v3_authorization_keeps_extra_fields_and_equals_in_values():
    fields = signing.parse_v3_authorization(
        "ACS3-HMAC-SHA256 Credential=a=b,SignedHeaders=host,Signature=s,Extra=1"
    )
    assert fields is not None
    assert fields["Credential"] == "a=b"
    assert fields["Extra"] == "1"


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "ACS3-HMAC-SHA256",
        "ACS3-HMAC-SHA256 ",
        "acs3-hmac-sha256 Credential=AK1,SignedHeaders=host,Signature=abc",
        "ACS3-HMAC-SM3 Credential=AK1,SignedHeaders=host,Signature=abc",
        "ACS3-RSA-SHA256 Credential=AK1,SignedHeaders=host,Signature=abc",
        "HMAC-SHA1 Credential=AK1,SignedHeaders=host,Signature=abc",
        "Bearer abc",
        "ACS3-HMAC-SHA256 Credential=AK1,SignedHeaders=host",
        "ACS3-HMAC-SHA256 Credential=AK1,Signature=abc",
        "ACS3-HMAC-SHA256 SignedHeaders=host,Signature=abc",
        "ACS3-HMAC-SHA256 Credential AK1,SignedHeaders host,Signature abc",
        "ACS3-HMAC-SHA256 credential=AK1,signedheaders=host,signature=abc",
        "ACS3-HMAC-SHA256 Credential=AK1;SignedHeaders=host;Signature=abc",
    ],
)
def test_parse_v3_authorization_bad(value):
    assert signing.parse_v3_authorization(value) is None


# --- signatures_equal ---------------------------------------------------------------------------
def test_signatures_equal():
    assert signing.signatures_equal(V3_SIGNATURE, V3_SIGNATURE)
    assert not signing.signatures_equal(V3_SIGNATURE, V3_SIGNATURE.upper())
    assert not signing.signatures_equal(V3_SIGNATURE, V3_SIGNATURE[:-1])
    assert not signing.signatures_equal("", V3_SIGNATURE)
    assert signing.signatures_equal("é", "é")


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [("A", "")],
        [("Timestamp", "2024-01-01T00:00:00Z"), ("Action", "QueryProduct"), ("Format", "JSON")],
        [("a=b", "c"), ("d", "e&f"), ("g", "h:i")],  # separators inside names and values
        [("k", "a=b&c=d"), ("x", "")],
        [("k", "v w"), ("t", "1:2")],
        [("é", "ü:"), ("k", "~-_.")],
    ],
)
def test_canonical_query_fast_path_agrees_with_encoding_each_side(pairs):
    expected = "&".join(f"{signing.percent_encode(k)}={signing.percent_encode(v)}" for k, v in sorted(pairs))
    assert signing.canonical_query(pairs) == expected


@pytest.mark.parametrize("digest", ["sha1", "sha256"])
def test_hmac_digest_agrees_with_the_standard_library(digest):
    import hmac
    import os

    for length in (0, 1, 30, 31, 63, 64, 65, 127, 128, 200):
        key = os.urandom(length)
        for message in (b"", b"GET&%2F&x", os.urandom(1000)):
            assert signing.hmac_digest(key, message, digest) == hmac.digest(key, message, digest)
            assert signing.hmac_digest(key, message, digest) == hmac.digest(key, message, digest)  # cached pads
