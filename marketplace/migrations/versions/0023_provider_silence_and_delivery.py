"""providers: when the reaper last took a unit for silence (no work offered till seen since), and the busy stretch
its delivered throughput is measured over (since when it has held a unit without a break, tokens handed in since)

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
        batch.add_column(sa.Column('busy_since', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('busy_tokens', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('providers') as batch:
        batch.drop_column('busy_tokens')
        batch.drop_column('busy_since')
        batch.drop_column('silent_at')
