"""`otaplane firmware upload|show|list|delete` against a running server, as a user runs it."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import httpx

from tests.support.clients import SdkCaller
from tests.support.server import otaplane_cli
from tests.support.uploads import post_upload


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
    info = json.loads(out.stdout)  # only JSON on stdout: the progress bar goes to stderr
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


def test_cli_refuses_half_a_key_pair_instead_of_using_the_admin_key(server):
    """With admin-credentials.json at hand, an AccessKeyId without its secret ran as the admin
    (another account's packages listed, uploads made there)."""
    key_id, secret = server.create_key("cli-half")
    common = {"OTAPLANE_ENDPOINT": server.base_url, "OTAPLANE_DATA_DIR": str(server.data_dir)}
    for half in ({"OTAPLANE_ACCESS_KEY_ID": key_id}, {"OTAPLANE_ACCESS_KEY_SECRET": secret}):
        result = otaplane_cli("firmware", "list", env={**common, **half}, check=False)
        assert result.returncode == 2, result.stdout
        assert "without its" in " ".join(result.stdout.split()) and "FirmwareInfo" not in result.stdout


def test_cli_reports_an_unreachable_endpoint_in_one_line(server, tmp_path):
    key_id, secret = server.create_key("cli-unreachable")
    env = {"OTAPLANE_ENDPOINT": "http://127.0.0.1:9", "OTAPLANE_ACCESS_KEY_ID": key_id,
           "OTAPLANE_ACCESS_KEY_SECRET": secret}
    result = otaplane_cli("firmware", "list", env=env, check=False)
    assert result.returncode == 1
    assert "EndpointUnreachable" in result.stdout and "Traceback" not in result.stdout + result.stderr
    broken = tmp_path / "admin-credentials.json"
    broken.write_text("{not json")
    result = otaplane_cli("firmware", "list", env={"OTAPLANE_ENDPOINT": server.base_url,
                                                   "OTAPLANE_DATA_DIR": str(tmp_path)}, check=False)
    assert result.returncode == 2 and "holds no AccessKey pair" in " ".join(result.stdout.split())
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_refuses_before_uploading_what_create_would_refuse(server, tmp_path):
    key_id, secret = server.create_key("cli-early")
    env = {"OTAPLANE_ENDPOINT": server.base_url, "OTAPLANE_ACCESS_KEY_ID": key_id,
           "OTAPLANE_ACCESS_KEY_SECRET": secret}
    product_key = SdkCaller("tea-v3", server.endpoint, key_id, secret).call(
        "CreateProduct", {"ProductName": "cli_" + uuid.uuid4().hex[:8], "NodeType": 0})["ProductKey"]
    firmware = tmp_path / "_leading-underscore.bin"
    firmware.write_bytes(b"firmware")
    upload = ("firmware", "upload", str(firmware), "--product", product_key)
    cases = [
        (("--version", "2 0"), 2, "InvalidParameter"),
        (("--version", "2.0", "--name", "n" * 41), 2, "InvalidParameter"),
        (("--version", "2.0", "--sign-method", "sha1"), 2, "InvalidParameter"),
        (("--version", "2.0", "--module", "nosuchmodule"), 1, "iot.ota.ModuleNotFound"),
    ]
    for flags, code, message in cases:
        result = otaplane_cli(*upload, *flags, env=env, check=False)
        assert (result.returncode, message in result.stdout) == (code, True), (flags, result.stdout)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    result = otaplane_cli("firmware", "upload", str(empty), "--product", product_key, "--version", "2.0",
                          env=env, check=False)
    assert result.returncode == 2 and "is empty" in " ".join(result.stdout.split())  # Rich wraps lines
    signer_view = SdkCaller("tea-v3", server.endpoint, key_id, secret)
    assert signer_view.call("ListOTAFirmware", {"CurrentPage": 1, "PageSize": 10})["Total"] == 0
    # The default name is made valid: the file name starts with '_', which a name may not.
    out = otaplane_cli(*upload, "--version", "2.0", "--json", env=env)
    info = json.loads(out.stdout)
    assert info["FirmwareName"] == "leading-underscore-2-0"
    # The same command again: the name is taken. Refused before the file is sent (it was sent,
    # then CreateOTAFirmware refused it, leaving an object nobody adopts; found by an audit).
    folder = server.data_dir / "blobs" / httpx.URL(info["FirmwareUrl"]).path.split("/oss/otaplane/", 1)[1]
    folder = folder.parent
    objects = sorted(folder.iterdir())
    again = otaplane_cli(*upload, "--version", "2.0", env=env, check=False)
    assert again.returncode == 1 and "iot.ota.FirmwareNameExisted" in again.stdout, again.stdout
    assert sorted(folder.iterdir()) == objects
    assert signer_view.call("ListOTAFirmware", {"CurrentPage": 1, "PageSize": 10})["Total"] == 1


def test_cli_show_prints_the_udi_and_each_file_of_a_multi_file_package(server):
    """`firmware show` printed neither the Udi nor the files of a multi-file package (their names,
    sizes, checksums and download URLs): only their total size (found by an audit)."""
    key_id, secret = server.create_key("cli-multi-" + uuid.uuid4().hex[:6])
    env = {"OTAPLANE_ENDPOINT": server.base_url, "OTAPLANE_ACCESS_KEY_ID": key_id,
           "OTAPLANE_ACCESS_KEY_SECRET": secret}
    api = SdkCaller("tea-v3", server.endpoint, key_id, secret)
    product_key = api.call("CreateProduct", {"ProductName": "cli_" + uuid.uuid4().hex[:8], "NodeType": 0})["ProductKey"]
    files = []
    for name, content in (("boot-img", b"boot" * 100), ("app-img", b"application" * 50)):
        generated = api.call("GenerateOTAUploadURL", {"FileSuffix": "bin"})["Data"]
        assert post_upload(generated, content).status_code in (200, 204)
        files.append({"Name": name, "Url": generated["FirmwareUrl"]})
    firmware_id = api.call("CreateOTAFirmware", {
        "ProductKey": product_key, "FirmwareName": "multi", "DestVersion": "3.0", "MultiFiles": files,
        "Udi": "udi-for-devices"})["Data"]["FirmwareId"]
    shown = " ".join(otaplane_cli("firmware", "show", firmware_id, env=env).stdout.split())
    assert "udi-for-devices" in shown
    assert "File boot-img" in shown and "400 bytes, Md5 " + hashlib.md5(b"boot" * 100).hexdigest() in shown
    assert "File app-img" in shown and "550 bytes" in shown


def test_cli_works_on_another_instance_of_the_account(server, tmp_path):
    """The firmware commands had no way to name an IotInstanceId: a product of a second instance
    (otaplane instances create) was "not existed" to them, and its packages out of reach (found by
    an audit)."""
    account = "cli-inst-" + uuid.uuid4().hex[:6]
    key_id, secret = server.create_key(account)
    instance = json.loads(server.cli("instances", "create", "--account", account, "--json").stdout)["IotInstanceId"]
    env = {"OTAPLANE_ENDPOINT": server.base_url, "OTAPLANE_ACCESS_KEY_ID": key_id,
           "OTAPLANE_ACCESS_KEY_SECRET": secret}
    product_key = SdkCaller("tea-v3", server.endpoint, key_id, secret).call(
        "CreateProduct", {"ProductName": "cli_" + uuid.uuid4().hex[:8], "NodeType": 0,
                          "IotInstanceId": instance})["ProductKey"]
    firmware = tmp_path / "second.bin"
    firmware.write_bytes(b"second instance" * 100)
    upload = ("firmware", "upload", str(firmware), "--product", product_key, "--version", "1.1", "--json")
    refused = otaplane_cli(*upload, env=env, check=False)
    assert refused.returncode == 1 and "iot.prod.NotExistedProduct" in refused.stdout
    info = json.loads(otaplane_cli(*upload, "--instance", instance, env=env).stdout)
    assert info["ProductKey"] == product_key and info["FirmwareSize"] == len(firmware.read_bytes())
    in_instance = {**env, "OTAPLANE_IOT_INSTANCE_ID": instance}
    listed = json.loads(otaplane_cli("firmware", "list", "--json", env=in_instance).stdout)
    assert [i["FirmwareId"] for i in listed["FirmwareInfo"]["SimpleFirmwareInfo"]] == [info["FirmwareId"]]
    assert json.loads(otaplane_cli("firmware", "list", "--json", env=env).stdout)["Total"] == 0
    assert otaplane_cli("firmware", "show", info["FirmwareId"], env=env, check=False).returncode == 1
    assert otaplane_cli("firmware", "delete", info["FirmwareId"], "--instance", instance, env=env).returncode == 0
