"""accounts, keys, nonces, instances, products, devices

Revision ID: 0001
Revises: 
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('accounts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_accounts')),
    sa.UniqueConstraint('name', name=op.f('uq_accounts_name'))
    )
    op.create_table('signature_nonces',
    sa.Column('access_key_id', sa.String(length=64), nullable=False),
    sa.Column('nonce', sa.String(length=128), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('access_key_id', 'nonce', name=op.f('pk_signature_nonces'))
    )
    with op.batch_alter_table('signature_nonces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_signature_nonces_expires_ms'), ['expires_ms'], unique=False)

    op.create_table('access_keys',
    sa.Column('access_key_id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('secret_encrypted', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('description', sa.String(length=256), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('revoked_ms', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_access_keys_account_id_accounts')),
    sa.PrimaryKeyConstraint('access_key_id', name=op.f('pk_access_keys'))
    )
    with op.batch_alter_table('access_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_access_keys_account_id'), ['account_id'], unique=False)

    op.create_table('instances',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('is_default', sa.Boolean(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_instances_account_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instances')),
    sa.UniqueConstraint('instance_id', name=op.f('uq_instances_instance_id'))
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instances_account_id'), ['account_id'], unique=False)

    op.create_table('products',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('instance_pk', sa.Integer(), nullable=False),
    sa.Column('product_key', sa.String(length=32), nullable=False),
    sa.Column('product_name', sa.String(length=64), nullable=False),
    sa.Column('product_secret_encrypted', sa.Text(), nullable=False),
    sa.Column('node_type', sa.Integer(), nullable=False),
    sa.Column('data_format', sa.Integer(), nullable=True),
    sa.Column('aliyun_commodity_code', sa.String(length=32), nullable=False),
    sa.Column('description', sa.String(length=128), nullable=True),
    sa.Column('auth_type', sa.String(length=16), nullable=False),
    sa.Column('net_type', sa.String(length=16), nullable=True),
    sa.Column('protocol_type', sa.String(length=32), nullable=True),
    sa.Column('category_key', sa.String(length=64), nullable=True),
    sa.Column('id2', sa.Boolean(), nullable=False),
    sa.Column('validate_type', sa.Integer(), nullable=True),
    sa.Column('publish_auto', sa.Boolean(), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('modified_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['instance_pk'], ['instances.id'], name=op.f('fk_products_instance_pk_instances')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_products')),
    sa.UniqueConstraint('instance_pk', 'product_name', name='uq_products_instance_name'),
    sa.UniqueConstraint('product_key', name=op.f('uq_products_product_key'))
    )
    op.create_table('devices',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('iot_id', sa.String(length=64), nullable=False),
    sa.Column('product_id', sa.Integer(), nullable=False),
    sa.Column('device_name', sa.String(length=64), nullable=False),
    sa.Column('device_secret_encrypted', sa.Text(), nullable=False),
    sa.Column('nickname', sa.String(length=64), nullable=True),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('modified_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_devices_product_id_products')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_devices')),
    sa.UniqueConstraint('iot_id', name=op.f('uq_devices_iot_id')),
    sa.UniqueConstraint('product_id', 'device_name', name='uq_devices_product_name')
    )


def downgrade() -> None:
    op.drop_table('devices')
    op.drop_table('products')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instances_account_id'))

    op.drop_table('instances')
    with op.batch_alter_table('access_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_access_keys_account_id'))

    op.drop_table('access_keys')
    with op.batch_alter_table('signature_nonces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signature_nonces_expires_ms'))

    op.drop_table('signature_nonces')
    op.drop_table('accounts')
