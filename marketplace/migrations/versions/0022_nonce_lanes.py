"""nonce lanes: a signer's heartbeats keep their last nonce apart (address + "/beat", protocol.signing.nonce_key)

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-08 01:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('signer_nonces') as batch:
        batch.alter_column('address', existing_type=sa.String(length=42), type_=sa.String(length=48),
                           existing_nullable=False)


def downgrade() -> None:
    op.execute("DELETE FROM signer_nonces WHERE address LIKE '%/beat'")
    with op.batch_alter_table('signer_nonces') as batch:
        batch.alter_column('address', existing_type=sa.String(length=48), type_=sa.String(length=42),
                           existing_nullable=False)
