"""when a delivered push goes again that a version report asked for inside the quiet period

Revision ID: 0011
Revises: 0010

A device that took its task's push and restarted before any progress reports the version it ran
before the task; when that comes within the quiet period after the push (or its last progress),
the push is not sent again at once (the device may be reporting as the push goes out, or while
it downloads) but at the end of that period, by whichever process sweeps first (see
store.device_ota.push_again and push_due_again).
"""

from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('device_ota_pending', schema=None) as batch_op:
        batch_op.add_column(sa.Column('push_again_ms', sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f('ix_device_ota_pending_push_again_ms'), ['push_again_ms'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('device_ota_pending', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_ota_pending_push_again_ms'))
        batch_op.drop_column('push_again_ms')
