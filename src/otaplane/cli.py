"""`otaplane` commands: serve, keys, instances, db."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from otaplane.cli_devices import app as devices_app
from otaplane.cli_firmware import app as firmware_app
from otaplane.cli_sim import sim as sim_command
from otaplane.settings import Settings

app = typer.Typer(help="otaplane: OTA firmware control plane.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage AccessKeys (per account).", no_args_is_help=True)
instances_app = typer.Typer(help="IoT instances (IotInstanceId) of an account.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(instances_app, name="instances")
app.add_typer(db_app, name="db")
app.add_typer(firmware_app, name="firmware")
app.add_typer(devices_app, name="devices")
app.command("sim")(sim_command)

console = Console()

DataDir = Annotated[
    Optional[Path], typer.Option("--data-dir", help="Data directory (env OTAPLANE_DATA_DIR).", show_default=False)
]
DatabaseUrl = Annotated[
    Optional[str], typer.Option("--database-url", help="postgresql://... (env OTAPLANE_DATABASE_URL).", show_default=False)
]


# The options of the `list` commands.
AccountFilter = Annotated[Optional[str], typer.Option(help="Only this account.")]
AsJsonRows = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _settings(**overrides) -> Settings:
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as problem:  # a bad flag or OTAPLANE_* value: which, and why, on one line
        _refuse(ValueError("; ".join(_setting_error(error) for error in problem.errors())))
    except ValueError as problem:
        _refuse(problem)


def _setting_error(error: dict) -> str:
    """'port (OTAPLANE_PORT or its flag): Input should be ...', without the value (a secret, maybe)."""
    name = ".".join(str(part) for part in error["loc"])
    return f"{name} (OTAPLANE_{name.upper()} or its flag): {error['msg']}"


def _print_rows(rows: list[dict], as_json: bool, columns: tuple[str, ...]) -> None:
    """A JSON array, or a table whose first column (an id other commands take) is never
    shortened: rich ellipsizes to fit, e.g. 80 columns in a pipe."""
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table()
    table.add_column(columns[0], no_wrap=True)
    for header in columns[1:]:
        table.add_column(header)
    for row in rows:
        # Text, not markup: an account named '[/x]' (or a description '[ci/prod]') is shown as it is, and
        # never breaks the table (rich's MarkupError) or hides part of a value
        table.add_row(*(Text("yes" if row[c] is True else "" if row[c] is False else str(row[c])) for c in columns))
    console.print(table)


def _refuse(problem: Exception) -> NoReturn:
    console.print(f"[red]otaplane: {escape(str(problem))}[/]")
    raise typer.Exit(2)


def _services(settings: Settings):
    """The services on the configured database. A command run away from the server's data
    directory would quietly make a database of its own: it says so."""
    url = settings.resolved_database_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        path = escape(url.removeprefix("sqlite:///"))
        Console(stderr=True).print(f"[yellow]otaplane: no database at {path}: a new one is made. Run this where the "
                                   "server runs, or pass --data-dir.[/]")
    try:
        return _open_services(settings, lambda services: services.db.upgrade())
    except ValueError as problem:  # e.g. an OTAPLANE_MASTER_KEY that is not a Fernet key
        _refuse(problem)
    except StartupProblem as problem:
        console.print(f"[red]otaplane: {escape(str(problem))}[/]")
        raise typer.Exit(1) from None


class StartupProblem(Exception):
    """What keeps the data directory or the database from being used, said in one line."""


def _open_services(settings: Settings, prepare):
    """Services.build and `prepare` (the schema...), then a check that this process's master key
    is the one the database's secrets were stored with. ValueError for a bad setting, StartupProblem
    for a data directory or a database that cannot be used, never a traceback. A master.key file
    made just now for a database whose secrets it cannot read is removed again."""
    import sqlalchemy.exc

    from otaplane.secretbox import MASTER_KEY_FILE
    from otaplane.services.container import Services

    key_file = settings.data_dir / MASTER_KEY_FILE
    fresh_key_file = not settings.master_key and not key_file.exists()
    services = None
    try:
        services = Services.build(settings)
        prepare(services)
        services.accounts.check_master_key()
    except ValueError:
        if services is not None and fresh_key_file:
            key_file.unlink(missing_ok=True)
        raise
    except sqlalchemy.exc.DBAPIError as problem:  # unreachable, refused, no such database...
        detail = " ".join(str(problem.orig if problem.orig is not None else problem).split())
        raise StartupProblem(f"the database cannot be used: {detail}") from None
    except (sqlalchemy.exc.ArgumentError, ImportError) as problem:  # not a URL; mysql://: no driver
        raise StartupProblem(f"the database URL cannot be used ({problem}): otaplane runs on SQLite (the "
                             "default, or sqlite:////path) and postgresql://user@host:port/db") from None
    except OSError as problem:  # a data directory that cannot be made or written
        raise StartupProblem(f"the data directory {settings.data_dir} cannot be used: {problem}") from None
    return services


def _check_port_free(host: str, port: int, what: str, hint: str) -> None:
    """Say so in one line, before anything starts, when a listener cannot bind (typically another
    server on the port), instead of a traceback, or uvicorn's exit after the broker had started."""
    import socket

    if port == 0:
        return
    try:
        # An empty host is every interface, as the servers read it (AI_PASSIVE: the wildcard address).
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as problem:
        console.print(f"[red]otaplane: the {what} address {host}:{port} cannot be used: {escape(str(problem))}[/]")
        raise typer.Exit(1) from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            probe.bind(address)
        except OSError as problem:
            reason = escape(str(problem.strerror))
            console.print(f"[red]otaplane: the {what} port {host}:{port} is not free ({reason}); {hint}[/]")
            raise typer.Exit(1) from None


def _check_mqtt_port_free(host: str, port: int) -> None:
    _check_port_free(host, port, "MQTT", "another MQTT broker? Pass --mqtt-port N (OTAPLANE_MQTT_PORT), or "
                     "OTAPLANE_MQTT_URL to use that broker instead of the embedded one.")


def _check_mqtt_tls(certfile: str, keyfile: str) -> None:
    """The broker's TLS files, loaded as the broker loads them (one PEM may hold both): a missing,
    unreadable or mismatched file is one line before anything starts, not the broker's tracebacks."""
    import ssl

    if not (certfile or keyfile):
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile or keyfile, keyfile or certfile)
    except OSError as problem:  # FileNotFoundError, PermissionError, ssl.SSLError
        files = ", ".join(dict.fromkeys(f for f in (certfile, keyfile) if f))
        console.print(f"[red]otaplane cannot start:[/] the MQTT TLS certificate and key ({escape(files)}) cannot "
                      f"be used: {escape(str(problem))}. --mqtt-certfile takes a PEM certificate, --mqtt-keyfile "
                      "its PEM private key (or one file holding both).")
        raise typer.Exit(1) from None


@app.command()
def serve(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    host: Annotated[Optional[str], typer.Option(help="Listen address [127.0.0.1].")] = None,
    port: Annotated[Optional[int], typer.Option(help="Listen port [8080].")] = None,
    public_url: Annotated[Optional[str], typer.Option(help="Base URL devices and clients dial.")] = None,
    response_case: Annotated[Optional[str], typer.Option(help="pascal (default) or camel.")] = None,
    rate_limit: Annotated[Optional[float], typer.Option(help="Requests/s per AccessKey; 0 = off.")] = None,
    access_log: Annotated[bool, typer.Option(help="Log every HTTP request.")] = False,
    mqtt_host: Annotated[Optional[str], typer.Option(help="Device channel (MQTT) listen address (default: as --host).")] = None,
    mqtt_port: Annotated[Optional[int], typer.Option(help="Device channel (MQTT) port [1883].")] = None,
    mqtt_certfile: Annotated[Optional[str], typer.Option(help="PEM certificate: MQTT over TLS.")] = None,
    mqtt_keyfile: Annotated[Optional[str], typer.Option(help="PEM private key of --mqtt-certfile.")] = None,
    cors_origins: Annotated[Optional[str], typer.Option(
        help="Browser origins allowed to upload and download blobs (CORS): comma-separated, or *.")] = None,
) -> None:
    """Run the server (OpenAPI gateway and MQTT device channel) on embedded defaults or the configured backends."""
    import uvicorn

    from otaplane.blobs import BlobStoreUnavailable
    from otaplane.http_protocol import CoalescingHttpToolsProtocol
    from otaplane.server import create_app, prepare

    settings = _settings(
        data_dir=data_dir, database_url=database_url, host=host, port=port, public_url=public_url,
        response_case=response_case, rate_limit=rate_limit, access_log=access_log or None,
        mqtt_host=mqtt_host, mqtt_port=mqtt_port, mqtt_certfile=mqtt_certfile, mqtt_keyfile=mqtt_keyfile,
        cors_origins=cors_origins,
    )
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.public_url and settings.host in ("0.0.0.0", "::", ""):
        logging.getLogger("otaplane").warning(
            "listening on all interfaces (%s) without --public-url: upload and download URLs say %s, which "
            "other machines cannot reach; set --public-url (OTAPLANE_PUBLIC_URL) to the address devices dial",
            settings.host or "*", settings.resolved_public_url())
    _check_port_free(settings.host, settings.port, "HTTP", "another server? Pass --port N (OTAPLANE_PORT).")
    if not settings.mqtt_url:
        _check_mqtt_port_free(settings.resolved_mqtt_host(), settings.mqtt_port)
        _check_mqtt_tls(settings.mqtt_certfile, settings.mqtt_keyfile)
    try:
        services = _open_services(settings, prepare)
    except (ValueError, BlobStoreUnavailable, StartupProblem) as problem:  # a setting, store, data dir, database
        console.print(f"[red]otaplane cannot start:[/] {escape(str(problem))}")
        raise typer.Exit(1) from None
    uvicorn.run(
        create_app(services),
        host=settings.host,
        port=settings.port,
        access_log=settings.access_log,
        log_level=settings.log_level,
        server_header=False,
        # a response's head and body in one send(); its own 400 in the configured case
        http=CoalescingHttpToolsProtocol.for_case(settings.response_case),
    )


@keys_app.command("create")
def keys_create(
    account: Annotated[str, typer.Option(help="Account name; created if new.")] = "default",
    description: Annotated[str, typer.Option(help="A note to recognise the key by.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print {AccessKeyId, AccessKeySecret}.")] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an AccessKey; the secret is shown this once."""
    services = _services(_settings(data_dir=data_dir, database_url=database_url))
    try:
        new_key = services.accounts.create_key(account, description)
    except ValueError as problem:
        _refuse(problem)
    finally:
        services.close()
    if as_json:
        typer.echo(json.dumps({"AccessKeyId": new_key.access_key_id, "AccessKeySecret": new_key.access_key_secret}))
        return
    console.print(f"Account:         [bold]{escape(new_key.account)}[/]")
    console.print(f"AccessKeyId:     [bold]{escape(new_key.access_key_id)}[/]")
    console.print(f"AccessKeySecret: [bold]{escape(new_key.access_key_secret)}[/]")
    console.print("[yellow]The secret is not shown again; store it now.[/]")


@keys_app.command("list")
def keys_list(
    account: AccountFilter = None,
    as_json: AsJsonRows = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """List AccessKeys (never their secrets)."""
    from otaplane.timefmt import utc_iso_ms

    services = _services(_settings(data_dir=data_dir, database_url=database_url))
    records = services.accounts.list_keys(account)
    services.close()
    rows = [
        {
            "AccessKeyId": r.access_key_id,
            "Account": r.account_name,
            "Status": r.status,
            "Description": r.description,
            "Created": utc_iso_ms(r.created_ms),
        }
        for r in records
    ]
    _print_rows(rows, as_json, ("AccessKeyId", "Account", "Status", "Created", "Description"))


@keys_app.command("revoke")
def keys_revoke(
    access_key_id: Annotated[str, typer.Argument(help="The AccessKeyId to revoke.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke an AccessKey: requests signed with it are refused from now on."""
    services = _services(_settings(data_dir=data_dir, database_url=database_url))
    revoked = services.accounts.revoke_key(access_key_id)
    services.close()
    if not revoked:
        console.print(f"[red]No active key {escape(access_key_id)}.[/]")
        raise typer.Exit(1)
    console.print(f"Revoked {escape(access_key_id)}.")


@instances_app.command("create")
def instances_create(
    account: Annotated[str, typer.Option(help="Account name; created if new.")] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print {IotInstanceId, Account}.")] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create another instance (IotInstanceId) for the account.

    Requests that pass its IotInstanceId, signed with any key of the account, see its own
    products, firmware, devices and jobs only."""
    services = _services(_settings(data_dir=data_dir, database_url=database_url))
    try:
        instance_id = services.accounts.create_instance(account)
    except ValueError as problem:
        _refuse(problem)
    finally:
        services.close()
    if as_json:
        typer.echo(json.dumps({"IotInstanceId": instance_id, "Account": account}))
        return
    console.print(f"Account {escape(account)}: IotInstanceId [bold]{instance_id}[/]")


@instances_app.command("list")
def instances_list(
    account: AccountFilter = None,
    as_json: AsJsonRows = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """List the instances (requests without IotInstanceId use the account's default one)."""
    from otaplane.timefmt import utc_iso_ms

    services = _services(_settings(data_dir=data_dir, database_url=database_url))
    records = services.accounts.list_instances(account)
    services.close()
    rows = [{"IotInstanceId": r.instance_id, "Account": r.account_name, "Default": r.is_default,
             "Created": utc_iso_ms(r.created_ms)} for r in records]
    _print_rows(rows, as_json, ("IotInstanceId", "Account", "Default", "Created"))


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Apply schema migrations (the server also does this on start)."""
    services = _services(_settings(data_dir=data_dir, database_url=database_url))
    services.close()
    console.print("Schema is up to date.")
