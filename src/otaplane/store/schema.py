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

# Replay protection shared by every server process on one database.
signature_nonces = sa.Table(
    "signature_nonces",
    metadata,
    sa.Column("access_key_id", sa.String(64), primary_key=True),
    sa.Column("nonce", sa.String(128), primary_key=True),
    sa.Column("expires_ms", sa.BigInteger, nullable=False, index=True),
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
)
