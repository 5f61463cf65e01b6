"""verdicts by time, the provider's and the market's (verifications.provider, verdict_at; verdict_at): who did the
latest checking (the audit odds, checking.audit_odds)

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
    op.create_index('ix_verifications_verdict_at', 'verifications', ['verdict_at'])


def downgrade() -> None:
    op.drop_index('ix_verifications_verdict_at', table_name='verifications')
    op.drop_index('ix_verifications_provider_verdict', table_name='verifications')
