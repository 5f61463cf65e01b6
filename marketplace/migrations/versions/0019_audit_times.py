"""when the referee's audit of a pass was drawn (verifications.audit_at): the sweep re-sends an audit lost a while
after it was drawn, and a pass is audited once (the passes of a convicted provider's work, checking._convicted)

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07 04:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('audit_at', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_column('audit_at')
