"""signature nonces keyed by a 64-bit digest of (AccessKeyId, nonce)

Revision ID: 0006
Revises: 0005

The nonces in use are carried over (a request signed before the upgrade stays refused as a
replay until its nonce expires).
"""

import hashlib

from alembic import op
import sqlalchemy as sa


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
    rows = {}
    for key_id, nonce, expires_ms in conn.execute(sa.select(old.c.access_key_id, old.c.nonce, old.c.expires_ms)):
        digest = _digest(key_id, nonce)
        rows[digest] = max(expires_ms, rows.get(digest, expires_ms))
    items = [{'digest': d, 'expires_ms': e} for d, e in rows.items()]
    for start in range(0, len(items), 1000):
        op.bulk_insert(digests, items[start:start + 1000])

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
