"""One Settings object for the whole process: environment (OTAPLANE_*) overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OTAPLANE_", extra="ignore")

    data_dir: Path = Path("./otaplane-data")
    host: str = "127.0.0.1"
    # Checked: getaddrinfo takes a port modulo 65536, so 70000 listened on 4464 while the URLs said 70000.
    port: int = Field(default=8080, ge=1, le=65535)
    # Empty means "SQLite file under data_dir"; postgresql://... scales out.
    database_url: str = ""
    # Fernet key (urlsafe base64, 32 bytes). Empty means "key file under data_dir".
    master_key: str = Field(default="", repr=False)
    # Requests per second allowed per AccessKey, with a burst of the same size; 0 disables.
    rate_limit: float = Field(default=200.0, ge=0)  # a negative rate disabled the limit silently
    rate_limit_burst: int = Field(default=0, ge=0)
    # Accepted distance between a request's timestamp and our clock (and nonce memory).
    signature_window_seconds: int = 900
    # Empty = files under data_dir/blobs; s3://bucket?endpoint_url=...&region=... for S3.
    blob_url: str = ""
    # Browser origins allowed to use the blob endpoints otaplane serves (PostObject uploads, local
    # downloads), as an OSS bucket's CORS rule: comma-separated http(s)://host[:port] (a `*` in
    # one matches anything there), or `*` for any. Empty = no CORS headers (blobs/cors.py).
    cors_origins: str = ""
    # Lifetime of presigned firmware download URLs (QueryOTAFirmware, device pushes). At least a
    # second: 0 or less would hand out URLs that have expired already, which no device can use.
    download_url_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    response_case: Literal["pascal", "camel"] = "pascal"
    # Base URL that devices and clients dial to reach this server (presigned URLs).
    public_url: str = ""
    access_log: bool = False
    log_level: str = "info"
    # The device channel. Empty mqtt_url = the embedded MQTT 3.1.1 broker, in this process, on
    # mqtt_host (empty = same as host) and mqtt_port; TLS when both cert and key files are given.
    # mqtt_url = mqtt[s]://[user:password@]host[:port]: devices connect to that broker (Mosquitto,
    # EMQX) and otaplane is its client (devices/external.py).
    mqtt_url: str = Field(default="", repr=False)  # mqtt://user:password@host:port: no password in repr
    # External broker: otaplane processes sharing this group split the upstream messages
    # ($share/<group>/...); empty = every process gets every message.
    mqtt_share_group: str = "otaplane"
    mqtt_host: str = ""
    mqtt_port: int = Field(default=1883, ge=0, le=65535)  # 0: any free port
    mqtt_certfile: str = ""
    mqtt_keyfile: str = ""
    # A device connection that sends no CONNECT within this time is closed.
    mqtt_connect_timeout_seconds: float = 10.0
    # The embedded broker's heartbeat in the database: when a process dies without closing its
    # device connections, another (or the next) one marks them OFFLINE after 6 missed beats.
    channel_heartbeat_seconds: float = 10.0

    # How long a "minute" of an upgrade job is, in seconds: TimeoutInMinutes, RetryInterval and
    # the ScheduleTime limits count in these. 60 in production; tests and demos shorten it.
    # Pacing (MaximumPerMinute) always uses real minutes.
    job_minute_seconds: float = 60.0
    # A device with an unfinished task that reports the version it ran before the task is pushed
    # again once neither the push nor its last progress report is this recent (before that it may
    # be reporting as the push goes out, or while it downloads); a report within it schedules the
    # push for its end. 10 in production; tests shorten it.
    push_again_quiet_seconds: float = 10.0
    # How often the job dispatcher looks at the database (it is also woken by new work).
    dispatch_interval_seconds: float = 0.1

    def job_minute_ms(self) -> int:
        return max(1, int(self.job_minute_seconds * 1000))

    def push_again_quiet_ms(self) -> int:
        return max(0, int(self.push_again_quiet_seconds * 1000))

    def resolved_database_url(self) -> str:
        """SQLAlchemy URL: SQLite in the data dir by default; psycopg 3 for PostgreSQL."""
        url = self.database_url.strip()
        if not url:
            return f"sqlite:///{(self.data_dir / 'otaplane.db').resolve()}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix):]
        return url

    def resolved_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def resolved_mqtt_host(self) -> str:
        return self.mqtt_host or self.host
