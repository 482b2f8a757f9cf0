"""a verify job counts the tasks that went with their deleted devices, by how they ended

Revision ID: 0010
Revises: 0009

Deleting a device deletes its tasks; the package's verification (services.task_flow) still
counts a verify job's, so that deleting a device whose verification failed, or had not
finished, cannot verify the package.
"""

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ota_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_succeeded', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('deleted_failed', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('deleted_canceled', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('ota_jobs', schema=None) as batch_op:
        batch_op.drop_column('deleted_canceled')
        batch_op.drop_column('deleted_failed')
        batch_op.drop_column('deleted_succeeded')
