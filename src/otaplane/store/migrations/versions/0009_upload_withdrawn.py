"""an upload whose object went with its last package while its form could still be posted

Revision ID: 0009
Revises: 0008

Such a record stays, withdrawn: no package may adopt the key, and the collector of abandoned
uploads deletes whatever a late post of the form stored (see services.firmware).
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ota_uploads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('withdrawn_ms', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('ota_uploads', schema=None) as batch_op:
        batch_op.drop_column('withdrawn_ms')
