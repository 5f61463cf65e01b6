"""Referee pools: referee workers on other CPU kernels than the referee's own (GRIDMINT_REFEREE_POOLS).

The same plan replays bit for bit only on the same kernels. Without a referee on a provider's kernels, a dispute over
its work is judged within a tolerance calibrated across kernels, and a float8 step in a bf16 job hides inside that
drift (bench proof ``cross_build``: 0 of 20 convicted). A referee pool closes that: a Celery worker started on a
machine with those kernels consumes the pool's own queue, the marketplace sends it the disputes over work computed
with them, and it replays them bit for bit; a verifier on the same kernels bonds its disputes.

Everything here is real: a Hardhat chain, Redis, the API and two ``gridmint marketplace worker`` processes (the
referee's, with the scheduler, and the pool's, on ATen's scalar kernels and MKL's compatible path: node.foreign's
other kernels), two providers and a verifier as ``gridmint node run`` / ``gridmint verifier run`` processes on the
pool's kernels. No process is told which kernels it computes with: each names its own (node.device.kernel_build).
A pool's worker says it is alive every few seconds; a pool away for GRIDMINT_REFEREE_POOL_WAIT_S hands its disputes
to the default referee, so no job waits on it for ever."""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from sqlalchemy import select

from gridmint.procs import Proc, free_port, start_redis, venv_path_env
from ledger.devchain import HardhatNode
from ledger.evm import Chain, GridMintContracts, deploy
from marketplace.db import Event, Unit, Verification, Verifier, make_sessionmaker
from marketplace.runtime import pool_queue
from node.client import MarketClient
from node.device import FOREIGN_KERNELS, kernel_build
from node.wallet import save as save_wallet
from protocol.jobs import new_job_id
from protocol.money import tokens
from protocol.schemas import JobSpec, ModelSpec

SPEC = JobSpec(model=ModelSpec(d_model=32, n_layer=1, n_head=2, ctx=32), rounds=1, units_per_round=2,
               steps_per_unit=16, segment_len=8, batch_size=8, max_price=tokens(2), precision="bf16",
               verification="full")
GM = [sys.executable, "-m", "gridmint.cli"]


def _kernels_of(env: dict[str, str]) -> str:
    """The kernels a process started with ``env`` computes with, as it says itself."""
    out = subprocess.run([sys.executable, "-c", "from node.device import kernel_build; print(kernel_build('cpu'))"],
                         env=venv_path_env(env), capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_a_worker_on_kernels_no_referee_computes_with_refuses_to_start(tmp_path: Path) -> None:
    """A worker on other kernels than the referee's and every pool's would judge disputes it cannot replay; a pool's
    worker not told the default referee's kernels would take its own for them. Both stop at once, saying why."""
    other = "torch-2.13.0.example/x86_64.genuineintel.avx512/aten-avx512"

    def worker(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*GM, "marketplace", "worker"], capture_output=True, text=True, timeout=120,
                              env=venv_path_env({"GRIDMINT_DATA_DIR": str(tmp_path), **env}))

    run = worker(GRIDMINT_REFEREE_BUILD=other)
    assert run.returncode == 2, run.stderr
    assert f"this worker computes with {kernel_build('cpu')}, the referee with {other}" in run.stderr, run.stderr
    assert "GRIDMINT_REFEREE_POOLS" in run.stderr
    run = worker(GRIDMINT_REFEREE_POOLS=kernel_build("cpu"))
    assert run.returncode == 2, run.stderr
    assert "computes with a referee pool's kernels" in run.stderr and "set GRIDMINT_REFEREE_BUILD" in run.stderr


@dataclass
class PoolMarket:
    """The real processes of a marketplace with one referee pool (node.foreign's other kernels)."""

    tmp: Path
    url: str
    pool: str  # the pool's kernels
    chain: Chain
    ops: GridMintContracts
    operator: Any
    deployment: Any
    env: dict[str, str]
    on_pool: dict[str, str]  # env of a process on the pool's kernels
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        p = Proc(name, argv, self.tmp / "logs", env)
        self.procs.append(p)
        return p

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def wallet(self, name: str, gmt: int) -> tuple[str, Path]:
        acct = Account.create()
        path = self.tmp / "wallets" / f"{name}.json"
        save_wallet(acct, path, password="")
        self.chain.send_eth(self.operator, acct.address, 10**18)
        self.ops.transfer(acct.address, gmt)
        return acct.address, path

    def provider(self, name: str, region: str, price: str, adversary: str | None = None) -> str:
        """A `gridmint node run` process on the pool's kernels, staking 200 GMT; its address."""
        address, path = self.wallet(name, tokens(500))
        argv = [*GM, "node", "run", "--marketplace", self.url, "--chain", self.chain_url, "--wallet", str(path),
                "--region", region, "--price", price, "--stake", "200"]
        self.start(f"node-{name}", argv + (["--adversary", adversary] if adversary else []), self.on_pool)
        return address

    def verifier(self, adversary: str | None = None) -> str:
        """A `gridmint verifier run` process on the pool's kernels, staking 100 GMT (two 50 GMT bonds); its address."""
        address, path = self.wallet("verifier", tokens(100))
        argv = [*GM, "verifier", "run", "--marketplace", self.url, "--wallet", str(path), "--chain", self.chain_url,
                "--stake", "100"]
        self.start("verifier", argv + (["--adversary", adversary] if adversary else []), self.on_pool)
        return address

    @property
    def chain_url(self) -> str:
        return self.env["GRIDMINT_CHAIN_URL"]

    def check_alive(self) -> None:
        for p in self.procs:  # a node may stop cleanly (exit 0); the cheat, told it was slashed, refused (exit 2)
            if p.alive():  # (polls: the exit status is known after)
                continue
            code = p.popen.returncode
            assert p.name.startswith("node-") and (code == 0 or (p.name == "node-cheat" and code == 2)), \
                f"{p.name} died (exit {p.popen.returncode}):\n{p.tail()}"

    def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.check_alive()
            got = cond()
            if got:
                return got
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                             + "\n".join(f"--- {p.name}\n{p.tail(8)}" for p in self.procs))

    def run_job(self, providers: set[str]) -> str:
        """Once ``providers`` are registered, a customer funds and submits SPEC; returns the job id once settled."""
        registered = lambda: {p["address"] for p in httpx.get(f"{self.url}/providers", timeout=5).json()}  # noqa: E731
        self.wait(lambda: registered() == providers, 240, "the providers registered")
        customer = Account.create()
        self.chain.send_eth(self.operator, customer.address, 10**18)
        self.ops.transfer(customer.address, tokens(100))
        client = MarketClient(self.url, customer)
        quote = client.quote(SPEC.model_dump(mode="json"))
        job_id = new_job_id(customer.address)
        GridMintContracts(self.chain, self.deployment, customer).fund_job_with_permit(job_id, int(quote["budget"]))
        client.submit_job(job_id, SPEC.model_dump(mode="json"))
        self.wait(lambda: client.job(job_id)["status"] == "settled", 360, "the job settled")
        return job_id

    def records(self, job_id: str) -> tuple[list[Unit], list[Verification], dict[str, list[dict[str, Any]]]]:
        """The job's units, their checks and the marketplace's events by kind, read from its database."""
        sessions = make_sessionmaker(f"sqlite:///{(self.tmp / 'market' / 'marketplace.db').resolve()}")
        with sessions() as s:
            units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
            checks = list(s.scalars(select(Verification).where(Verification.unit_id.in_([u.id for u in units]))))
            events: dict[str, list[dict[str, Any]]] = {}
            for e in s.scalars(select(Event)):
                events.setdefault(e.kind, []).append(e.data)
        return units, checks, events


@contextmanager
def pool_market(tmp_path: Path, *, pool_worker: bool, wait_s: int) -> Iterator[PoolMarket]:
    """A Hardhat chain, Redis, the API and the referee's own worker (with the scheduler), one referee pool named
    (node.foreign's other kernels, waited for ``wait_s`` when away), and with ``pool_worker`` the pool's worker."""
    node = HardhatNode()
    node.start()
    m: PoolMarket | None = None
    try:
        pool = _kernels_of(dict(FOREIGN_KERNELS))
        assert pool != kernel_build("cpu") and "aten-default" in pool
        chain = Chain.http(node.url)
        operator = chain.dev_accounts()[0]
        deployment = deploy(chain, operator, supply=tokens(1_000_000), treasury=Account.create().address,
                            verifier_bond=tokens(50))
        deployment.to_json(tmp_path / "deployment.json")
        ops = GridMintContracts(chain, deployment, operator)
        redis, redis_url = start_redis(tmp_path / "redis", tmp_path / "logs")
        port = free_port()
        env = {"GRIDMINT_DATA_DIR": str(tmp_path / "market"), "GRIDMINT_CHAIN_URL": node.url,
               "GRIDMINT_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
               "GRIDMINT_OPERATOR_KEY": "0x" + bytes(operator.key).hex(), "GRIDMINT_REDIS_URL": redis_url,
               "GRIDMINT_MIN_STAKE": str(tokens(100)), "GRIDMINT_UNIT_TIMEOUT_S": "60", "GRIDMINT_CANARY_RATE": "0",
               "GRIDMINT_WALLET_PASSWORD": "", "GRIDMINT_REFEREE_POOLS": pool,
               "GRIDMINT_REFEREE_POOL_WAIT_S": str(wait_s),
               # every process is told the default referee's kernels: a pool's machine cannot take its own for them
               "GRIDMINT_REFEREE_BUILD": kernel_build("cpu")}
        m = PoolMarket(tmp_path, f"http://127.0.0.1:{port}", pool, chain, ops, operator, deployment, env,
                       {**env, **FOREIGN_KERNELS}, [redis])
        m.start("api", [*GM, "marketplace", "serve", "--port", str(port)], env)
        m.start("worker", [*GM, "marketplace", "worker"], env)
        if pool_worker:
            m.start("pool-worker", [*GM, "marketplace", "worker"], m.on_pool)
        m.proc("api").wait_until(lambda: httpx.get(f"{m.url}/healthz", timeout=1).status_code == 200, 180,
                                 "API answering")
        config = httpx.get(f"{m.url}/config").json()
        assert config["referee_pools"] == [pool] and config["referee_build"] == kernel_build("cpu")
        assert config["referee_pool_wait_s"] == wait_s
        yield m
    finally:
        for p in reversed(m.procs if m else []):
            p.stop()
        node.stop()


def _pool_seen(url: str, pool: str) -> float:
    """The pool's last sign of life as /metrics reports it (0: never seen)."""
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("gridmint_referee_pool_seen_timestamp_seconds{") and f'referee="{pool}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no gridmint_referee_pool_seen_timestamp_seconds for {pool}")


def test_a_float8_step_on_a_referee_pools_kernels_is_convicted_bit_for_bit_there(tmp_path: Path) -> None:
    # the pool's worker says it is alive every 1.5 s: its disputes stay with it, though it is away after 6 s
    with pool_market(tmp_path, pool_worker=True, wait_s=6) as m:
        agents = {"honest": m.provider("honest", "us-east", "0.9"),
                  "cheat": m.provider("cheat", "eu-north", "0.55", "low-precision")}
        verifier = m.verifier()
        job_id = m.run_job(set(agents.values()))
        units, checks, events = m.records(job_id)
        pool, ops = m.pool, m.ops
        # every unit and every stored result names the pool's kernels: the agents said what they compute with
        assert {u.build for u in units} == {pool}
        # the honest provider's work on those kernels replays bit for bit on the verifier's: every check passed
        honest = [v for v in checks if v.provider == agents["honest"]]
        assert honest and all(v.status == "passed" for v in honest), [(v.segment, v.status) for v in honest]
        assert all(v.replayed_hash == next(u for u in units if u.id == v.unit_id).proof["segments"][v.segment]
                   ["endHash"] for v in honest)
        assert all(u.status == "verified" and u.provider == agents["honest"] for u in units)
        # the cheat's float8 step: disputed with a bond (the task named the pool's kernels as the referee's), sent
        # to the pool's queue and convicted there on an exact replay: the fraud-proof path, the verifier paid
        assert events["segment_disputed"] and all("[unbonded" not in e["reason"] for e in events["segment_disputed"])
        assert "false_accusation" not in events, events["false_accusation"]
        [slash] = events["provider_slashed"]
        assert slash["provider"] == agents["cheat"] and slash["path"] == "fraud-proof", slash
        assert "end state differs" in slash["reason"] and "other kernels" not in slash["reason"], slash
        assert ops.stake_of(agents["cheat"]) == 0 and ops.stake_of(agents["honest"]) == tokens(200)
        assert ops.stake_of(verifier) >= tokens(100)  # its bond back, and a bounty on top
        # the ruling was the pool worker's, on its own queue; the referee's own worker never got the dispute (it
        # would have refused it: "this dispute is for the referee computing with ..."), nor did one fall back to it:
        # the pool's worker kept saying it was there
        assert f"referee pool {pool}: queue {pool_queue(pool)}" in m.proc("pool-worker").tail(200)
        assert "is for the referee computing with" not in m.proc("worker").tail(400), m.proc("worker").tail(40)
        assert "referee_fallback" not in events, events["referee_fallback"]
        assert _pool_seen(m.url, pool) >= time.time() - 30


def test_a_referee_pool_with_no_worker_hands_its_disputes_to_the_default_referee(tmp_path: Path) -> None:
    """The pool is named but no worker of it runs. A verifier on its kernels disputes every segment of an honest
    provider there (it accuses everything), with a bond: the task says the pool would judge it bit for bit. The pool
    never says it is alive, so after GRIDMINT_REFEREE_POOL_WAIT_S each dispute goes to the default referee, which
    judges the other kernels within the tolerance and clears the honest work; the job settles instead of waiting for
    ever. No one is blamed: the bonds, posted on the pool's promise of an exact replay, are released, and the
    overruled verdicts are not counted against the verifier (the pool would have proven them false; its absence
    is the marketplace's failing)."""
    with pool_market(tmp_path, pool_worker=False, wait_s=3) as m:
        honest = m.provider("honest", "us-east", "0.9")
        verifier = m.verifier("accuse-everything")
        assert _pool_seen(m.url, m.pool) == 0
        job_id = m.run_job({honest})
        units, checks, events = m.records(job_id)
        assert {u.build for u in units} == {m.pool} and all(u.status == "verified" for u in units)
        assert checks and all(v.status == "dismissed" and v.fallback_at for v in checks), \
            [(v.segment, v.status, v.fallback_at) for v in checks]
        assert len(events["referee_fallback"]) == len(checks) == len(events["dispute_dismissed"])
        assert all(e["pool"] == m.pool and e["pool_seen"] is None for e in events["referee_fallback"])
        assert any(e["bonded"] for e in events["dispute_dismissed"])  # a bond was at stake, and came back
        assert "provider_slashed" not in events and "false_accusation" not in events
        assert m.ops.stake_of(honest) == tokens(200) and m.ops.stake_of(verifier) == tokens(100)
        with make_sessionmaker(f"sqlite:///{(tmp_path / 'market' / 'marketplace.db').resolve()}")() as s:
            row = s.get(Verifier, verifier)
            assert row is not None and row.wrong == 0 and row.status == "active", (row.wrong, row.status)
