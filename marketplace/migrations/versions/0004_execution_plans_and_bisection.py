"""execution plans and live bisection

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 09:10:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('units', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plan', sa.String(length=16), server_default='cpu', nullable=False))
    with op.batch_alter_table('verifiers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plan', sa.String(length=16), server_default='cpu', nullable=False))
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bisect', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_column('bisect')
    with op.batch_alter_table('verifiers', schema=None) as batch_op:
        batch_op.drop_column('plan')
    with op.batch_alter_table('units', schema=None) as batch_op:
        batch_op.drop_column('plan')
