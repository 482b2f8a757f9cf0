"""`otaplane devices ...`: operator commands on devices that the OpenAPI has no action for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from otaplane.errors import ApiError

app = typer.Typer(help="Devices and their OTA channel.", no_args_is_help=True)
console = Console()

DataDir = Annotated[
    Optional[Path], typer.Option("--data-dir", help="Data directory (env OTAPLANE_DATA_DIR).", show_default=False)
]
DatabaseUrl = Annotated[
    Optional[str], typer.Option("--database-url", help="postgresql://... (env OTAPLANE_DATABASE_URL).",
                                show_default=False)
]


@app.command("push")
def push(
    product: Annotated[str, typer.Option("--product", help="ProductKey of the device.")],
    device: Annotated[str, typer.Option("--device", help="DeviceName.")],
    firmware: Annotated[str, typer.Option("--firmware", help="FirmwareId of the package to install.")],
    account: Annotated[str, typer.Option(help="Account that owns the device and the package.")] = "default",
    iot_instance_id: Annotated[Optional[str], typer.Option(
        "--iot-instance-id", "--instance", help="IotInstanceId \\[the account's default].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {Module, MessageId}.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Cancel the device's job task for the module, whose "
                                        "push this one replaces (refused otherwise).")] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Make a package the device's pending upgrade: a running server pushes it to the device
    at once if it is online (within a second, from any replica), else when it connects. Refused
    while a job task of the device for the module is unfinished (or waits for a retry), unless
    --force cancels it: the task would wait for good for a package the device no longer gets."""
    from otaplane.cli import _services, _settings  # the checks every local command makes
    from otaplane.services.devices import DeviceRef

    services = _services(_settings(data_dir=data_dir, database_url=database_url))
    ref = DeviceRef(product_key=product, device_name=device)
    try:
        tenant = services.accounts.tenant_by_name(account, iot_instance_id)
        tasks = services.jobs.make_way_for_push(tenant, ref, firmware, cancel=force)
        if tasks and not force:
            task = tasks[0]
            console.print(f"[red]refused[/]: {escape(product)}/{escape(device)} has task {task['task_id']} "
                          f"({task['status']}) of "
                          f"job {task['job_id']} for module {task['module_name']}, which this push would orphan; "
                          "cancel it, or pass --force to cancel it and push.", soft_wrap=True)
            raise typer.Exit(1)
        for task in tasks:  # on stderr: stdout may be --json
            Console(stderr=True).print(f"Cancelled task {task['task_id']} ({task['status']}) of job "
                                       f"{task['job_id']}: replaced by this push.", soft_wrap=True)
        pushed = services.device_ota.push(tenant, ref, firmware)
    except ApiError as error:
        console.print(f"[red]{error.code}[/]: {escape(error.message)}")
        raise typer.Exit(1) from None
    finally:
        services.close()
    if as_json:
        typer.echo(json.dumps({"Module": pushed.module_name, "MessageId": pushed.message_id}))
        return
    console.print(f"Pending for {escape(product)}/{escape(device)}, module {escape(pushed.module_name)}: "
                  f"push id {pushed.message_id}.")
