"""hand-outs by unit and segment (handed.unit_id, segment): whether another verifier was shown what tells a canary

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06 09:30:00
"""
from __future__ import annotations

from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_handed_unit_segment', 'handed', ['unit_id', 'segment'])


def downgrade() -> None:
    op.drop_index('ix_handed_unit_segment', table_name='handed')
