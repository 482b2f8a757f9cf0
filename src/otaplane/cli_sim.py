"""`otaplane sim`: a fleet of simulated devices on the otaplane device channel (otaplane.sim)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import resource
import signal
import time
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape

from otaplane.cli_firmware import DataDir, Endpoint, KeyId, KeySecret, _client
from otaplane.client import ApiCallError

console = Console()
err_console = Console(stderr=True)


def _mqtt_target(endpoint: str, host: str | None, port: int | None, tls: bool | None) -> tuple[str, int, bool]:
    """Where devices dial: the flags, else the server settings (OTAPLANE_MQTT_URL of an external
    broker, or OTAPLANE_MQTT_HOST/PORT of the embedded one), else the endpoint's host and 1883."""
    from otaplane.settings import Settings

    settings = Settings()
    if settings.mqtt_url:
        url = urlsplit(settings.mqtt_url)
        secure = url.scheme in ("mqtts", "ssl", "tls")
        return (host or url.hostname or "127.0.0.1", port or url.port or (8883 if secure else 1883),
                secure if tls is None else tls)
    default_host = settings.mqtt_host if settings.mqtt_host not in ("", "0.0.0.0", "::") else None
    endpoint_host = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint).hostname
    secure = bool(settings.mqtt_certfile and settings.mqtt_keyfile)
    return (host or default_host or endpoint_host or "127.0.0.1", port or settings.mqtt_port,
            secure if tls is None else tls)


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter("comma-separated integers, e.g. 0,50,100") from None
    if not steps or any(s < 0 or s > 100 for s in steps):
        raise typer.BadParameter("steps are 0..100")
    return steps


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        err_console.print(f"[yellow]open-files limit {soft} < {need}: some devices will not connect "
                          "(raise `ulimit -n`).[/]")


def sim(
    devices: Annotated[int, typer.Option("--devices", min=1, help="How many devices.")],
    product: Annotated[str, typer.Option("--product", help="ProductKey of the devices.")],
    prefix: Annotated[str, typer.Option(help="Device names are {prefix}000001, ...; existing ones are reused.")]
    = "sim-",
    version: Annotated[str, typer.Option("--version", help="Version the devices report when they start.")] = "1.0.0",
    module: Annotated[str, typer.Option(help="OTA module the devices report and upgrade.")] = "default",
    fail_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Fraction of upgrades that fail.")] = 0.0,
    fail_step: Annotated[int, typer.Option(min=-4, max=-1, help="Failure step reported: -1 upgrade, -2 download, "
                                           "-3 verify, -4 burn.")] = -1,
    progress_steps: Annotated[str, typer.Option(help="Progress reported during an upgrade (first one when the "
                                                "download starts).")] = "0,50,100",
    step_delay: Annotated[float, typer.Option(min=0.0, help="Seconds between progress steps.")] = 0.5,
    download: Annotated[bool, typer.Option("--download/--no-download", help="HTTP GET the package (or only "
                                           "report progress).")] = True,
    verify_checksum: Annotated[bool, typer.Option("--verify-checksum/--no-verify-checksum", help="Check the "
                                                  "download against sign/signMethod; a mismatch reports -3.")]
    = True,
    pull: Annotated[bool, typer.Option("--pull", help="Ask thing/ota/firmware/get after each connect.")] = False,
    download_concurrency: Annotated[int, typer.Option(min=1, help="HTTP downloads at once.")] = 100,
    connect_window: Annotated[int, typer.Option(min=1, help="CONNECTs outstanding at once.")] = 256,
    keepalive: Annotated[int, typer.Option(min=30, max=1200, help="MQTT keepalive, seconds.")] = 60,
    duration: Annotated[Optional[float], typer.Option(min=0.0, help="Stop after this many seconds "
                                                      "\\[run until Ctrl-C/SIGTERM].")] = None,
    stats_file: Annotated[Optional[Path], typer.Option(help="JSON counters, rewritten every second and at exit.")]
    = None,
    per_device: Annotated[bool, typer.Option("--per-device", help="Each device's version in --stats-file.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (which upgrades fail).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary lines.")] = False,
    mqtt_host: Annotated[Optional[str], typer.Option(help="Device channel host \\[server settings, else the "
                                                     "endpoint's host].")] = None,
    mqtt_port: Annotated[Optional[int], typer.Option(help="Device channel port [OTAPLANE_MQTT_PORT, 1883].")] = None,
    mqtt_tls: Annotated[Optional[bool], typer.Option("--mqtt-tls/--no-mqtt-tls", help="MQTT over TLS (the "
                                                     "certificate is not checked).", show_default=False)] = None,
    endpoint: Endpoint = "http://127.0.0.1:8080",
    access_key_id: KeyId = None,
    access_key_secret: KeySecret = None,
    data_dir: DataDir = Path("./otaplane-data"),
) -> None:
    """Simulate DEVICES devices of PRODUCT: connect over MQTT, report versions, take pushed packages
    (download, verify, progress, new version), with a configurable failure rate."""
    from otaplane.sim.device import Behaviour
    from otaplane.sim.fleet import Fleet, FleetOptions, ensure_devices

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    behaviour = Behaviour(version=version, module=module, fail_rate=fail_rate, fail_step=fail_step,
                          progress_steps=_steps(progress_steps), step_delay=step_delay, download=download,
                          verify_checksum=verify_checksum, pull=pull, rng=random.Random(seed))
    host, port, tls = _mqtt_target(endpoint, mqtt_host, mqtt_port, mqtt_tls)
    say = (lambda text: None) if quiet else _say

    client = _client(endpoint, access_key_id, access_key_secret, data_dir)
    started = time.monotonic()
    try:
        identities, registered = ensure_devices(client, product, devices, prefix, progress=say)
    except ApiCallError as error:
        err_console.print(f"[red]{error.code}[/]: {escape(error.message)}")
        raise typer.Exit(1) from None
    finally:
        client.close()
    say(f"{devices} devices of {product} ready ({registered} registered) in {time.monotonic() - started:.1f} s; "
        f"connecting to {host}:{port}{' (TLS)' if tls else ''}")
    _raise_fd_limit(devices + download_concurrency + 64)

    fleet = Fleet(product, identities, behaviour,
                  FleetOptions(host=host, port=port, tls=tls, keepalive=keepalive, connect_window=connect_window,
                               download_concurrency=download_concurrency, stats_file=stats_file,
                               per_device=per_device))
    final = _run(fleet, duration, quiet)
    if not quiet:
        typer.echo(json.dumps({k: v for k, v in final.items() if k != "per_device"}))
    if devices and not final.get("ever_connected"):  # a wrong host, port or TLS flag: not a run that worked
        err_console.print(f"No device could connect to the MQTT broker at {host}:{port}{' (TLS)' if tls else ''}.",
                          markup=False, highlight=False)
        raise typer.Exit(1)


def _say(text: str) -> None:
    """A plain line: no wrapping at the console width when piped."""
    if console.is_terminal:
        console.print(text, markup=False, highlight=False)  # it names the product, as given
    else:
        typer.echo(text)


def _run(fleet, duration: float | None, quiet: bool) -> dict:
    live = None
    last_line = [0.0]
    announced = [False]

    def report(stats) -> None:
        if quiet:
            return
        if stats.first_connect_s is not None and not announced[0]:
            announced[0] = True
            rate = stats.devices / stats.first_connect_s if stats.first_connect_s else float("inf")
            _say(f"all {stats.devices} devices connected in {stats.first_connect_s:.1f} s ({rate:,.0f}/s)")
        if live is not None:
            live.update(stats.line())
        elif time.monotonic() - last_line[0] >= 5:
            last_line[0] = time.monotonic()
            _say(stats.line())

    async def main() -> dict:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        return await fleet.run(stop, duration, report)

    if console.is_terminal and not quiet:
        from rich.live import Live

        with Live("", console=console, refresh_per_second=2, transient=False) as live:
            final = _loop_run(main())
    else:
        final = _loop_run(main())
        if not quiet:
            _say(fleet.stats.line())
    return final


def _loop_run(coroutine):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
