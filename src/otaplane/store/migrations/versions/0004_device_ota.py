"""device OTA pending packages, firmware md5

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('device_ota_pending',
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('module_name', sa.String(length=64), nullable=False),
    sa.Column('firmware_pk', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.BigInteger(), nullable=False),
    sa.Column('progress', sa.Integer(), nullable=True),
    sa.Column('progress_desc', sa.String(length=256), nullable=True),
    sa.Column('delivered_ms', sa.BigInteger(), nullable=True),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('modified_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], name=op.f('fk_device_ota_pending_device_id_devices'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['firmware_pk'], ['firmware.id'], name=op.f('fk_device_ota_pending_firmware_pk_firmware'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('device_id', 'module_name', name=op.f('pk_device_ota_pending'))
    )
    with op.batch_alter_table('device_ota_pending', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_ota_pending_delivered_ms'), ['delivered_ms'], unique=False)
        batch_op.create_index(batch_op.f('ix_device_ota_pending_firmware_pk'), ['firmware_pk'], unique=False)

    with op.batch_alter_table('firmware', schema=None) as batch_op:
        batch_op.add_column(sa.Column('md5', sa.String(length=32), nullable=True))
    # For an Md5 package the sign is the MD5; SHA256 packages get theirs at their first push.
    op.execute("UPDATE firmware SET md5 = sign WHERE sign_method = 'Md5' AND blob_key IS NOT NULL")



def downgrade() -> None:
    with op.batch_alter_table('firmware', schema=None) as batch_op:
        batch_op.drop_column('md5')

    with op.batch_alter_table('device_ota_pending', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_ota_pending_firmware_pk'))
        batch_op.drop_index(batch_op.f('ix_device_ota_pending_delivered_ms'))

    op.drop_table('device_ota_pending')
