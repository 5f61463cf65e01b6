"""`gridmint marketplace stack` runs real services: a Hardhat node, Redis and PostgreSQL answer at the URLs it prints;
SIGTERM stops every process it started and it exits 0; PostgreSQL starts again from its data dir, data kept, with no
crash recovery (it was shut down properly)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from eth_account import Account
from sqlalchemy import create_engine, text

from tests.conftest import need_postgres_server

REPO = Path(__file__).resolve().parents[2]
HARDHAT_CHAIN_ID = 31337


class Stack:
    """``gridmint marketplace stack`` as a subprocess, its output in a file (read while it runs, never a full pipe)."""

    def __init__(self, data_dir: Path, out: Path, *flags: str) -> None:
        self.out = out
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDMINT_")}
        with open(out, "wb") as f:
            self.popen = subprocess.Popen([sys.executable, "-c", "from gridmint.cli import main; main()", "marketplace",
                                           "stack", "--data-dir", str(data_dir), *flags], cwd=REPO, env=env,
                                          stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def settings(self, timeout: float = 90) -> dict[str, str]:
        """The ``export NAME=VALUE`` lines, once it says it is ready."""
        deadline = time.monotonic() + timeout
        while "\n# ready" not in (said := self.out.read_text()):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"stack not ready (exit {self.popen.poll()}):\n{said}")
            time.sleep(0.1)
        return dict(line.removeprefix("export ").split("=", 1) for line in said.splitlines()
                    if line.startswith("export "))

    def terminate(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(30)

    def close(self) -> None:
        """After a failure: stop it the way it is meant to be stopped, so that it still stops its services."""
        if self.popen.poll() is None:
            self.terminate()


def _stat(pid: int) -> tuple[int, str, str, str] | None:
    """(ppid, state, start time, command name) of a process, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm, rest = raw[raw.index("(") + 1:raw.rindex(")")], raw[raw.rindex(")") + 2:].split()
    return int(rest[1]), rest[0], rest[19], comm  # fields 4, 3, 22 and 2 of proc(5)


def descendants(root: int) -> dict[int, tuple[str, str]]:
    """Every process below ``root``: pid -> (start time, command name)."""
    table = {int(d.name): s for d in Path("/proc").iterdir() if d.name.isdigit() and (s := _stat(int(d.name)))}
    found: dict[int, tuple[str, str]] = {}
    parents = [root]
    while parents:
        parent = parents.pop()
        for pid, (ppid, _, start, comm) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (start, comm)
                parents.append(pid)
    return found


def still_running(tree: dict[int, tuple[str, str]]) -> list[str]:
    """Those of ``tree`` still running (a pid reused since, or an exited zombie, does not count)."""
    left = []
    for pid, (start, comm) in tree.items():
        now = _stat(pid)
        if now is not None and now[2] == start and now[1] != "Z":
            left.append(f"{comm} ({pid})")
    return left


def rpc(url: str, method: str, *params: str) -> str:
    answer = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}, timeout=10)
    return str(answer.json()["result"])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_stack_answers_stops_every_process_and_keeps_postgres_data(tmp_path: Path) -> None:
    need_postgres_server()
    data = tmp_path / "stack"
    first = Stack(data, tmp_path / "first.out")
    try:
        env = first.settings()
        tree = descendants(first.popen.pid)
        assert {"postgres", "redis-server", "node"} <= {comm for _, comm in tree.values()}, tree
        assert int(rpc(env["GRIDMINT_CHAIN_URL"], "eth_chainId"), 16) == HARDHAT_CHAIN_ID
        operator = Account.from_key(env["GRIDMINT_OPERATOR_KEY"]).address  # funded: it can deploy
        assert int(rpc(env["GRIDMINT_CHAIN_URL"], "eth_getBalance", operator, "latest"), 16) > 0
        assert redis.Redis.from_url(env["GRIDMINT_REDIS_URL"]).ping() is True
        engine = create_engine(env["GRIDMINT_DB_URL"])
        with engine.begin() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
            conn.execute(text("CREATE TABLE kept (note text)"))
            conn.execute(text("INSERT INTO kept VALUES ('first run')"))
        engine.dispose()
        assert first.terminate() == 0, first.out.read_text()
        assert still_running(tree) == []
    finally:
        first.close()

    log = data / "logs" / "postgres.log"
    starts = log.read_text().count("starting PostgreSQL")
    second = Stack(data, tmp_path / "second.out", "--no-chain", "--no-redis")
    try:
        env = second.settings()
        assert set(env) == {"GRIDMINT_DB_URL"}
        tree = descendants(second.popen.pid)
        assert {comm for _, comm in tree.values()} == {"postgres"}, tree
        engine = create_engine(env["GRIDMINT_DB_URL"])
        with engine.connect() as conn:
            assert conn.execute(text("SELECT note FROM kept")).scalars().all() == ["first run"]
        engine.dispose()
        this_start = log.read_text().split("starting PostgreSQL")[starts + 1:]
        assert len(this_start) == 1 and "database system was shut down at" in this_start[0], this_start
        assert second.terminate() == 0, second.out.read_text()
        assert still_running(tree) == []
    finally:
        second.close()
