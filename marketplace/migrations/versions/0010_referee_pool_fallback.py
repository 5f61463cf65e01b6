"""referee pools say when they were last alive; a dispute whose pool is away is handed to the default referee

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 06:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('referee_pools',
                    sa.Column('build', sa.String(160), primary_key=True),
                    sa.Column('seen_at', sa.BigInteger(), nullable=False))
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fallback_at', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_column('fallback_at')
    op.drop_table('referee_pools')
