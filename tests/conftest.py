"""Fixtures shared by every suite: a real PostgreSQL server for the tests that run on both databases."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gridmint.procs import new_database, postgres_bindir, start_postgres


def need_postgres_server() -> None:
    """Skip the calling test where the machine has no PostgreSQL server, except in CI (``CI`` set), where a missing
    server fails: .ci/run installs one."""
    if postgres_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries are missing in CI (.ci/run should have installed postgresql)")
        pytest.skip("no PostgreSQL server on this machine (apt-get install postgresql)")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL server started for this test session (need_postgres_server says where it is skipped)."""
    need_postgres_server()
    d = tmp_path_factory.mktemp("postgres")
    proc, url = start_postgres(d / "data", d / "logs")
    yield url
    proc.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One marketplace database per test, on each backend: SQLite (the embedded default) and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'marketplace.db'}"
    return new_database(request.getfixturevalue("postgres_server"))
