"""execution plans may name their GPU model ("cuda:geforce-rtx-4090/mb64"): plan labels up to 40 characters

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 21:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

TABLES = ('verifiers', 'units')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('plan', existing_type=sa.String(16), type_=sa.String(40),
                                  existing_nullable=False, existing_server_default='cpu')


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('plan', existing_type=sa.String(40), type_=sa.String(16),
                                  existing_nullable=False, existing_server_default='cpu')
