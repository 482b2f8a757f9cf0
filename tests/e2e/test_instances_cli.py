"""`otaplane instances`: more IoT instances per account, kept apart like accounts are."""

from __future__ import annotations

import json
import uuid

from tests.support.clients import RawSigner


def _products(signer: RawSigner, **instance: str) -> list[str]:
    body = signer.v1("QueryProductList", {"CurrentPage": "1", "PageSize": "50"}, **instance).json()
    assert body["Success"] is True, body
    return [p["ProductName"] for p in body["Data"]["List"]["ProductInfo"]]


def test_a_second_instance_has_its_own_resources(server):
    account = f"inst-{uuid.uuid4().hex[:8]}"
    key_id, secret = server.create_key(account)
    created = json.loads(server.cli("instances", "create", "--account", account, "--json").stdout)
    instance = created["IotInstanceId"]
    assert created["Account"] == account and instance.startswith("iot-")

    listed = json.loads(server.cli("instances", "list", "--account", account, "--json").stdout)
    assert sorted((row["IotInstanceId"] == instance, row["Default"]) for row in listed) == [(False, True), (True, False)]

    signer = RawSigner(server.base_url, key_id, secret)
    name = "in_" + uuid.uuid4().hex[:12]
    body = signer.v1("CreateProduct", {"ProductName": name, "NodeType": "0"}, IotInstanceId=instance).json()
    assert body["Success"] is True, body
    product_key = body["ProductKey"]
    # The running server sees the new instance at once, and keeps its product out of the default one.
    assert _products(signer, IotInstanceId=instance) == [name]
    assert name not in _products(signer)
    in_default = signer.v1("QueryProduct", {"ProductKey": product_key}).json()
    assert in_default["Code"] == "iot.prod.NotExistedProduct", in_default

    # Another account's key cannot name it.
    other_id, other_secret = server.create_key(f"other-{uuid.uuid4().hex[:8]}")
    refused = RawSigner(server.base_url, other_id, other_secret).v1(
        "QueryProduct", {"ProductKey": product_key}, IotInstanceId=instance).json()
    assert (refused["Success"], refused["Code"]) == (False, "iot.system.InstanceNotFound"), refused


def test_account_names_and_descriptions_that_cannot_be_stored_are_refused(server):
    """Checked before the database (PostgreSQL would refuse them with a traceback, SQLite would
    take them): a clear line, exit 2, nothing created."""
    for args in (("instances", "create", "--account", "a" * 65), ("instances", "create", "--account", ""),
                 ("keys", "create", "--account", "bad\nname"),
                 ("keys", "create", "--account", "fine", "--description", "d" * 257)):
        result = server.cli(*args, check=False)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "otaplane: a" in output and "Traceback" not in output, output
    listed = json.loads(server.cli("instances", "list", "--json").stdout)
    assert not {row["Account"] for row in listed} & {"a" * 65, "", "bad\nname"}
    assert "fine" not in {row["Account"] for row in json.loads(server.cli("keys", "list", "--json").stdout)}
