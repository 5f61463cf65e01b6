"""The marketplace in this process, as the tests and the in-process benches run it: an in-process EVM with the
contracts deployed, the runtime on a database (SQLite, or the URL given), the HTTP API on loopback (uvicorn in a
thread) and a Celery worker (solo, in a thread) on a redis-server the caller started."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from celery.contrib.testing.worker import start_worker
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gridmint.procs import free_port
from ledger.evm import Chain, Deployment, GridMintContracts, deploy
from marketplace import tasks
from marketplace.app import create_app
from marketplace.blobs import BlobStore
from marketplace.db import make_sessionmaker
from marketplace.runtime import Runtime, set_runtime
from marketplace.settings import Settings
from protocol.money import tokens

#: The in-process worker's idle wait on the broker, in seconds (kombu's ``polling_interval``: its BRPOP timeout)
IDLE_POLL_S = 0.1


class Accounts:
    """Fresh funded accounts on a deployment; mixed into the in-process markets (needs chain, deployment, ops,
    operator)."""

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


class InProcessMarket(Accounts):
    """A chain with the contracts deployed (a fresh treasury, a 50 GMT verifier bond) and the marketplace's runtime
    on it, its settings ``data_dir = root / "market"`` plus ``settings`` (redis_url, db_url, rates...). Funded
    accounts with :meth:`account`; the API and a worker with :meth:`serving`."""

    def __init__(self, root: Path, supply: int, *, deployed: tuple[Chain, Deployment] | None = None,
                 **settings: Any) -> None:
        """``deployed``: a chain and :meth:`deploy`'s deployment on it to use (the tests revert one chain to it,
        instead of deploying anew for each); else a new chain, deployed here."""
        self.chain, self.deployment = deployed or self.deploy(Chain.in_process(), supply)
        self.operator: LocalAccount = self.chain.dev_accounts()[0]
        self.ops = GridMintContracts(self.chain, self.deployment, self.operator)
        conf = Settings(data_dir=root / "market", **settings)
        conf.data_dir.mkdir(parents=True)
        tasks.configure(conf.redis_url)
        self.rt = Runtime(settings=conf, sessions=make_sessionmaker(conf.resolved_db_url()),
                          blobs=BlobStore(conf.blob_dir()), chain_id=self.chain.chain_id, contracts=self.ops,
                          enqueue=tasks.enqueue)
        self.root = root

    @staticmethod
    def deploy(chain: Chain, supply: int) -> tuple[Chain, Deployment]:
        """The contracts on ``chain``, deployed by its first dev account, a fresh treasury holding ``supply``."""
        return chain, deploy(chain, chain.dev_accounts()[0], supply=supply, treasury=Account.create().address,
                             verifier_bond=tokens(50))

    @contextmanager
    def serving(self) -> Iterator[str]:
        """The API on a free loopback port and a solo Celery worker, both in threads, while inside; yields the URL.
        The runtime is the process's (``set_runtime``) meanwhile: the worker's tasks run on it."""
        set_runtime(self.rt)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(self.rt), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        # the worker's idle wait on the broker (a BRPOP, 1 s by default) is what its shutdown waits out: 0.1 s here,
        # where a market is started and stopped per test
        conf = tasks.celery_app.conf
        conf.broker_transport_options = {**conf.broker_transport_options, "polling_interval": IDLE_POLL_S}
        try:
            with start_worker(tasks.celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                              shutdown_timeout=30):
                yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(10)
            set_runtime(None)
