"""providers: when the reaper last took a unit for silence (no work offered till seen since), and when the last unit
was handed in (a queued unit's delivery is timed from there)

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-08 01:10:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('providers') as batch:
        batch.add_column(sa.Column('silent_at', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('last_delivered_at', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('providers') as batch:
        batch.drop_column('last_delivered_at')
        batch.drop_column('silent_at')
