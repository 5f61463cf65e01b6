"""A real marketplace for tests: uvicorn on loopback, a Celery worker on a real redis-server, an in-process EVM."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from celery.contrib.testing.worker import start_worker
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gridmint.procs import free_port, new_database, start_redis
from ledger.evm import Chain, Deployment, GridMintContracts, deploy
from marketplace import tasks
from marketplace.app import create_app
from marketplace.blobs import BlobStore
from marketplace.db import make_sessionmaker
from marketplace.runtime import Runtime, set_runtime
from marketplace.settings import Settings
from protocol.money import tokens

SUPPLY = tokens(1_000_000)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("redis")
    proc, url = start_redis(d, d)
    yield url
    proc.stop()


class Accounts:
    """Fresh funded accounts on a deployment; mixed into the test markets (needs chain, deployment, ops, operator)."""

    chain: Chain
    deployment: Deployment
    ops: GridMintContracts
    operator: LocalAccount

    def account(self, gmt: int = 0) -> LocalAccount:
        """A new account with 1 ETH for gas and ``gmt`` base units of GMT."""
        acct = Account.create()
        self.chain.send_eth(self.operator, acct.address, 10**18)
        if gmt:
            self.ops.transfer(acct.address, gmt)
        return acct

    def contracts(self, acct: LocalAccount) -> GridMintContracts:
        return GridMintContracts(self.chain, self.deployment, acct)


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
    chain = Chain.in_process()
    operator = chain.dev_accounts()[0]
    deployment = deploy(chain, operator, supply=SUPPLY, treasury=Account.create().address, verifier_bond=tokens(50))
    ops = GridMintContracts(chain, deployment, operator)
    settings = Settings(data_dir=tmp_path / "market", min_stake=tokens(100), max_upload_bytes=2 * 1024 * 1024,
                        redis_url=redis_url, db_url=db_url,
                        # no planted known-bad tasks, nor the referee's audits of passes, unless a test asks
                        # (test_flow's canary and audit tests)
                        canary_rate=0.0, audit_rate=0.0)
    settings.data_dir.mkdir(parents=True)
    tasks.configure(redis_url)
    tasks.celery_app.connection_for_write().default_channel.client.flushdb()  # no tasks left from earlier tests
    rt = Runtime(settings=settings, sessions=make_sessionmaker(settings.resolved_db_url()),
                 blobs=BlobStore(settings.blob_dir()), chain_id=chain.chain_id, contracts=ops, enqueue=tasks.enqueue)
    set_runtime(rt)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(rt), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    with start_worker(tasks.celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=30):
        yield Market(f"http://127.0.0.1:{port}", rt, chain, deployment, ops, operator)
    server.should_exit = True
    thread.join(10)
    set_runtime(None)
