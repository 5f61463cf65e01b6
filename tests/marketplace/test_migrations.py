"""Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL, and re-running them
(several processes starting at once, or a restart) is harmless."""
from __future__ import annotations

import threading

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from marketplace.db import Base, alembic_config, make_engine, migrate


def test_migrations_match_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    migrate(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert ctx.get_current_revision() == head
    assert set(inspect(engine).get_table_names()) >= {"jobs", "units", "ledger_entries", "payout_epochs"}


def test_concurrent_and_repeated_migrations_are_harmless(db_url: str) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            migrate(make_engine(db_url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    migrate(make_engine(db_url))  # and once more, already at head
