"""execution plans may name their GPU model ("cuda:geforce-rtx-4090/mb64"): plan labels up to 40 characters;
a verification remembers when it was queued (a unit on an exact plan waits a while for a verifier on that plan)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 21:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

TABLES = ('verifiers', 'units')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('plan', existing_type=sa.String(16), type_=sa.String(40),
                                  existing_nullable=False, existing_server_default='cpu')
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('created_at', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_column('created_at')
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('plan', existing_type=sa.String(40), type_=sa.String(16),
                                  existing_nullable=False, existing_server_default='cpu')
