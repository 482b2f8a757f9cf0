"""ota modules, uploads, firmware

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ota_uploads',
    sa.Column('blob_key', sa.String(length=255), nullable=False),
    sa.Column('instance_pk', sa.Integer(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['instance_pk'], ['instances.id'], name=op.f('fk_ota_uploads_instance_pk_instances')),
    sa.PrimaryKeyConstraint('blob_key', name=op.f('pk_ota_uploads'))
    )
    with op.batch_alter_table('ota_uploads', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ota_uploads_created_ms'), ['created_ms'], unique=False)

    op.create_table('ota_modules',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('product_id', sa.Integer(), nullable=False),
    sa.Column('module_name', sa.String(length=64), nullable=False),
    sa.Column('name_folded', sa.String(length=64), nullable=False),
    sa.Column('alias_name', sa.String(length=64), nullable=True),
    sa.Column('description', sa.String(length=128), nullable=True),
    sa.Column('is_default', sa.Boolean(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('modified_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_ota_modules_product_id_products')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ota_modules')),
    sa.UniqueConstraint('product_id', 'name_folded', name='uq_ota_modules_product_name')
    )
    op.create_table('firmware',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('firmware_id', sa.String(length=64), nullable=False),
    sa.Column('instance_pk', sa.Integer(), nullable=False),
    sa.Column('product_id', sa.Integer(), nullable=False),
    sa.Column('module_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.String(length=128), nullable=True),
    sa.Column('dest_version', sa.String(length=64), nullable=False),
    sa.Column('src_version', sa.String(length=64), nullable=True),
    sa.Column('type', sa.Integer(), nullable=False),
    sa.Column('sign_method', sa.String(length=16), nullable=False),
    sa.Column('sign', sa.String(length=64), nullable=True),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('blob_key', sa.String(length=255), nullable=True),
    sa.Column('udi', sa.Text(), nullable=True),
    sa.Column('need_to_verify', sa.Boolean(), nullable=False),
    sa.Column('status', sa.Integer(), nullable=False),
    sa.Column('verify_progress', sa.Integer(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('modified_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['instance_pk'], ['instances.id'], name=op.f('fk_firmware_instance_pk_instances')),
    sa.ForeignKeyConstraint(['module_id'], ['ota_modules.id'], name=op.f('fk_firmware_module_id_ota_modules')),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_firmware_product_id_products')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_firmware')),
    sa.UniqueConstraint('firmware_id', name=op.f('uq_firmware_firmware_id')),
    sa.UniqueConstraint('instance_pk', 'name', name='uq_firmware_instance_name')
    )
    with op.batch_alter_table('firmware', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_firmware_blob_key'), ['blob_key'], unique=False)
        batch_op.create_index('ix_firmware_instance_created', ['instance_pk', 'created_ms', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_firmware_module_id'), ['module_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_firmware_product_id'), ['product_id'], unique=False)

    op.create_table('firmware_files',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('firmware_pk', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('blob_key', sa.String(length=255), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sign_value', sa.String(length=64), nullable=False),
    sa.Column('file_md5', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['firmware_pk'], ['firmware.id'], name=op.f('fk_firmware_files_firmware_pk_firmware'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_firmware_files'))
    )
    with op.batch_alter_table('firmware_files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_firmware_files_blob_key'), ['blob_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_firmware_files_firmware_pk'), ['firmware_pk'], unique=False)


    # Every product has the `default` module, including those created before modules existed.
    op.execute(
        "INSERT INTO ota_modules (product_id, module_name, name_folded, is_default, created_ms, modified_ms) "
        "SELECT id, 'default', 'default', true, created_ms, created_ms FROM products"
    )

def downgrade() -> None:
    with op.batch_alter_table('firmware_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_firmware_files_firmware_pk'))
        batch_op.drop_index(batch_op.f('ix_firmware_files_blob_key'))

    op.drop_table('firmware_files')
    with op.batch_alter_table('firmware', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_firmware_product_id'))
        batch_op.drop_index(batch_op.f('ix_firmware_module_id'))
        batch_op.drop_index('ix_firmware_instance_created')
        batch_op.drop_index(batch_op.f('ix_firmware_blob_key'))

    op.drop_table('firmware')
    op.drop_table('ota_modules')
    with op.batch_alter_table('ota_uploads', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ota_uploads_created_ms'))

    op.drop_table('ota_uploads')
