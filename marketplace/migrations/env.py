"""Alembic environment: runs on the connection ``marketplace.db.migrate`` hands in (no alembic.ini needed)."""
from __future__ import annotations

from alembic import context

from marketplace.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
