"""``gridmint marketplace stack``: the services every marketplace process shares — a Hardhat JSON-RPC node, Redis and
PostgreSQL — started on this machine in the foreground, to try the multi-process setup (``deploy``, then ``serve``
and ``worker`` in other shells) without installing and wiring them by hand. The processes are gridmint.procs' and
ledger.devchain's, the ones the tests and ``gridmint demo`` run.

A trial, not a deployment: all of it listens on loopback only, PostgreSQL trusts every local connection and runs
with fsync off, the chain is a fresh dev chain at every start (its contracts deployed again), and Redis keeps
nothing (it only carries the queue). PostgreSQL's data stays in the data dir, shut down cleanly at every stop."""
from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Callable

from gridmint.procs import Proc, ServiceError, create_database, start_postgres, start_redis
from ledger.devchain import HardhatNode, hardhat_dev_keys

DATABASE = "gridmint"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Stack:
    """What runs; ``settings`` holds the GRIDMINT_* values that reach it."""

    procs: list[Proc] = field(default_factory=list)
    chain: HardhatNode | None = None
    settings: dict[str, str] = field(default_factory=dict)

    def dead(self) -> str | None:
        """Which service exited by itself, with the end of its log; None while all run."""
        if self.chain is not None and not self.chain.running:
            return f"the Hardhat node exited:\n{self.chain.log_tail()}"
        for p in self.procs:
            if not p.alive():
                return f"{p.name} exited with {p.popen.returncode}:\n{p.tail()}"
        return None

    def stop(self) -> None:
        """Stop all of it, each process group whole; PostgreSQL by a fast shutdown, so that its data dir starts
        again without recovery. Safe to call twice."""
        for p in reversed(self.procs):
            p.stop()
        if self.chain is not None:
            self.chain.stop()


@dataclass(frozen=True)
class Services:
    """Which services to start, and on which loopback ports (None: a free one)."""

    chain: bool = True
    redis: bool = True
    postgres: bool = True
    chain_port: int | None = None
    redis_port: int | None = None
    postgres_port: int | None = None


def start_stack(stack: Stack, data_dir: Path, services: Services) -> None:
    """Start ``services`` into ``stack`` (each added as soon as it runs, so that stopping ``stack`` after an error or
    a signal mid-way stops what started) and wait until each answers. PostgreSQL comes first: a machine without it
    fails before anything else started."""
    logs = data_dir / "logs"
    if services.postgres:
        proc, server = start_postgres(data_dir / "postgres", logs, services.postgres_port)
        stack.procs.append(proc)
        stack.settings["GRIDMINT_DB_URL"] = create_database(server, DATABASE, exist_ok=True)
    if services.redis:
        proc, url = start_redis(data_dir / "redis", logs, services.redis_port)
        stack.procs.append(proc)
        stack.settings["GRIDMINT_REDIS_URL"] = url
    if services.chain:
        stack.chain = HardhatNode(port=services.chain_port)
        stack.chain.start()
        stack.settings["GRIDMINT_CHAIN_URL"] = stack.chain.url
        stack.settings["GRIDMINT_OPERATOR_KEY"] = hardhat_dev_keys(1)[0]


class _Stopped(Exception):
    """A stop signal arrived."""


def run_stack(data_dir: Path, services: Services, say: Callable[[str], None]) -> int:
    """Start ``services``, ``say`` their settings as shell ``export`` lines and keep them up until SIGINT (Ctrl-C),
    SIGTERM or SIGHUP; then stop all of them and return 0. A service that exits by itself stops the rest too: 1.
    An error in starting (a ServiceError: no PostgreSQL server, ...) is raised once what started is stopped."""
    data_dir = data_dir.resolve()  # the services run in the repo's directory, not the caller's
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:  # once: a second Ctrl-C must not cut the shutdown short (and leave a process behind)
            stopping = True
            raise _Stopped(signum)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    stack = Stack()
    try:
        say(f"# GridMint stack in {data_dir} (logs in {data_dir / 'logs'}): starting")
        start_stack(stack, data_dir, services)
        for name, value in stack.settings.items():
            if name == "GRIDMINT_OPERATOR_KEY":
                say("# Hardhat's well-known DEV key (account #0, funded on this dev chain only): it is public, "
                    "NEVER use it on a real chain")
            say(f"export {name}={value}")
        if stack.chain is not None:
            say("# The chain starts empty each time: run `gridmint marketplace deploy --dev --force --treasury ADDRESS`")
        say("# ready: Ctrl-C stops it all")
        while (why := stack.dead()) is None:
            time.sleep(0.5)
        stopping = True
        print(f"error: {why}\nstopping the rest", file=sys.stderr)
        return 1
    except _Stopped:
        return 0
    finally:
        stopping = True
        stack.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            say("# stopped")
