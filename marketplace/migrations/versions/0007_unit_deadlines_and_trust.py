"""a unit's deadline: taken back when not submitted by then, however alive its provider looks; a provider's
record of units verified in a row (the trusted-host discount); a verifier's heartbeat on the task it replays

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 06:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('units', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deadline_at', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('providers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('verified_streak', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heartbeat_at', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('verifications', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_at')
    with op.batch_alter_table('providers', schema=None) as batch_op:
        batch_op.drop_column('verified_streak')
    with op.batch_alter_table('units', schema=None) as batch_op:
        batch_op.drop_column('deadline_at')
