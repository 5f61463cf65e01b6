"""planted known-bad segments (canaries) and benched verifiers

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 15:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('verifiers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sa.String(length=16), server_default='active', nullable=False))
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('canary', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_column('canary')
    with op.batch_alter_table('verifiers', schema=None) as batch_op:
        batch_op.drop_column('status')
