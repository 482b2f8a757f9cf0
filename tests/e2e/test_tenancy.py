"""Two accounts on one server: B can never read or change A's resources, for EVERY action.

The actions come from the live action table (`build_table()`), so a new action is covered (or
makes this file fail) the moment it is registered. Every parameter is filled from two tables:

- OWNED: identifiers of a tenant's resources (ProductKey, FirmwareId, FirmwareUrl, IotId,
  ApplyId) and the business codes that may answer someone else's; both accounts own one of each;
- FILLERS: anything else a call needs (names, versions, counts, paging).

An action with a required parameter in neither table fails loudly, naming it, so whoever adds the
action must teach this test how to call it (and, for a new kind of resource, give both accounts
one of it in `Tenant.populate`).

Probes run with B's key, for every action that takes an identifier:
1. every identifier it takes (required or optional) is A's;
2. one identifier is A's and the others are B's own (for device references, IotId and
   ProductKey+DeviceName are alternatives, each tried alone);
each must answer Success=false with a not-found code. An action that takes no identifier must
succeed for B. No answer to B may carry any identifier or secret of A's that B did not send, and
afterwards A's product, modules, firmware and devices are exactly as before, seen through A's key.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
import sqlalchemy as sa

from otaplane.openapi.params import ListOf, StructList
from otaplane.openapi.registry import Action, build_table
from tests.support.clients import RawSigner
from tests.support.uploads import post_upload

TABLE: dict[str, Action] = build_table()

NOT_EXISTED_PRODUCT = "iot.prod.NotExistedProduct"
NOT_EXISTED_DEVICE = "iot.device.NotExistedDevice"
INSTANCE_NOT_FOUND = "iot.system.InstanceNotFound"

# Identifier -> (key in Tenant.resources, business codes that may answer someone else's).
OWNED: dict[str, tuple[str, frozenset[str]]] = {
    "ProductKey": ("product_key", frozenset({NOT_EXISTED_PRODUCT})),
    "FirmwareId": ("firmware_id", frozenset({"iot.ota.FirmwareNotFound"})),
    "FirmwareUrl": ("upload_url", frozenset({"iot.ota.InvalidFirmwareUrl"})),
    "IotId": ("iot_id", frozenset({NOT_EXISTED_DEVICE, "iot.device.InvalidIoTId"})),
    "ApplyId": ("apply_id", frozenset({"iot.device.ApplyIdNotFound"})),
    "JobId": ("job_id", frozenset({"iot.ota.JobNotFound"})),
    "TaskId": ("task_id", frozenset({"iot.ota.TaskNotFound"})),
}

# Names scoped by a product: A and B both have one of each with this name.
MODULE_NAME = "mcu"
DEVICE_NAME = "dev_shared"


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


FILLERS: dict[str, Callable[[], str]] = {
    "ProductName": lambda: _unique("t"),
    "NodeType": lambda: "0",
    "CurrentPage": lambda: "1",
    "PageSize": lambda: "10",
    "ModuleName": lambda: MODULE_NAME,
    "DeviceName": lambda: DEVICE_NAME,
    "FirmwareName": lambda: _unique("fw"),
    "DestVersion": lambda: "9.9.9",
    "Count": lambda: "1",
    "TargetSelection": lambda: "ALL",
    "TargetDeviceName": lambda: DEVICE_NAME,
    "MaximumPerMinute": lambda: "100",
    "UpgradeType": lambda: "STATIC",
}


def unfillable(action: Action) -> list[str]:
    return [p.name for p in action.all_params if p.required and p.name not in FILLERS and p.name not in OWNED]


def owned_params(action: Action) -> list[str]:
    return [p.name for p in action.all_params if p.name in OWNED]


def is_device_ref(action: Action) -> bool:
    """IotId, or ProductKey + DeviceName, as alternative references to one device."""
    optional = {p.name for p in action.all_params if not p.required}
    return {"IotId", "ProductKey", "DeviceName"} <= optional


# Optional parameters without which a call would do nothing worth probing.
EXTRAS: dict[str, dict[str, str]] = {
    "CancelOTATaskByJob": {f"Cancel{kind}Task": "true" for kind in
                           ("Scheduled", "Queued", "InProgress", "Notified", "Unconfirmed")},
    "CreateOTADynamicUpgradeJob": {"SrcVersion": "0.1"},  # required unless a device group is named
}


def base_params(action: Action) -> dict[str, str]:
    filled = {p.name: FILLERS[p.name]() for p in action.all_params if p.required and p.name in FILLERS}
    return {**filled, **EXTRAS.get(action.name, {})}


def flatten_lists(action: Action, params: dict[str, str]) -> dict[str, str]:
    """A list parameter (`TaskId.N`) given one value under its bare name goes as `Name.1`."""
    lists = {p.name for p in action.all_params if isinstance(p.type, (ListOf, StructList))}
    return {(f"{k}.1" if k in lists else k): v for k, v in params.items()}


def method_for(action: Action) -> str:
    return "POST" if "POST" in action.methods else sorted(action.methods)[0]


def require_fillable(action: Action) -> None:
    missing = unfillable(action)
    if missing:
        pytest.fail(
            f"{action.name}: tests/e2e/test_tenancy.py cannot fill the required parameters {missing}; "
            "add them to FILLERS or OWNED to prove tenant isolation for this action"
        )


def test_every_action_can_be_driven_by_this_test():
    missing = {name: unfillable(action) for name, action in sorted(TABLE.items()) if unfillable(action)}
    assert not missing, (
        "tests/e2e/test_tenancy.py cannot fill these required parameters, so it cannot prove "
        f"tenant isolation for these actions: {missing}. Add them to FILLERS, or to OWNED (and give "
        "both accounts such a resource in Tenant.populate) when they name a tenant's resource."
    )


# --- the two accounts ------------------------------------------------------------------------------
class Tenant:
    def __init__(self, server, account: str):
        self.account = account
        key_id, secret = server.create_key(account)
        self.signer = RawSigner(server.base_url, key_id, secret)
        self.http = httpx.Client(timeout=30)  # one connection pool: hundreds of calls follow
        self.resources: dict[str, str] = {}
        self.device_secret = ""

    def call(self, action: str, params: dict[str, str] | None = None) -> dict:
        """A V1-signed call (signed by the official util, see tests/support/clients.py)."""
        method = method_for(TABLE[action])
        signed = self.signer.v1_params(action, flatten_lists(TABLE[action], params or {}), method)
        response = self.http.request(method, f"{self.signer.base_url}/?{urlencode(signed)}")
        assert response.status_code == 200, (action, params, response.status_code, response.text)
        return response.json()

    def ok(self, action: str, params: dict[str, str] | None = None) -> dict:
        body = self.call(action, params)
        assert body["Success"] is True, (action, params, body)
        return body

    def upload(self, content: bytes) -> str:
        data = self.ok("GenerateOTAUploadURL", {"FileSuffix": "bin"})["Data"]
        response = post_upload(data, content)
        assert response.status_code in (200, 201, 204), response.text
        return data["FirmwareUrl"]

    def populate(self) -> None:
        """One of everything: a product with a custom module, a firmware package, an unadopted
        upload, a device named DEVICE_NAME and a batch registration."""
        created = self.ok("CreateProduct", {
            "ProductName": _unique("p"), "NodeType": "1", "AliyunCommodityCode": "iothub_senior",
            "DataFormat": "1", "Description": f"{self.account}'s product",
        })
        product_key = created["ProductKey"]
        self.ok("CreateOTAModule", {"ProductKey": product_key, "ModuleName": MODULE_NAME, "AliasName": "MCU"})
        firmware_url = self.upload(f"firmware of {self.account}".encode())
        firmware_id = self.ok("CreateOTAFirmware", {
            "ProductKey": product_key, "ModuleName": MODULE_NAME, "FirmwareName": _unique("fw"),
            "DestVersion": "1.0.0", "FirmwareUrl": firmware_url, "FirmwareDesc": "kept",
        })["Data"]["FirmwareId"]
        device = self.ok("RegisterDevice", {"ProductKey": product_key, "DeviceName": DEVICE_NAME})["Data"]
        apply_id = self.ok("BatchRegisterDevice", {"ProductKey": product_key, "Count": "2"})["Data"]["ApplyId"]
        self.device_secret = device["DeviceSecret"]
        job_id = self.ok("CreateOTAVerifyJob", {"ProductKey": product_key, "FirmwareId": firmware_id,
                                                "TargetDeviceName.1": DEVICE_NAME})["Data"]["JobId"]
        task_id = self.ok("ListOTATaskByJob", {"JobId": job_id})["Data"]["SimpleOTATaskInfo"][0]["TaskId"]
        self.resources = {
            "product_key": product_key,
            "product_secret": created["Data"]["ProductSecret"],
            "firmware_id": firmware_id,
            "firmware_url": firmware_url,
            "upload_url": self.upload(b"not adopted yet"),
            "iot_id": device["IotId"],
            "apply_id": str(apply_id),
            "job_id": job_id,
            "task_id": task_id,
        }

    def owned(self, names: list[str]) -> dict[str, str]:
        return {name: self.resources[OWNED[name][0]] for name in names}

    def secrets(self) -> list[str]:
        """Strings that must never show up in another account's answers."""
        values = [v for k, v in self.resources.items() if not k.endswith("_url")]
        # The object paths (the keys) of the uploads, whatever host or signature a URL carries.
        values += [urlsplit(self.resources[k]).path for k in ("firmware_url", "upload_url")]
        return [*values, self.device_secret]

    def snapshot(self) -> dict[str, Any]:
        key = self.resources["product_key"]
        return {
            "product": self.ok("QueryProduct", {"ProductKey": key})["Data"],
            "modules": self.ok("ListOTAModuleByProduct", {"ProductKey": key})["Data"],
            "firmware": self.ok("ListOTAFirmware", {"CurrentPage": "1", "PageSize": "100",
                                                    "ProductKey": key})["FirmwareInfo"],
            "device": self.ok("QueryDeviceDetail", {"IotId": self.resources["iot_id"]})["Data"],
            "devices": self.ok("QueryDevice", {"ProductKey": key, "PageSize": "50"})["Data"],
            "apply": self.ok("QueryPageByApplyId", {"ApplyId": self.resources["apply_id"]})["ApplyDeviceList"],
            "job": self.ok("QueryOTAJob", {"JobId": self.resources["job_id"]})["Data"],
            "tasks": self.ok("ListOTATaskByJob", {"JobId": self.resources["job_id"]})["Data"],
        }


@pytest.fixture(scope="module")
def world(server) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:8]
    a = Tenant(server, f"acct-a-{suffix}")
    b = Tenant(server, f"acct-b-{suffix}")
    try:
        a.populate()
        b.populate()
        yield {"a": a, "b": b, "server": server, "a_snapshot": a.snapshot()}
    finally:
        a.http.close()
        b.http.close()


def assert_a_unchanged(world) -> None:
    assert world["a"].snapshot() == world["a_snapshot"]


def assert_no_leak(world, body: dict, sent: dict[str, str]) -> None:
    """No identifier or secret of A's in `body`, unless B itself sent it (an error may echo it)."""
    text = json.dumps(body)
    echoed = " ".join(sent.values())
    for value in world["a"].secrets():
        if value not in echoed:
            assert value not in text, (value, body)


def foreign_probes(action: Action, a: Tenant, b: Tenant) -> list[dict[str, str]]:
    """The identifier parameters of each call B makes that names something of A's."""
    owned = owned_params(action)
    if not owned:
        return []
    probes = [a.owned(owned)]
    if is_device_ref(action):
        probes[0]["DeviceName"] = DEVICE_NAME
        others = [name for name in owned if name not in ("IotId", "ProductKey")]
        probes.append({**b.owned(others), **a.owned(["IotId"])})
        probes.append({**b.owned(others), **a.owned(["ProductKey"]), "DeviceName": DEVICE_NAME})
        for foreign in others:
            probes.append({**b.owned(["IotId"]), **b.owned(others), **a.owned([foreign])})
    elif len(owned) > 1:
        for foreign in owned:
            probes.append({**b.owned(owned), **a.owned([foreign])})
    return probes


# --- B against A's resources, for every action -----------------------------------------------------------
@pytest.mark.parametrize("action_name", sorted(TABLE))
def test_b_cannot_reach_a_resources(world, action_name):
    action = TABLE[action_name]
    require_fillable(action)
    a, b = world["a"], world["b"]
    codes = frozenset().union(*(OWNED[name][1] for name in owned_params(action)))
    if is_device_ref(action):
        codes |= {NOT_EXISTED_DEVICE}  # ProductKey + DeviceName name a device, not a product

    probes = foreign_probes(action, a, b)
    for identifiers in probes:
        params = {**base_params(action), **identifiers}
        body = b.call(action_name, params)
        assert body["Success"] is False and body["Code"] in codes, (action_name, identifiers, body)
        assert_no_leak(world, body, params)
    if not probes:  # nothing of anyone's named: B's own view, which must work and show nothing of A's
        params = base_params(action)
        body = b.call(action_name, params)
        assert body["Success"] is True, (action_name, body)
        assert_no_leak(world, body, params)

    assert_a_unchanged(world)


@pytest.mark.parametrize("action_name", ["QueryProduct", "UpdateProduct", "DeleteProduct"])
def test_product_actions_on_a_product_answer_not_existed(world, action_name):
    a, b = world["a"], world["b"]
    params = {"ProductKey": a.resources["product_key"]}
    if action_name == "UpdateProduct":
        params.update(ProductName=_unique("mine"), Description="B was here")
    body = b.call(action_name, params)
    assert (body["Success"], body["Code"]) == (False, NOT_EXISTED_PRODUCT), body
    assert_a_unchanged(world)


def test_b_lists_show_only_b_resources(world):
    a, b = world["a"], world["b"]
    products = b.ok("QueryProductList", {"CurrentPage": "1", "PageSize": "200"})["Data"]
    keys = [item["ProductKey"] for item in products["List"]["ProductInfo"]]
    assert b.resources["product_key"] in keys
    assert a.resources["product_key"] not in keys
    assert products["Total"] == len(keys)

    firmware = b.ok("ListOTAFirmware", {"CurrentPage": "1", "PageSize": "100"})
    ids = [item["FirmwareId"] for item in firmware["FirmwareInfo"]["SimpleFirmwareInfo"]]
    assert b.resources["firmware_id"] in ids
    assert a.resources["firmware_id"] not in ids
    assert firmware["Total"] == len(ids)


def test_b_cannot_adopt_a_uploads(world):
    """Upload objects belong to the instance that asked for the upload URL."""
    a, b = world["a"], world["b"]
    for which in ("upload_url", "firmware_url"):
        body = b.call("CreateOTAFirmware", {
            "ProductKey": b.resources["product_key"], "FirmwareName": _unique("steal"),
            "DestVersion": "6.6.6", "FirmwareUrl": a.resources[which],
        })
        assert (body["Success"], body["Code"]) == (False, "iot.ota.InvalidFirmwareUrl"), (which, body)
    # A's unadopted upload is still A's to use.
    created = a.ok("CreateOTAFirmware", {
        "ProductKey": a.resources["product_key"], "FirmwareName": _unique("late"),
        "DestVersion": "2.0.0", "FirmwareUrl": a.resources["upload_url"],
    })["Data"]["FirmwareId"]
    a.ok("DeleteOTAFirmware", {"FirmwareId": created})
    assert_a_unchanged(world)


def test_same_names_in_two_accounts(world):
    """Product names are unique per account instance, not globally."""
    a, b = world["a"], world["b"]
    name = world["a_snapshot"]["product"]["ProductName"]
    created = b.ok("CreateProduct", {"ProductName": name, "NodeType": "0"})
    assert created["ProductKey"] != a.resources["product_key"]
    b.ok("DeleteProduct", {"ProductKey": created["ProductKey"]})
    assert_a_unchanged(world)


# --- IotInstanceId ---------------------------------------------------------------------------------------
def own_identifiers(action: Action, tenant: Tenant) -> dict[str, str]:
    identifiers = tenant.owned(owned_params(action))
    if is_device_ref(action):
        identifiers["DeviceName"] = DEVICE_NAME
    return identifiers


@pytest.mark.parametrize("action_name", sorted(TABLE))
def test_unknown_instance_id(world, action_name):
    action = TABLE[action_name]
    require_fillable(action)
    for tenant in (world["a"], world["b"]):
        params = {**base_params(action), **own_identifiers(action, tenant), "IotInstanceId": "iot-00000000"}
        body = tenant.call(action_name, params)
        assert (body["Success"], body["Code"]) == (False, INSTANCE_NOT_FOUND), (tenant.account, body)
    assert_a_unchanged(world)


def _instance_ids(server) -> dict[str, str]:
    """account name -> default IotInstanceId, read from the server's database.

    No API hands out instance ids yet, so this peeks at the `instances` table directly
    (read-only). Replace it with the API once there is one.
    """
    url = server.database_url or f"sqlite:///{server.data_dir / 'otaplane.db'}"
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT a.name, i.instance_id FROM instances i JOIN accounts a ON a.id = i.account_id "
                "WHERE i.is_default"
            )).all()
    finally:
        engine.dispose()
    return {name: instance_id for name, instance_id in rows}


def test_other_accounts_instance_id_is_refused(world):
    a, b = world["a"], world["b"]
    instance_ids = _instance_ids(world["server"])
    a_instance, b_instance = instance_ids[a.account], instance_ids[b.account]
    assert a_instance != b_instance

    # Naming one's own instance explicitly works exactly as leaving it out.
    key = a.resources["product_key"]
    assert a.ok("QueryProduct", {"ProductKey": key, "IotInstanceId": a_instance})["Data"] == \
        world["a_snapshot"]["product"]

    # B naming A's instance is refused as if it did not exist, for every action, with A's
    # identifiers and with B's own (so the instance check alone must refuse).
    for name, action in sorted(TABLE.items()):
        require_fillable(action)
        for owner in (a, b):
            params = {**base_params(action), **own_identifiers(action, owner), "IotInstanceId": a_instance}
            body = b.call(name, params)
            assert (body["Success"], body["Code"]) == (False, INSTANCE_NOT_FOUND), (name, owner.account, body)
            assert_no_leak(world, body, params)
    # And A naming B's instance.
    body = a.call("QueryProductList", {"CurrentPage": "1", "PageSize": "10", "IotInstanceId": b_instance})
    assert (body["Success"], body["Code"]) == (False, INSTANCE_NOT_FOUND), body
    assert_a_unchanged(world)
