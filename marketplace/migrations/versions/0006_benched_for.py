"""why a verifier was benched (a missed canary, or a false accusation the referee proved)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 22:10:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('verifiers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('benched_for', sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('verifiers', schema=None) as batch_op:
        batch_op.drop_column('benched_for')
