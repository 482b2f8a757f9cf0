"""OSS V1 PostObject policies and presigned URLs: the §8 vectors, refusals, and oss2 agreement."""

from __future__ import annotations

import base64
import json
import random
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from otaplane.blobs.oss_signing import (
    OssError,
    build_policy,
    check_policy,
    presigned_url,
    quote_key,
    sign_policy,
    verify_post,
    verify_presigned,
)
from otaplane.openapi.signing import percent_encode
from otaplane.timefmt import parse_utc_seconds

SECRET = "testSecret"
VECTOR_POLICY_JSON = (
    '{"expiration":"2024-01-01T00:01:00.000Z","conditions":'
    '[["content-length-range",0,1048576000],["eq","$key","ota/pk123/fw-abc.bin"]]}'
)
VECTOR_EXPIRES_MS = int(parse_utc_seconds("2024-01-01T00:01:00Z") * 1000)
BEFORE_EXPIRY = VECTOR_EXPIRES_MS / 1000 - 30


def encode(document: dict) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def refusal(call, *args, **kwargs) -> OssError:
    with pytest.raises(OssError) as info:
        call(*args, **kwargs)
    return info.value


# --- PostObject --------------------------------------------------------------------------------


def test_policy_signature_vector():
    policy = base64.b64encode(VECTOR_POLICY_JSON.encode()).decode()
    assert sign_policy(SECRET, policy) == "FMcGKJrSa3IIFvKpowbT+SKWAAs="


def test_build_policy_is_the_compact_documented_form():
    policy = build_policy("ota/pk123/fw-abc.bin", 1048576000, VECTOR_EXPIRES_MS)
    assert base64.b64decode(policy).decode() == VECTOR_POLICY_JSON
    assert policy.startswith("eyJleHBpcmF")
    assert sign_policy(SECRET, policy) == "FMcGKJrSa3IIFvKpowbT+SKWAAs="


def form(key: str = "ota/pk123/fw-abc.bin", policy: str | None = None, **extra: str) -> dict[str, str]:
    policy = policy or build_policy("ota/pk123/fw-abc.bin", 1000, VECTOR_EXPIRES_MS, min_bytes=10)
    fields = {"key": key, "policy": policy, "ossaccesskeyid": "id", "signature": sign_policy(SECRET, policy)}
    return {**fields, **extra}


def test_verify_post_accepts_a_good_form_and_returns_the_size_range():
    sizes = verify_post(SECRET, form(), BEFORE_EXPIRY, "b", "id")
    assert (sizes.min_bytes, sizes.max_bytes) == (10, 1000)


@pytest.mark.parametrize("missing", ["key", "policy", "ossaccesskeyid", "signature"])
def test_verify_post_missing_field(missing):
    fields = form()
    del fields[missing]
    error = refusal(verify_post, SECRET, fields, BEFORE_EXPIRY, "b", "id")
    assert (error.status, error.code) == (400, "InvalidArgument")
    assert missing in error.message


def test_verify_post_wrong_signature_and_access_key():
    error = refusal(verify_post, SECRET, form(signature="AAAA" + form()["signature"][4:]), BEFORE_EXPIRY, "b", "id")
    assert (error.status, error.code) == (403, "SignatureDoesNotMatch")
    error = refusal(verify_post, "otherSecret", form(), BEFORE_EXPIRY, "b", "id")
    assert error.code == "SignatureDoesNotMatch"
    error = refusal(verify_post, SECRET, form(), BEFORE_EXPIRY, "b", "other-id")
    assert (error.status, error.code) == (403, "InvalidAccessKeyId")


def test_verify_post_expired_policy():
    error = refusal(verify_post, SECRET, form(), VECTOR_EXPIRES_MS / 1000 + 1, "b", "id")
    assert (error.status, error.code, error.message) == (
        403,
        "AccessDenied",
        "Invalid according to Policy: Policy expired.",
    )


def test_verify_post_key_condition():
    error = refusal(verify_post, SECRET, form(key="ota/pk123/other.bin"), BEFORE_EXPIRY, "b", "id")
    assert (error.status, error.code) == (403, "AccessDenied")
    assert error.message == (
        'Invalid according to Policy: Policy Condition failed: ["eq", "$key", "ota/pk123/fw-abc.bin"]'
    )


def doc(*conditions) -> str:
    return encode({"expiration": "2024-01-01T00:01:00.000Z", "conditions": list(conditions)})


def test_conditions_starts_with_bucket_short_form_and_range_intersection():
    fields = {"key": "ota/x/fw.bin", "content-type": "application/zip"}
    policy = doc(
        ["starts-with", "$key", "ota/x/"],
        ["starts-with", "$Content-Type", ""],
        {"bucket": "otaplane"},
        ["eq", "$bucket", "otaplane"],
        ["content-length-range", 5, 100],
        ["content-length-range", 0, 50],
    )
    sizes = check_policy(policy, fields, BEFORE_EXPIRY, "otaplane")
    assert (sizes.min_bytes, sizes.max_bytes) == (5, 50)
    for bad in (["starts-with", "$key", "ota/y/"], {"bucket": "other"}, ["eq", "$x-oss-meta-a", "1"]):
        error = refusal(check_policy, doc(bad), fields, BEFORE_EXPIRY, "otaplane")
        assert (error.status, error.code) == (403, "AccessDenied")


def test_no_length_condition_means_the_oss_post_limit():
    sizes = check_policy(doc(["eq", "$key", "k"]), {"key": "k"}, BEFORE_EXPIRY, "b")
    assert (sizes.min_bytes, sizes.max_bytes) == (0, 5 * 1024**3)


@pytest.mark.parametrize(
    "condition",
    [
        ["in", "$key", ["a"]],
        ["not-eq", "$key", "k"],
        ["eq", "key", "k"],
        ["eq", "$key"],
        ["content-length-range", 10, 5],
        ["content-length-range", -1, 5],
        ["content-length-range", "0", "5"],
        {"key": "k", "bucket": "b"},
        "eq $key k",
        [],
    ],
)
def test_unknown_or_malformed_conditions_are_refused(condition):
    error = refusal(check_policy, doc(condition), {"key": "k"}, BEFORE_EXPIRY, "b")
    assert (error.status, error.code) == (400, "InvalidPolicyDocument")


@pytest.mark.parametrize(
    "policy",
    [
        "not base64!",
        base64.b64encode(b"not json").decode(),
        encode({"conditions": []}),
        encode({"expiration": "tomorrow", "conditions": []}),
        encode({"expiration": "2024-01-01T00:01:00.000Z", "conditions": {"key": "k"}}),
        base64.b64encode(b"[1, 2]").decode(),
    ],
)
def test_malformed_policies_are_refused(policy):
    error = refusal(check_policy, policy, {"key": "k"}, BEFORE_EXPIRY, "b")
    assert (error.status, error.code) == (400, "InvalidPolicyDocument")


# --- Presigned GET -----------------------------------------------------------------------------


def query_of(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def test_presigned_url_vector():
    host = "https://iotx-ota.oss-cn-shanghai.aliyuncs.com"
    url = presigned_url(host, "iotx-ota", "ota/abc/fw 1+x.bin", "AK", SECRET, 1700003600)
    parts = urlsplit(url)
    assert parts.path == "/ota/abc/fw%201%2Bx.bin"
    signature = "qGN8f4Lh+hBDs0cIZDJ4ajHUSc0="
    assert query_of(url) == {"Expires": "1700003600", "OSSAccessKeyId": "AK", "Signature": signature}
    assert "Signature=qGN8f4Lh%2BhBDs0cIZDJ4ajHUSc0%3D" in parts.query


def check(query: dict[str, str], key: str = "ota/abc/fw 1+x.bin", now: float = 1700000000, **kwargs) -> None:
    verify_presigned(query, "iotx-ota", key, "AK", SECRET, now, **kwargs)


def test_verify_presigned_accepts_its_own_urls_until_expiry():
    query = query_of(presigned_url("https://h", "iotx-ota", "ota/abc/fw 1+x.bin", "AK", SECRET, 1700003600))
    check(query)
    check(query, now=1700003600)
    error = refusal(check, query, now=1700003601)
    assert (error.status, error.code, error.message) == (403, "AccessDenied", "Request has expired.")


def test_verify_presigned_refusals():
    query = query_of(presigned_url("https://h", "iotx-ota", "ota/abc/fw 1+x.bin", "AK", SECRET, 1700003600))
    assert refusal(check, query, key="ota/abc/other.bin").code == "SignatureDoesNotMatch"
    assert refusal(check, {**query, "Expires": "1700009999"}).code == "SignatureDoesNotMatch"
    assert refusal(check, {**query, "Signature": "AAAA" + query["Signature"][4:]}).code == "SignatureDoesNotMatch"
    assert refusal(check, {**query, "OSSAccessKeyId": "other"}).code == "InvalidAccessKeyId"
    assert refusal(check, {**query, "Expires": "soon"}).code == "AccessDenied"
    # Digits str.isdigit() passes and int() refuses (each was a 500 with a traceback).
    for expires in ("\u00b2", "\u0661\u0667", "9" * 4301, "9" * 20):
        error = refusal(check, {**query, "Expires": expires})
        assert (error.status, error.code, error.message) == (403, "AccessDenied", "Invalid Expires.")
    for name in query:
        incomplete = {k: v for k, v in query.items() if k != name}
        error = refusal(check, incomplete)
        assert (error.status, error.code) == (403, "AccessDenied")


def test_verify_presigned_head_and_unencoded_plus():
    get_query = query_of(presigned_url("https://h", "iotx-ota", "ota/abc/fw 1+x.bin", "AK", SECRET, 1700003600))
    head_query = query_of(
        presigned_url("https://h", "iotx-ota", "ota/abc/fw 1+x.bin", "AK", SECRET, 1700003600, method="HEAD")
    )
    check(get_query, methods=("HEAD", "GET"))
    check(head_query, methods=("HEAD", "GET"))
    assert refusal(check, head_query).code == "SignatureDoesNotMatch"  # a HEAD URL is no GET URL
    # "+" left unencoded in a query string arrives as a space.
    check({**get_query, "Signature": get_query["Signature"].replace("+", " ")})


def test_presigned_urls_agree_with_oss2(monkeypatch):
    oss2 = pytest.importorskip("oss2")
    monkeypatch.setattr(oss2.auth.time, "time", lambda: 1700000000.25)
    bucket = oss2.Bucket(oss2.Auth("AK", SECRET), "https://oss-cn-shanghai.aliyuncs.com", "iotx-ota")
    for key in ("ota/abc/fw 1+x.bin", "ota/iot-1a2b3c4d/Xy_9-z.bin", "ota/a/b/c~d=e&f.zip"):
        theirs = bucket.sign_url("GET", key, 3600, slash_safe=True)
        ours = presigned_url("https://iotx-ota.oss-cn-shanghai.aliyuncs.com", "iotx-ota", key, "AK", SECRET, 1700003600)
        assert query_of(theirs) == query_of(ours)
        assert urlsplit(theirs).path == urlsplit(ours).path
        check(query_of(theirs), key=key)


def test_quote_key_and_param_match_urllib_quote():
    # Their fast paths (nothing to escape) must agree with quote() on every kind of text; a URL's
    # OSSAccessKeyId is quoted by signing.percent_encode.
    rng = random.Random(11)
    alphabet = "aZ09_.-~/+= %?#&é\u4e2d\x00"
    samples = ["ota/iot-1/abc.bin", "a b/c", "", "~/x", "é", "a%2Fb", "LTAI5tAbc"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(5_000)]
    for text in samples:
        assert quote_key(text) == quote(text, safe="/"), text
        assert percent_encode(text) == quote(text, safe=""), text
