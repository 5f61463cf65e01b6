"""ledger entries may be a verifier's fee for one passed check (the check's id; the unit's own entry has none)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 13:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('verification_id', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('ledger_entries', schema=None) as batch_op:
        batch_op.drop_column('verification_id')
