"""Shared pieces of the benchmarks in bench/: servers in child processes, a load generator
(wrk when installed, else a built-in asyncio client), pre-signed V1 requests, a throwaway
PostgreSQL database, and the environment/table printing.

Every run is bounded: each load phase has a fixed duration, every child process gets a
timeout, and the servers are stopped (and databases dropped) in `finally` blocks.
Only loopback addresses are used.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

BENCH_DIR = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
API_VERSION = "2018-01-20"


# --- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A server in a child process, logging to a file, killed on stop()."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, health_path: str = "/healthz", timeout_s: float = 60) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.base_url + health_path, timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy in {timeout_s:.0f} s:\n{self.logs()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def logs(self, tail: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])


def hello_server(workdir: Path) -> ServerProcess:
    """The bare Starlette endpoint (bench/_hello.py) on a free port."""
    port = free_port()
    return ServerProcess(
        "bare Starlette server",
        [sys.executable, str(BENCH_DIR / "_hello.py"), "--host", LOOPBACK, "--port", str(port)],
        workdir / "hello.log",
        port=port,
    )


def otaplane_server(workdir: Path, database_url: str = "", *args: str) -> ServerProcess:
    """`otaplane serve` (one worker) on a free port with its data dir in workdir."""
    port = free_port()
    # The embedded MQTT broker gets a free port too (1883 may be taken, e.g. by another server).
    env = {"OTAPLANE_DATA_DIR": str(workdir / "data"), "OTAPLANE_MQTT_PORT": str(free_port())}
    if database_url:
        env["OTAPLANE_DATABASE_URL"] = database_url
    return ServerProcess(
        "otaplane serve",
        [sys.executable, "-m", "otaplane", "serve", "--host", LOOPBACK, "--port", str(port), *args],
        workdir / "otaplane.log",
        env=env,
        port=port,
    )


def admin_credentials(workdir: Path) -> tuple[str, str]:
    """The key `otaplane serve` writes on its first start (data dir from otaplane_server)."""
    data = json.loads((workdir / "data" / "admin-credentials.json").read_text())
    return data["AccessKeyId"], data["AccessKeySecret"]


# --- PostgreSQL --------------------------------------------------------------------------------
class ThrowawayPostgres:
    """`with ThrowawayPostgres(url) as db_url:` a fresh database on url's server, dropped after."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.name = "otaplane_bench_" + uuid.uuid4().hex[:12]
        self.server_version = ""

    def _admin(self):
        import psycopg

        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5)

    def __enter__(self) -> str:
        with self._admin() as conn:
            self.server_version = conn.execute("SHOW server_version").fetchone()[0]
            conn.execute(f'CREATE DATABASE "{self.name}"')
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + self.name, parts.query, ""))

    def __exit__(self, *_exc) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in ("localhost", "::1") and not host.startswith("127."):
        raise SystemExit(f"refusing {url}: benchmarks only talk to loopback addresses")


# --- signed requests ---------------------------------------------------------------------------
def _rpc_signer():
    """The official util's V1 signer when installed (an independent implementation), else ours."""
    try:
        from alibabacloud_openapi_util.client import Client as OpenApiUtil

        return OpenApiUtil.get_rpcsignature, "alibabacloud_openapi_util"
    except ImportError:
        from otaplane.openapi import signing

        def sign(params: dict[str, str], method: str, secret: str) -> str:
            return signing.v1_signature(secret, signing.v1_string_to_sign(method, params))

        return sign, "otaplane.openapi.signing"


RPC_SIGN, RPC_SIGNER_NAME = _rpc_signer()


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def signed_params(key: tuple[str, str], action: str, params: dict[str, str], method: str = "GET",
                  timestamp: str | None = None) -> dict[str, str]:
    """RPC V1 (HMAC-SHA1) parameters with a fresh SignatureNonce, Signature included."""
    key_id, secret = key
    signed = {
        "Action": action,
        "Version": API_VERSION,
        "Format": "JSON",
        "AccessKeyId": key_id,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureNonce": uuid.uuid4().hex,
        "Timestamp": timestamp or utc_timestamp(),
        **params,
    }
    signed["Signature"] = RPC_SIGN(signed, method, secret)
    return signed


def presign_paths(key: tuple[str, str], action: str, params: dict[str, str], count: int) -> list[str]:
    """`count` GET paths (`/?...`), each with its own nonce: the server refuses replays."""
    timestamp = utc_timestamp()
    return ["/?" + urlencode(signed_params(key, action, params, "GET", timestamp)) for _ in range(count)]


def call(base_url: str, key: tuple[str, str], action: str, params: dict[str, str],
         method: str = "GET") -> tuple[int, dict]:
    """One signed call (setup and checks, not load): (HTTP status, JSON body)."""
    query = urlencode(signed_params(key, action, params, method))
    request = urllib.request.Request(f"{base_url}/?{query}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


# --- load generation ---------------------------------------------------------------------------
@dataclass
class LoadResult:
    label: str
    requests: int  # completed in the timed window
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and non-2xx answers
    exhausted: bool = False  # the pre-signed pool ran out (replayed nonces: see errors)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


@dataclass(frozen=True)
class LoadSpec:
    connections: int = 32
    duration_s: float = 10.0
    warmup_s: float = 2.0
    threads: int = 1  # wrk threads (the built-in client is one asyncio loop)


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    wrk = wrk_binary()
    if not wrk:
        return ""
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    match = re.search(r"wrk\s+(\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "?"


# One script for every target so that the client does the same work per request. Thread k of n
# sends lines k, k+n, k+2n... of BENCH_PATHS (each line used once unless the pool runs out), or
# BENCH_PATH every time. done() prints one machine-readable line.
_WRK_LUA = r"""
local threads = {}
local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  paths = {}
  local file = os.getenv("BENCH_PATHS") or ""
  if file ~= "" then
    local i = 0
    for line in io.lines(file) do
      if i % nthreads == id then paths[#paths + 1] = line end
      i = i + 1
    end
  else
    paths[1] = os.getenv("BENCH_PATH") or "/"
  end
  idx = 0
  wrapped = 0
end

function request()
  idx = idx + 1
  if idx > #paths then
    idx = 1
    if #paths > 1 then wrapped = wrapped + 1 end
  end
  return wrk.format("GET", paths[idx])
end

function done(summary, latency, requests)
  local wraps = 0
  for _, t in ipairs(threads) do wraps = wraps + (t:get("wrapped") or 0) end
  local e = summary.errors
  io.write(string.format(
    'BENCH-RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, "wrapped": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout, wraps))
end
"""


def _run_wrk(label: str, url: str, spec: LoadSpec, seconds: float, workdir: Path,
             paths_file: Path | None, path: str) -> LoadResult:
    script = workdir / "bench.lua"
    script.write_text(_WRK_LUA)
    threads = max(1, min(spec.threads, spec.connections))
    argv = [
        wrk_binary(), "-t", str(threads), "-c", str(spec.connections), "-d", f"{max(1, round(seconds))}s",
        "--timeout", "10s", "-s", str(script), url,
    ]
    env = {**os.environ, "BENCH_THREADS": str(threads), "BENCH_PATHS": str(paths_file or ""), "BENCH_PATH": path}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60)
    match = re.search(r"^BENCH-RESULT (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    data = json.loads(match.group(1))
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(label, data["requests"], data["duration_us"] / 1e6, data["p50_us"] / 1000,
                      data["p99_us"] / 1000, errors, exhausted=data["wrapped"] > 0)


class _PathSource:
    """Hands out request paths; a pool is used once through, then wraps (and says so)."""

    def __init__(self, paths: list[str] | None, path: str):
        self.paths = paths or [path]
        self.fixed = not paths
        self.index = 0
        self.wrapped = False

    def next(self) -> str:
        if self.index >= len(self.paths):
            self.index = 0
            self.wrapped = not self.fixed
        value = self.paths[self.index]
        self.index += 1
        return value


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


async def _python_load(host: str, port: int, source: _PathSource, connections: int,
                       seconds: float) -> tuple[list[float], int, float]:
    """Closed loop: `connections` keep-alive HTTP/1.1 connections, each with one request in
    flight. Returns (latencies of requests completed in the window, errors, window)."""
    loop = asyncio.get_running_loop()
    host_header = f"Host: {host}:{port}\r\n".encode()
    state = {"measuring": False, "stopping": False}
    latencies: list[float] = []
    errors = [0]
    clock = time.perf_counter

    class Client(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buffer = b""
            self.closed = loop.create_future()
            self.send()

        def send(self):
            if state["stopping"]:
                self.transport.close()
                return
            self.started = clock()
            self.transport.write(b"GET " + source.next().encode() + b" HTTP/1.1\r\n" + host_header + b"\r\n")

        def data_received(self, data):
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            match = _CONTENT_LENGTH.search(self.buffer, 0, end + 2)
            length = int(match.group(1)) if match else 0
            if len(self.buffer) < end + 4 + length:
                return
            status = self.buffer[9:12]
            self.buffer = self.buffer[end + 4 + length:]
            if state["measuring"]:
                latencies.append(clock() - self.started)
                if not status.startswith(b"2"):
                    errors[0] += 1
            self.send()

        def connection_lost(self, exc):
            if exc is not None and state["measuring"]:
                errors[0] += 1
            if not self.closed.done():
                self.closed.set_result(None)

    clients = []
    state["measuring"] = True
    start = clock()
    for _ in range(connections):
        _transport, protocol = await loop.create_connection(Client, host, port)
        clients.append(protocol)
    await asyncio.sleep(seconds)
    state["measuring"] = False
    window = clock() - start
    state["stopping"] = True
    for client in clients:
        client.transport.close()
    await asyncio.wait([c.closed for c in clients], timeout=5)
    return latencies, errors[0], window


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(0, math.ceil(pct / 100 * len(sorted_values)) - 1)
    return sorted_values[rank]


def _run_python(label: str, base_url: str, spec: LoadSpec, seconds: float, paths: list[str] | None,
                path: str) -> LoadResult:
    parts = urlsplit(base_url)
    source = _PathSource(paths, path)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    latencies, errors, window = runner(_python_load(parts.hostname, parts.port, source, spec.connections, seconds))
    latencies.sort()
    return LoadResult(label, len(latencies), window, _percentile(latencies, 50) * 1000,
                      _percentile(latencies, 99) * 1000, errors, exhausted=source.wrapped)


def run_phase(tool: str, label: str, base_url: str, spec: LoadSpec, seconds: float, workdir: Path,
              paths: list[str] | None = None, path: str = "/") -> LoadResult:
    """Load base_url for `seconds` at spec.connections (closed loop). With `paths` each one is
    sent once, in order (a pool that runs out starts over: see LoadResult.exhausted);
    otherwise `path` is sent every time."""
    require_loopback(base_url)
    if tool == "python":
        return _run_python(label, base_url, spec, seconds, paths, path)
    paths_file = None
    if paths:
        paths_file = workdir / "requests.paths"
        paths_file.write_text("\n".join(paths) + "\n")
    try:
        return _run_wrk(label, base_url, spec, seconds, workdir, paths_file, path)
    finally:
        if paths_file:
            paths_file.unlink()


# --- reporting ---------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(tool: str, spec: LoadSpec, extra: list[tuple[str, str]] = (), rounds: int = 1
                ) -> list[tuple[str, str]]:
    if tool == "wrk":
        threads = max(1, min(spec.threads, spec.connections))
        load = f"wrk {wrk_version()} ({threads} thread{'s' * (threads > 1)}, {spec.connections} connections)"
    else:
        loop = "uvloop" if _version("uvloop") != "not installed" else "asyncio"
        load = f"built-in Python client ({loop}, 1 process, {spec.connections} connections)"
    return [
        ("cpus", f"{os.cpu_count()} x {cpu_model()}"),
        ("os", f"{platform.system()} {platform.release()}"),
        ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("uvicorn", f"{_version('uvicorn')} (uvloop {_version('uvloop')}, httptools {_version('httptools')}), "
                    "1 worker"),
        ("starlette", _version("starlette")),
        ("load tool", load),
        ("window", f"{max(1.0, spec.warmup_s):g} s warm-up, then {rounds} x {spec.duration_s:g} s timed per target"
                   f"{' (alternating)' if rounds > 1 else ''}, fixed concurrency, loopback"),
        *extra,
        ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min; at the end of the run)"),
    ]


def print_environment(title: str, rows: list[tuple[str, str]]) -> None:
    print(title)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print()


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{str(c):>{w}}" for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
