"""`otaplane firmware upload|show|list|delete` against a running server, as a user runs it."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import httpx

from tests.support.clients import SdkCaller
from tests.support.server import otaplane_cli


def test_cli_upload_show_list_delete(server, tmp_path):
    key_id, secret = server.create_key("cli-" + uuid.uuid4().hex[:6])
    env = {"OTAPLANE_ENDPOINT": server.base_url, "OTAPLANE_ACCESS_KEY_ID": key_id,
           "OTAPLANE_ACCESS_KEY_SECRET": secret}
    product_key = SdkCaller("tea-v3", server.endpoint, key_id, secret).call(
        "CreateProduct", {"ProductName": "cli_" + uuid.uuid4().hex[:8], "NodeType": 0})["ProductKey"]
    firmware = tmp_path / "camera-fw.tar.gz"
    content = os.urandom(2_000_000)
    firmware.write_bytes(content)

    out = otaplane_cli("firmware", "upload", str(firmware), "--product", product_key, "--version", "2.1.0",
                       "--sign-method", "sha256", "--no-verify", "--json", env=env)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["FirmwareSize"] == len(content)
    assert info["FirmwareSign"] == hashlib.sha256(content).hexdigest()
    assert info["SignMethod"] == "SHA256" and info["Status"] == -1 and info["DestVersion"] == "2.1.0"
    assert httpx.get(info["FirmwareUrl"], timeout=30).content == content

    shown = json.loads(otaplane_cli("firmware", "show", info["FirmwareId"], "--json", env=env).stdout)
    assert shown["FirmwareId"] == info["FirmwareId"]
    listed = json.loads(otaplane_cli("firmware", "list", "--product", product_key, "--json", env=env).stdout)
    assert [i["FirmwareId"] for i in listed["FirmwareInfo"]["SimpleFirmwareInfo"]] == [info["FirmwareId"]]

    assert otaplane_cli("firmware", "delete", info["FirmwareId"], env=env).returncode == 0
    missing = otaplane_cli("firmware", "show", info["FirmwareId"], env=env, check=False)
    assert missing.returncode == 1 and "iot.ota.FirmwareNotFound" in missing.stdout


def test_cli_reports_a_wrong_secret_clearly(server):
    key_id, _ = server.create_key("cli-bad")
    env = {"OTAPLANE_ENDPOINT": server.base_url, "OTAPLANE_ACCESS_KEY_ID": key_id,
           "OTAPLANE_ACCESS_KEY_SECRET": "wrong"}
    result = otaplane_cli("firmware", "list", env=env, check=False)
    assert result.returncode == 1 and "SignatureDoesNotMatch" in result.stdout
