"""slashes waiting out GridStaking's slashDelay (marketplace.slashes): the sweep pays each out once its delay has
passed, unless the guardian voided it first; and slashes to send again once a void gives back what an account's own
pending slashes held

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07 13:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'slashes',
        sa.Column('evidence', sa.String(length=66), nullable=False),
        sa.Column('kind', sa.String(length=8), nullable=False),
        sa.Column('account', sa.String(length=42), nullable=False),
        sa.Column('amount', sa.String(length=80), nullable=False),
        sa.Column('ready_at', sa.BigInteger(), nullable=False),
        sa.Column('beneficiary', sa.String(length=42), nullable=True),
        sa.Column('want', sa.String(length=80), nullable=True),
        sa.Column('since_block', sa.BigInteger(), nullable=True),
        sa.Column('basis', sa.JSON(), nullable=True),
        sa.Column('noted_at', sa.BigInteger(), nullable=False),
        sa.Column('done_at', sa.BigInteger(), nullable=True),
        sa.Column('outcome', sa.String(length=8), nullable=True),
        sa.PrimaryKeyConstraint('evidence'),
    )
    with op.batch_alter_table('slashes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_slashes_done_at'), ['done_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('slashes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_slashes_done_at'))
    op.drop_table('slashes')
