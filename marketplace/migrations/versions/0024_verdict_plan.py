"""verifications: how the verifier replayed when it gave its verdict (plan, kernels), kept with the verdict

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-08 01:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('verifications') as batch:
        batch.add_column(sa.Column('verifier_plan', sa.String(length=40), nullable=True))
        batch.add_column(sa.Column('verifier_build', sa.String(length=160), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('verifications') as batch:
        batch.drop_column('verifier_build')
        batch.drop_column('verifier_plan')
