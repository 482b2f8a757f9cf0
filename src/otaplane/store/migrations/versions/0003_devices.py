"""device state, module versions, batch applies

Revision ID: 0003
Revises: 0002
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('device_applies',
    sa.Column('apply_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('product_id', sa.Integer(), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_device_applies_product_id_products')),
    sa.PrimaryKeyConstraint('apply_id', name=op.f('pk_device_applies'))
    )
    with op.batch_alter_table('device_applies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_applies_product_id'), ['product_id'], unique=False)

    op.create_table('device_modules',
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('module_name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('modified_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], name=op.f('fk_device_modules_device_id_devices'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('device_id', 'module_name', name=op.f('pk_device_modules'))
    )
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('disabled', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('online', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('active_ms', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('online_ms', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('last_seen_ms', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('ip_address', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('apply_id', sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f('ix_devices_apply_id'), ['apply_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_devices_apply_id'))
        batch_op.drop_column('apply_id')
        batch_op.drop_column('ip_address')
        batch_op.drop_column('last_seen_ms')
        batch_op.drop_column('online_ms')
        batch_op.drop_column('active_ms')
        batch_op.drop_column('online')
        batch_op.drop_column('disabled')

    op.drop_table('device_modules')
    with op.batch_alter_table('device_applies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_applies_product_id'))

    op.drop_table('device_applies')
