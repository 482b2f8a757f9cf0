"""Every product action through all three official client variants, against a real server.

Variants: legacy `aliyun-python-sdk-core` + `aliyunsdkiot` request classes (signature V1), the Tea
`alibabacloud-iot20180120` client with its default V3 signature, and the Tea client with
`signature_algorithm='v2'` (V1). Each variant works in its own account, so the tests never see
each other's products.

Every response body is checked against the contract's field tree
(/work/shared/contract/aliyun-iot-actions.json, copied below for the product actions); for Tea,
the SDK's parsed model must also give back exactly the raw body, so no field is lost or misnamed.
"""

from __future__ import annotations

import importlib
import re
import time
import uuid
from typing import Any

import pytest
from aliyunsdkcore.acs_exception.exceptions import ServerException as LegacyServerException
from alibabacloud_tea_openapi.exceptions import ClientException as TeaClientException
from Tea.exceptions import TeaException

from tests.support.clients import RawSigner, iot_models, legacy_call, legacy_client, tea_client

# --- the contract ------------------------------------------------------------------------------
# Response trees of /work/shared/contract/aliyun-iot-actions.json for the product actions
# ("scalar" = any non-container value, [tree] = list of items shaped like tree).
S = "scalar"
_ENVELOPE = {"Code": S, "ErrorMessage": S, "RequestId": S, "Success": S}
CONTRACT: dict[str, dict[str, Any]] = {
    "CreateProduct": {
        **_ENVELOPE,
        "ProductKey": S,
        "Data": {
            "AliyunCommodityCode": S, "AuthType": S, "DataFormat": S, "Description": S, "Id2": S,
            "NodeType": S, "ProductKey": S, "ProductName": S, "ProductSecret": S, "ProtocolType": S,
        },
    },
    "QueryProduct": {
        **_ENVELOPE,
        "Data": {
            "AliyunCommodityCode": S, "AuthType": S, "CategoryKey": S, "CategoryName": S,
            "DataFormat": S, "Description": S, "DeviceCount": S, "GmtCreate": S, "Id2": S,
            "NetType": S, "NodeType": S, "Owner": S, "ProductKey": S, "ProductName": S,
            "ProductSecret": S, "ProductStatus": S, "ProtocolType": S, "ValidateType": S,
        },
    },
    "QueryProductList": {
        **_ENVELOPE,
        "Data": {
            "CurrentPage": S, "PageCount": S, "PageSize": S, "Total": S,
            "List": {
                "ProductInfo": [
                    {
                        "AuthType": S, "DataFormat": S, "Description": S, "DeviceCount": S,
                        "GmtCreate": S, "NodeType": S, "ProductKey": S, "ProductName": S,
                    }
                ]
            },
        },
    },
    "UpdateProduct": dict(_ENVELOPE),
    "DeleteProduct": dict(_ENVELOPE),
}


def assert_shape(data: Any, tree: Any, path: str = "$") -> None:
    """`data` nests like the contract `tree` and uses only keys the tree has."""
    if tree == S:
        assert not isinstance(data, (dict, list)), f"{path}: expected a scalar, got {data!r}"
    elif isinstance(tree, dict):
        assert isinstance(data, dict), f"{path}: expected an object, got {data!r}"
        extra = sorted(set(data) - set(tree))
        assert not extra, f"{path}: keys {extra} are not in the contract (allowed: {sorted(tree)})"
        for key, value in data.items():
            assert_shape(value, tree[key], f"{path}.{key}")
    elif isinstance(tree, list):
        assert isinstance(data, list), f"{path}: expected a list, got {data!r}"
        for index, item in enumerate(data):
            assert_shape(item, tree[0], f"{path}[{index}]")
    else:  # pragma: no cover - a typo in CONTRACT
        raise AssertionError(f"bad contract tree at {path}: {tree!r}")


def test_contract_copy_matches_the_shared_contract():
    """CONTRACT above is the shared file's product subset, not a paraphrase of it."""
    import json
    from pathlib import Path

    shared = Path("/work/shared/contract/aliyun-iot-actions.json")
    if not shared.exists():
        pytest.skip("the shared contract file is not available here")
    full = json.loads(shared.read_text())
    for action, tree in CONTRACT.items():
        assert full[action]["response"] == tree, action


def test_assert_shape_rejects_what_it_should():
    tree = CONTRACT["QueryProductList"]
    good = {"RequestId": "r", "Success": True, "Code": "",
            "Data": {"Total": 1, "List": {"ProductInfo": [{"ProductKey": "k"}]}}}
    assert_shape(good, tree)
    for bad in (
        {**good, "Extra": 1},
        {**good, "Data": {"List": {"ProductInfo": {"ProductKey": "k"}}}},  # object for a list
        {**good, "Data": {"List": {"ProductInfo": [{"ProductKey": {"x": 1}}]}}},  # object for scalar
        {**good, "Data": {"List": [{"ProductKey": "k"}]}},  # list one level too high
    ):
        with pytest.raises(AssertionError):
            assert_shape(bad, tree)


# --- the three client variants -----------------------------------------------------------------
VARIANTS = ("legacy-v1", "tea-v3", "tea-v1")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class GatewayError(Exception):
    """What an SDK raised for an HTTP 4xx/5xx answer, normalised for assertions."""

    def __init__(self, code: str, http_status: int | None, raised: BaseException):
        super().__init__(f"{code} (HTTP {http_status})")
        self.code = code
        self.http_status = http_status
        self.raised = raised  # what the SDK raised


class Api:
    """One SDK variant bound to one account. `call` returns the raw JSON body of the answer."""

    def __init__(self, variant: str, endpoint: str, key_id: str, secret: str):
        self.variant = variant
        self.endpoint = endpoint
        if variant == "legacy-v1":
            self._legacy = legacy_client(key_id, secret)
        else:
            self._tea = tea_client(endpoint, key_id, secret, "v3" if variant == "tea-v3" else "v2")
            self._raw: list[dict] = []
            original = self._tea.call_api

            def recording_call_api(params, request, runtime):
                result = original(params, request, runtime)
                self._raw.append(result["body"])
                return result

            self._tea.call_api = recording_call_api  # record the body the SDK received, unchanged

    def call(self, action: str, **params: Any) -> dict:
        if self.variant == "legacy-v1":
            module = importlib.import_module(f"aliyunsdkiot.request.v20180120.{action}Request")
            request = getattr(module, f"{action}Request")()
            for name, value in params.items():
                getattr(request, f"set_{name}")(value)
            try:
                body = legacy_call(self._legacy, self.endpoint, request)
            except LegacyServerException as exc:
                raise GatewayError(exc.get_error_code(), exc.get_http_status(), exc) from exc
        else:
            request = getattr(iot_models, f"{action}Request")(**{_snake(k): v for k, v in params.items()})
            try:
                response = getattr(self._tea, _snake(action))(request)
            except TeaException as exc:  # ClientException / ServerException / ThrottlingException
                status = getattr(exc, "status_code", None) or (exc.data or {}).get("statusCode")
                raise GatewayError(exc.code, status, exc) from exc
            body = self._raw[-1]
            assert response.status_code == 200
            # The SDK's model must carry exactly what was sent: nothing dropped or misnamed.
            assert response.body.to_map() == body
        assert_shape(body, CONTRACT[action])
        return body

    def ok(self, action: str, **params: Any) -> dict:
        body = self.call(action, **params)
        assert body["Success"] is True, body
        assert body["Code"] == "", body
        assert "ErrorMessage" not in body, body
        assert re.fullmatch(r"[0-9A-F-]{36}", body["RequestId"]), body
        return body

    def business_error(self, action: str, code: str, **params: Any) -> dict:
        """HTTP 200, Success=false, the given iot.* Code: both SDKs hand the body back."""
        body = self.call(action, **params)
        assert body["Success"] is False, body
        assert body["Code"] == code, body
        assert body["ErrorMessage"], body
        assert set(body) == {"RequestId", "Success", "Code", "ErrorMessage"}, body
        return body

    def gateway_error(self, action: str, **params: Any) -> GatewayError:
        """The SDK must raise (HTTP 4xx/5xx); returns the normalised error."""
        with pytest.raises(GatewayError) as caught:
            self.call(action, **params)
        return caught.value

    def create(self, name: str, **params: Any) -> dict:
        return self.ok("CreateProduct", ProductName=name, **{"NodeType": 0, **params})


def unique_name(prefix: str = "p") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def api(server, variant) -> Api:
    """The variant's client in an account of its own on this backend's server."""
    key_id, secret = server.create_key(f"products-{variant}-{uuid.uuid4().hex[:8]}")
    return Api(variant, server.endpoint, key_id, secret)


@pytest.fixture
def fresh_api(server, variant) -> Api:
    """The variant's client in a brand-new, empty account (a CLI call: use sparingly)."""
    key_id, secret = server.create_key(f"products-empty-{variant}-{uuid.uuid4().hex[:8]}")
    return Api(variant, server.endpoint, key_id, secret)


# --- CreateProduct / QueryProduct ----------------------------------------------------------------
def test_create_and_query_round_trip(api):
    name = unique_name("lamp")
    description = "Smart lamp, 2 channels: on/off * dim ~ 50% + a&b=c (灯)"
    before = int(time.time() * 1000)
    created = api.create(
        name, NodeType=1, AliyunCommodityCode="iothub_senior", DataFormat=1, Description=description
    )
    after = int(time.time() * 1000)

    data = created["Data"]
    product_key = created["ProductKey"]
    assert data["ProductKey"] == product_key
    assert re.fullmatch(r"[A-Za-z0-9]{11}", product_key), product_key
    assert re.fullmatch(r"[A-Za-z0-9]{16}", data["ProductSecret"]), data["ProductSecret"]
    assert data["ProductName"] == name
    assert data["NodeType"] == 1
    assert data["AliyunCommodityCode"] == "iothub_senior"
    assert data["DataFormat"] == 1
    assert data["Description"] == description

    queried = api.ok("QueryProduct", ProductKey=product_key)["Data"]
    assert queried["ProductKey"] == product_key
    assert queried["ProductName"] == name
    assert queried["ProductSecret"] == data["ProductSecret"]
    assert queried["NodeType"] == 1
    assert queried["AliyunCommodityCode"] == "iothub_senior"
    assert queried["DataFormat"] == 1
    assert queried["Description"] == description
    assert queried["DeviceCount"] == 0
    gmt_create = queried["GmtCreate"]
    assert type(gmt_create) is int, gmt_create  # milliseconds as a JSON number, not a string
    assert before - 2000 <= gmt_create <= after + 2000, (before, gmt_create, after)


def test_create_with_defaults(api):
    name = unique_name("plain")
    created = api.create(name)  # NodeType 0 only: AliyunCommodityCode defaults to iothub
    assert created["Data"]["ProductName"] == name
    assert created["Data"]["NodeType"] == 0
    assert created["Data"]["AliyunCommodityCode"] == "iothub"
    queried = api.ok("QueryProduct", ProductKey=created["ProductKey"])["Data"]
    assert queried["NodeType"] == 0
    assert queried["AliyunCommodityCode"] == "iothub"
    assert "Description" not in queried  # absent, not null


def test_product_keys_and_secrets_are_unique(api):
    first, second = api.create(unique_name()), api.create(unique_name())
    assert first["ProductKey"] != second["ProductKey"]
    assert first["Data"]["ProductSecret"] != second["Data"]["ProductSecret"]


def test_duplicate_name_is_refused(api):
    name = unique_name("dup")
    kept = api.create(name)
    api.business_error("CreateProduct", "iot.prod.AlreadyExistedProductName", ProductName=name, NodeType=0)
    # The first product is untouched.
    assert api.ok("QueryProduct", ProductKey=kept["ProductKey"])["Data"]["ProductName"] == name


@pytest.mark.parametrize(
    "bad_name",
    ["abc", "x" * 31, "bad name", "bad-name", "dot.name", "智能灯具产品", "semi;colon"],
    ids=["too-short", "too-long", "space", "dash", "dot", "non-ascii", "semicolon"],
)
def test_badly_formatted_name_is_refused(api, bad_name):
    api.business_error("CreateProduct", "iot.prod.InvalidFormattedProductName", ProductName=bad_name, NodeType=0)


def test_name_limits_are_inclusive(api):
    hex_ = uuid.uuid4().hex
    for name in ("Z_" + hex_[:2], "Z_" + hex_[:28]):  # 4 and 30 characters
        assert api.create(name)["Data"]["ProductName"] == name


@pytest.mark.parametrize("node_type", [5, -1])
def test_invalid_node_type_is_a_gateway_error(api, node_type):
    error = api.gateway_error("CreateProduct", ProductName=unique_name(), NodeType=node_type)
    assert error.http_status == 400
    assert error.code == "InvalidParameter"
    # 4xx: core raises its ServerException, tea-openapi 0.4 its ClientException.
    expected = LegacyServerException if api.variant == "legacy-v1" else TeaClientException
    assert isinstance(error.raised, expected), type(error.raised)


def test_missing_product_key_is_a_gateway_error(api):
    error = api.gateway_error("QueryProduct")
    assert (error.http_status, error.code) == (400, "MissingProductKey")


# --- unknown ProductKey ----------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["QueryProduct", "UpdateProduct", "DeleteProduct"])
def test_unknown_product_key(api, action):
    params: dict[str, Any] = {"ProductKey": "a1NoSuchPrd"}
    if action == "UpdateProduct":
        params["ProductName"] = unique_name()
    api.business_error(action, "iot.prod.NotExistedProduct", **params)


# --- QueryProductList --------------------------------------------------------------------------------
def _page(api: Api, current: int, size: int) -> dict:
    return api.ok("QueryProductList", CurrentPage=current, PageSize=size)["Data"]


def test_list_pages_newest_first_and_stable(fresh_api):
    api = fresh_api
    empty = _page(api, 1, 10)
    assert (empty["Total"], empty["PageCount"], empty["CurrentPage"], empty["PageSize"]) == (0, 0, 1, 10)
    assert empty.get("List", {}).get("ProductInfo", []) == []

    created = []
    for index in range(5):
        senior = index in (0, 3)
        extra = {"AliyunCommodityCode": "iothub_senior", "DataFormat": 1} if senior else {"DataFormat": 0}
        body = api.create(unique_name(f"l{index}"), Description=f"item {index}", **extra)
        created.append(body["Data"])
    newest_first = [item["ProductKey"] for item in reversed(created)]

    pages = [_page(api, page, 2) for page in (1, 2, 3)]
    for number, data in enumerate(pages, start=1):
        assert data["Total"] == 5
        assert data["PageCount"] == 3
        assert data["CurrentPage"] == number
        assert data["PageSize"] == 2
    listed = [item for data in pages for item in data["List"]["ProductInfo"]]
    assert [len(data["List"]["ProductInfo"]) for data in pages] == [2, 2, 1]
    assert [item["ProductKey"] for item in listed] == newest_first  # no overlap, no gap, newest first
    gmt = [item["GmtCreate"] for item in listed]
    assert all(type(g) is int for g in gmt) and gmt == sorted(gmt, reverse=True)

    # The summary fields round-trip.
    by_key = {item["ProductKey"]: item for item in listed}
    for original in created:
        item = by_key[original["ProductKey"]]
        assert item["ProductName"] == original["ProductName"]
        assert item["NodeType"] == 0
        assert item["DataFormat"] == original["DataFormat"]
        assert item["Description"] == original["Description"]
        assert item["DeviceCount"] == 0
        assert "ProductSecret" not in item

    # Asking again gives the same pages; one big page gives the same order.
    assert [_page(api, page, 2) for page in (1, 2, 3)] == pages
    assert [item["ProductKey"] for item in _page(api, 1, 200)["List"]["ProductInfo"]] == newest_first

    # Past the last page: an empty page, totals unchanged.
    beyond = _page(api, 4, 2)
    assert beyond["Total"] == 5 and beyond["PageCount"] == 3
    assert beyond.get("List", {}).get("ProductInfo", []) == []

    # Filtered by AliyunCommodityCode: the same order, paged the same way.
    for code, indexes in (("iothub_senior", (3, 0)), ("iothub", (4, 2, 1))):
        expected = [created[i]["ProductKey"] for i in indexes]
        first = api.ok("QueryProductList", CurrentPage=1, PageSize=2, AliyunCommodityCode=code)["Data"]
        assert first["Total"] == len(expected)
        assert first["PageCount"] == (len(expected) + 1) // 2
        keys = [i["ProductKey"] for i in first["List"]["ProductInfo"]]
        if len(expected) > 2:
            second = api.ok("QueryProductList", CurrentPage=2, PageSize=2, AliyunCommodityCode=code)["Data"]
            keys += [i["ProductKey"] for i in second["List"]["ProductInfo"]]
        assert keys == expected, code


@pytest.mark.parametrize("current,size", [(0, 10), (1, 0), (1, 201)])
def test_list_refuses_bad_page_parameters(api, current, size):
    api.business_error("QueryProductList", "iot.common.InvalidPageParams", CurrentPage=current, PageSize=size)


# --- UpdateProduct -------------------------------------------------------------------------------------
def test_update_renames_and_redescribes(api):
    old_name = unique_name("old")
    created = api.create(old_name, Description="before", DataFormat=1)
    product_key = created["ProductKey"]
    new_name = unique_name("new")

    body = api.ok("UpdateProduct", ProductKey=product_key, ProductName=new_name, Description="after it")
    assert set(body) == {"RequestId", "Success", "Code"}

    data = api.ok("QueryProduct", ProductKey=product_key)["Data"]
    assert data["ProductName"] == new_name
    assert data["Description"] == "after it"
    # Everything else is kept.
    assert data["ProductSecret"] == created["Data"]["ProductSecret"]
    assert data["DataFormat"] == 1
    assert data["NodeType"] == 0

    # The old name is free again.
    assert api.create(old_name)["Data"]["ProductName"] == old_name


def test_update_without_description_keeps_it(api):
    created = api.create(unique_name("keep"), Description="kept")
    new_name = unique_name("kept")
    api.ok("UpdateProduct", ProductKey=created["ProductKey"], ProductName=new_name)
    data = api.ok("QueryProduct", ProductKey=created["ProductKey"])["Data"]
    assert (data["ProductName"], data["Description"]) == (new_name, "kept")


def test_update_to_own_name_is_allowed(api):
    name = unique_name("same")
    created = api.create(name)
    api.ok("UpdateProduct", ProductKey=created["ProductKey"], ProductName=name, Description="d")
    assert api.ok("QueryProduct", ProductKey=created["ProductKey"])["Data"]["Description"] == "d"


def test_update_errors(api):
    taken = unique_name("taken")
    api.create(taken)
    name = unique_name("mine")
    mine = api.create(name)["ProductKey"]
    api.business_error("UpdateProduct", "iot.prod.AlreadyExistedProductName", ProductKey=mine, ProductName=taken)
    api.business_error("UpdateProduct", "iot.prod.InvalidFormattedProductName", ProductKey=mine, ProductName="no way!")
    api.business_error("UpdateProduct", "iot.prod.InvalidFormattedProductName", ProductKey=mine, ProductName="abc")
    assert api.ok("QueryProduct", ProductKey=mine)["Data"]["ProductName"] == name


# --- DeleteProduct -------------------------------------------------------------------------------------
def test_a_product_whose_batch_registered_devices_were_deleted_can_be_deleted(server):
    """BatchRegisterDevice's record kept a foreign key on the product: DeleteProduct failed with a
    500 for good, even with no device left (found by an audit)."""
    signer = RawSigner(server.base_url, *server.create_key("batch-delete"))
    created = signer.v1("CreateProduct", {"ProductName": unique_name("batch"), "NodeType": "0"}).json()
    product_key = created["ProductKey"]
    applied = signer.v1("BatchRegisterDevice", {"ProductKey": product_key, "Count": "2"}).json()
    apply_id = str(applied["Data"]["ApplyId"])
    status = signer.v1("QueryBatchRegisterDeviceStatus", {"ProductKey": product_key, "ApplyId": apply_id}).json()
    for name in status["Data"]["ValidList"]["Name"]:
        assert signer.v1("DeleteDevice", {"ProductKey": product_key, "DeviceName": name}).json()["Success"]
    deleted = signer.v1("DeleteProduct", {"ProductKey": product_key})
    assert deleted.status_code == 200 and deleted.json()["Success"], deleted.text
    assert signer.v1("QueryProduct", {"ProductKey": product_key}).json()["Code"] == "iot.prod.NotExistedProduct"


def test_delete(api):
    kept = api.create(unique_name("kept"))["ProductKey"]
    name = unique_name("gone")
    gone = api.create(name)["ProductKey"]

    body = api.ok("DeleteProduct", ProductKey=gone)
    assert set(body) == {"RequestId", "Success", "Code"}

    api.business_error("QueryProduct", "iot.prod.NotExistedProduct", ProductKey=gone)
    api.business_error("DeleteProduct", "iot.prod.NotExistedProduct", ProductKey=gone)
    api.business_error("UpdateProduct", "iot.prod.NotExistedProduct", ProductKey=gone, ProductName=unique_name())
    listed = [i["ProductKey"] for i in _page(api, 1, 200)["List"]["ProductInfo"]]
    assert kept in listed and gone not in listed
    # The name can be used again, and gets a new key.
    again = api.create(name)["ProductKey"]
    assert again != gone
