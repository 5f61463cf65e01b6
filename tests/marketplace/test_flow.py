"""The loop over real HTTP, a real Celery worker on Redis and the in-process EVM:
stake -> register -> match -> train + prove -> verify -> (slash) -> settle -> claim."""
from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select

from marketplace.db import Job, LedgerEntry, Provider, Unit, Verification
from node.agent import AgentConfig, ProviderAgent
from node.client import MarketClient
from node.verifier_agent import VerifierAgent
from protocol.money import tokens
from protocol.schemas import JobSpec

SPEC = JobSpec(rounds=2, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))


def provider(market, tmp_path: Path, name: str, region: str, price: str, adversary: str | None = None) -> ProviderAgent:
    acct = market.account(gmt=tokens(500))
    cfg = AgentConfig(marketplace=market.url, chain_url="", region=region, price=tokens(price), stake=tokens(200),
                      adversary=adversary)
    agent = ProviderAgent(cfg, acct, tmp_path / name, contracts=market.contracts(acct))
    agent.setup()
    return agent


def submit_job(market, spec: JobSpec = SPEC) -> str:
    customer = market.account(gmt=tokens(100))
    client = MarketClient(market.url, customer)
    quote = client.quote(spec.model_dump(mode="json"))
    market.contracts(customer).fund_job_with_permit(quote["job_id"], int(quote["budget"]))
    client.submit_job(quote["job_id"], spec.model_dump(mode="json"))
    return str(quote["job_id"])


def job_status(market, job_id: str) -> str:
    with market.rt.sessions() as s:
        job = s.get(Job, job_id)
        return job.status if job else "missing"


def drive(market, agents: list[ProviderAgent], verifier: VerifierAgent, job_id: str, max_iters: int = 400) -> None:
    """Step every agent until the job is settled (each step does one unit of real work, or nothing)."""
    for _ in range(max_iters):
        if job_status(market, job_id) == "settled":
            return
        busy = False
        for a in agents:
            if a.client.account.address not in slashed(market):
                busy |= a.work_once()
        busy |= verifier.verify_once() is not None
        if not busy:
            time.sleep(0.1)
    raise AssertionError(f"job {job_id} not settled: {job_status(market, job_id)}")


def slashed(market) -> set[str]:
    with market.rt.sessions() as s:
        return set(s.scalars(select(Provider.address).where(Provider.status == "slashed")))


def test_honest_job_is_matched_cheapest_first_verified_settled_and_claimed(market, tmp_path: Path) -> None:
    cheap = provider(market, tmp_path, "cheap", "eu-north", "0.6")
    mid = provider(market, tmp_path, "mid", "us-east", "0.9")
    pricey = provider(market, tmp_path, "pricey", "ap-east", "1.5")
    verifier = VerifierAgent(market.url, market.account(), tmp_path / "verifier")
    verifier.client.register_verifier()
    job_id = submit_job(market)
    # round 0 goes to the two cheapest; the pricey region is standby
    market.wait(lambda: _assigned(market, job_id) == 2, what="round 0 matched")
    with market.rt.sessions() as s:
        takers = {u.provider for u in s.scalars(select(Unit).where(Unit.job_id == job_id, Unit.round == 0))}
    assert takers == {cheap.account.address, mid.account.address}
    drive(market, [cheap, mid, pricey], verifier, job_id)
    with market.rt.sessions() as s:
        job = s.get(Job, job_id)
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id)))
        checks = list(s.scalars(select(Verification)))
        assert job.eval_losses[-1] < job.eval_losses[0]
    assert len(entries) == 4 and all(e.released for e in entries)
    assert checks and all(v.status == "passed" for v in checks)  # no honest unit flagged
    paid = sum(e.amount for e in entries)
    onchain = market.ops.get_job(job_id)
    assert onchain.closed and onchain.released == paid
    assert paid + job.refund == SPEC.budget()
    for agent in (cheap, mid):
        owed = market.ops.claimable(agent.account.address)
        assert owed == sum(e.amount for e in entries if e.provider == agent.account.address) > 0
        before = market.ops.balance_of(agent.account.address)
        assert agent.claim() == owed
        assert market.ops.balance_of(agent.account.address) == before + owed
        assert agent.claim() == 0  # claiming twice pays nothing


def _assigned(market, job_id: str) -> int:
    with market.rt.sessions() as s:
        return len(list(s.scalars(select(Unit).where(Unit.job_id == job_id, Unit.status == "assigned"))))


def test_cheat_is_caught_slashed_and_its_unit_reassigned(market, tmp_path: Path) -> None:
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = VerifierAgent(market.url, market.account(), tmp_path / "verifier")
    verifier.client.register_verifier()
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    treasury = market.deployment.treasury
    supply_before = market.ops.total_supply()
    drive(market, [cheat, honest], verifier, job_id)
    assert slashed(market) == {cheat.account.address}
    assert market.ops.stake_of(cheat.account.address) == 0
    assert market.ops.balance_of(verifier.account.address) == tokens(100)  # half of the 200 stake: bounty
    assert market.ops.balance_of(treasury) == tokens(100)
    with market.rt.sessions() as s:
        units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id)))
        frauds = list(s.scalars(select(Verification).where(Verification.status == "fraud")))
    assert all(u.status == "verified" and u.provider == honest.account.address for u in units)
    assert {e.provider for e in entries} == {honest.account.address}
    assert len(frauds) == 1 and frauds[0].provider == cheat.account.address
    assert any(cheat.account.address in u.excluded for u in units)
    assert market.ops.total_supply() == supply_before
