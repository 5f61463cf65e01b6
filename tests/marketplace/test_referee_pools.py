"""Referee pools: referee workers on other CPU kernels than the referee's own (GRIDMINT_REFEREE_POOLS).

The same plan replays bit for bit only on the same kernels. Without a referee on a provider's kernels, a dispute over
its work is judged within a tolerance calibrated across kernels, and a float8 step in a bf16 job hides inside that
drift (bench proof ``cross_build``: 0 of 20 convicted). A referee pool closes that: a Celery worker started on a
machine with those kernels consumes the pool's own queue, the marketplace sends it the disputes over work computed
with them, and it replays them bit for bit; a verifier on the same kernels bonds its disputes.

Everything here is real: a Hardhat chain, Redis, the API and two ``gridmint marketplace worker`` processes (the
referee's, with the scheduler, and the pool's, on ATen's scalar kernels and MKL's compatible path: node.foreign's
other kernels), two providers and a verifier as ``gridmint node run`` / ``gridmint verifier run`` processes on the
pool's kernels. No process is told which kernels it computes with: each names its own (node.device.kernel_build)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from sqlalchemy import select

from gridmint.procs import Proc, free_port, start_redis, venv_path_env
from ledger.devchain import HardhatNode
from ledger.evm import Chain, GridMintContracts, deploy
from marketplace.db import Event, Unit, Verification, make_sessionmaker
from marketplace.runtime import pool_queue
from node.client import MarketClient
from node.device import FOREIGN_KERNELS, kernel_build
from node.wallet import save as save_wallet
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


def test_a_float8_step_on_a_referee_pools_kernels_is_convicted_bit_for_bit_there(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    procs: list[Proc] = []
    node = HardhatNode()
    node.start()
    try:
        pool = _kernels_of(dict(FOREIGN_KERNELS))
        assert pool != kernel_build("cpu") and "aten-default" in pool
        chain = Chain.http(node.url)
        operator = chain.dev_accounts()[0]
        deployment = deploy(chain, operator, supply=tokens(1_000_000), treasury=Account.create().address,
                            verifier_bond=tokens(50))
        deployment.to_json(tmp_path / "deployment.json")
        ops = GridMintContracts(chain, deployment, operator)
        redis, redis_url = start_redis(tmp_path / "redis", logs)
        procs.append(redis)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"GRIDMINT_DATA_DIR": str(tmp_path / "market"), "GRIDMINT_CHAIN_URL": node.url,
               "GRIDMINT_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
               "GRIDMINT_OPERATOR_KEY": "0x" + bytes(operator.key).hex(), "GRIDMINT_REDIS_URL": redis_url,
               "GRIDMINT_MIN_STAKE": str(tokens(100)), "GRIDMINT_UNIT_TIMEOUT_S": "60", "GRIDMINT_CANARY_RATE": "0",
               "GRIDMINT_WALLET_PASSWORD": "", "GRIDMINT_REFEREE_POOLS": pool,
               # every process is told the default referee's kernels: a pool's machine cannot take its own for them
               "GRIDMINT_REFEREE_BUILD": kernel_build("cpu")}
        on_pool = {**env, **FOREIGN_KERNELS}
        procs += [Proc("api", [*GM, "marketplace", "serve", "--port", str(port)], logs, env),
                  Proc("worker", [*GM, "marketplace", "worker"], logs, env),
                  Proc("pool-worker", [*GM, "marketplace", "worker"], logs, on_pool)]
        procs[1].wait_until(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, 180, "API answering")
        config = httpx.get(f"{url}/config").json()
        assert config["referee_pools"] == [pool] and config["referee_build"] == kernel_build("cpu")

        def wallet(name: str, gmt: int) -> tuple[str, Path]:
            acct = Account.create()
            path = tmp_path / "wallets" / f"{name}.json"
            save_wallet(acct, path, password="")
            chain.send_eth(operator, acct.address, 10**18)
            ops.transfer(acct.address, gmt)
            return acct.address, path

        agents = {}
        for name, region, price, adversary in (("honest", "us-east", "0.9", None),
                                               ("cheat", "eu-north", "0.55", "low-precision")):
            address, path = wallet(name, tokens(500))
            argv = [*GM, "node", "run", "--marketplace", url, "--chain", node.url, "--wallet", str(path),
                    "--region", region, "--price", price, "--stake", "200"]
            procs.append(Proc(f"node-{name}", argv + (["--adversary", adversary] if adversary else []), logs,
                              on_pool))
            agents[name] = address
        verifier, vpath = wallet("verifier", tokens(100))
        procs.append(Proc("verifier", [*GM, "verifier", "run", "--marketplace", url, "--wallet", str(vpath),
                                       "--chain", node.url, "--stake", "100"], logs, on_pool))

        def check_alive() -> None:
            for p in procs:  # a node told it was slashed stops cleanly (exit 0): the cheat's way out
                assert p.alive() or (p.name.startswith("node-") and p.popen.returncode == 0), \
                    f"{p.name} died (exit {p.popen.returncode}):\n{p.tail()}"

        def wait(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                check_alive()
                got = cond()
                if got:
                    return got
                time.sleep(0.3)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                 + "\n".join(f"--- {p.name}\n{p.tail(8)}" for p in procs))

        registered = lambda: {p["address"] for p in httpx.get(f"{url}/providers", timeout=5).json()}  # noqa: E731
        wait(lambda: registered() == set(agents.values()), 240, "both providers registered")
        customer = Account.create()
        chain.send_eth(operator, customer.address, 10**18)
        ops.transfer(customer.address, tokens(100))
        client = MarketClient(url, customer)
        quote = client.quote(SPEC.model_dump(mode="json"))
        job_id = quote["job_id"]
        GridMintContracts(chain, deployment, customer).fund_job_with_permit(job_id, int(quote["budget"]))
        client.submit_job(job_id, SPEC.model_dump(mode="json"))
        wait(lambda: client.job(job_id)["status"] == "settled", 360, "the job settled")

        sessions = make_sessionmaker(f"sqlite:///{(tmp_path / 'market' / 'marketplace.db').resolve()}")
        with sessions() as s:
            units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
            checks = list(s.scalars(select(Verification).where(Verification.unit_id.in_([u.id for u in units]))))
            events = {k: [e.data for e in s.scalars(select(Event).where(Event.kind == k))]
                      for k in ("provider_slashed", "segment_disputed", "false_accusation")}
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
        assert not events["false_accusation"], events["false_accusation"]
        [slash] = events["provider_slashed"]
        assert slash["provider"] == agents["cheat"] and slash["path"] == "fraud-proof", slash
        assert "end state differs" in slash["reason"] and "other kernels" not in slash["reason"], slash
        assert ops.stake_of(agents["cheat"]) == 0 and ops.stake_of(agents["honest"]) == tokens(200)
        assert ops.stake_of(verifier) >= tokens(100)  # its bond back, and a bounty on top
        # the ruling was the pool worker's, on its own queue; the referee's own worker never got the dispute (it
        # would have refused it: "this dispute is for the referee computing with ...")
        assert f"referee pool {pool}: queue {pool_queue(pool)}" in procs[3].tail(200)
        assert "is for the referee computing with" not in procs[2].tail(400), procs[2].tail(40)
    finally:
        for p in reversed(procs):
            p.stop()
        node.stop()
