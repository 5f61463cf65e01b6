"""a unit's dropouts, kept apart from its fraud exclusions: {provider: unix s when the unit was taken back from it}

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 15:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('units', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dropped_by', sa.JSON(), nullable=False, server_default='{}'))


def downgrade() -> None:
    with op.batch_alter_table('units', schema=None) as batch_op:
        batch_op.drop_column('dropped_by')
