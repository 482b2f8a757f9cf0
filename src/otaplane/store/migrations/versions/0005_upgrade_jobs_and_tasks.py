"""upgrade jobs, their tasks and task history; pending pushes know their task

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ota_jobs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('instance_pk', sa.Integer(), nullable=False),
    sa.Column('firmware_pk', sa.Integer(), nullable=False),
    sa.Column('product_id', sa.Integer(), nullable=False),
    sa.Column('module_name', sa.String(length=64), nullable=False),
    sa.Column('job_type', sa.String(length=32), nullable=False),
    sa.Column('selection_type', sa.String(length=16), nullable=False),
    sa.Column('target_selection', sa.String(length=16), nullable=False),
    sa.Column('gray_percent', sa.String(length=16), nullable=True),
    sa.Column('dynamic_mode', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('description', sa.String(length=256), nullable=True),
    sa.Column('src_versions', sa.JSON(), nullable=False),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('schedule_ms', sa.BigInteger(), nullable=True),
    sa.Column('schedule_finish_ms', sa.BigInteger(), nullable=True),
    sa.Column('max_per_minute', sa.Integer(), nullable=False),
    sa.Column('timeout_minutes', sa.Integer(), nullable=True),
    sa.Column('retry_count', sa.Integer(), nullable=True),
    sa.Column('retry_interval', sa.Integer(), nullable=True),
    sa.Column('overwrite_mode', sa.Integer(), nullable=False),
    sa.Column('need_push', sa.Boolean(), nullable=False),
    sa.Column('need_confirm', sa.Boolean(), nullable=False),
    sa.Column('multi_module', sa.Boolean(), nullable=False),
    sa.Column('download_protocol', sa.String(length=8), nullable=False),
    sa.Column('abort_failure_percent', sa.Float(), nullable=True),
    sa.Column('abort_minimum_count', sa.Integer(), nullable=True),
    sa.Column('pace_next_us', sa.BigInteger(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('modified_ms', sa.BigInteger(), nullable=False),
    sa.Column('started_ms', sa.BigInteger(), nullable=True),
    sa.Column('ended_ms', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['firmware_pk'], ['firmware.id'], name=op.f('fk_ota_jobs_firmware_pk_firmware'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['instance_pk'], ['instances.id'], name=op.f('fk_ota_jobs_instance_pk_instances')),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_ota_jobs_product_id_products')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ota_jobs')),
    sa.UniqueConstraint('job_id', name=op.f('uq_ota_jobs_job_id'))
    )
    with op.batch_alter_table('ota_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ota_jobs_firmware_pk'), ['firmware_pk'], unique=False)
        batch_op.create_index('ix_ota_jobs_product', ['product_id', 'status'], unique=False)
        batch_op.create_index('ix_ota_jobs_status', ['status', 'selection_type'], unique=False)

    op.create_table('ota_tasks',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('task_id', sa.String(length=64), nullable=False),
    sa.Column('job_pk', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('module_name', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('src_version', sa.String(length=64), nullable=True),
    sa.Column('progress', sa.Integer(), nullable=False),
    sa.Column('description', sa.String(length=256), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('dispatched_attempt', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.BigInteger(), nullable=True),
    sa.Column('retries_left', sa.Integer(), nullable=False),
    sa.Column('due_ms', sa.BigInteger(), nullable=True),
    sa.Column('deadline_ms', sa.BigInteger(), nullable=True),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('modified_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], name=op.f('fk_ota_tasks_device_id_devices'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_pk'], ['ota_jobs.id'], name=op.f('fk_ota_tasks_job_pk_ota_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ota_tasks')),
    sa.UniqueConstraint('task_id', name=op.f('uq_ota_tasks_task_id'))
    )
    with op.batch_alter_table('ota_tasks', schema=None) as batch_op:
        batch_op.create_index('ix_ota_tasks_deadline', ['deadline_ms'], unique=False)
        batch_op.create_index('ix_ota_tasks_device', ['device_id', 'module_name', 'status'], unique=False)
        batch_op.create_index('ix_ota_tasks_job_status', ['job_pk', 'status', 'due_ms'], unique=False)
        batch_op.create_index('uq_ota_tasks_device_module_unfinished', ['device_id', 'module_name'], unique=True, sqlite_where=sa.text("status IN ('CONFIRM', 'QUEUED', 'NOTIFIED', 'IN_PROGRESS')"), postgresql_where=sa.text("status IN ('CONFIRM', 'QUEUED', 'NOTIFIED', 'IN_PROGRESS')"))

    op.create_table('ota_task_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('task_pk', sa.Integer(), nullable=False),
    sa.Column('from_status', sa.String(length=16), nullable=True),
    sa.Column('to_status', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.String(length=256), nullable=True),
    sa.Column('at_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['task_pk'], ['ota_tasks.id'], name=op.f('fk_ota_task_events_task_pk_ota_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ota_task_events'))
    )
    with op.batch_alter_table('ota_task_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ota_task_events_task_pk'), ['task_pk'], unique=False)

    with op.batch_alter_table('device_ota_pending', schema=None) as batch_op:
        batch_op.add_column(sa.Column('task_pk', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('push', sa.Boolean(), server_default=sa.true(), nullable=False))
        batch_op.create_index(batch_op.f('ix_device_ota_pending_task_pk'), ['task_pk'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('device_ota_pending', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_ota_pending_task_pk'))
        batch_op.drop_column('push')
        batch_op.drop_column('task_pk')

    with op.batch_alter_table('ota_task_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ota_task_events_task_pk'))

    op.drop_table('ota_task_events')
    with op.batch_alter_table('ota_tasks', schema=None) as batch_op:
        batch_op.drop_index('uq_ota_tasks_device_module_unfinished', sqlite_where=sa.text("status IN ('CONFIRM', 'QUEUED', 'NOTIFIED', 'IN_PROGRESS')"), postgresql_where=sa.text("status IN ('CONFIRM', 'QUEUED', 'NOTIFIED', 'IN_PROGRESS')"))
        batch_op.drop_index('ix_ota_tasks_job_status')
        batch_op.drop_index('ix_ota_tasks_device')
        batch_op.drop_index('ix_ota_tasks_deadline')

    op.drop_table('ota_tasks')
    with op.batch_alter_table('ota_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_ota_jobs_status')
        batch_op.drop_index('ix_ota_jobs_product')
        batch_op.drop_index(batch_op.f('ix_ota_jobs_firmware_pk'))

    op.drop_table('ota_jobs')
