"""`otaplane keys` against a running server, and where AccessKey secrets may (never) end up."""

from __future__ import annotations

import json
import stat
import uuid

import pytest
import sqlalchemy as sa
from aliyunsdkcore.acs_exception.exceptions import ServerException as LegacyServerException
from aliyunsdkiot.request.v20180120.QueryProductListRequest import QueryProductListRequest
from cryptography.fernet import Fernet
from Tea.exceptions import TeaException

from tests.support.clients import RawSigner, iot_models, legacy_call, legacy_client, tea_client, wait_until_revoked
from tests.support.server import free_port, otaplane_cli


def _account(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _list_request() -> QueryProductListRequest:
    request = QueryProductListRequest()
    request.set_CurrentPage(1)
    request.set_PageSize(10)
    return request


def _use_with_every_client(server, key_id: str, secret: str) -> None:
    """One successful call per client variant, plus a product (so the key's secret is used)."""
    body = legacy_call(legacy_client(key_id, secret), server.endpoint, _list_request())
    assert body["Success"] is True, body
    for signature in ("v3", "v2"):
        response = tea_client(server.endpoint, key_id, secret, signature).query_product_list(
            iot_models.QueryProductListRequest(current_page=1, page_size=10)
        )
        assert response.body.success is True
    created = RawSigner(server.base_url, key_id, secret).v1(
        "CreateProduct", {"ProductName": "k_" + uuid.uuid4().hex[:12], "NodeType": "0"}
    )
    assert created.json()["Success"] is True, created.text


def _assert_gateway_error(server, key_id: str, secret: str, status: int, code: str) -> None:
    """Raw V1 and V3 requests, and all three SDK variants, get HTTP `status` with `code`."""
    signer = RawSigner(server.base_url, key_id, secret)
    for response in (signer.v1("QueryProductList", {"CurrentPage": "1", "PageSize": "10"}),
                     signer.v3("QueryProductList", {"CurrentPage": "1", "PageSize": "10"})):
        assert response.status_code == status, response.text
        body = response.json()
        assert body["Code"] == code, body
        assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}, body

    with pytest.raises(LegacyServerException) as legacy:
        legacy_call(legacy_client(key_id, secret), server.endpoint, _list_request())
    assert (legacy.value.get_http_status(), legacy.value.get_error_code()) == (status, code)

    for signature in ("v3", "v2"):
        with pytest.raises(TeaException) as tea:
            tea_client(server.endpoint, key_id, secret, signature).query_product_list(
                iot_models.QueryProductListRequest(current_page=1, page_size=10)
            )
        assert tea.value.code == code, (signature, tea.value)
        assert tea.value.data["statusCode"] == status, (signature, tea.value.data)


# --- keys create / list / revoke ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def used_key(server) -> tuple[str, str, str]:
    """(account, AccessKeyId, AccessKeySecret) of a key created while the server runs, then used."""
    account = _account("cli-used")
    key_id, secret = server.create_key(account)
    _use_with_every_client(server, key_id, secret)  # works at once, with every client variant
    return account, key_id, secret


def test_key_created_while_the_server_runs_works_at_once(used_key):
    _, key_id, secret = used_key
    assert key_id.startswith("LTAI") and len(key_id) == 24
    assert len(secret) == 30


def test_keys_list_shows_ids_and_never_secrets(server, used_key):
    account, key_id, secret = used_key

    # The table, as a script or a pipe sees it (80 columns): the whole id, no secret.
    table = otaplane_cli("keys", "list", env={**server.env, "COLUMNS": "80"}).stdout
    assert key_id in table, table
    assert secret not in table

    rows = json.loads(server.cli("keys", "list", "--json").stdout)
    by_id = {row["AccessKeyId"]: row for row in rows}
    assert by_id[key_id]["Account"] == account
    assert by_id[key_id]["Status"] == "active"
    assert by_id[key_id]["Created"].endswith("Z")
    for row in rows:
        assert not [name for name in row if "secret" in name.lower()], row
    assert secret not in json.dumps(rows)


def test_revoked_key_is_refused_within_a_second(server):
    key_id, secret = server.create_key(_account("cli-revoke"))
    response = RawSigner(server.base_url, key_id, secret).v1("QueryProductList", {"CurrentPage": "1", "PageSize": "1"})
    assert response.status_code == 200, response.text

    revoked = server.cli("keys", "revoke", key_id)
    assert key_id in revoked.stdout
    wait_until_revoked(server.base_url, key_id, secret)
    _assert_gateway_error(server, key_id, secret, 400, "InvalidAccessKeyId.Inactive")

    again = server.cli("keys", "revoke", key_id, check=False)
    assert again.returncode != 0, again
    assert key_id in again.stdout + again.stderr


def test_unknown_access_key_id_is_not_found(server):
    _assert_gateway_error(server, "LTAI" + uuid.uuid4().hex[:20], "no-such-secret", 404, "InvalidAccessKeyId.NotFound")


# --- secrets at rest and in logs ------------------------------------------------------------------------
def test_secret_files_are_private(server):
    for name in ("master.key", "admin-credentials.json"):
        path = server.data_dir / name
        assert path.exists(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (name, oct(path.stat().st_mode))


def test_admin_credentials_file_holds_a_working_key(server):
    admin = json.loads((server.data_dir / "admin-credentials.json").read_text())
    assert admin["Account"] == "default"
    response = RawSigner(server.base_url, admin["AccessKeyId"], admin["AccessKeySecret"]).v1(
        "QueryProductList", {"CurrentPage": "1", "PageSize": "1"}
    )
    assert response.status_code == 200, response.text
    assert admin["AccessKeySecret"] not in server.logs()


def _database_texts(server) -> list[bytes]:
    """Everything the database holds, as bytes to search: the SQLite files (with the WAL), or
    every row of every table for PostgreSQL."""
    if not server.database_url:
        files = sorted(server.data_dir.glob("otaplane.db*"))
        assert files, list(server.data_dir.iterdir())
        return [path.read_bytes() for path in files]
    url = "postgresql+psycopg://" + server.database_url.split("://", 1)[1]
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            tables = conn.execute(sa.text(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )).scalars().all()
            assert "access_keys" in tables
            return [
                "\n".join(conn.execute(sa.text(f'SELECT t::text FROM "{table}" t')).scalars()).encode()
                for table in tables
            ]
    finally:
        engine.dispose()


def test_secrets_never_reach_the_log_or_the_database_in_plaintext(server, used_key):
    _, key_id, secret = used_key
    # Failing requests too: a wrong signature answers with the string to sign, never a secret.
    wrong = RawSigner(server.base_url, key_id, secret[::-1]).v1("QueryProductList", {"CurrentPage": "1", "PageSize": "1"})
    assert wrong.json()["Code"] == "SignatureDoesNotMatch"
    product_secret = RawSigner(server.base_url, key_id, secret).v1(
        "CreateProduct", {"ProductName": "s_" + uuid.uuid4().hex[:12], "NodeType": "0"}
    ).json()["Data"]["ProductSecret"]

    log = server.logs()
    assert log, "the server log is empty: is it written where tests/support/server.py says?"
    assert secret not in log
    assert product_secret not in log

    texts = _database_texts(server)
    assert any(key_id.encode() in blob for blob in texts), "the key id should be stored (sanity check)"
    for blob in texts:
        assert secret.encode() not in blob
        assert product_secret.encode() not in blob
    master_key = (server.data_dir / "master.key").read_bytes().strip()
    assert all(master_key not in blob for blob in texts)
    assert master_key.decode() not in log


def test_master_key_from_the_environment(server, make_server):
    backend = "postgresql" if server.database_url else "sqlite"
    master_key = Fernet.generate_key().decode()
    own = make_server(backend, "--rate-limit", "0", env={"OTAPLANE_MASTER_KEY": master_key})
    key_id, secret = own.create_key(_account("env-master"))  # the CLI gets the same env
    response = RawSigner(own.base_url, key_id, secret).v1("QueryProductList", {"CurrentPage": "1", "PageSize": "1"})
    assert response.status_code == 200, response.text

    assert not (own.data_dir / "master.key").exists(), sorted(p.name for p in own.data_dir.iterdir())
    admin = own.data_dir / "admin-credentials.json"
    assert stat.S_IMODE(admin.stat().st_mode) == 0o600
    log = own.logs()
    assert master_key not in log and secret not in log


def test_a_bad_setting_is_one_line_and_a_new_database_is_announced(tmp_path):
    """A bad OTAPLANE_* value or master key was a 60-line traceback; a command run away from the
    server's data directory quietly made a database of its own (found by a new-user audit)."""
    for env in ({"OTAPLANE_PORT": "abc"}, {"OTAPLANE_MASTER_KEY": "notakey"}):
        result = otaplane_cli("keys", "list", "--data-dir", str(tmp_path / "bad"), env=env, check=False)
        assert result.returncode == 2, result
        assert "Traceback" not in result.stdout + result.stderr
    fresh = otaplane_cli("keys", "list", "--data-dir", str(tmp_path / "elsewhere"), check=False)
    assert fresh.returncode == 0 and "a new one is made" in " ".join(fresh.stderr.split())
    again = otaplane_cli("keys", "list", "--data-dir", str(tmp_path / "elsewhere"), check=False)
    assert "a new one is made" not in again.stderr


def test_names_with_brackets_are_printed_as_given(tmp_path):
    """Output went through rich markup: `keys create --account '[/x]'` created the key and then died
    in a MarkupError traceback before printing its secret, after which `keys list` died on every
    call; a description like 'deploy [ci/prod]' was shown as 'deploy ' (found by a CLI audit)."""
    data_dir = str(tmp_path / "data")
    created = otaplane_cli("keys", "create", "--account", "[/x]", "--description", "deploy [ci/prod] [/]",
                           "--data-dir", data_dir, env={"COLUMNS": "200"}, check=False)
    assert created.returncode == 0, created.stderr
    assert "Account:         [/x]" in created.stdout and "AccessKeySecret: " in created.stdout
    listed = otaplane_cli("keys", "list", "--data-dir", data_dir, env={"COLUMNS": "200"}, check=False)
    assert listed.returncode == 0, listed.stderr
    assert "[/x]" in listed.stdout and "deploy [ci/prod] [/]" in listed.stdout
    instance = otaplane_cli("instances", "create", "--account", "[red]acme", "--data-dir", data_dir, check=False)
    assert instance.returncode == 0 and "Account [red]acme: " in instance.stdout, instance
    revoked = otaplane_cli("keys", "revoke", "[/y]", "--data-dir", data_dir, check=False)
    assert revoked.returncode == 1 and "No active key [/y]." in revoked.stdout, revoked
    assert "Traceback" not in created.stderr + listed.stderr + instance.stderr + revoked.stderr


def test_help_shows_bracketed_defaults():
    """Rich took '[run until Ctrl-C/SIGTERM]' and the like in help texts for markup and dropped them."""
    shown = {
        ("sim",): ("[run until Ctrl-C/SIGTERM]", "[server settings, else the endpoint's host]"),
        ("devices", "push"): ("[the account's default]",),
    }
    for command, texts in shown.items():
        result = otaplane_cli(*command, "--help", env={"COLUMNS": "250"})
        for text in texts:
            assert text in result.stdout, (command, text)


def test_a_master_key_other_than_the_database_s_is_refused(tmp_path):
    """On a shared database (PostgreSQL; here the SQLite file of another data directory), a local
    command run from another data directory made a master.key of its own and stored a key whose
    secret no server could decrypt: every request signed with it was an InternalError. A server
    started that way failed every request too (found by a CLI audit)."""
    server_dir, other_dir = tmp_path / "server", tmp_path / "elsewhere"
    otaplane_cli("keys", "create", "--account", "first", "--data-dir", str(server_dir))
    url = f"sqlite:///{server_dir / 'otaplane.db'}"
    for command in (("keys", "create", "--account", "second"), ("keys", "list"), ("db", "upgrade")):
        result = otaplane_cli(*command, "--data-dir", str(other_dir), "--database-url", url, check=False)
        assert result.returncode == 2, result
        assert "stored with another master key" in " ".join(result.stdout.split()), result
        assert "Traceback" not in result.stdout + result.stderr
    assert not (other_dir / "master.key").exists()  # not left behind for the next command to trust
    wrong = otaplane_cli("keys", "create", "--data-dir", str(server_dir), check=False,
                         env={"OTAPLANE_MASTER_KEY": Fernet.generate_key().decode()})
    assert wrong.returncode == 2 and "another master key" in " ".join(wrong.stdout.split()), wrong
    listed = json.loads(otaplane_cli("keys", "list", "--json", "--data-dir", str(server_dir)).stdout)
    assert [row["Account"] for row in listed] == ["first"]
    serve = otaplane_cli("serve", "--data-dir", str(other_dir), "--database-url", url, "--port", str(free_port()),
                         "--mqtt-port", str(free_port()), check=False)
    assert serve.returncode == 1 and "another master key" in " ".join(serve.stdout.split()), serve
    assert "Traceback" not in serve.stdout + serve.stderr


def test_a_database_or_tls_file_that_cannot_be_used_is_one_line(tmp_path):
    """A data directory that is a file, a database URL that is not one (or names a driver otaplane
    lacks), an unreachable PostgreSQL and missing or mismatched MQTT TLS files each ended in a rich
    traceback of 100-500 lines (found by a CLI audit)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    data_dir = str(tmp_path / "data")
    for options in (("--data-dir", str(a_file)), ("--database-url", "nonsense"), ("--database-url", "mysql://x/y"),
                    ("--database-url", f"postgresql://postgres@127.0.0.1:{free_port()}/test")):
        for command in (("keys", "list"), ("serve", "--port", str(free_port()), "--mqtt-port", str(free_port()))):
            result = otaplane_cli(*command, "--data-dir", data_dir, *options, check=False)
            assert result.returncode == 1, (options, result)
            assert "Traceback" not in result.stdout + result.stderr, (options, result)
            assert "cannot be used" in " ".join(result.stdout.split()), (options, result)
    for tls in (("--mqtt-certfile", str(tmp_path / "no.pem")), ("--mqtt-certfile", str(a_file))):
        result = otaplane_cli("serve", "--data-dir", data_dir, "--port", str(free_port()), "--mqtt-port",
                              str(free_port()), *tls, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result
        assert "MQTT TLS certificate and key" in " ".join(result.stdout.split()), result



def test_a_setting_out_of_range_is_named_in_one_message(tmp_path):
    result = otaplane_cli("serve", "--data-dir", str(tmp_path), "--port", "70000", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result
    said = " ".join(result.stdout.split())
    assert "port (OTAPLANE_PORT or its flag): Input should be less than or equal to 65535" in said, said
    assert "errors.pydantic.dev" not in said
