"""embedded-broker processes and their heartbeats; which one holds a device's connection

Revision ID: 0007
Revises: 0006

Devices ONLINE before this revision name no process: they are marked OFFLINE here (every
process restarts for the upgrade, and a device that is still connected is ONLINE again at its
next connect).
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('channel_nodes',
    sa.Column('node_id', sa.String(length=32), nullable=False),
    sa.Column('heartbeat_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('node_id', name=op.f('pk_channel_nodes'))
    )
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('online_node', sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_devices_online_node'), ['online_node'], unique=False)
    devices = sa.table('devices', sa.column('online', sa.Boolean))
    op.execute(devices.update().where(devices.c.online.is_(True)).values(online=False))


def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_devices_online_node'))
        batch_op.drop_column('online_node')
    op.drop_table('channel_nodes')
