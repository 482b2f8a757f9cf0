"""`otaplane firmware ...`: upload, show, list, delete through the signed API."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Column, Table

from otaplane.client import ApiCallError, Credentials, OtaplaneClient
from otaplane import errors
from otaplane.errors import ApiError
from otaplane.openapi.params import parse_params
from otaplane.openapi.registry import build_table
from otaplane.services.firmware import MAX_FILE_BYTES, MAX_PACKAGES_PER_INSTANCE

app = typer.Typer(help="Firmware packages on an otaplane endpoint.", no_args_is_help=True)
console = Console()
progress_console = Console(stderr=True)
UPLOAD_STALL_S = 120  # the longest the store may leave an upload without reading or answering

SUFFIXES = ("tar.gz", "tar.xz", "bin", "dav", "apk", "tar", "gz", "zip", "gzip", "pack")

Endpoint = Annotated[str, typer.Option(envvar="OTAPLANE_ENDPOINT", help="otaplane URL.")]
KeyId = Annotated[Optional[str], typer.Option(envvar="OTAPLANE_ACCESS_KEY_ID", help="AccessKeyId.")]
KeySecret = Annotated[
    Optional[str], typer.Option(envvar="OTAPLANE_ACCESS_KEY_SECRET", help="AccessKeySecret.", show_default=False)
]
DataDir = Annotated[Path, typer.Option(envvar="OTAPLANE_DATA_DIR", help="Where to find admin-credentials.json "
                                       "when no key is given.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the raw response body.")]
Instance = Annotated[Optional[str], typer.Option(
    "--instance", envvar="OTAPLANE_IOT_INSTANCE_ID", help="IotInstanceId (otaplane instances create); "
    "default: the account's default instance.", show_default=False)]


def _client(endpoint: str, key_id: str | None, secret: str | None, data_dir: Path,
            instance: str | None = None) -> OtaplaneClient:
    if key_id and secret:
        return OtaplaneClient(endpoint, Credentials(key_id, secret), instance_id=instance)
    if key_id or secret:  # half a pair: never fall back to the admin key of the data directory
        given, missing = ("AccessKeyId", "AccessKeySecret") if key_id else ("AccessKeySecret", "AccessKeyId")
        console.print(f"[red]An {given} without its {missing}: pass both (--access-key-id/--access-key-secret "
                      "or OTAPLANE_ACCESS_KEY_ID/OTAPLANE_ACCESS_KEY_SECRET).[/]")
        raise typer.Exit(2)
    fallback = data_dir / "admin-credentials.json"
    if fallback.exists():
        try:
            return OtaplaneClient(endpoint, Credentials.from_file(fallback), instance_id=instance)
        except ValueError as problem:
            console.print(f"[red]{problem}[/]")
            raise typer.Exit(2) from None
    console.print("[red]No AccessKey: pass --access-key-id/--access-key-secret or set "
                  "OTAPLANE_ACCESS_KEY_ID/OTAPLANE_ACCESS_KEY_SECRET.[/]")
    raise typer.Exit(2)


def _fail(error: ApiCallError | ApiError, exit_code: int = 1) -> NoReturn:
    """The server's refusal (or the one it would make, found before a call) as Code: message."""
    console.print(f"[red]{error.code}[/]: {error.message}")
    raise typer.Exit(exit_code)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith("." + s)), "bin")


class _ProgressFile:
    """A file object that reports every read to a progress bar (httpx streams it in chunks)."""

    def __init__(self, handle, advance):
        self._handle = handle
        self._advance = advance

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._advance(len(chunk))
        return chunk

    def __getattr__(self, name):  # fileno, seek, tell: httpx uses them to learn the length
        return getattr(self._handle, name)


def _digest(path: Path, method: str) -> str:
    digest = hashlib.sha256() if method == "SHA256" else hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _post_file(data: dict, path: Path) -> None:
    fields = data.get("FormFields") or {
        "key": data["Key"], "policy": data["Policy"], "OSSAccessKeyId": data["OSSAccessKeyId"],
        "Signature": data["Signature"], "success_action_status": "200",
    }
    size = path.stat().st_size
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    # On stderr: stdout carries the result (--json prints only JSON there).
    with Progress(*columns, console=progress_console, transient=False) as progress, path.open("rb") as handle:
        task = progress.add_task(f"upload {path.name}", total=size)
        body = _ProgressFile(handle, lambda n: progress.advance(task, n))
        try:
            # No bound on the whole upload (a big file on a slow link), but on each wait for the store.
            response = httpx.post(data["Host"], data=fields, files={"file": (path.name, body)},
                                  timeout=httpx.Timeout(UPLOAD_STALL_S, connect=10))
        except httpx.HTTPError as problem:
            console.print(f"[red]Upload to {data['Host']} failed:[/] {type(problem).__name__}: {problem}")
            raise typer.Exit(1) from None
    if response.status_code not in (200, 201, 204):
        console.print(f"[red]Upload refused ({response.status_code}):[/] {response.text[:500]}")
        raise typer.Exit(1)


def _default_name(file: Path, version: str) -> str:
    """`<file stem>-<version>` as a valid FirmwareName: allowed characters only, starting with a
    letter or digit, at most 40."""
    name = "".join(c if c.isalnum() or c in "_-()" else "-" for c in f"{file.stem}-{version}")
    return (name.lstrip("_-()") or "firmware")[:40]


def _package_names(client: OtaplaneClient) -> tuple[set[str], int]:
    """The names of the instance's packages and how many there are (ListOTAFirmware, all pages)."""
    names: set[str] = set()
    page, total = 1, 0
    while True:
        body = client.call("ListOTAFirmware", {"CurrentPage": page, "PageSize": 100})
        items = body["FirmwareInfo"]["SimpleFirmwareInfo"]
        names.update(item["FirmwareName"] for item in items)
        total = body["Total"]
        if not items or page >= body["PageCount"]:
            return names, total
        page += 1


def _check_before_upload(client: OtaplaneClient, params: dict, file: Path) -> None:
    """Refuse now what CreateOTAFirmware would refuse after a long upload: the parameters by
    the server's own rules (otaplane.openapi's declarations), an empty or too large file, an
    unknown product or module, a name taken or a full instance (asked of the server)."""
    flat = {key: str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in params.items() if value is not None}
    try:
        parse_params(build_table()["CreateOTAFirmware"].params, {**flat, "FirmwareUrl": "https://checked.later/x"})
    except ApiError as refused:
        _fail(refused, exit_code=2)
    size = file.stat().st_size
    if size == 0:
        console.print(f"[red]{file} is empty[/]: a firmware file has at least one byte.")
        raise typer.Exit(2)
    if size > MAX_FILE_BYTES:
        _fail(errors.FirmwareTooLarge(limit=MAX_FILE_BYTES, actual=size), exit_code=2)
    try:
        modules = client.call("ListOTAModuleByProduct", {"ProductKey": params["ProductKey"]}, method="GET")["Data"]
    except ApiCallError as error:
        _fail(error)
    if params["ModuleName"].lower() not in {module["ModuleName"].lower() for module in modules}:
        console.print(f"[red]iot.ota.ModuleNotFound[/]: product {params['ProductKey']} has no OTA module "
                      f"{params['ModuleName']!r}.")
        raise typer.Exit(1)
    try:
        names, total = _package_names(client)
    except ApiCallError as error:
        _fail(error)
    if params["FirmwareName"] in names:
        _fail(errors.FirmwareNameExists())
    if total >= MAX_PACKAGES_PER_INSTANCE:
        _fail(errors.FirmwareCountExceeded(limit=MAX_PACKAGES_PER_INSTANCE))


def _print_firmware(info: dict) -> None:
    table = Table(show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a URL folds onto more lines rather than losing its end
    for key in ("FirmwareId", "FirmwareName", "ProductKey", "ProductName", "ModuleName", "DestVersion",
                "SrcVersion", "Type", "FirmwareSize", "SignMethod", "FirmwareSign", "Status", "VerifyProgress",
                "FirmwareDesc", "Udi", "UtcCreate", "UtcModified", "FirmwareUrl"):
        if key in info:
            table.add_row(key, str(info[key]))
    for file in info.get("MultiFiles") or []:  # a multi-file package: each file, its checksum and URL
        sign = f"{info.get('SignMethod')} {file.get('SignValue')}"
        if info.get("SignMethod") != "Md5":
            sign += f", Md5 {file.get('FileMd5')}"
        table.add_row(f"File {file.get('Name')}", f"{file.get('Size')} bytes, {sign}\n{file.get('Url')}")
    console.print(table)


@app.command()
def upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    product: Annotated[str, typer.Option("--product", help="ProductKey.")],
    version: Annotated[str, typer.Option("--version", help="DestVersion.")],
    module: Annotated[str, typer.Option(help="OTA module.")] = "default",
    src_version: Annotated[Optional[str], typer.Option(help="SrcVersion: makes a diff package.")] = None,
    name: Annotated[Optional[str], typer.Option(help="FirmwareName [file name + version].")] = None,
    desc: Annotated[Optional[str], typer.Option(help="FirmwareDesc.")] = None,
    udi: Annotated[Optional[str], typer.Option(help="Udi passed to devices.")] = None,
    sign_method: Annotated[str, typer.Option(help="MD5 or SHA256.")] = "MD5",
    no_verify: Annotated[bool, typer.Option("--no-verify", help="NeedToVerify=false.")] = False,
    endpoint: Endpoint = "http://127.0.0.1:8080",
    access_key_id: KeyId = None,
    access_key_secret: KeySecret = None,
    data_dir: DataDir = Path("./otaplane-data"),
    instance: Instance = None,
    as_json: AsJson = False,
) -> None:
    """Upload FILE and create a firmware package from it."""
    client = _client(endpoint, access_key_id, access_key_secret, data_dir, instance)
    method = sign_method.upper()
    params = {
        "ProductKey": product, "FirmwareName": name or _default_name(file, version), "DestVersion": version,
        "ModuleName": module, "SrcVersion": src_version, "Type": 1 if src_version else 0, "FirmwareDesc": desc,
        "Udi": udi, "NeedToVerify": not no_verify, "SignMethod": method,
    }
    _check_before_upload(client, params, file)
    try:
        data = client.call("GenerateOTAUploadURL", {"FileSuffix": _suffix(file)})["Data"]
        _post_file(data, file)
        created = client.call("CreateOTAFirmware", {
            **params, "FirmwareUrl": data["FirmwareUrl"],
            # The server recomputes both from the stored object: this catches a corrupted upload.
            "FirmwareSign": _digest(file, method), "FirmwareSize": os.path.getsize(file),
        })
        info = client.call("QueryOTAFirmware", {"FirmwareId": created["Data"]["FirmwareId"]})["FirmwareInfo"]
    except ApiCallError as error:
        _fail(error)
    if as_json:
        typer.echo(json.dumps(info))
    else:
        _print_firmware(info)


@app.command()
def show(
    firmware_id: Annotated[str, typer.Argument(help="FirmwareId.")],
    endpoint: Endpoint = "http://127.0.0.1:8080",
    access_key_id: KeyId = None,
    access_key_secret: KeySecret = None,
    data_dir: DataDir = Path("./otaplane-data"),
    instance: Instance = None,
    as_json: AsJson = False,
) -> None:
    """Show one package (QueryOTAFirmware)."""
    client = _client(endpoint, access_key_id, access_key_secret, data_dir, instance)
    try:
        info = client.call("QueryOTAFirmware", {"FirmwareId": firmware_id})["FirmwareInfo"]
    except ApiCallError as error:
        _fail(error)
    typer.echo(json.dumps(info)) if as_json else _print_firmware(info)


@app.command("list")
def list_(
    product: Annotated[Optional[str], typer.Option("--product", help="Only this ProductKey.")] = None,
    page: Annotated[int, typer.Option(min=1)] = 1,
    page_size: Annotated[int, typer.Option(min=1, max=100)] = 20,
    endpoint: Endpoint = "http://127.0.0.1:8080",
    access_key_id: KeyId = None,
    access_key_secret: KeySecret = None,
    data_dir: DataDir = Path("./otaplane-data"),
    instance: Instance = None,
    as_json: AsJson = False,
) -> None:
    """List packages, newest first (ListOTAFirmware)."""
    client = _client(endpoint, access_key_id, access_key_secret, data_dir, instance)
    try:
        body = client.call("ListOTAFirmware", {"CurrentPage": page, "PageSize": page_size, "ProductKey": product})
    except ApiCallError as error:
        _fail(error)
    items = body["FirmwareInfo"]["SimpleFirmwareInfo"]
    if as_json:
        typer.echo(json.dumps(body))
        return
    # The id is what show, delete and devices push take: never cut to fit the terminal.
    table = Table(Column("FirmwareId", no_wrap=True), "Name", "ProductKey", "Module", "Version", "Size", "Status",
                  "Created")
    for item in items:
        table.add_row(item["FirmwareId"], item["FirmwareName"], item["ProductKey"], item["ModuleName"],
                      item["DestVersion"], str(item["FirmwareSize"]), str(item["Status"]), item["UtcCreate"])
    console.print(table)
    console.print(f"page {body['CurrentPage']} of {body['PageCount']}, {body['Total']} packages")


@app.command()
def delete(
    firmware_id: Annotated[str, typer.Argument(help="FirmwareId.")],
    endpoint: Endpoint = "http://127.0.0.1:8080",
    access_key_id: KeyId = None,
    access_key_secret: KeySecret = None,
    data_dir: DataDir = Path("./otaplane-data"),
    instance: Instance = None,
) -> None:
    """Delete a package (DeleteOTAFirmware)."""
    client = _client(endpoint, access_key_id, access_key_secret, data_dir, instance)
    try:
        client.call("DeleteOTAFirmware", {"FirmwareId": firmware_id})
    except ApiCallError as error:
        _fail(error)
    console.print(f"Deleted {firmware_id}.")
