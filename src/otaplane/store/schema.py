"""Tables (SQLAlchemy Core). Every tenant-owned row hangs off an instance, which belongs to an
account, so one account's key can never reach another account's rows.

Changing a table here needs a migration in store/migrations/versions.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

# An IoT instance (IotInstanceId). Each account has one default instance.
instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("instance_id", sa.String(64), nullable=False, unique=True),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False, index=True),
    sa.Column("is_default", sa.Boolean, nullable=False, default=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

access_keys = sa.Table(
    "access_keys",
    metadata,
    sa.Column("access_key_id", sa.String(64), primary_key=True),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False, index=True),
    sa.Column("secret_encrypted", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # active | revoked
    sa.Column("description", sa.String(256), nullable=False, default=""),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("revoked_ms", sa.BigInteger, nullable=True),
)

# Replay protection shared by every server process on one database: one row per signature nonce
# in use, keyed by a 64-bit digest of (AccessKeyId, nonce) (store.nonces.digest). An integer key
# keeps the rows small and, on SQLite, is the table's own rowid: every signed request inserts
# one at a random place, and a small key means fewer pages written per insert and checkpoint.
signature_nonces = sa.Table(
    "signature_nonce_digests",
    metadata,
    sa.Column("digest", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=False),
    sa.Column("expires_ms", sa.BigInteger, nullable=False, index=True),
)

# Processes running an embedded broker, and when each last said it is alive.
channel_nodes = sa.Table(
    "channel_nodes",
    metadata,
    sa.Column("node_id", sa.String(32), primary_key=True),
    sa.Column("heartbeat_ms", sa.BigInteger, nullable=False),
)

products = sa.Table(
    "products",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("instance_pk", sa.Integer, sa.ForeignKey("instances.id"), nullable=False),
    # Globally unique: devices authenticate with it, without any account context.
    sa.Column("product_key", sa.String(32), nullable=False, unique=True),
    sa.Column("product_name", sa.String(64), nullable=False),
    sa.Column("product_secret_encrypted", sa.Text, nullable=False),
    sa.Column("node_type", sa.Integer, nullable=False),
    sa.Column("data_format", sa.Integer, nullable=True),
    sa.Column("aliyun_commodity_code", sa.String(32), nullable=False),
    sa.Column("description", sa.String(128), nullable=True),
    sa.Column("auth_type", sa.String(16), nullable=False),
    sa.Column("net_type", sa.String(16), nullable=True),
    sa.Column("protocol_type", sa.String(32), nullable=True),
    sa.Column("category_key", sa.String(64), nullable=True),
    sa.Column("id2", sa.Boolean, nullable=False, default=False),
    sa.Column("validate_type", sa.Integer, nullable=True),
    sa.Column("publish_auto", sa.Boolean, nullable=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("modified_ms", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("instance_pk", "product_name", name="uq_products_instance_name"),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("iot_id", sa.String(64), nullable=False, unique=True),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id"), nullable=False),
    sa.Column("device_name", sa.String(64), nullable=False),
    sa.Column("device_secret_encrypted", sa.Text, nullable=False),
    sa.Column("nickname", sa.String(64), nullable=True),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("modified_ms", sa.BigInteger, nullable=False),
    # Connection state, written by the device channel.
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("online", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("active_ms", sa.BigInteger, nullable=True),  # first successful connect
    sa.Column("online_ms", sa.BigInteger, nullable=True),  # last connect
    sa.Column("last_seen_ms", sa.BigInteger, nullable=True),
    sa.Column("ip_address", sa.String(64), nullable=True),
    # The embedded-broker process holding the connection (channel_nodes): when that process dies
    # without saying so, another one finds its heartbeat stale and marks the device OFFLINE.
    sa.Column("online_node", sa.String(32), nullable=True, index=True),
    sa.Column("apply_id", sa.BigInteger, nullable=True, index=True),  # BatchRegisterDevice
    sa.UniqueConstraint("product_id", "device_name", name="uq_devices_product_name"),
)

# The version a device last reported per OTA module (`/ota/device/inform`).
device_modules = sa.Table(
    "device_modules",
    metadata,
    sa.Column("device_id", sa.Integer, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("module_name", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("modified_ms", sa.BigInteger, nullable=False),
)

# BatchRegisterDevice applications.
device_applies = sa.Table(
    "device_applies",
    metadata,
    sa.Column("apply_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id"), nullable=False, index=True),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

# OTA modules of a product. Every product has `default` (is_default), created with it.
ota_modules = sa.Table(
    "ota_modules",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id"), nullable=False),
    sa.Column("module_name", sa.String(64), nullable=False),
    # Names are unique per product case-insensitively: the unique index is on this column.
    sa.Column("name_folded", sa.String(64), nullable=False),
    sa.Column("alias_name", sa.String(64), nullable=True),
    sa.Column("description", sa.String(128), nullable=True),
    sa.Column("is_default", sa.Boolean, nullable=False, default=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("modified_ms", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("product_id", "name_folded", name="uq_ota_modules_product_name"),
)

# Objects handed out by GenerateOTAUploadURL: proves which instance may use a key, and lets
# housekeeping remove uploads that no package adopted within the grace period.
ota_uploads = sa.Table(
    "ota_uploads",
    metadata,
    sa.Column("blob_key", sa.String(255), primary_key=True),
    sa.Column("instance_pk", sa.Integer, sa.ForeignKey("instances.id"), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False, index=True),
    # Its object went with its last package while its form could still be posted: no package may
    # adopt it any more; the collector of abandoned uploads deletes what a late post stored.
    sa.Column("withdrawn_ms", sa.BigInteger, nullable=True),
)

firmware = sa.Table(
    "firmware",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("firmware_id", sa.String(64), nullable=False, unique=True),
    sa.Column("instance_pk", sa.Integer, sa.ForeignKey("instances.id"), nullable=False),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id"), nullable=False, index=True),
    sa.Column("module_id", sa.Integer, sa.ForeignKey("ota_modules.id"), nullable=False, index=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("description", sa.String(128), nullable=True),
    sa.Column("dest_version", sa.String(64), nullable=False),
    sa.Column("src_version", sa.String(64), nullable=True),
    sa.Column("type", sa.Integer, nullable=False),  # 0 full, 1 diff
    sa.Column("sign_method", sa.String(16), nullable=False),  # Md5 | SHA256
    sa.Column("sign", sa.String(64), nullable=True),  # lowercase hex of the single file
    # MD5 of the single file whatever the sign method: iotkit 3 devices need `md5` in every push.
    sa.Column("md5", sa.String(32), nullable=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("blob_key", sa.String(255), nullable=True, index=True),  # null for multi-file
    sa.Column("udi", sa.Text, nullable=True),
    sa.Column("need_to_verify", sa.Boolean, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("verify_progress", sa.Integer, nullable=False, default=0),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("modified_ms", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("instance_pk", "name", name="uq_firmware_instance_name"),
    sa.Index("ix_firmware_instance_created", "instance_pk", "created_ms", "id"),
)

firmware_files = sa.Table(
    "firmware_files",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("firmware_pk", sa.Integer, sa.ForeignKey("firmware.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("blob_key", sa.String(255), nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sign_value", sa.String(64), nullable=False),
    sa.Column("file_md5", sa.String(32), nullable=False),
)

# The package each device should install now, per OTA module (written by DeviceOtaService.push,
# read by the device channel). Several server processes share it: whichever holds the device's
# MQTT connection delivers the rows it has not delivered yet (delivered_ms null).
device_ota_pending = sa.Table(
    "device_ota_pending",
    metadata,
    sa.Column("device_id", sa.Integer, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("module_name", sa.String(64), primary_key=True),
    sa.Column("firmware_pk", sa.Integer, sa.ForeignKey("firmware.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("message_id", sa.BigInteger, nullable=False),  # the push's numeric `id`
    sa.Column("progress", sa.Integer, nullable=True),  # last step reported: -4..100
    sa.Column("progress_desc", sa.String(256), nullable=True),
    sa.Column("delivered_ms", sa.BigInteger, nullable=True, index=True),  # acknowledged by the device
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("modified_ms", sa.BigInteger, nullable=False),
    # The upgrade task this push belongs to (null: a push without a job, `otaplane devices push`).
    sa.Column("task_pk", sa.Integer, nullable=True, index=True),
    # False: the job said NeedPush=false, so the device only gets it by asking (firmware/get).
    sa.Column("push", sa.Boolean, nullable=False, server_default=sa.true()),
    # Processes on one external broker share the row: when one took the push to publish it, and
    # when one last published it again after a version report (store.device_ota.claim).
    sa.Column("publishing_ms", sa.BigInteger, nullable=True),
    sa.Column("re_offered_ms", sa.BigInteger, nullable=True),
    # A delivered task push the device asked for again (it reported the version it ran before the
    # task) within the quiet period after the push or its last progress: it goes again at this
    # time, unless the device reports progress or takes a push first (store.device_ota.push_again).
    sa.Column("push_again_ms", sa.BigInteger, nullable=True, index=True),
)

# Upgrade jobs (verify, static, dynamic). Lists and tags are small JSON arrays: never queried into.
ota_jobs = sa.Table(
    "ota_jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False, unique=True),
    sa.Column("instance_pk", sa.Integer, sa.ForeignKey("instances.id"), nullable=False),
    sa.Column("firmware_pk", sa.Integer, sa.ForeignKey("firmware.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("product_id", sa.Integer, sa.ForeignKey("products.id"), nullable=False),
    sa.Column("module_name", sa.String(64), nullable=False),
    sa.Column("job_type", sa.String(32), nullable=False),  # VERFIY_FIRMWARE | UPGRADE_FIRMWARE
    sa.Column("selection_type", sa.String(16), nullable=False),  # STATIC | DYNAMIC
    sa.Column("target_selection", sa.String(16), nullable=False),  # ALL | SPECIFIC | GRAY | GROUP
    sa.Column("gray_percent", sa.String(16), nullable=True),
    sa.Column("dynamic_mode", sa.Integer, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # PLANNED | IN_PROGRESS | COMPLETED | CANCELED
    sa.Column("description", sa.String(256), nullable=True),
    sa.Column("src_versions", sa.JSON, nullable=False),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("schedule_ms", sa.BigInteger, nullable=True),
    sa.Column("schedule_finish_ms", sa.BigInteger, nullable=True),
    sa.Column("max_per_minute", sa.Integer, nullable=False),
    sa.Column("timeout_minutes", sa.Integer, nullable=True),
    sa.Column("retry_count", sa.Integer, nullable=True),
    sa.Column("retry_interval", sa.Integer, nullable=True),
    sa.Column("overwrite_mode", sa.Integer, nullable=False),
    sa.Column("need_push", sa.Boolean, nullable=False),
    sa.Column("need_confirm", sa.Boolean, nullable=False),
    sa.Column("multi_module", sa.Boolean, nullable=False),
    sa.Column("download_protocol", sa.String(8), nullable=False),
    # otaplane's extension: stop the rollout when too many devices fail.
    sa.Column("abort_failure_percent", sa.Float, nullable=True),
    sa.Column("abort_minimum_count", sa.Integer, nullable=True),
    # Pacing: the earliest time (microseconds) the next push may go out.
    sa.Column("pace_next_us", sa.BigInteger, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("modified_ms", sa.BigInteger, nullable=False),
    sa.Column("started_ms", sa.BigInteger, nullable=True),
    sa.Column("ended_ms", sa.BigInteger, nullable=True),
    # A verify job's tasks that went with their deleted devices, by how they ended (an unfinished
    # one as cancelled): the package's verification still counts them (services/task_flow.py).
    sa.Column("deleted_succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("deleted_failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("deleted_canceled", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_ota_jobs_status", "status", "selection_type"),
    sa.Index("ix_ota_jobs_product", "product_id", "status"),
)

# One device's part of a job. State changes only through services/task_flow.py.
ota_tasks = sa.Table(
    "ota_tasks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(64), nullable=False, unique=True),
    sa.Column("job_pk", sa.Integer, sa.ForeignKey("ota_jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("device_id", sa.Integer, sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
    sa.Column("module_name", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("src_version", sa.String(64), nullable=True),  # what the device ran when the task began
    sa.Column("progress", sa.Integer, nullable=False),  # last step 0..100 the device reported
    sa.Column("description", sa.String(256), nullable=True),  # TaskDesc: why it failed or ended
    sa.Column("attempt", sa.Integer, nullable=False),  # 1, then +1 per retry or reupgrade
    sa.Column("dispatched_attempt", sa.Integer, nullable=False),  # the attempt whose push is written
    sa.Column("message_id", sa.BigInteger, nullable=True),  # that push's id
    sa.Column("retries_left", sa.Integer, nullable=False),
    # QUEUED: not dispatched before. FAILED with retries left: when the retry is due.
    sa.Column("due_ms", sa.BigInteger, nullable=True),
    sa.Column("deadline_ms", sa.BigInteger, nullable=True),  # IN_PROGRESS: fails as timed out after
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("modified_ms", sa.BigInteger, nullable=False),
    sa.Index("ix_ota_tasks_job_status", "job_pk", "status", "due_ms"),
    sa.Index("ix_ota_tasks_device", "device_id", "module_name", "status"),
    sa.Index("ix_ota_tasks_deadline", "deadline_ms"),
)

# Every state change of every task: who or what moved it, when and why.
ota_task_events = sa.Table(
    "ota_task_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_pk", sa.Integer, sa.ForeignKey("ota_tasks.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("from_status", sa.String(16), nullable=True),  # null: created
    sa.Column("to_status", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),  # api:<Action> | device | dispatcher
    sa.Column("reason", sa.String(256), nullable=True),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
)

# A task that still waits or runs; a device has at most one per OTA module (enforced here too).
UNFINISHED_TASK_STATUSES = ("CONFIRM", "QUEUED", "NOTIFIED", "IN_PROGRESS")
sa.Index(
    "uq_ota_tasks_device_module_unfinished",
    ota_tasks.c.device_id,
    ota_tasks.c.module_name,
    unique=True,
    sqlite_where=ota_tasks.c.status.in_(UNFINISHED_TASK_STATUSES),
    postgresql_where=ota_tasks.c.status.in_(UNFINISHED_TASK_STATUSES),
)
# A failed task whose retry is scheduled (due_ms: when). The status is a literal, not a bound
# value, so that prepared statements (store/prepared.py) take the condition as it is.
WAITING_FOR_RETRY = sa.and_(ota_tasks.c.status == sa.literal_column("'FAILED'"), ota_tasks.c.due_ms.is_not(None))
