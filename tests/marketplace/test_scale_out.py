"""Scale-out: two API processes and two Celery workers (one of them running beat) against one PostgreSQL and one
Redis, on a real Hardhat chain. Agents talk to different API processes; a job runs to settlement and claims.

Everything that must hold when the service is spread over processes (or machines) is checked: one job's units are
each verified and credited once, per-signer nonces are shared through the database (a request accepted by one API
process is a replay on the other), and no token is created or lost."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from celery import Celery
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import func, select

from gridmint.procs import Proc, free_port, new_database, start_redis
from ledger.devchain import HardhatNode
from ledger.evm import Chain, Deployment, GridMintContracts, deploy
from marketplace.db import Event, Job, LedgerEntry, Unit, Verification, make_sessionmaker
from node.agent import AgentConfig, ProviderAgent
from node.client import MarketClient
from node.verifier_agent import VerifierAgent
from protocol.jobs import new_job_id
from protocol.money import tokens
from protocol.schemas import JobSpec
from protocol.signing import sign_request
from tests.marketplace.conftest import Accounts

SUPPLY = tokens(1_000_000)
SPEC = JobSpec(rounds=2, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))
DEADLINE_S = 150  # the whole job, from submission to claims


@dataclass
class Cluster(Accounts):
    api: list[str]  # base URLs of the API processes
    procs: list[Proc]
    chain: Chain
    deployment: Deployment
    operator: LocalAccount
    ops: GridMintContracts
    db_url: str
    redis_url: str

    def check_alive(self) -> None:
        for p in self.procs:
            assert p.alive(), f"{p.name} died (exit {p.popen.returncode}):\n{p.tail()}"


@pytest.fixture()
def cluster(tmp_path: Path, postgres_server: str) -> Iterator[Cluster]:
    """Hardhat + contracts, one PostgreSQL database, one Redis, 2 x ``gridmint marketplace serve`` and
    2 x ``gridmint marketplace worker`` (``--beat`` on one only), all with the same GRIDMINT_* environment."""
    logs = tmp_path / "logs"
    procs: list[Proc] = []
    node = HardhatNode()
    node.start()
    try:
        chain = Chain.http(node.url)
        operator = chain.dev_accounts()[0]
        deployment = deploy(chain, operator, supply=SUPPLY, treasury=Account.create().address)
        deployment_file = tmp_path / "deployment.json"
        deployment.to_json(deployment_file)
        redis, redis_url = start_redis(tmp_path / "redis", logs)
        procs.append(redis)
        db_url = new_database(postgres_server)
        env = {
            # On one machine the API processes and workers share GRIDMINT_DATA_DIR (checkpoint blobs); across
            # machines that directory must be shared storage (see the README's scale-out section).
            "GRIDMINT_DATA_DIR": str(tmp_path / "market"),
            "GRIDMINT_DB_URL": db_url,
            "GRIDMINT_REDIS_URL": redis_url,
            "GRIDMINT_CHAIN_URL": node.url,
            "GRIDMINT_DEPLOYMENT_FILE": str(deployment_file),
            "GRIDMINT_OPERATOR_KEY": "0x" + bytes(operator.key).hex(),
            "GRIDMINT_MIN_STAKE": str(tokens(100)),
            "GRIDMINT_UNIT_TIMEOUT_S": "60",
            # every check of a segment comes first as a planted canary (each segment is planted at most once), forged
            # by one process, answered via any
            "GRIDMINT_CANARY_RATE": "1.0",
            "GRIDMINT_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
        }
        gm = [sys.executable, "-m", "gridmint.cli", "marketplace"]
        ports = [free_port(), free_port()]
        # the second API is one port served by 2 uvicorn worker processes (its /metrics must sum both)
        apis = [Proc(f"api-{i}", [*gm, "serve", "--port", str(port), "--workers", str(i + 1)], logs, env)
                for i, port in enumerate(ports)]
        workers = [Proc("worker-beat", [*gm, "worker", "--beat"], logs, env),
                   Proc("worker-2", [*gm, "worker", "--no-beat"], logs, env)]
        procs += [*apis, *workers]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for proc, url in zip(apis, urls):
            proc.wait_until(lambda u=url: httpx.get(f"{u}/healthz", timeout=1).status_code == 200, 120, "API answering")
        yield Cluster(urls, procs, chain, deployment, operator, GridMintContracts(chain, deployment, operator),
                      db_url, redis_url)
    finally:
        for p in reversed(procs):
            p.stop()
        node.stop()


def _celery_workers(redis_url: str, want: int) -> list[str]:
    """Names of the Celery workers answering a broadcast ping on the shared broker (polled until ``want`` answer)."""
    # A Celery app of its own: the shared ``tasks.celery_app`` belongs to whichever test configured it last.
    probe = Celery("gridmint-probe", broker=redis_url)
    names: list[str] = []
    # a worker imports torch and the whole service before it answers: on a loaded 2-core machine that took > 30 s
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        names = sorted(name for reply in probe.control.ping(timeout=1.0) for name in reply)
        if len(names) >= want:
            break
    probe.close()
    return names


def test_two_apis_two_workers_one_postgres_one_redis_settle_a_job_exactly_once(cluster: Cluster, tmp_path: Path) -> None:
    api_a, api_b = cluster.api
    assert len(_celery_workers(cluster.redis_url, 2)) == 2  # both workers consume from the one broker

    def provider(name: str, url: str, region: str, price: str) -> ProviderAgent:
        acct = cluster.account(gmt=tokens(500))
        cfg = AgentConfig(marketplace=url, chain_url="", region=region, price=tokens(price), stake=tokens(200))
        agent = ProviderAgent(cfg, acct, tmp_path / name, contracts=cluster.contracts(acct))
        agent.setup()
        return agent

    # providers register through different API processes; matching runs on whichever worker takes the task
    agents = [provider("p-a", api_a, "eu-north", "0.6"), provider("p-b", api_b, "us-east", "0.9")]
    vacct = cluster.account(gmt=tokens(100))
    verifier = VerifierAgent(api_b, vacct, tmp_path / "verifier")
    verifier.client.register_verifier()
    verifier.keep_staked("", tokens(100), contracts=cluster.contracts(vacct))  # tasks go only to staked verifiers

    customer = cluster.account(gmt=tokens(100))
    client_a, client_b = MarketClient(api_a, customer), MarketClient(api_b, customer)
    quote = client_b.quote(SPEC.model_dump(mode="json"))
    job_id, budget = new_job_id(customer.address), int(quote["budget"])
    cluster.contracts(customer).fund_job_with_permit(job_id, budget)
    client_a.submit_job(job_id, SPEC.model_dump(mode="json"))
    supply_before = cluster.ops.total_supply()

    # drive the agents step by step until the job is settled (status read through the *other* API process)
    end = time.monotonic() + DEADLINE_S
    while client_b.job(job_id)["status"] != "settled":
        assert time.monotonic() < end, f"job not settled in {DEADLINE_S}s: {client_b.job(job_id)['status']}"
        cluster.check_alive()
        busy = False
        for a in agents:
            busy |= a.work_once()
        busy |= verifier.verify_once() is not None
        if not busy:
            time.sleep(0.2)

    sessions = make_sessionmaker(cluster.db_url)
    n_units = SPEC.rounds * SPEC.units_per_round
    with sessions() as s:
        job = s.get(Job, job_id)
        units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                           LedgerEntry.verification_id.is_(None))))
        checks = list(s.scalars(select(Verification).join(Unit).where(Unit.job_id == job_id)))
        verified_events = list(s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == "unit_verified")))
        rounds_done = s.scalar(select(func.count()).select_from(Event)
                               .where(Event.job_id == job_id, Event.kind == "round_done"))
    assert job is not None and job.status == "settled" and job.eval_losses[-1] < job.eval_losses[0]
    # every unit verified once, credited once
    assert len(units) == n_units and all(u.status == "verified" and u.attempts == 1 for u in units)
    assert sorted(e.data["unit"] for e in verified_events) == sorted(u.id for u in units)
    # every real check, of the last segment too (its forgery borrows the update before it), stood behind exactly one
    # planted canary, which the honest verifier flagged; the real check was done all the same (a forgery is declined
    # only where it is the claim itself, which no made-up step lands on)
    real = [v for v in checks if v.canary is None]
    planted = sorted((v.unit_id, v.segment) for v in checks if v.canary is not None)
    assert planted == sorted((v.unit_id, v.segment) for v in real)
    assert all(v.status == "canary_flagged" for v in checks if v.canary is not None)
    assert real and all(v.status == "passed" for v in real)
    assert len({(v.unit_id, v.segment) for v in real}) == len(real)  # no segment handed out twice
    assert len(entries) == n_units and {e.unit_id for e in entries} == {u.id for u in units}
    assert all(e.released and e.amount == u.price for e in entries for u in units if u.id == e.unit_id)
    assert rounds_done == SPEC.rounds  # each round averaged once, though two workers could have raced on it
    with sessions() as s:  # and each passed check's fee to its verifier
        fees = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                        LedgerEntry.verification_id.is_not(None))))
    assert sorted(f.verification_id for f in fees) == sorted(v.id for v in real) and all(f.released for f in fees)
    paid = sum(e.amount for e in entries) + sum(f.amount for f in fees)
    onchain = cluster.ops.get_job(job_id)
    assert onchain.closed and onchain.released == paid and paid + job.refund == budget

    # the payout root goes on chain once; each provider claims exactly what the ledger owes it, once
    end = time.monotonic() + 60
    # (sent on chain first, then recorded as posted: the marketplace serves proofs only under a recorded root)
    while cluster.ops.latest_epoch() < 1 or agents[0].client.payout()["newest_epoch"] < 1:
        assert time.monotonic() < end, "no payout root posted and recorded"
        time.sleep(0.2)
    for agent in agents:
        owed = sum(e.amount for e in entries if e.provider == agent.account.address)
        assert agent.claim() == owed
        assert cluster.ops.claimed(agent.account.address) == owed
        assert agent.claim() == 0

    # one signed request, accepted by one API process, is a replay on the other (nonces live in the database)
    body = json.dumps({"unit_id": None, "steps_done": 0}).encode()
    for first, other, agent in ((api_a, api_b, agents[0]), (api_b, api_a, agents[1])):
        headers = sign_request(agent.account, agent.client.domain, "POST", "/providers/heartbeat", body,
                               agent.client.nonces.next(), int(time.time()) + 60)
        headers["content-type"] = "application/json"
        assert httpx.post(f"{first}/providers/heartbeat", content=body, headers=headers).status_code == 200
        replay = httpx.post(f"{other}/providers/heartbeat", content=body, headers=headers)
        assert replay.status_code == 409 and replay.json()["error"] == "ReplayError"

    # token totals: nothing created, nothing lost
    holders = [cluster.operator.address, cluster.deployment.treasury, customer.address, verifier.account.address,
               *(a.account.address for a in agents)]
    total = sum(cluster.ops.balance_of(h) for h in holders) + sum(cluster.ops.contract_balances().values())
    assert total == cluster.ops.total_supply() == supply_before == SUPPLY
    cluster.check_alive()

    # api_b runs 2 worker processes behind one port: every scrape counts the requests both of them answered
    before = _healthz_count(api_b)
    with httpx.Client() as http:
        for _ in range(20):
            assert http.get(f"{api_b}/healthz", headers={"connection": "close"}).status_code == 200  # fresh
    assert [_healthz_count(api_b) for _ in range(4)] == [before + 20] * 4


def _healthz_count(url: str) -> float:
    """``gridmint_http_requests_total`` for GET /healthz 200 in one scrape of ``url``/metrics (new connection)."""
    text = httpx.get(f"{url}/metrics", headers={"connection": "close"}).text
    for line in text.splitlines():
        if (line.startswith("gridmint_http_requests_total{") and 'route="/healthz"' in line
                and 'method="GET"' in line and 'status="200"' in line):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no /healthz counter in the scrape")
