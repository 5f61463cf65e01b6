"""A real marketplace for tests: uvicorn on loopback, a Celery worker on a real redis-server, an in-process EVM."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from gridmint.inprocess import Accounts, InProcessMarket
from gridmint.procs import new_database, start_redis
from ledger.evm import Chain, Deployment, GridMintContracts
from marketplace import tasks
from marketplace.runtime import Runtime
from protocol.money import tokens
from tests.marketplace.snapshots import reverted

__all__ = ["Accounts", "Market", "SUPPLY"]  # (test_scale_out's cluster mixes Accounts in too)

SUPPLY = tokens(1_000_000)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("redis")
    proc, url = start_redis(d, d)
    yield url
    proc.stop()


@dataclass
class Market(Accounts):
    url: str
    rt: Runtime
    chain: Chain
    deployment: Deployment
    ops: GridMintContracts
    operator: LocalAccount

    def wait(self, cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = cond()
            if got:
                return got
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture()
def market(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[Market]:
    """The marketplace on SQLite; ``@pytest.mark.parametrize("market", ["postgres"], indirect=True)`` puts it on a
    real PostgreSQL server instead."""
    db_url = None
    if getattr(request, "param", "sqlite") == "postgres":
        db_url = new_database(request.getfixturevalue("postgres_server"))
    deployed = reverted("market", lambda: InProcessMarket.deploy(Chain.in_process(), SUPPLY))  # (snapshots.py)
    m = InProcessMarket(tmp_path, SUPPLY, deployed=deployed, min_stake=tokens(100),
                        max_upload_bytes=2 * 1024 * 1024, redis_url=redis_url, db_url=db_url,
                        # no planted known-bad tasks, nor the referee's audits of passes, unless a test asks
                        # (test_flow's canary and audit tests)
                        canary_rate=0.0, audit_rate=0.0)
    tasks.celery_app.connection_for_write().default_channel.client.flushdb()  # no tasks left from earlier tests
    with m.serving() as url:
        yield Market(url, m.rt, m.chain, m.deployment, m.ops, m.operator)
