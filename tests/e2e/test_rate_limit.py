"""Per-AccessKey rate limit on a dedicated server started with `--rate-limit 2` (burst 2)."""

from __future__ import annotations

import time
import uuid
from urllib.parse import urlencode

import httpx
import pytest
from aliyunsdkcore.acs_exception.exceptions import ServerException as LegacyServerException
from aliyunsdkiot.request.v20180120.QueryProductListRequest import QueryProductListRequest
from Tea.exceptions import TeaException

from tests.support.clients import RawSigner, iot_models, legacy_call, legacy_client, tea_client

LIST = {"CurrentPage": "1", "PageSize": "1"}
BURST = 10


@pytest.fixture(scope="module")
def limited(make_server):
    return make_server("sqlite", "--rate-limit", "2")


@pytest.fixture(scope="module")
def keys(limited) -> dict[str, tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    return {"busy": limited.create_key(f"rl-busy-{suffix}"), "quiet": limited.create_key(f"rl-quiet-{suffix}")}


def _assert_throttled_body(response) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["Code"] == "Throttling.User", body
    assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}, body


def test_a_burst_is_throttled_and_other_keys_are_not(limited, keys):
    busy = RawSigner(limited.base_url, *keys["busy"])
    quiet = RawSigner(limited.base_url, *keys["quiet"])
    time.sleep(1.0)  # a full bucket, whatever ran before

    with httpx.Client(timeout=30) as http:  # one connection: the burst is as quick as it gets
        responses = [
            http.post(f"{limited.base_url}/?{urlencode(busy.v1_params('QueryProductList', LIST))}")
            for _ in range(BURST)
        ]
    statuses = [r.status_code for r in responses]
    assert statuses[0] == 200, responses[0].text
    throttled = [r for r in responses if r.status_code != 200]
    assert throttled, statuses  # 2 in the bucket, +2/s while the burst lasts
    for response in throttled:
        _assert_throttled_body(response)

    # Straight after, another key still has its whole burst: the limit is per key.
    for _ in range(2):
        response = quiet.v1("QueryProductList", LIST)
        assert response.status_code == 200, response.text

    # V3 requests are limited the same way.
    v3 = [busy.v3("QueryProductList", LIST) for _ in range(BURST // 2)]
    assert any(r.status_code != 200 for r in v3), [r.status_code for r in v3]
    for response in v3:
        if response.status_code != 200:
            _assert_throttled_body(response)

    # The bucket refills at 2/s.
    time.sleep(0.6)
    response = busy.v1("QueryProductList", LIST)
    assert response.status_code == 200, response.text


def test_legacy_sdk_raises_throttling(limited, keys):
    client = legacy_client(*keys["busy"])
    codes = []
    for _ in range(BURST):
        request = QueryProductListRequest()
        request.set_CurrentPage(1)
        request.set_PageSize(1)
        try:
            legacy_call(client, limited.endpoint, request)
            codes.append("ok")
        except LegacyServerException as exc:
            assert exc.get_http_status() == 400, exc
            codes.append(exc.get_error_code())
    assert "Throttling.User" in codes, codes
    assert set(codes) <= {"ok", "Throttling.User"}, codes


@pytest.mark.parametrize("signature", ["v3", "v2"])
def test_tea_sdk_raises_throttling(limited, keys, signature):
    client = tea_client(limited.endpoint, *keys["busy"], signature=signature)
    codes = []
    for _ in range(BURST):
        try:
            client.query_product_list(iot_models.QueryProductListRequest(current_page=1, page_size=1))
            codes.append("ok")
        except TeaException as exc:  # tea-openapi 0.4: ClientException (or ThrottlingException)
            assert exc.data["statusCode"] == 400, exc.data
            codes.append(exc.code)
    assert "Throttling.User" in codes, codes
    assert set(codes) <= {"ok", "Throttling.User"}, codes
