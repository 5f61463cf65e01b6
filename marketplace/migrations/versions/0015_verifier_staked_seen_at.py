"""when a verifier's poll for tasks last found its stake enough (verifiers.staked_seen_at)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('verifiers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('staked_seen_at', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('verifiers', schema=None) as batch_op:
        batch_op.drop_column('staked_seen_at')
