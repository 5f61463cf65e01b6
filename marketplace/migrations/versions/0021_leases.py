"""leases on steps that must not run twice at once across workers (marketplace.leases): the slash sweep's redos

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07 22:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'leases',
        sa.Column('name', sa.String(length=32), nullable=False),
        sa.Column('holder', sa.String(length=32), nullable=False),
        sa.Column('until', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('leases')
