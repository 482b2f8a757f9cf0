"""when a process took a pending push to publish it, and when one last re-offered it

Revision ID: 0008
Revises: 0007

Several processes on one external broker all see a push pending: the first to stamp the row
publishes it, the others leave it until the stamp is old (see store.device_ota.claim).
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('device_ota_pending', schema=None) as batch_op:
        batch_op.add_column(sa.Column('publishing_ms', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('re_offered_ms', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('device_ota_pending', schema=None) as batch_op:
        batch_op.drop_column('re_offered_ms')
        batch_op.drop_column('publishing_ms')
