"""a provider's verdicts by time (verifications.provider, verdict_at): who did its latest checking (audit odds)

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 18:30:00
"""
from __future__ import annotations

from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_verifications_provider_verdict', 'verifications', ['provider', 'verdict_at'])


def downgrade() -> None:
    op.drop_index('ix_verifications_provider_verdict', table_name='verifications')
