"""signature nonces keyed by a 64-bit digest of (AccessKeyId, nonce)

Revision ID: 0006
Revises: 0005

The nonces in use are carried over (a request signed before the upgrade stays refused as a
replay until its nonce expires).
"""

import hashlib

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def _digest(access_key_id: str, nonce: str) -> int:
    # Frozen copy of otaplane.store.nonces.digest at this revision (migrations never import app code).
    data = f"{len(access_key_id)}:{access_key_id}{nonce}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)


def upgrade() -> None:
    digests = op.create_table('signature_nonce_digests',
    sa.Column('digest', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('digest', name=op.f('pk_signature_nonce_digests'))
    )
    with op.batch_alter_table('signature_nonce_digests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_signature_nonce_digests_expires_ms'), ['expires_ms'], unique=False)

    old = sa.table('signature_nonces', sa.column('access_key_id', sa.String), sa.column('nonce', sa.String),
                   sa.column('expires_ms', sa.BigInteger))
    conn = op.get_bind()
    insert = (postgresql.insert(digests) if conn.dialect.name == 'postgresql' else sqlite.insert(digests))
    insert = insert.on_conflict_do_nothing()  # two nonces on one digest (~never): one row is enough
    rows = conn.execute(sa.select(old.c.access_key_id, old.c.nonce, old.c.expires_ms)
                        .execution_options(stream_results=True, yield_per=1000))
    for chunk in rows.partitions(1000):  # streamed: the table may hold millions of nonces
        conn.execute(insert, [{'digest': _digest(k, n), 'expires_ms': e} for k, n, e in chunk])

    with op.batch_alter_table('signature_nonces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signature_nonces_expires_ms'))
    op.drop_table('signature_nonces')


def downgrade() -> None:
    # The digests cannot be turned back into nonces: the old table starts empty.
    op.create_table('signature_nonces',
    sa.Column('access_key_id', sa.String(length=64), nullable=False),
    sa.Column('nonce', sa.String(length=128), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('access_key_id', 'nonce', name=op.f('pk_signature_nonces'))
    )
    with op.batch_alter_table('signature_nonces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_signature_nonces_expires_ms'), ['expires_ms'], unique=False)
    with op.batch_alter_table('signature_nonce_digests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signature_nonce_digests_expires_ms'))
    op.drop_table('signature_nonce_digests')
