"""verifications record when their verdict came in (a dispute's age: a referee pool away that long hands it over)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 07:15:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('verdict_at', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_column('verdict_at')
