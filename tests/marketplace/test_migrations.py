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


def test_0022_starts_each_signers_beat_lane_at_its_last_nonce_and_goes_back(db_url: str) -> None:
    """Nonce lanes (0022): a signer's beat lane starts at the last nonce the signer's one row held, so a beat the
    marketplace took just before the upgrade is not taken again after it (found by a review: the lane started
    empty); downgraded, the lanes' rows go and the signer's own stays."""
    from alembic import command
    from sqlalchemy import text

    engine = make_engine(db_url)
    cfg = alembic_config()
    a = "0x" + "ab" * 20
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0021")
        conn.execute(text("INSERT INTO signer_nonces (address, last_nonce) VALUES (:a, 5)"), {"a": a})
        command.upgrade(cfg, "head")
        rows = sorted(conn.execute(text("SELECT address, last_nonce FROM signer_nonces")).all())
        assert rows == [(a, 5), (a + "/beat", 5)]
        command.downgrade(cfg, "0021")
        assert conn.execute(text("SELECT address, last_nonce FROM signer_nonces")).all() == [(a, 5)]
        command.upgrade(cfg, "head")
