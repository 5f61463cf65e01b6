"""units and verifiers record which kernels they computed with (node.device.kernel_build): the same plan replays bit
for bit only on the same kernels

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 00:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

TABLES = ('verifiers', 'units')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('build', sa.String(160), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('build')
