"""checkpoints charged to the unit they were uploaded for (unit_uploads): a per-unit upload quota

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-08 11:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('unit_uploads',
                    sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
                    sa.Column('unit_id', sa.String(length=66), nullable=False),
                    sa.Column('provider', sa.String(length=42), nullable=False),
                    sa.Column('sha256', sa.String(length=64), nullable=False),
                    sa.Column('at', sa.BigInteger(), nullable=False),
                    sa.UniqueConstraint('unit_id', 'provider', 'sha256'))
    op.create_index('ix_unit_uploads_provider_sha', 'unit_uploads', ['provider', 'sha256'])


def downgrade() -> None:
    op.drop_index('ix_unit_uploads_provider_sha', table_name='unit_uploads')
    op.drop_table('unit_uploads')
