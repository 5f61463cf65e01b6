"""Alembic migrations of the marketplace database (``marketplace.db.migrate`` runs them on start-up)."""
