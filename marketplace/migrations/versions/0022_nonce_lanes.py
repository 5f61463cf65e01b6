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
    # a beat accepted before the upgrade kept its nonce under the address: its lane starts there, so that request
    # is not taken again after it (found by a review)
    op.execute("INSERT INTO signer_nonces (address, last_nonce) SELECT address || '/beat', last_nonce "
               "FROM signer_nonces WHERE address NOT LIKE '%/beat'")


def downgrade() -> None:
    op.execute("DELETE FROM signer_nonces WHERE address LIKE '%/beat'")
    with op.batch_alter_table('signer_nonces') as batch:
        batch.alter_column('address', existing_type=sa.String(length=48), type_=sa.String(length=42),
                           existing_nullable=False)
