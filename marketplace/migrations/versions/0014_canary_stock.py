"""canaries forged ahead (verifications.decoy) and what each verifier was handed (handed)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 17:45:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('decoy', sa.JSON(), nullable=True))
    op.create_table('handed',
                    sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
                    sa.Column('verifier', sa.String(length=42), nullable=False),
                    sa.Column('unit_id', sa.String(length=66), nullable=False),
                    sa.Column('segment', sa.Integer(), nullable=False))
    op.create_index('ix_handed_verifier_unit', 'handed', ['verifier', 'unit_id'])


def downgrade() -> None:
    op.drop_index('ix_handed_verifier_unit', table_name='handed')
    op.drop_table('handed')
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_column('decoy')
