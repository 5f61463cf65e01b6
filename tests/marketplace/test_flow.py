"""The loop over real HTTP, a real Celery worker on Redis and the in-process EVM:
stake -> register -> match -> train + prove -> verify -> (slash) -> settle -> claim."""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from sqlalchemy import select, update

from marketplace.db import Event, Job, LedgerEntry, Provider, Unit, Verification, Verifier
from node.agent import AgentConfig, ProviderAgent
from node.client import MarketClient, MarketError
from node.trainer import UnitSpec, train_unit
from node.verifier_agent import VerifierAgent
from protocol.errors import ChainError, ChainUnavailable, GridMintValueError, VersionMismatch
from protocol.jobs import RANDOM_BYTES, new_job_id
from protocol.money import tokens
from protocol.proof import TrainingProof, segment_view
from protocol.schemas import JobSpec, ModelSpec
from protocol.signing import sign_typed, to_bytes32
from protocol.verification import UNDER_REVIEW

SPEC = JobSpec(rounds=2, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))


def provider(market, tmp_path: Path, name: str, region: str, price: str, adversary: str | None = None,
             plan: str = "cpu") -> ProviderAgent:
    acct = market.account(gmt=tokens(500))
    cfg = AgentConfig(marketplace=market.url, chain_url="", region=region, price=tokens(price), stake=tokens(200),
                      adversary=adversary, plan=plan)
    agent = ProviderAgent(cfg, acct, tmp_path / name, contracts=market.contracts(acct))
    agent.setup()
    return agent


def staked_verifier(market, tmp_path: Path, name: str, **kw) -> VerifierAgent:
    """A registered verifier with 100 GMT staked (it backs its accusations with a bond)."""
    acct = market.account(gmt=tokens(100))
    v = VerifierAgent(market.url, acct, tmp_path / name, **kw)
    v.client.register_verifier(v.plan.label, v.build)  # its declared plan: what the referee judges its verdicts by
    v.keep_staked("", tokens(100), contracts=market.contracts(acct))
    return v


#: The customer of the tests' fixed job ids: a job id starts with its customer's address (protocol.jobs), so a fixed
#: id (a fixed data order) needs a fixed key.
FIXED_CUSTOMER = Account.from_key(keccak(text="GridMint test_flow: the customer of fixed job ids"))


def fixed_job_id(fill: int) -> str:
    """FIXED_CUSTOMER's job id whose random part is the byte ``fill`` repeated."""
    return new_job_id(FIXED_CUSTOMER.address, bytes([fill]) * RANDOM_BYTES)


def submit_job(market, spec: JobSpec = SPEC, job_id: str | None = None) -> str:
    """Quote, fund and submit ``spec``; as a new customer under a fresh job id of its own, or as FIXED_CUSTOMER
    under ``job_id`` (one of its ``fixed_job_id``: its data order, so its units, are then known in advance)."""
    customer: LocalAccount = market.account(gmt=tokens(100)) if job_id is None else FIXED_CUSTOMER
    if job_id is not None:
        market.chain.send_eth(market.operator, customer.address, 10**18)
        market.ops.transfer(customer.address, tokens(100))
    client = MarketClient(market.url, customer)
    quote = client.quote(spec.model_dump(mode="json"))
    job_id = job_id or new_job_id(customer.address)
    market.contracts(customer).fund_job_with_permit(job_id, int(quote["budget"]))
    client.submit_job(job_id, spec.model_dump(mode="json"))
    return str(job_id)


def job_status(market, job_id: str) -> str:
    with market.rt.sessions() as s:
        job = s.get(Job, job_id)
        return job.status if job else "missing"


def drive(market, agents: list[ProviderAgent], verifiers: VerifierAgent | list[VerifierAgent], job_id: str,
          timeout_s: float = 300) -> None:
    """Step every agent until the job is settled (each step does one unit of real work, or nothing); a verifier
    that gets benched meanwhile drops out. The limit is wall time, not a count of steps: on a slow machine the
    referee's replays (Celery) take longer between reveals."""
    pool = [verifiers] if isinstance(verifiers, VerifierAgent) else list(verifiers)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if job_status(market, job_id) == "settled":
            return
        busy = False
        for a in agents:
            if a.client.account.address not in slashed(market):
                try:
                    busy |= a.reveal_once() or a.work_once()
                except MarketError as exc:  # refused work (slashed on chain a moment ago, or short of stake): idle,
                    if exc.status != 409:   # as the agent's own loop rides it out
                        raise
        for v in list(pool):
            try:
                busy |= v.verify_once() is not None
            except MarketError as exc:
                if exc.status != 409 or "benched" not in str(exc.detail):
                    raise
                pool.remove(v)
        if not busy:
            time.sleep(0.1)
    with market.rt.sessions() as s:
        checks = [(v.unit_id[:10], v.segment, v.status, sorted((v.bisect or {}).get("reveals") or {}))
                  for v in s.scalars(select(Verification))]
    raise AssertionError(f"job {job_id} not settled after {timeout_s:g} s: {job_status(market, job_id)}; "
                         f"verifications {checks}; slashes {_events(market, 'provider_slashed')}")


def slashed(market) -> set[str]:
    with market.rt.sessions() as s:
        return set(s.scalars(select(Provider.address).where(Provider.status == "slashed")))


@pytest.mark.parametrize("market", ["sqlite", "postgres"], indirect=True)
def test_honest_job_is_matched_cheapest_first_verified_settled_and_claimed(market, tmp_path: Path) -> None:
    cheap = provider(market, tmp_path, "cheap", "eu-north", "0.6")
    mid = provider(market, tmp_path, "mid", "us-east", "0.9")
    pricey = provider(market, tmp_path, "pricey", "ap-east", "1.5")
    verifier = staked_verifier(market, tmp_path, "verifier")
    job_id = submit_job(market)
    # round 0 goes to the two cheapest; the pricey region is standby
    market.wait(lambda: _assigned(market, job_id) == 2, what="round 0 matched")
    with market.rt.sessions() as s:
        takers = {u.provider for u in s.scalars(select(Unit).where(Unit.job_id == job_id, Unit.round == 0))}
    assert takers == {cheap.account.address, mid.account.address}
    drive(market, [cheap, mid, pricey], verifier, job_id)
    with market.rt.sessions() as s:
        job = s.get(Job, job_id)
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                           LedgerEntry.verification_id.is_(None))))
        fees = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                        LedgerEntry.verification_id.is_not(None))))
        checks = list(s.scalars(select(Verification)))
        prices = {u.id: u.price for u in s.scalars(select(Unit).where(Unit.job_id == job_id))}
        assert job.eval_losses[-1] < job.eval_losses[0]
    assert len(entries) == 4 and all(e.released and e.batch for e in entries)
    assert len({e.batch for e in entries + fees}) == 1  # one pool transfer for the whole job, fees included
    assert checks and all(v.status == "passed" for v in checks)  # no honest unit flagged
    # the verifier earns the provider's price for the share of each unit it replayed: one fee per passed check
    by_check = {v.id: v for v in checks}
    assert sorted(f.verification_id for f in fees) == sorted(by_check)
    assert all(f.provider == verifier.account.address and f.released for f in fees)
    assert all(f.amount == -(-prices[by_check[f.verification_id].unit_id] // 4) for f in fees)  # 4 segments a unit
    paid, fee_total = sum(e.amount for e in entries), sum(f.amount for f in fees)
    onchain = market.ops.get_job(job_id)
    assert onchain.closed and onchain.released == paid + fee_total
    assert paid + fee_total + job.refund == SPEC.budget()
    assert market.ops.batch_released(job_id, entries[0].batch)
    # the settle task queued an epoch: one root over cumulative earnings, funded by the pool
    # (sent on chain first, then recorded as posted: the marketplace serves proofs only under a recorded root)
    market.wait(lambda: market.ops.latest_epoch() == 1 and cheap.client.payout()["newest_epoch"] == 1,
                what="payout root posted and recorded")
    assert market.ops.total_deposited() == paid + fee_total
    assert verifier.claim() == fee_total > 0 and market.ops.claimed(verifier.account.address) == fee_total
    # from round 1 on, ranking uses delivered throughput, so any of the three may have earned: each claims its own
    for agent in (cheap, mid, pricey):
        owed = sum(e.amount for e in entries if e.provider == agent.account.address)
        payout = agent.client.payout()
        assert payout["epoch"] == 1 and int(payout["cumulative"]) == owed and payout["claimed"] == "0"
        before = market.ops.balance_of(agent.account.address)
        assert agent.claim() == owed
        assert market.ops.balance_of(agent.account.address) == before + owed
        assert market.ops.claimed(agent.account.address) == owed
        assert agent.claim() == 0  # claiming twice pays nothing
    assert market.ops.balance_of(market.ops.distributor.address) == 0


def test_a_job_at_level_none_is_credited_settled_and_paid_without_any_replay(market, tmp_path: Path) -> None:
    """The buyer chose no replay: a result that passes the structural checks is credited at once (no verifier is
    asked anything), the job settles and its provider is paid."""
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="none")
    p = provider(market, tmp_path, "p", "eu-north", "0.6")
    verifier = staked_verifier(market, tmp_path, "verifier")
    job_id = submit_job(market, spec)
    drive(market, [p], verifier, job_id)
    with market.rt.sessions() as s:
        job = s.get(Job, job_id)
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                           LedgerEntry.verification_id.is_(None))))
        assert not list(s.scalars(select(Verification)))  # nothing replayed, nothing asked of the verifier
        units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
        streak = s.get(Provider, p.account.address).verified_streak
    assert [u.status for u in units] == ["verified", "verified"] and streak == 0  # no replay builds no record
    assert len(entries) == 2 and all(e.released and e.provider == p.account.address for e in entries)
    paid = sum(e.amount for e in entries)
    assert market.ops.get_job(job_id).released == paid and paid + job.refund == spec.budget()


def _assigned(market, job_id: str) -> int:
    with market.rt.sessions() as s:
        return len(list(s.scalars(select(Unit).where(Unit.job_id == job_id, Unit.status == "assigned"))))


def test_cheat_is_caught_slashed_and_its_unit_reassigned(market, tmp_path: Path) -> None:
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    verifier.accuse = False  # no signed accusation: the operator's governance slash, the verifier's bond untouched
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
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                           LedgerEntry.verification_id.is_(None))))
        frauds = list(s.scalars(select(Verification).where(Verification.status == "fraud")))
    assert all(u.status == "verified" and u.provider == honest.account.address for u in units)
    assert {e.provider for e in entries} == {honest.account.address}
    assert len(frauds) == 1 and frauds[0].provider == cheat.account.address
    assert any(cheat.account.address in u.excluded for u in units)
    assert market.ops.total_supply() == supply_before
    # the customer's page of the job tells the same story: the cheat found and slashed, the model to download
    page = httpx.get(f"{market.url}/web/jobs/{job_id}", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f"Providers slashed for cheating: 1 ({cheat.account.address[:8]}" in page.text
    assert "1 fraud" in page.text and "provider_slashed" in page.text and "Status <b>settled</b>" in page.text
    assert f'href="/jobs/{job_id}/weights"' in page.text and 'http-equiv="refresh"' not in page.text
    assert httpx.get(f"{market.url}/jobs/{job_id}/weights", timeout=10).status_code == 200


def test_a_segment_that_did_not_train_is_replayed_beyond_the_levels_budget_and_its_cheat_slashed(market,
                                                                                                 tmp_path: Path) -> None:
    """An 8-segment unit at the standard level buys one replay, drawn uniformly. A cheat idle in segment 4
    (plausible losses, AdamW counters bumped so its hashes still move) would be checked there one time in eight;
    the marketplace measures each segment's update on the uploaded checkpoints, sees the one that did not move,
    replays it on top of the budget, and the cheat is slashed. An honest unit of the same shape gets no extra replay."""
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="idle-segment")
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=40, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [cheat], 1)
    sub = _events(market, "unit_submitted")[-1]
    assert (sub["segments"], sub["update_outliers"]) == (8, [4]) and 4 in sub["sampled"] and len(sub["sampled"]) <= 2
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    drive(market, [cheat, honest], verifier, job_id)
    assert slashed(market) == {cheat.account.address}
    [fraud] = _rows(market, status="fraud")
    assert (fraud.provider, fraud.segment) == (cheat.account.address, 4)
    again = [e for e in _events(market, "unit_submitted") if e["provider"] == honest.account.address]
    assert [(len(e["sampled"]), e["update_outliers"]) for e in again] == [(1, [])]
    with market.rt.sessions() as s:
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                           LedgerEntry.verification_id.is_(None))))
    assert {e.provider for e in entries} == {honest.account.address}


def test_a_cheats_other_disputes_end_once_it_is_slashed_and_its_unit_goes_to_another(market, tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """A cheat disputed on several segments is slashed to nothing by the first ruling, and its unit goes back to the
    pool. The other disputes end (they failed on chain and were retried for ever, once): dismissed, their bonds
    released, nothing counted against their verifier — and never ruled on the unit as it stands later, when a
    standby's honest result is there (a replay of that cleared "the cheat" and benched the verifier who had caught
    it, as proven false)."""
    from marketplace import checking, service

    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.6", adversary="skip-steps")
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    held: list[int] = []
    real = market.rt.enqueue
    monkeypatch.setattr(market.rt, "enqueue", lambda name, args, queue=None: held.append(args[0])
                        if name == "gridmint.adjudicate" else real(name, args, queue=queue))
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [cheat], 1)
    while verifier.verify_once() is not None:
        pass
    disputes = [v.id for v in _rows(market, status="disputed")]
    assert len(disputes) >= 2 and sorted(held) == disputes  # every segment skipped steps: each one disputed
    assert checking.adjudicate(market.rt, disputes[0]) == "fraud"
    assert market.ops.stake_state(cheat.account.address).staked == 0
    # a standby takes the unit over and hands in an honest result before the other disputes are ruled
    standby = provider(market, tmp_path, "standby", "us-east", "0.9")
    market.wait(lambda: standby.work_once(), what="the standby trained the unit")
    assert _rows(market, status="pending") and _rows(market, status="disputed")
    for vid in disputes[1:]:
        assert checking.adjudicate(market.rt, vid) == "dismissed"
    assert [v.id for v in _rows(market, status="fraud")] == disputes[:1]
    assert sorted(v.id for v in _rows(market, status="dismissed")) == disputes[1:]
    assert service.sweep(market.rt)["adjudicate"] == 0  # nothing left to retry
    assert [e["path"] for e in _events(market, "provider_slashed")] == ["fraud-proof"]  # one slash, of all of it
    dismissed = _events(market, "dispute_dismissed")
    assert len(dismissed) == len(disputes) - 1 and all("left provider" in e["reason"] for e in dismissed)
    assert not _events(market, "false_accusation")
    state = market.ops.stake_state(verifier.account.address)
    assert state.bonded == 0 and state.staked == tokens(100)  # every bond released, none forfeit
    with market.rt.sessions() as s:
        v = s.get(Verifier, verifier.account.address)
        assert (v.status, v.wrong) == ("active", 0)


def test_a_cheat_that_unbonds_once_its_work_is_in_is_slashed_all_the_same(market, tmp_path: Path) -> None:
    """Submitted work is paid only once verified; a cheat that starts unbonding its whole stake right after submitting
    (nothing is frozen on chain before a dispute) has nothing staked left, but cannot withdraw it for the unbonding
    delay (a week by default) and its unbonding stake is slashed in full: the governance slash takes staked +
    unbonding, as the on-chain fraud proof does."""
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    verifier.accuse = False  # no on-chain dispute: the operator's governance slash
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [cheat, honest], 2)
    cheat.contracts.request_unbond(tokens(200))
    state = market.ops.stake_state(cheat.account.address)
    assert state.staked == 0 and state.unbonding == tokens(200)
    with pytest.raises(ChainError) as err:  # and it cannot take it out before a verifier gets to its work
        cheat.contracts.withdraw()
    assert err.value.error_name == "StakingStillUnbonding"
    drive(market, [cheat, honest], verifier, job_id)
    assert slashed(market) == {cheat.account.address}
    state = market.ops.stake_state(cheat.account.address)
    assert state.staked == 0 and state.unbonding == 0
    [event] = _events(market, "provider_slashed")
    assert event["path"] == "governance" and event["amount"] == str(tokens(200))
    assert market.ops.balance_of(verifier.account.address) == tokens(100)  # the bounty: half of the 200
    assert market.ops.balance_of(market.deployment.treasury) == tokens(100)


def _refused(p: ProviderAgent, trainer) -> MarketError:  # type: ignore[no-untyped-def]
    """``p`` works once with ``trainer(its own trainer)`` in its place; the error its submission got."""
    train = p.trainer
    p.trainer = trainer(train)
    try:
        with pytest.raises(MarketError) as err:
            p.work_once()
    finally:
        p.trainer = train
    return err.value


def _refused_after_unbonding_while_training(p: ProviderAgent) -> None:
    """``p`` trains its assigned unit, unbonding 150 of its 200 GMT meanwhile (the minimum is 100): its result is
    refused (409) and the unit goes back to the pool."""
    def unbond_while_training(train):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            p.contracts.request_unbond(tokens(150))
            return train(*args)
        return run

    err = _refused(p, unbond_while_training)
    assert err.status == 409 and "the result is refused" in str(err.detail)


def test_a_node_whose_region_ask_or_stake_would_be_refused_stops_before_it_stakes(market, tmp_path: Path) -> None:
    """A typo in ``--region``, an ask under the region's floor or a stake under the minimum is refused by the node
    itself, from ``/config``, before it stakes anything: found after staking, it would leave the tokens locked for
    the unbonding delay."""
    for region, price, stake, capacity, says in (
            ("mars", "0.6", 200, 1, "unknown region 'mars': this marketplace has ap-east"),
            ("eu-north", "0.1", 200, 1, "below the eu-north floor of 0.5000 GMT"),
            # the registration's own bounds, as the marketplace's schema has them (a capacity of 0 staked first)
            ("eu-north", "0.6", 200, 0, "would refuse this offer .capacity: Input should be greater than or equal to 1"),
            ("eu-north", "0.6", 200, 65, "would refuse this offer .capacity: Input should be less than or equal to 64"),
            ("eu-north", "0.6", 50, 1, "below the 100.0000 GMT this marketplace asks of a provider at a price of "
                                       "0.6000 GMT per unit .its minimum of 100.0000 GMT, and 20 units"),
            # a stake over the flat minimum that does not cover 20 units at the ask (20 x 6 = 120 GMT)
            ("eu-north", "6", 110, 1, "below the 120.0000 GMT this marketplace asks of a provider at a price of "
                                      "6.0000 GMT")):
        acct = market.account(gmt=tokens(500))
        cfg = AgentConfig(marketplace=market.url, chain_url="", region=region, price=tokens(price), stake=tokens(stake),
                          capacity=capacity)
        agent = ProviderAgent(cfg, acct, tmp_path / f"{region}-{price}-{stake}-{capacity}",
                              contracts=market.contracts(acct))
        with pytest.raises(GridMintValueError, match=says):
            agent.setup()
        assert market.ops.stake_of(acct.address) == 0 and market.ops.balance_of(acct.address) == tokens(500)
    # what counts is the stake it will have: a node asked to keep 50 that holds 200 staked already registers
    market.contracts(acct).stake(tokens(200))
    assert int(agent.setup()["stake"]) == tokens(200)


def test_a_provider_whose_stake_falls_below_the_minimum_gets_no_work_until_it_stakes_again(market,
                                                                                          tmp_path: Path) -> None:
    """The stake a provider registered with is read again whenever it asks for work or submits: one that unbonds
    below the minimum while training has its result refused (the unit back to the pool), is refused work and passed
    over by matching while short (409, saying how much it has and needs), and works again once it stakes."""
    from marketplace import service

    p = provider(market, tmp_path, "p", "us-east", "0.9")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    _refused_after_unbonding_while_training(p)
    with pytest.raises(MarketError) as err:
        p.work_once()
    assert err.value.status == 409 and "has 50.0000 GMT staked" in str(err.value.detail)
    assert "at least 100.0000 GMT" in str(err.value.detail)
    with market.rt.sessions() as s:
        unit = s.scalars(select(Unit).where(Unit.job_id == job_id)).one()
        assert unit.status == "pending" and unit.provider is None
        assert s.get(Provider, p.account.address).stake == tokens(50)
    assert [e["provider"] for e in _events(market, "unit_released")] == [p.account.address]
    assert service.run_matching(market.rt) == []  # nobody else to take it, and p is short
    p.contracts.stake(tokens(100))
    # the chain's node drops out just then: the marketplace cannot read stakes, so the last one read stands (50:
    # still short), and nothing stalls on the outage itself; once the chain is back, the fresh stake counts
    read = market.rt.contracts.stake_of

    def chain_down(address: str) -> int:
        raise ChainUnavailable(f"injected: the chain node is unreachable (reading {address})")

    market.rt.contracts.stake_of = chain_down
    try:
        assert p.work_once() is False  # no unit assigned (p was short at the last read): nothing, not an error
        assert service.run_matching(market.rt) == []
    finally:
        market.rt.contracts.stake_of = read
    market.wait(lambda: p.work_once(), what="work again once staked")
    with market.rt.sessions() as s:
        assert s.scalars(select(Unit).where(Unit.job_id == job_id)).one().status == "submitted"


def test_polls_reuse_a_recent_stake_read_and_a_submission_reads_the_chain_again(market, tmp_path: Path) -> None:
    """Polling for work reads the provider's stake from the chain once per ``stake_read_ttl_s``, not once a poll;
    a stake found short is read again at every poll (staking up counts at once), and a submitted result always
    reads it again: a provider that unbonded below the minimum within the window has its result refused."""
    market.rt.settings.stake_read_ttl_s = 60
    p = provider(market, tmp_path, "p", "us-east", "0.9")
    read, reads = market.rt.contracts.stake_of, []

    def counted(address: str) -> int:  # the real chain read, counted
        reads.append(address)
        return read(address)

    market.rt.contracts.stake_of = counted
    try:
        for _ in range(20):
            assert p.client.next_work() is None
        assert reads == [p.account.address]  # one read for twenty polls
        job_id = submit_job(market, JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5,
                                            batch_size=8, max_price=tokens(2)))
        market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
        _refused_after_unbonding_while_training(p)  # the poll that fetched the unit used the cached read
        assert len(reads) == 2  # the submission read the chain
        for _ in range(3):  # short: read again every time
            with pytest.raises(MarketError):
                p.client.next_work()
        assert len(reads) == 5
        p.contracts.stake(tokens(100))
        market.wait(lambda: p.work_once(), what="work at the first poll after staking up")
    finally:
        market.rt.contracts.stake_of = read


def test_a_result_whose_proof_is_not_of_the_units_shape_is_refused_and_loses_nothing(market, tmp_path: Path) -> None:
    """A proof consistent with itself but of another shape than the unit's spec (here 4 segments for its 2: the
    start state and segment 1's start in turn, two checkpoints uploaded) was taken: its checks were drawn among
    segments no replay can find, and a verifier handed one stopped on it ("out of range") each time it was handed
    it again. It is refused with the reason; the unit stays the provider's, and the true result is taken."""
    from dataclasses import replace

    from protocol.proof import make_proof
    from protocol.signing import sign_typed

    p = provider(market, tmp_path, "p", "us-east", "0.9")
    job_id = submit_job(market, JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8,
                                        max_price=tokens(2)))
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    submit = p.client.submit

    def reshaped(unit_id: str, body: dict) -> dict:  # type: ignore[type-arg]
        proof = TrainingProof.from_dict(body["proof"])
        a, b = proof.segments[0].start_hash, proof.segments[1].start_hash
        segs = [replace(proof.segments[i % 2], index=i, start_hash=(a, b)[i % 2], end_hash=(b, a)[i % 2])
                for i in range(4)]
        forged = make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=20,
                            segment_len=5, segments=segs)
        losses = [x for seg in segs for x in [seg.loss_micro / 1e6] * 5]
        return submit(unit_id, {**body, "proof": forged.to_dict(), "losses": losses, "final_blob":
                                body["segment_blobs"][0], "segment_blobs": [*body["segment_blobs"]] * 2,
                                "proof_signature": sign_typed(p.account, "TrainingProof", p.client.domain,
                                                              forged.signable_fields())})

    p.client.submit = reshaped  # type: ignore[method-assign]
    with pytest.raises(MarketError) as err:
        p.work_once()
    p.client.submit = submit  # type: ignore[method-assign]
    assert err.value.status == 422 and "20 steps in 4 segments of 5: this unit is" in str(err.value.detail), err.value
    assert "10 steps in 2 segments of 5" in str(err.value.detail)
    with market.rt.sessions() as s:
        [unit] = s.scalars(select(Unit).where(Unit.job_id == job_id))
        assert unit.status == "assigned" and unit.provider == p.account.address and unit.proof is None
        assert not list(s.scalars(select(Verification).where(Verification.unit_id == unit.id)))
    assert p.work_once()  # the same unit, its kept result handed in as it is
    with market.rt.sessions() as s:
        assert s.scalars(select(Unit.status).where(Unit.job_id == job_id)).one() == "submitted"


def test_a_result_whose_step_losses_do_not_average_to_its_commitments_is_refused_and_loses_nothing(
        market, tmp_path: Path) -> None:
    """The per-step losses a provider submits with its proof are what a loss scan judges each step against: a result
    whose curve does not average to its committed segment losses (one step's loss made up after the fact) is refused
    with the reason, the unit stays the provider's, nothing is queued for checking, and the true result is taken."""
    from dataclasses import replace

    p = provider(market, tmp_path, "p", "us-east", "0.9")
    job_id = submit_job(market, JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8,
                                        max_price=tokens(2)))
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")

    def nicer_curve(train):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            result = train(*args)
            return replace(result, losses=[*result.losses[:6], result.losses[6] * 0.9, *result.losses[7:]])
        return run

    err = _refused(p, nicer_curve)
    assert err.status == 422 and "segment 1's step losses average" in str(err.detail), err.detail
    with market.rt.sessions() as s:
        [unit] = s.scalars(select(Unit).where(Unit.job_id == job_id))
        assert unit.status == "assigned" and unit.provider == p.account.address and unit.proof is None
        assert not list(s.scalars(select(Verification).where(Verification.unit_id == unit.id)))
    assert p.work_once()  # the same unit, trained again and submitted as it is
    with market.rt.sessions() as s:
        [unit] = s.scalars(select(Unit).where(Unit.job_id == job_id))
        assert unit.status == "submitted" and len(unit.losses) == 10


def test_a_verifier_on_another_execution_plan_passes_honest_work_and_catches_the_cheat(market, tmp_path: Path) -> None:
    """A verifier whose machine does not replay bit for bit (here: gradients in two micro-batches) checks within its
    calibrated tolerance against the provider's end checkpoint: honest segments pass although no replayed hash
    equals the committed one, and the cheat's segment fails and is slashed. Off the referee's plan the verifier
    bonds nothing by default (the referee could not tell its honest drift from a lie): the dispute goes unbonded and
    the cheat is slashed on the governance path, the bounty paid all the same."""
    from node.crosscheck import Plan
    from node.verifier_agent import OTHER_PLAN_BOND_MARGIN
    from protocol.proof import TrainingProof

    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier", plan=Plan("cpu", 2))
    assert verifier.bond_margin == OTHER_PLAN_BOND_MARGIN == math.inf
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))
    # a fixed job id whose honest segments all land within the verifier's tolerance (0x44..44, before ids named
    # their customer: at most 0.22x; this one passed, its ratios not measured): under a random one, honest drift
    # passes it in ~3% of segments (seen: 7.5x), and the referee rightly clears such a dispute
    job_id = submit_job(market, spec, job_id=fixed_job_id(0x44))
    drive(market, [cheat, honest], verifier, job_id)
    assert slashed(market) == {cheat.account.address}
    with market.rt.sessions() as s:
        units = {u.id: u for u in s.scalars(select(Unit).where(Unit.job_id == job_id))}
        checks = list(s.scalars(select(Verification).where(Verification.unit_id.in_(list(units)))))
    passed = [v for v in checks if v.status == "passed"]
    assert passed and all(u.status == "verified" and u.provider == honest.account.address for u in units.values())
    for v in passed:  # not one of them replayed bit for bit: the tolerance did the work
        claimed = TrainingProof.from_dict(units[v.unit_id].proof).segments[v.segment].end_hash
        assert v.replayed_hash != claimed
    assert [v.provider for v in checks if v.status == "fraud"] == [cheat.account.address]
    fraud = next(v for v in checks if v.status == "fraud")
    assert fraud.accusation is None and [e["path"] for e in _events(market, "provider_slashed")] == ["governance"]
    assert market.ops.stake_of(verifier.account.address) == tokens(100)  # nothing was bonded
    assert market.ops.balance_of(verifier.account.address) == tokens(100)  # the bounty: half the slashed 200


def test_staked_verifier_fraud_proof_slashes_the_cheat_through_a_dispute(market, tmp_path: Path) -> None:
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    vacct = verifier.account
    treasury = market.deployment.treasury
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    drive(market, [cheat, honest], verifier, job_id)
    assert slashed(market) == {cheat.account.address}
    with market.rt.sessions() as s:
        fraud = s.scalars(select(Verification).where(Verification.status == "fraud")).one()
        slash_events = [e.data for e in s.scalars(select(Event).where(Event.kind == "provider_slashed"))]
    assert fraud.accusation is not None and slash_events[0]["path"] == "fraud-proof"
    evidence = fraud.slash_tx
    assert market.ops.evidence_used(evidence) and not market.ops.dispute_of(evidence).is_open
    assert market.ops.stake_of(cheat.account.address) == 0
    assert market.ops.balance_of(vacct.address) == tokens(100)  # bounty: half the cheat's 200 stake
    assert market.ops.balance_of(treasury) == tokens(100)
    state = market.ops.stake_state(vacct.address)
    assert state.staked == tokens(100) and state.bonded == 0 and state.open_disputes == 0  # bond released


def test_a_false_accusation_costs_the_verifier_its_bond_and_its_place_and_pays_the_honest_provider(market,
                                                                                                 tmp_path: Path) -> None:
    """A staked liar on the providers' own plan accuses an honest provider: the referee reproduces the claim bit for
    bit, so the accusation is proven false: the bond is forfeit and the liar is benched (refused from then on, told
    why); a careful verifier does the remaining checks; the provider keeps its stake and is paid."""
    from marketplace.db import Verifier

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    liar = staked_verifier(market, tmp_path, "liar", accuse_everything=True)
    careful = staked_verifier(market, tmp_path, "careful")
    vacct = liar.account
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    assert liar.verify_once() == "fraud"
    benched = market.wait(lambda: _events(market, "verifier_benched"), what="the liar benched")
    assert benched[0]["verifier"] == vacct.address and "proved false" in benched[0]["reason"]
    for call in (liar.verify_once, liar.client.register_verifier):
        with pytest.raises(MarketError) as err:
            call()
        assert err.value.status == 409 and "benched" in str(err.value.detail) and "bit for bit" in str(err.value.detail)
    drive(market, [honest], careful, job_id)
    assert slashed(market) == set()
    assert market.ops.stake_of(honest.account.address) == tokens(200)
    with market.rt.sessions() as s:
        checks = list(s.scalars(select(Verification).where(Verification.canary.is_(None))))
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                           LedgerEntry.verification_id.is_(None))))
        assert s.get(Verifier, vacct.address).status == "benched"
        assert s.get(Verifier, careful.account.address).status == "active"
    wrong = [v for v in checks if v.status == "verifier_wrong"]
    assert len(wrong) == 1 and wrong[0].verifier == vacct.address and market.ops.evidence_used(wrong[0].slash_tx)
    assert all(v.status == "passed" and v.verifier == careful.account.address for v in checks if v not in wrong)
    [event] = _events(market, "false_accusation")
    assert event["bonded"] and event["proven_false"] and not event["good_faith"]
    assert int(event["bond_lost"]) == tokens(50)  # the false accusation forfeits one bond
    assert market.ops.stake_of(vacct.address) == tokens(50)
    assert market.ops.balance_of(market.deployment.treasury) == tokens(50)
    assert [e.provider for e in entries] == [honest.account.address]


def test_a_verifier_the_referee_keeps_overruling_is_benched_where_no_single_verdict_is_provable(market,
                                                                                             tmp_path: Path) -> None:
    """A verifier on a plan the referee does not replay on (here micro-batches) cannot be proven false one verdict at
    a time. One that disputes everything without a bond (no accusation: nothing at stake) would cost the marketplace
    a referee replay each time for free: once the referee has overruled 5 of its verdicts, and they are more than
    half of its verdicts, it is benched; a careful verifier does the rest; nobody's stake moves."""
    from node.crosscheck import Plan

    market.rt.settings.canary_rate = 0.0
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    liar = staked_verifier(market, tmp_path, "liar", plan=Plan("cpu", 2), accuse_everything=True)
    liar.accuse = False
    careful = staked_verifier(market, tmp_path, "careful")
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 2)
    assert [liar.verify_once() for _ in range(5)] == ["fraud"] * 5
    benched = market.wait(lambda: _events(market, "verifier_benched"), what="the liar benched")
    assert benched[0]["verifier"] == liar.account.address
    assert "overruled 5 of its 5 verdicts" in benched[0]["reason"]
    wrong = _events(market, "false_accusation")
    assert len(wrong) == 5 and not any(e["proven_false"] or e["bonded"] or e["good_faith"] for e in wrong)
    assert all("cannot reproduce a replay on plan cpu/mb2" in e["faith_reason"] for e in wrong)
    drive(market, [honest], [liar, careful], job_id)
    checks = _rows(market)
    assert sorted((v.status, v.verifier) for v in checks) == sorted(
        [("verifier_wrong", liar.account.address)] * 5 + [("passed", careful.account.address)] * 3)
    assert market.ops.stake_of(liar.account.address) == tokens(100)  # nothing bonded, nothing lost
    assert market.ops.stake_of(honest.account.address) == tokens(200) and slashed(market) == set()


def test_an_unstaked_verifier_gets_no_task_until_it_stakes(market, tmp_path: Path) -> None:
    """A verifier with nothing staked would risk nothing: a lazy one caught by a canary, or a liar benched, would come
    back under a new wallet. Tasks go only to verifiers staking the marketplace's minimum (409, saying how much)."""
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    acct = market.account(gmt=tokens(100))
    verifier = VerifierAgent(market.url, acct, tmp_path / "verifier")
    verifier.client.register_verifier()
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    contracts = market.contracts(acct)
    for stake in (0, tokens(60)):
        verifier.keep_staked("", stake, contracts=contracts)
        with pytest.raises(MarketError) as err:
            verifier.verify_once()
        assert err.value.status == 409
        assert f"has {stake // 10**18}.0000 GMT staked" in str(err.value.detail)
        assert "staking at least 100.0000 GMT" in str(err.value.detail)
    assert not _rows(market, status="assigned")  # nothing was handed out
    verifier.keep_staked("", tokens(100), contracts=contracts)
    drive(market, [honest], verifier, job_id)
    assert all(v.status == "passed" and v.verifier == acct.address for v in _rows(market))


def test_a_verifier_agent_short_of_stake_tops_it_up_and_carries_on(market, tmp_path: Path, capsys) -> None:
    """``gridmint verifier run --stake N`` keeps N staked: refused tasks for a stake that fell short (a forfeit bond;
    here, an unbond), the agent stakes back up from its wallet and goes on; one asked to keep less than the
    marketplace's minimum stops at the refusal, saying why, instead of polling in vain."""
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    acct = market.account(gmt=tokens(200))
    contracts = market.contracts(acct)
    verifier = VerifierAgent(market.url, acct, tmp_path / "verifier", poll_s=0.05)
    verifier.keep_staked("", tokens(100), contracts=contracts)
    contracts.request_unbond(tokens(50))
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    verifier.run(exit_when_idle_s=1)
    assert market.ops.stake_of(acct.address) == tokens(100)
    checks = _rows(market)
    assert checks and all(v.status == "passed" and v.verifier == acct.address for v in checks)
    contracts.request_unbond(tokens(50))
    verifier.keep_staked("", tokens(60), contracts=contracts)
    capsys.readouterr()
    assert "staking at least" in (verifier.run(exit_when_idle_s=60) or "")  # a failure status for the CLI
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "stopped:" in err and "staking at least 100.0000 GMT" in err
    assert market.ops.stake_of(acct.address) == tokens(60)


def test_an_idle_provider_node_stays_up_until_its_work_is_verified(market, tmp_path: Path) -> None:
    """``gridmint node run --exit-when-idle S`` does not exit while a unit of its own is submitted and not yet
    verified: a dispute over it may still ask the node to reveal a state, and a node gone silent past the deadline
    loses its stake. ``GET /providers/{address}`` says how many are open."""
    import signal
    import threading

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    honest.cfg.exit_when_idle_s, honest.cfg.poll_s = 0.5, 0.05
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    assert honest.client.provider()["unverified"] == 0

    def verify_later() -> None:  # the verifier turns up well after the node has gone idle
        market.wait(lambda: _rows(market), what="the unit submitted")
        time.sleep(3)
        while verifier.verify_once() is not None:
            pass

    seen: list[int] = []
    worker = threading.Thread(target=verify_later)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    worker.start()
    try:
        honest.run()  # trains, submits, idles; returns only once nothing of its own is open
        seen.append(honest.client.provider()["unverified"])
    finally:
        worker.join()
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert seen == [0]
    with market.rt.sessions() as s:
        assert s.scalars(select(Unit).where(Unit.job_id == job_id)).one().status == "verified"
    for address, status in (("0x" + "12" * 20, 404), ("nope", 422)):
        assert httpx.get(f"{market.url}/providers/{address}").status_code == status


def _submitted(market, job_id: str, agents: list[ProviderAgent], n: int) -> None:
    """Let the providers train until ``n`` units of the job are submitted (nothing verified yet), and their checks
    are out: the worker stocked their canaries (checking.stock_canaries)."""
    _handed_in(market, job_id, agents, n)
    _stocked(market)


def _stocking_kept(market, monkeypatch) -> tuple[list[list[str]], Any]:
    """The stocking step's sends kept in a list, not sent (a broker away when the result came in, or a step the test
    runs itself); and the market's own send, to put back."""
    send, kept = market.rt.enqueue, []
    monkeypatch.setattr(market.rt, "enqueue", lambda name, args, queue=None: kept.append(args)
                        if name == "gridmint.stock_canaries" else send(name, args, queue))
    return kept, send


@pytest.fixture
def segments_in_order(monkeypatch) -> None:
    """A unit's checks queued (so handed out) in segment order, for the tests that script which segment each verifier
    gets; the market queues them in a random order (service._shuffled)."""
    from marketplace import service

    monkeypatch.setattr(service, "_shuffled", list)


def _handed_in(market, job_id: str, agents: list[ProviderAgent], n: int) -> list[str]:
    """Let the providers train until ``n`` units of the job are submitted; their ids."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with market.rt.sessions() as s:
            done = list(s.scalars(select(Unit.id).where(Unit.job_id == job_id, Unit.status == "submitted")))
        if len(done) >= n:
            return done
        if not any(a.work_once() for a in agents):
            time.sleep(0.1)
    raise AssertionError(f"{n} units of {job_id} not submitted in time")


def _stocked(market, timeout_s: float = 60) -> None:
    """Wait until no check waits for its canaries (the Celery worker forges them once a unit is handed in)."""
    deadline = time.monotonic() + timeout_s
    while _rows(market, status="stocking"):
        assert time.monotonic() < deadline, "checks still waiting for their canaries"
        time.sleep(0.05)


def _rows(market, **where) -> list[Verification]:
    with market.rt.sessions() as s:
        q = select(Verification).order_by(Verification.id)
        for k, v in where.items():
            q = q.where(getattr(Verification, k) == v)
        return list(s.scalars(q))


def decoy_ending(spec: UnitSpec, proof: TrainingProof, seg: int, end: dict, blobs) -> dict:  # type: ignore[type-arg]
    """A decoy (what ``canary.forge`` returns) claiming segment ``seg`` ends in ``end``: a test's own forgery."""
    from dataclasses import replace

    from node import checkpoint
    from node.trainer import checkpoint_metadata, state_hash
    from protocol.proof import make_proof

    last = seg == len(proof.segments) - 1
    h = state_hash(end)
    segments = list(proof.segments)
    segments[seg] = replace(segments[seg], end_hash=h)
    if not last:
        segments[seg + 1] = replace(segments[seg + 1], start_hash=h)
    forged = make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                        segment_len=proof.segment_len, segments=segments)
    blob = blobs.put_checkpoint(checkpoint.serialize(end, checkpoint_metadata(spec, None if last else seg + 1)))
    return {"proof": forged.to_dict(), "end_blob": blob, "true_end": proof.segments[seg].end_hash}


def _every_check_a_canary(market, monkeypatch, forge, providers: list[ProviderAgent]) -> tuple[str, list[list]]:
    """A full-replay job of one unit of four segments, submitted by ``providers``, every check of it stocked with the
    canary ``forge`` makes (planted when handed out: canary rate 1); the referee's rulings on missed canaries are held
    back in the list returned with the job id. Its checks are queued in segment order (segments_in_order): a test
    scripts which segment each verifier gets, and a canary is planted only where no other verifier was handed what
    tells it."""
    from marketplace import canary, service

    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    monkeypatch.setattr(service, "_shuffled", list)
    monkeypatch.setattr(canary, "forge", forge)
    market.rt.settings.canary_rate = 1.0
    job_id = submit_job(market, spec)
    _submitted(market, job_id, providers, 1)
    held: list[list] = []
    send = market.rt.enqueue
    monkeypatch.setattr(market.rt, "enqueue", lambda name, args, queue=None: held.append(args)
                        if name == "gridmint.punish_verifier" else send(name, args, queue))
    return job_id, held


def test_a_units_canaries_are_forged_on_the_worker_while_its_checks_wait(market, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """A result is accepted without forging a canary in the request (the default job's cost 0.4-0.7 s each): the
    Celery worker forges them. Meanwhile every check of the unit waits, none handed out, drawn for a canary or not
    (an early check is no likelier real than a late one); then all go out at once, each with its decoy. A
    duplicate of the step stocks nothing twice."""
    from marketplace import canary, checking

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    entered, gate = threading.Event(), threading.Event()
    real_stock = canary.stock

    def held_stock(*args, **kw):  # the worker's forging, held until the test has looked
        entered.set()
        assert gate.wait(60)
        return real_stock(*args, **kw)

    monkeypatch.setattr(canary, "stock", held_stock)
    market.rt.settings.canary_rate = 1.0  # every check stocked with a canary
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    job_id = submit_job(market, spec)
    try:
        [unit_id] = _handed_in(market, job_id, [honest], 1)  # accepted while the worker's forging is held
        assert entered.wait(30)
        waiting = _rows(market, unit_id=unit_id)
        assert sorted((v.segment, v.status, v.decoy) for v in waiting) == [(0, "stocking", None), (1, "stocking", None)]
        assert verifier.client.next_verification() is None
        listed = httpx.get(f"{market.url}/jobs/{job_id}").json()["verifications"]
        assert sorted(v["status"] for v in listed) == ["open", "open"]  # (not answered: what for, unsaid)
    finally:
        gate.set()
    _stocked(market)
    out = _rows(market, unit_id=unit_id)
    assert [v.status for v in out] == ["pending", "pending"]
    with market.rt.sessions() as s:
        root = s.get(Unit, unit_id).proof["merkleRoot"]
    assert all(v.decoy and v.decoy["root"] == root and v.decoy["proof"]["merkleRoot"] != root for v in out)
    assert checking.stock_canaries(market.rt, unit_id) == 0  # (a duplicate: nothing left to stock)
    assert [v.decoy for v in _rows(market, unit_id=unit_id)] == [v.decoy for v in out]
    assert verifier.verify_once() == "fraud"  # a planted canary, flagged


def test_checks_go_out_when_their_canaries_cannot_be_forged_or_the_stocking_step_is_lost(market, tmp_path: Path,
                                                                                       monkeypatch, caplog) -> None:
    """The stocking step never sent (a broker away when the result came in) is sent again by the sweep once the
    checks have waited ``STOCK_LOST_S``; a forgery that fails there (a checkpoint gone) is logged and the checks go
    out without canaries: the customer's checks never wait on a canary for ever."""
    from marketplace import canary, service

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    market.rt.settings.canary_rate = 1.0
    lost, send = _stocking_kept(market, monkeypatch)
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    job_id = submit_job(market, spec)
    [unit_id] = _handed_in(market, job_id, [honest], 1)
    assert lost == [[unit_id]] and {v.status for v in _rows(market, unit_id=unit_id)} == {"stocking"}
    monkeypatch.setattr(market.rt, "enqueue", send)
    assert service.sweep(market.rt)["stock_canaries"] == 0  # (not yet given up on)
    monkeypatch.setattr(service, "STOCK_LOST_S", 0)
    time.sleep(1.1)

    def gone(*args, **kw):
        raise FileNotFoundError("a checkpoint was collected")

    monkeypatch.setattr(canary, "forge", gone)
    assert service.sweep(market.rt)["stock_canaries"] == 1
    _stocked(market)
    assert [(v.status, v.decoy) for v in _rows(market, unit_id=unit_id)] == [("pending", None), ("pending", None)]
    assert any("could not be forged" in r.getMessage() for r in caplog.records)
    drive(market, [honest], verifier, job_id)  # real checks only: passed, the job settles
    assert {v.status for v in _rows(market, unit_id=unit_id)} == {"passed"}


def test_a_units_checks_go_out_in_an_order_no_one_can_predict(market, tmp_path: Path) -> None:
    """A unit's checks are queued, and so handed out, in a random order, not by segment: a ring of verifiers seeing
    one segment's check go out before an earlier one's learns nothing (had it been segment order, the earlier one
    held back would tell a canary out with another verifier: checking.next_verification)."""
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=40, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    job_id = submit_job(market, spec)
    [unit_id] = _handed_in(market, job_id, [honest], 1)
    queued = [v.segment for v in _rows(market, unit_id=unit_id)]  # by id: the queue's order
    # every segment once; in segment order with odds 1/8! = 1/40,320
    assert sorted(queued) == list(range(8)) and queued != sorted(queued)
    handed = []
    while (task := verifier.client.next_verification()) is not None:
        handed.append(int(task["segment"]))
        with market.rt.sessions.begin() as s:  # answered (what the verdict says is not this test's business)
            s.execute(update(Verification).where(Verification.id == task["verification_id"]).values(status="passed"))
    assert handed == queued
    listed = httpx.get(f"{market.url}/jobs/{job_id}").json()["verifications"]  # the customer's view: by segment
    assert [v["segment"] for v in listed] == list(range(8)) and {v["status"] for v in listed} == {"passed"}


def test_a_stocking_step_claims_its_units_checks_so_a_duplicate_forges_nothing(market, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """Two stocking steps of one unit (the sweep re-sent it while the first was queued behind others): the one that
    runs while the other forges finds the checks claimed and forges nothing; a claim whose worker was killed
    mid-forgery holds the sweep off until it lapses (``STOCK_LEASE_S``), then the sweep's step takes it over."""
    from marketplace import canary, checking, service

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    market.rt.settings.canary_rate = 1.0
    queued, _ = _stocking_kept(market, monkeypatch)
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=15, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    [unit_id] = _handed_in(market, submit_job(market, spec), [honest], 1)
    assert queued == [[unit_id]]
    stock, calls, duplicate = canary.stock, [], []

    def killed(*args, **kw):  # the worker dies mid-forgery (not an error the step catches)
        calls.append("killed")
        raise SystemExit("worker killed")

    monkeypatch.setattr(canary, "stock", killed)
    with pytest.raises(SystemExit):
        checking.stock_canaries(market.rt, unit_id)
    rows = _rows(market, unit_id=unit_id)
    assert {v.status for v in rows} == {"stocking"} and all(v.heartbeat_at for v in rows)  # claimed
    monkeypatch.setattr(service, "STOCK_LOST_S", 0)
    time.sleep(1.1)
    assert service.sweep(market.rt)["stock_canaries"] == 0  # claimed: not lost yet
    with market.rt.sessions.begin() as s:  # the claim lapses (time passes)
        s.execute(update(Verification).where(Verification.unit_id == unit_id)
                  .values(heartbeat_at=Verification.heartbeat_at - checking.STOCK_LEASE_S - 1))
    assert service.sweep(market.rt)["stock_canaries"] == 1 and queued == [[unit_id], [unit_id]]

    def forging(*args, **kw):  # while this step forges, its duplicate runs
        calls.append("forged")
        duplicate.append(checking.stock_canaries(market.rt, unit_id))
        return stock(*args, **kw)

    monkeypatch.setattr(canary, "stock", forging)
    assert checking.stock_canaries(market.rt, unit_id) == 3
    assert calls == ["killed", "forged"] and duplicate == [0]  # the duplicate forged nothing
    rows = _rows(market, unit_id=unit_id)
    assert [(v.status, v.heartbeat_at, v.decoy is not None) for v in rows] == [("pending", None, True)] * 3
    assert checking.stock_canaries(market.rt, unit_id) == 0 and calls == ["killed", "forged"]  # nothing left


def test_an_honest_verifier_flags_planted_canaries_and_loses_nothing(market, segments_in_order,
                                                                      tmp_path: Path) -> None:
    """Planted known-bad segments (marketplace.canary) mixed into an honest verifier's tasks: it flags every one
    with a signed accusation that is never relayed (no stake moves, the provider is not touched), a canary it
    abandons is voided, the real check each canary stood in for is done all the same, and the job settles as
    without canaries."""
    from marketplace import service
    from marketplace.db import Verifier

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    market.rt.settings.canary_rate = 1.0  # (canaries are forged when the checks are queued: every check has one)
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 2)
    # two canaries, both flagged: one per unit (a verifier gets units it has not seen first, and one canary a unit)
    assert [verifier.verify_once(), verifier.verify_once()] == ["fraud", "fraud"]
    other = staked_verifier(market, tmp_path, "other")
    abandoned = other.client.next_verification()  # a third one, to another verifier, never answered
    assert other.client.next_verification() == abandoned  # one task at a time: polled again, the same one
    # a canary is the real task it stands in for: its unit, provider, spec and start checkpoint, and it is listed
    # with the job's checks while out (the real check it replaced held back, unlisted); only its claim differs, and
    # the task shows no other segment's claim (no Merkle root to compare with another task of the unit)
    row = _rows(market, id=abandoned["verification_id"])[0]
    assert row.canary is not None and abandoned["provider"] == honest.account.address == row.provider
    assert UnitSpec.from_json(abandoned["spec"]).unit_id == row.unit_id
    forged = TrainingProof.from_dict(row.canary["proof"])
    assert abandoned["proof"] == segment_view(forged, row.segment).to_dict() != forged.to_dict()
    for blob in (abandoned["checkpoint_blob"], abandoned["end_blob"]):  # nothing dates the forged end state
        headers = httpx.get(f"{market.url}/blobs/{blob}").headers
        assert "last-modified" not in headers and "etag" not in headers
    listed = {v["id"]: v["status"] for v in httpx.get(f"{market.url}/jobs/{job_id}").json()["verifications"]}
    assert len(listed) == 8 and listed[row.id] == "open"  # as any check out or waiting: nothing tells them apart
    held = _rows(market, id=row.canary["held"])[0]
    assert (held.unit_id, held.segment, held.status) == (row.unit_id, row.segment, "held")
    # every other check passes meanwhile, but those that tell the canary out with ``other`` (canary.telling: they
    # wait until it is answered): the unit is still not paid, its held check is open
    market.rt.settings.canary_rate = 0.0
    while verifier.verify_once() is not None:
        pass
    with market.rt.sessions() as s:
        assert s.get(Unit, row.unit_id).status == "submitted"
    told = {v.id for v in _rows(market, unit_id=row.unit_id, status="pending") if v.segment in row.canary["telling"]}
    open_ = sorted(told | {held.id})
    assert [v.id for v in _rows(market, unit_id=row.unit_id) if v.canary is None and v.status != "passed"] == open_
    market.rt.settings.unit_timeout_s = 0
    time.sleep(1.1)
    service.reap(market.rt)
    market.rt.settings.unit_timeout_s = 120
    assert _rows(market, id=row.id)[0].status == "void"  # the abandoned canary, never handed out again
    assert [v.id for v in _rows(market, status="pending")] == open_ and not _rows(market, status="assigned")
    # a segment is planted at most once: whatever the rate, its held check now comes back as itself (and this
    # verifier had its canary of the unit: the others too)
    market.rt.settings.canary_rate = 1.0
    while verifier.verify_once() is not None:
        pass
    assert {_rows(market, id=i)[0].status for i in open_} == {"passed"}
    market.rt.settings.canary_rate = 0.3
    drive(market, [honest], verifier, job_id)
    planted = [v for v in _rows(market) if v.canary is not None]
    flagged = [v for v in planted if v.status == "canary_flagged"]
    assert len(flagged) >= 2 and len(flagged) == len(planted) - 1
    for v in flagged:  # signed accusations, naming a unit and a provider that do not exist, never sent on chain
        assert v.accusation and v.replayed_hash == v.canary["true_end"] != v.canary["proof"]["segments"][v.segment]["endHash"]
        assert not market.ops.evidence_used(service.verification.fraud_evidence(v.unit_id, v.segment, v.provider))
    real = [v for v in _rows(market) if v.canary is None]
    assert len(real) == 8 and all(v.status == "passed" for v in real)  # every replaced check was still done
    listed = httpx.get(f"{market.url}/jobs/{job_id}").json()["verifications"]
    assert sorted(v["id"] for v in listed) == sorted(v.id for v in real)  # answered canaries are not listed
    state = market.ops.stake_state(verifier.account.address)
    assert state.staked == tokens(100) and state.bonded == 0
    assert market.ops.stake_of(honest.account.address) == tokens(200) and slashed(market) == set()
    with market.rt.sessions() as s:
        assert s.get(Verifier, verifier.account.address).status == "active"
        assert len(list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                            LedgerEntry.verification_id.is_(None))))) == 2
    assert not _events(market, "segment_disputed") and not _events(market, "verifier_benched")


class _CrossCheckingLazyVerifier:
    """A lazy verifier that looks for canaries instead of replaying: it replays the first task of each unit it is
    handed (honestly, through its agent), remembers every hash and checkpoint it is shown of the unit (by boundary:
    the state before segment k), and answers every later task of the unit without a replay: fraud where it
    contradicts what it knows (a canary's forged end, it hopes), approved otherwise."""

    def __init__(self, agent: VerifierAgent) -> None:
        self.agent, self.client = agent, agent.client
        self.known: dict[str, dict[int, set[str]]] = {}  # unit -> boundary -> hashes and blob ids seen there
        self.replays, self.flagged_unseen, self.approved_unseen = 0, [], []

    def _learn(self, unit: str, task: dict) -> None:
        proof, seg = TrainingProof.from_dict(task["proof"]), int(task["segment"])
        at = self.known.setdefault(unit, {})
        for s in proof.segments:  # whatever the task shows of any segment (blanked hashes carry nothing)
            for k, h in ((s.index, s.start_hash), (s.index + 1, s.end_hash)):
                if h != "0x" + "00" * 32:
                    at.setdefault(k, set()).add(h)
        at.setdefault(seg, set()).add(task["checkpoint_blob"])
        at.setdefault(seg + 1, set()).add(task["end_blob"])

    def _contradicts(self, unit: str, task: dict) -> bool:
        """Whether the task shows, at a boundary this verifier saw before, a hash or checkpoint of another kind
        than it saw there (two hashes, or two blob ids, at one boundary)."""
        before = {k: set(v) for k, v in self.known.get(unit, {}).items()}
        probe = _CrossCheckingLazyVerifier.__new__(_CrossCheckingLazyVerifier)
        probe.known = {unit: {}}
        probe._learn(unit, task)
        for k, shown in probe.known[unit].items():
            seen = before.get(k, set())
            for group in (lambda x: x.startswith("0x"), lambda x: not x.startswith("0x")):  # hashes, blob ids
                if {x for x in seen if group(x)} and {x for x in shown if group(x)} - {x for x in seen if group(x)}:
                    return True
        return False

    def verify_once(self) -> str | None:
        task = self.client.next_verification()
        if task is None:
            return None
        unit, seg = UnitSpec.from_json(task["spec"]).unit_id, int(task["segment"])
        if unit in self.known:
            ok = not self._contradicts(unit, task)
            (self.approved_unseen if ok else self.flagged_unseen).append(task["verification_id"])
            self._learn(unit, task)
            proof = TrainingProof.from_dict(task["proof"])
            claimed = proof.segments[seg].end_hash
            replayed = claimed if ok else "0x" + "11" * 32
            msg = {"unitId": to_bytes32(unit), "segment": seg, "ok": ok, "claimedHash": to_bytes32(claimed),
                   "replayedHash": to_bytes32(replayed)}
            self.client.verdict({"verification_id": task["verification_id"], "ok": ok, "replayed_hash": replayed,
                                 "signature": sign_typed(self.agent.account, "Verdict", self.client.domain, msg),
                                 "reason": "not replayed"})
            return "ok" if ok else "fraud"
        self._learn(unit, task)
        self.replays += 1
        return self.agent.verify_once()  # the same task again (one at a time): replayed for real


def test_a_lazy_verifier_comparing_its_tasks_of_a_unit_cannot_tell_a_canary(market, segments_in_order, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """A verifier handed several segments of one unit replays the first and compares the others with what it saw:
    a task shows only its own segment's claim (no Merkle root or neighbour's hash), and a canary is never planted
    where the verifier saw the segment after it, or the one after that (its forgery's source), so nothing it knows
    contradicts one. It approves a canary and is benched."""
    from marketplace import canary

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    lazy = _CrossCheckingLazyVerifier(staked_verifier(market, tmp_path, "lazy"))
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    market.rt.settings.canary_rate = 1.0  # every check is queued with its canary forged
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 2)
    draws = iter([False, True] * 20)  # every other task handed out is planted, where a canary may be
    monkeypatch.setattr(canary, "draw", lambda odds: next(draws))
    answers = []
    while (got := lazy.verify_once()) is not None:
        answers.append(got)
        with market.rt.sessions() as s:
            if s.get(Verifier, lazy.agent.account.address).status == "benched":
                break
    planted = {v.id: v.status for v in _rows(market) if v.canary is not None}
    assert planted and "canary_missed" in planted.values()  # it approved a canary unreplayed: benched
    assert not set(lazy.flagged_unseen) & set(planted)  # no canary ever contradicted what it had seen
    assert set(lazy.approved_unseen) & set(planted)
    with market.rt.sessions() as s:
        assert s.get(Verifier, lazy.agent.account.address).status == "benched"
    assert lazy.replays >= 1 and answers


def test_no_canary_of_a_segment_whose_end_the_verifier_was_shown(market, segments_in_order,
                                                                 tmp_path: Path, monkeypatch) -> None:
    """Tasks come back out of order (one abandoned by another verifier is reaped and handed out again): a verifier
    that was handed segment 1 knows the state segment 0 truly ends in, so segment 0 is not planted for it — the
    first canary drawn for it is of a later segment, which it cannot tell, approves, and is benched for."""
    from marketplace import canary, service

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    other = staked_verifier(market, tmp_path, "other")
    lazy = _CrossCheckingLazyVerifier(staked_verifier(market, tmp_path, "lazy"))
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    market.rt.settings.canary_rate = 1.0
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    draws = iter([False, False, True, True])  # other's (segment 0), lazy's first (1), then two drawn as canaries
    monkeypatch.setattr(canary, "draw", lambda odds: next(draws))
    assert other.client.next_verification()["segment"] == 0  # and abandoned
    assert lazy.verify_once() == "ok" and lazy.replays == 1  # segment 1, replayed
    market.rt.settings.unit_timeout_s = 0
    time.sleep(1.1)
    service.reap(market.rt)  # other's task of segment 0 back in the pool
    market.rt.settings.unit_timeout_s = 120
    assert lazy.verify_once() == "ok"  # segment 0, drawn but not planted: it knows where segment 0 ends
    assert lazy.verify_once() == "ok"  # segment 2: a canary nothing it saw contradicts
    planted = [v for v in _rows(market) if v.canary is not None]
    assert [(v.segment, v.status) for v in planted] == [(2, "canary_missed")]
    assert not lazy.flagged_unseen
    with market.rt.sessions() as s:
        assert s.get(Verifier, lazy.agent.account.address).status == "benched"


def _colluding_pair(market, tmp_path: Path) -> tuple[_CrossCheckingLazyVerifier, _CrossCheckingLazyVerifier]:
    """Two lazy verifiers that compare notes: what either was shown of a unit, both know."""
    x = _CrossCheckingLazyVerifier(staked_verifier(market, tmp_path, "x"))
    y = _CrossCheckingLazyVerifier(staked_verifier(market, tmp_path, "y"))
    y.known = x.known
    return x, y


def _one_unit_of_four_segments(market, honest: ProviderAgent) -> str:
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    market.rt.settings.canary_rate = 1.0
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    return job_id


def test_a_gpu_verifier_is_planted_canaries_only_where_a_gpu_referee_can_excuse_its_approvals(
        market, segments_in_order, tmp_path: Path, monkeypatch) -> None:
    """A GPU verifier approves within its own GPU's tolerance; a referee with no GPU stood in for it with the CPUs'
    own (~1e-9), so an honest approval of a canary near the truth could not be excused, and was slashed (found by
    review). Where no GPU plan is among the referee's, a GPU verifier is handed real checks only (the audits still
    check its passes); where one is, canaries as any verifier."""
    from marketplace import canary

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    _one_unit_of_four_segments(market, honest)
    monkeypatch.setattr(canary, "draw", lambda odds: True)

    def gpu_verifier() -> MarketClient:
        acct = market.account(gmt=tokens(100))
        client = MarketClient(market.url, acct)
        client.register_verifier("cuda:h100", "torch-2.13.0.example/cuda-12.8.cudnn-91002.sm90")
        market.contracts(acct).stake(tokens(100))
        return client

    task = gpu_verifier().next_verification()
    assert task is not None and _rows(market, id=task["verification_id"])[0].canary is None
    market.rt.settings.referee_plans = "cpu,cuda:h100"
    market.rt.settings.referee_gpu_builds = "torch-2.13.0.example/cuda-12.8.cudnn-91002.sm90"
    task = gpu_verifier().next_verification()
    assert task is not None and _rows(market, id=task["verification_id"])[0].canary is not None


def test_no_canary_of_a_segment_whose_end_another_verifier_was_shown(market, segments_in_order,
                                                                     tmp_path: Path, monkeypatch) -> None:
    """Two lazy verifiers compare notes. One was handed segment 1 (and replayed it): it knows where segment 0 truly
    ends, so a canary of segment 0 is planted for neither; the first canary the other gets is of a segment neither
    was shown anything that tells, which it approves and is benched for."""
    from marketplace import canary, service

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    other = staked_verifier(market, tmp_path, "other")
    x, y = _colluding_pair(market, tmp_path)
    _one_unit_of_four_segments(market, honest)
    draws = iter([False, False, True, True])  # other's (segment 0), y's (1), then two drawn as canaries
    monkeypatch.setattr(canary, "draw", lambda odds: next(draws))
    assert other.client.next_verification()["segment"] == 0  # and abandoned
    assert y.verify_once() == "ok" and y.replays == 1  # segment 1, replayed: both know its start and end
    market.rt.settings.unit_timeout_s = 0
    time.sleep(1.1)
    service.reap(market.rt)  # other's task of segment 0 back in the pool
    market.rt.settings.unit_timeout_s = 120
    assert x.verify_once() == "ok"  # segment 0, drawn but not planted: y knows where it ends
    assert x.verify_once() == "ok"  # segment 2: a canary nothing either saw contradicts
    planted = [v for v in _rows(market) if v.canary is not None]
    assert [(v.segment, v.status, v.verifier) for v in planted] == [(2, "canary_missed", x.agent.account.address)]
    assert not x.flagged_unseen and not y.flagged_unseen
    with market.rt.sessions() as s:
        assert s.get(Verifier, x.agent.account.address).status == "benched"


def test_what_tells_a_canary_out_is_handed_to_no_other_verifier_until_it_is_answered(
        market, segments_in_order, tmp_path: Path, monkeypatch) -> None:
    """While a canary of segment 0 is out, segment 1's check (it starts at the true end) is handed to no other
    verifier: a lazy pair comparing notes learns nothing that tells it, and the one holding the canary approves it
    and is benched. Once it is answered, segment 1 goes out."""
    from marketplace import canary

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    x, y = _colluding_pair(market, tmp_path)
    _one_unit_of_four_segments(market, honest)
    draws = iter([True, False, False])  # x's (segment 0) planted; y's next tasks real
    monkeypatch.setattr(canary, "draw", lambda odds: next(draws))
    held = x.client.next_verification()  # a canary of segment 0, not answered yet
    assert held["segment"] == 0 and _rows(market, id=held["verification_id"])[0].canary is not None
    assert y.verify_once() == "ok" and y.replays == 1
    assert [v.segment for v in _rows(market, verifier=y.agent.account.address)] == [2]  # not 1
    # nor does the public job view tell x which check waits behind its canary (it listed segment 1 "pending" beside
    # those out, "assigned"): every check not yet answered is "open", its verifier unsaid
    job_id = _rows(market, id=held["verification_id"])[0].unit_id
    with market.rt.sessions() as s:
        job_id = s.get(Unit, job_id).job_id  # type: ignore[union-attr]
    listed = httpx.get(f"{market.url}/jobs/{job_id}").json()["verifications"]
    assert {(v["segment"], v["status"], v["verifier"]) for v in listed} == {
        (0, "open", None), (1, "open", None), (2, "passed", y.agent.account.address), (3, "open", None)}
    assert x.verify_once() == "ok"  # nothing y saw contradicts it: approved unreplayed
    assert _rows(market, id=held["verification_id"])[0].status == "canary_missed"
    with market.rt.sessions() as s:
        assert s.get(Verifier, x.agent.account.address).status == "benched"
    assert y.client.next_verification()["segment"] == 1  # now that the canary is answered (and its verdict stands)


def _withheld_from_both(market, seer: VerifierAgent, lazy: VerifierAgent, check_id: int) -> None:
    """``seer``, handed what tells check ``check_id``'s canary, is handed the check as itself; abandoned (back in the
    pool), it goes to ``lazy`` as itself too: ``seer`` was shown its real claim, and the two could compare notes.
    ``lazy``'s unreplayed approval is a pass of a real (honest) check."""
    from marketplace import service

    task = seer.client.next_verification()
    assert task["verification_id"] == check_id and _rows(market, id=check_id)[0].canary is None
    market.rt.settings.unit_timeout_s = 0
    time.sleep(1.1)
    service.reap(market.rt)
    market.rt.settings.unit_timeout_s = 120
    assert lazy.verify_once() == "ok"
    row = _rows(market, id=check_id)[0]
    assert row.canary is None and row.status == "passed" and row.verifier == lazy.account.address
    with market.rt.sessions() as s:
        assert s.get(Verifier, lazy.account.address).status == "active"


def _missed_when_first(market, lazy: VerifierAgent, check_id: int) -> None:
    """Check ``check_id`` handed out before any other pending check (those held back meanwhile, as if still waiting
    for their canaries): to ``lazy`` as its canary, which it approves unreplayed and is benched for."""
    with market.rt.sessions.begin() as s:
        others = list(s.scalars(select(Verification).where(Verification.status == "pending",
                                                           Verification.id != check_id)))
        for v in others:
            v.status = "stocking"
    assert lazy.verify_once() == "ok"
    with market.rt.sessions.begin() as s:
        for v in others:
            s.get(Verification, v.id).status = "pending"
    row = _rows(market, id=check_id)[0]
    assert row.canary is not None and row.status == "canary_missed" and row.verifier == lazy.account.address
    with market.rt.sessions() as s:
        assert s.get(Verifier, lazy.account.address).status == "benched"


def test_a_last_segment_canary_is_forged_from_another_unit_of_the_round_for_verifiers_who_never_saw_it(
        market, segments_in_order, tmp_path: Path, monkeypatch) -> None:
    """The last segment of a unit of two segments has nothing further on, nor moments a segment before its start, to
    forge from: its canary ends in the final state of another unit of the round handed in before (the same model, as
    long trained, on another shard). A verifier that was handed any of that unit's segments could know that state,
    so it gets no such canary; nor does any verifier after it is handed the check (they could compare notes). One
    that never saw the source unit, handed the check first, cannot tell, approves it unreplayed, and is benched.
    (Canaries made up elementwise: a job whose segment costs more to train again than the operator's budget, or a
    bf16 one.)"""
    from marketplace import canary

    monkeypatch.setattr(canary, "BUDGET", 0)
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    saw = staked_verifier(market, tmp_path, "saw")
    lazy = staked_verifier(market, tmp_path, "lazy", approve_everything=True)
    spec = JobSpec(rounds=1, units_per_round=3, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    market.rt.settings.canary_rate = 1.0
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    real_draw = canary.draw
    monkeypatch.setattr(canary, "draw", lambda odds: False)  # (stocking is done: nothing planted for now)
    while saw.verify_once() is not None:  # both segments of the first unit, replayed
        pass
    monkeypatch.setattr(canary, "draw", real_draw)  # the other units' canaries are stocked for real
    _submitted(market, job_id, [honest], 1)  # (the first is verified by now)
    first = {v.unit_id for v in _rows(market, verifier=saw.account.address)}
    (last,) = [v for v in _rows(market, segment=1, status="pending")]
    assert last.decoy["source_unit"] in first and last.unit_id not in first
    monkeypatch.setattr(canary, "draw", lambda odds: False)
    assert saw.verify_once() == "ok"  # the second unit's segment 0
    monkeypatch.setattr(canary, "draw", lambda odds: True)
    _withheld_from_both(market, saw, lazy, last.id)  # saw was handed the source unit
    # the third unit: its last segment's canary, handed first to a verifier that never saw its source (either unit)
    fresh = staked_verifier(market, tmp_path, "fresh", approve_everything=True)
    _submitted(market, job_id, [honest], 1)
    (target,) = [v for v in _rows(market, segment=1, status="pending") if v.decoy and v.decoy.get("source_unit")]
    _missed_when_first(market, fresh, target.id)


def test_the_last_segment_of_a_rounds_only_unit_can_be_a_canary(market, tmp_path: Path, monkeypatch) -> None:
    """The last segment of a round's first unit handed in (here a round of one unit) was never a canary: it was
    forged from another unit's final state, and there was none. Made up elementwise, it borrows the update before it,
    so a verifier handed it before any segment it is made of, which approves it unreplayed, is benched."""
    from marketplace import canary

    monkeypatch.setattr(canary, "BUDGET", 0)
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    careful = staked_verifier(market, tmp_path, "careful")
    lazy = staked_verifier(market, tmp_path, "lazy", approve_everything=True)
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=15, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    market.rt.settings.canary_rate = 1.0
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    (last,) = _rows(market, segment=2, status="pending")
    assert last.decoy is not None and last.decoy["telling"] == [0, 1, 2] and "source_unit" not in last.decoy
    # handed out before anything it is made of: planted, approved unreplayed, benched
    _missed_when_first(market, lazy, last.id)
    drive(market, [honest], careful, job_id)  # the rest, and the real check it stood in for, replayed: all pass
    assert {v.status for v in _rows(market) if v.canary is None} == {"passed"}


def test_a_canary_the_hand_out_order_may_forbid_is_planted_likelier_where_allowed(market, segments_in_order,
                                                                                  tmp_path: Path, monkeypatch) -> None:
    """A canary of segment 0 is allowed only if segment 1's check (which tells it) is not handed out before it: half
    the time in a random order. Where it is allowed it is planted twice as likely, so the rate set holds: at rate
    1/2, with every check stocked, the first check handed out is a canary for sure (canary.plant_odds)."""
    from marketplace import canary

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    market.rt.settings.canary_rate = 0.5  # (stocked at 4x, at most all: every check has a decoy)
    _submitted(market, submit_job(market, spec), [honest], 1)
    decoys = {v.segment: v.decoy for v in _rows(market, status="pending")}
    assert {seg: (d["telling"], d["checked"]) for seg, d in decoys.items()} == {
        0: ([0, 1], [0, 1, 2, 3]), 1: ([1, 2], [0, 1, 2, 3]), 2: ([2, 3], [0, 1, 2, 3]), 3: ([3], [0, 1, 2, 3])}
    drawn, real_draw = [], canary.draw
    monkeypatch.setattr(canary, "draw", lambda odds: drawn.append(odds) or real_draw(odds))
    task = verifier.client.next_verification()
    assert task["segment"] == 0 and drawn == [1]  # 1/2 x (1 + segment 1's check)
    assert _rows(market, id=task["verification_id"])[0].canary is not None


def test_a_retrained_canary_is_told_by_its_own_segment_and_the_next_only(market, segments_in_order,
                                                                         tmp_path: Path, monkeypatch) -> None:
    """A canary trained again from its segment's start (the default job's way, canary.retrainable) is made of
    nothing else: the last segment of a round's only unit is one too, and a verifier that was handed every segment
    before it still gets it; an honest one replays it and flags it, a lazy one approves it and is benched."""
    from marketplace import canary

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    careful = staked_verifier(market, tmp_path, "careful")
    lazy = staked_verifier(market, tmp_path, "lazy", approve_everything=True)
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=15, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    market.rt.settings.canary_rate = 1.0
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    decoys = {v.segment: v.decoy for v in _rows(market, status="pending")}
    assert {seg: d["telling"] for seg, d in decoys.items()} == {0: [0, 1], 1: [1, 2], 2: [2]}
    assert not any("source_unit" in d for d in decoys.values())
    (last,) = _rows(market, segment=2, status="pending")
    real_draw = canary.draw
    monkeypatch.setattr(canary, "draw", lambda odds: False)
    assert careful.verify_once() == "ok" and careful.verify_once() == "ok"  # segments 0 and 1, replayed
    monkeypatch.setattr(canary, "draw", real_draw)
    assert careful.verify_once() is not None  # segment 2: planted all the same, replayed and flagged
    row = _rows(market, id=last.id)[0]
    assert row.canary is not None and row.status == "canary_flagged" and row.verifier == careful.account.address
    # another job's unit of one segment, not seen by the lazy one
    _submitted(market, submit_job(market, spec.model_copy(update={"steps_per_unit": 5})), [honest], 1)
    while not _rows(market, status="canary_missed") and lazy.verify_once() is not None:
        pass  # (the check of segment 2 queued again is real; the new unit's is a canary at this rate)
    missed = _rows(market, status="canary_missed")
    assert len(missed) == 1 and missed[0].verifier == lazy.account.address
    with market.rt.sessions() as s:
        assert s.get(Verifier, lazy.account.address).status == "benched"


def test_a_bf16_canary_is_the_retrained_variant_for_a_verifier_on_the_units_own_plan(market, segments_in_order,
                                                                                     tmp_path: Path) -> None:
    """A bf16 job's decoys are made up elementwise, each with a retrained variant beside it (canary.for_verifier): a
    verifier that replays the unit's plan bit for bit is planted the retrained one, one on another plan the other."""
    from node.crosscheck import Plan

    own = staked_verifier(market, tmp_path, "own-plan", approve_everything=True)
    other = staked_verifier(market, tmp_path, "other-plan", plan=Plan("cpu", 2), approve_everything=True)
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=15, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full", precision="bf16")
    market.rt.settings.canary_rate = 1.0
    _submitted(market, submit_job(market, spec), [honest], 1)
    decoys = {v.id: v.decoy for v in _rows(market, status="pending")}
    assert len(decoys) == 3 and all("exact" in d and "proof" in d for d in decoys.values())
    for agent, exact in ((own, True), (other, False)):
        assert agent.verify_once() == "ok"  # approved unreplayed
        (row,) = _rows(market, verifier=agent.account.address)
        want = decoys[row.id]["exact"] if exact else decoys[row.id]
        assert row.status == "canary_missed" and row.canary["end_blob"] == want["end_blob"], agent.plan


def test_a_canary_forged_from_a_claim_that_does_not_hold_proves_nothing(market, segments_in_order,
                                                                        tmp_path: Path, monkeypatch) -> None:
    """A provider that fakes a segment can shape the claims its canary is forged from so that the forgery lies a hair
    (1e-6) from the segment's true end: inside the tolerance of an honest verifier on another plan, which approves
    it, yet not the bits the referee's replay ends in. The referee found the forged claim wrong and slashed the
    honest verifier's whole stake. It now referees the provider's own claim of the segment too: that claim does not
    hold, so the canary proves nothing: void, nothing slashed, the verifier back at work. (The approver here approves
    everything: its verdict on that canary is the one an honest verifier within its tolerance gives.)"""
    import torch

    from marketplace import canary, checking
    from node import checkpoint
    from node.trainer import deterministic, export_training_state, load_training_state, run_segment

    def shaped(spec, proof, seg, segment_blobs, final_blob, blobs, sibling_final=None, **_):
        if seg != 0:
            return None
        with deterministic(spec.threads):  # where an honest replay of the segment ends ...
            model, opt = load_training_state(spec, checkpoint.load(blobs.read(segment_blobs[0]))[0])
            run_segment(spec, model, opt, 0)
            end = {k: v.detach().clone() for k, v in export_training_state(model, opt).items()}
        key = next(k for k in end if k.startswith("model."))
        end[key] = end[key] * (1 + 1e-6)  # ... and a hair from it
        assert not torch.equal(end[key], checkpoint.load(blobs.read(segment_blobs[1]))[0][key])  # the claim is fake
        return decoy_ending(spec, proof, 0, end, blobs)

    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    approver = staked_verifier(market, tmp_path, "approver", approve_everything=True)
    job_id, held = _every_check_a_canary(market, monkeypatch, shaped, [cheat])
    assert approver.verify_once() == "ok"
    market.rt.settings.canary_rate = 0.0
    (missed,) = _rows(market, status="canary_missed")
    assert missed.segment == 0 and held == [[missed.id]]
    assert checking.punish_verifier(market.rt, missed.id) == "void"
    row = _rows(market, id=missed.id)[0]
    assert row.status == "canary_void" and row.slash_tx is None
    assert market.ops.stake_state(approver.account.address).staked == tokens(100)
    (void,) = _events(market, "canary_void")
    assert void["verification"] == missed.id and "does not hold" in void["reason"]
    assert not _events(market, "verifier_slashed")
    with market.rt.sessions() as s:
        assert s.get(Verifier, approver.account.address).status == "active"


def test_a_lazy_verifier_is_caught_by_a_canary_benched_slashed_and_its_checks_redone(
        market, segments_in_order, tmp_path: Path, monkeypatch) -> None:
    """A staked verifier that approves without replaying passes two real checks, then a planted known-bad segment:
    it is benched (refused from then on), its whole stake goes to the treasury on chain (once, however often the
    step runs), and the two checks it passed are done again by an honest verifier before the unit is paid."""
    from marketplace import checking, service
    from marketplace.db import Verifier

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    lazy = staked_verifier(market, tmp_path, "lazy", approve_everything=True)
    careful = staked_verifier(market, tmp_path, "careful")
    treasury = market.deployment.treasury
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    market.rt.settings.canary_rate = 1.0  # every check is queued with a canary forged for it
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    market.rt.settings.canary_rate = 0.0  # none planted yet
    assert [lazy.verify_once(), lazy.verify_once()] == ["ok", "ok"]
    passed_by_lazy = [v.id for v in _rows(market, status="passed")]
    assert len(passed_by_lazy) == 2
    market.rt.settings.canary_rate = 1.0
    assert lazy.verify_once() == "ok"  # it approved a canary (of segment 2: it saw only the segments before)
    market.rt.settings.canary_rate = 0.0
    market.wait(lambda: _rows(market, status="canary_missed")[0].slash_tx, what="lazy verifier slashed")
    assert market.ops.stake_state(lazy.account.address).staked == 0
    missed = _rows(market, status="canary_missed")
    assert len(missed) == 1 and market.ops.evidence_used(missed[0].slash_tx)
    assert market.ops.balance_of(treasury) == tokens(100)
    assert _events(market, "verifier_slashed")[0]["amount"] == str(tokens(100))
    with market.rt.sessions() as s:
        assert s.get(Verifier, lazy.account.address).status == "benched"
        assert s.get(Unit, _rows(market)[0].unit_id).status == "submitted"  # not paid on the lazy word
    for vid in passed_by_lazy:
        redo = _rows(market, id=vid)[0]
        assert redo.status == "pending" and redo.verifier is None
    assert _events(market, "verifier_benched")[0]["rechecks"] == 2
    for call in (lazy.verify_once, lazy.client.register_verifier):
        with pytest.raises(MarketError) as err:
            call()
        assert err.value.status == 409 and "benched" in str(err.value.detail)
        assert UNDER_REVIEW not in str(err.value.detail)  # ruled: benched for good, its agent stops
    # the slash step again (a retry, the sweep): nothing more moves
    assert checking.punish_verifier(market.rt, missed[0].id) == "slashed"
    assert service.sweep(market.rt)["punish_verifier"] == 0
    assert market.ops.balance_of(treasury) == tokens(100)
    drive(market, [honest], careful, job_id)
    real = [v for v in _rows(market) if v.canary is None]
    assert len(real) == 4 and all(v.status == "passed" and v.verifier == careful.account.address for v in real)
    with market.rt.sessions() as s:
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                           LedgerEntry.verification_id.is_(None))))
    assert [e.provider for e in entries] == [honest.account.address]


def test_a_benched_verifiers_pass_on_a_claim_the_unit_no_longer_holds_is_not_redone(market, segments_in_order,
                                                                                    tmp_path: Path) -> None:
    """A lazy verifier passed a check of provider A's claim; A was then slashed over another segment and a standby B
    re-submitted the unit. When a canary benched the lazy verifier, that old pass went back to the queue: an honest
    verifier replayed B's claim for a check naming A, and was never paid for it (only checks of the unit's current
    claim are). A pass of a claim the unit no longer holds is left as it is."""
    a = provider(market, tmp_path, "a", "eu-north", "0.55", adversary="idle-segment")
    b = provider(market, tmp_path, "b", "us-east", "0.9")
    lazy = staked_verifier(market, tmp_path, "lazy", approve_everything=True)
    careful = staked_verifier(market, tmp_path, "careful")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    job_id = submit_job(market, spec)
    market.wait(lambda: a.work_once(), what="A's unit submitted")
    assert lazy.verify_once() == "ok"  # a check of A's claim, passed on the lazy word
    stale = _rows(market, status="passed")[0]
    while careful.verify_once() != "fraud":
        pass
    market.wait(lambda: a.account.address in slashed(market), what="A slashed")
    market.rt.settings.canary_rate = 1.0  # B's checks are queued with canaries forged for them
    market.wait(lambda: b.work_once(), timeout=120, what="B re-trains and submits the unit")
    _stocked(market)
    # the lazy verifier approves B's checks until a canary benches it (none of a segment whose state it saw in A's
    # claim: B's states are A's up to A's cheat), the real ones it passed of B's claim done again
    answers = []
    while not _events(market, "verifier_benched"):
        answers.append(lazy.verify_once())
        assert None not in answers, "the lazy verifier ran out of tasks without a canary"
    market.rt.settings.canary_rate = 0.0
    assert answers and set(answers) == {"ok"}
    assert _events(market, "verifier_benched")[0]["rechecks"] == len(answers) - 1  # not A's stale pass
    row = _rows(market, id=stale.id)[0]
    assert (row.status, row.verifier, row.provider) == ("passed", lazy.account.address, a.account.address)
    drive(market, [b], careful, job_id)
    with market.rt.sessions() as s:
        paid = {e.verification_id for e in s.scalars(select(LedgerEntry).where(
            LedgerEntry.provider == careful.account.address))}
    done = {v.id for v in _rows(market, status="passed") if v.verifier == careful.account.address
            and v.provider == b.account.address}
    assert done and done <= paid  # every check careful did of B's claim is paid


def test_a_canary_a_replay_reaches_is_void_and_its_approver_keeps_its_stake_and_its_place(
        market, segments_in_order, tmp_path: Path, monkeypatch) -> None:
    """A provider shapes the states a canary is forged from (its own claims further on), so a "forgery" could be one
    a replay reaches. The honest verifier that approves it is not slashed: the referee replays the segment before
    any slash, finds the claim right, voids the canary and puts the verifier back to work."""
    from marketplace import canary, checking
    from marketplace.db import Verifier

    def truthful(spec, proof, seg, segment_blobs, final_blob, blobs, sibling_final=None, **_):  # never planted
        if seg + 1 >= len(segment_blobs):
            return None  # (as canary.forge: no canary of a unit's last segment)
        return {"proof": proof.to_dict(), "end_blob": segment_blobs[seg + 1], "true_end": proof.segments[seg].end_hash}

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    careful = staked_verifier(market, tmp_path, "careful")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    monkeypatch.setattr(canary, "forge", truthful)
    market.rt.settings.canary_rate = 1.0
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    held: list[list] = []  # the referee's ruling, held back until the agent is seen waiting for it
    send = market.rt.enqueue
    monkeypatch.setattr(market.rt, "enqueue", lambda name, args, queue=None: held.append(args)
                        if name == "gridmint.punish_verifier" else send(name, args, queue))
    market.rt.settings.canary_rate = 1.0
    assert careful.verify_once() == "ok"  # it replayed: the claim it was handed is right
    market.rt.settings.canary_rate = 0.0
    (missed,) = _rows(market, status="canary_missed")
    assert held == [[missed.id]]
    with pytest.raises(MarketError) as refused:  # benched, but the referee has not ruled: it is told to wait
        careful.verify_once()
    assert refused.value.status == 409 and "benched" in refused.value.detail and UNDER_REVIEW in refused.value.detail

    # the agent's own loop waits through the review (it stopped for good, and had to be restarted, before), then
    # does the real checks once the referee voids the canary
    ruling = threading.Timer(2.0, checking.punish_verifier, (market.rt, missed.id))
    ruling.start()
    careful.poll_s = 0.2
    assert careful.run(exit_when_idle_s=3.0) is None
    ruling.join()
    void = _rows(market, status="canary_void")[0]
    assert void.canary is not None and void.slash_tx is None
    assert market.ops.stake_state(careful.account.address).staked == tokens(100)
    assert not _events(market, "verifier_slashed") and _events(market, "canary_void")[0]["verification"] == void.id
    with market.rt.sessions() as s:
        ver = s.get(Verifier, careful.account.address)
        assert ver.status == "active" and ver.benched_for is None
    real = [v for v in _rows(market) if v.canary is None]
    assert real and all(v.status == "passed" and v.verifier == careful.account.address for v in real)
    assert checking.punish_verifier(market.rt, void.id) == "canary_void"  # a retry or the sweep: nothing moves
    drive(market, [honest], careful, job_id)  # the unit is paid
    with market.rt.sessions() as s:
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                           LedgerEntry.verification_id.is_(None))))
    assert [e.provider for e in entries] == [honest.account.address]


def test_a_canary_within_a_cross_plan_verifiers_tolerance_is_void_for_it_and_not_for_a_bit_exact_one(
        market, tmp_path: Path, monkeypatch) -> None:
    """A canary is forged far from the truth, but how far an honest verifier on another plan may drift is only
    calibrated, not known when it is forged. One that approves a forgery lying within (twice) its tolerance of the
    true end may have replayed honestly: the canary is void for it, stake and place kept. A verifier on the unit's
    own plan and kernels replays bit for bit: for it the same forgery is a miss, and it is slashed."""
    import torch

    from marketplace import canary, checking
    from marketplace.db import Verifier
    from node import checkpoint
    from node.crosscheck import Plan

    def near(spec, proof, seg, segment_blobs, final_blob, blobs, sibling=None, **_):  # 1 ulp from the truth
        last = seg == len(segment_blobs) - 1
        true_end = checkpoint.load(blobs.read(final_blob if last else segment_blobs[seg + 1]))[0]
        key = next(k for k in sorted(true_end) if k.startswith("model."))
        nudged = dict(true_end)
        nudged[key] = true_end[key].clone()
        nudged[key].view(-1)[0] = torch.nextafter(nudged[key].view(-1)[0], torch.tensor(math.inf))
        return {**decoy_ending(spec, proof, seg, nudged, blobs), "telling": [seg]}

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    other = staked_verifier(market, tmp_path, "other-plan", plan=Plan("cpu", 2), approve_everything=True)
    same = staked_verifier(market, tmp_path, "same-plan", approve_everything=True)
    _, held = _every_check_a_canary(market, monkeypatch, near, [honest])
    assert other.verify_once() == "ok" and same.verify_once() == "ok"  # both approve without replaying
    market.rt.settings.canary_rate = 0.0
    missed = {v.verifier: v.id for v in _rows(market, status="canary_missed")}
    assert set(missed) == {other.account.address, same.account.address} and len(held) == 2
    assert checking.punish_verifier(market.rt, missed[other.account.address]) == "void"
    assert checking.punish_verifier(market.rt, missed[same.account.address]) == "slashed"
    assert market.ops.stake_state(other.account.address).staked == tokens(100)  # before the fix: slashed whole
    assert market.ops.stake_state(same.account.address).staked == 0
    (void,) = _events(market, "canary_void")
    assert void["verifier"] == other.account.address and "within 2 x the tolerance" in void["reason"], void
    with market.rt.sessions() as s:
        assert s.get(Verifier, other.account.address).status == "active"
        assert s.get(Verifier, same.account.address).status == "benched"


def test_a_verifier_whose_task_is_withdrawn_while_it_replays_carries_on(market, tmp_path: Path) -> None:
    """A task can be withdrawn while a verifier replays it (its provider slashed over another segment, or it took
    too long): the verdict is refused (409), the verifier says so and goes on with the next task."""
    from marketplace import service

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 1)
    send = verifier.client.verdict

    def late(body: dict) -> object:  # the task times out meanwhile and is reaped back to the pool
        market.rt.settings.unit_timeout_s = 0
        time.sleep(1.1)
        service.reap(market.rt)
        market.rt.settings.unit_timeout_s = 120
        return send(body)

    verifier.client.verdict = late
    assert verifier.verify_once() == "withdrawn"
    verifier.client.verdict = send
    drive(market, [honest], verifier, job_id)
    assert all(v.status == "passed" for v in _rows(market))


def test_silent_provider_loses_its_unit_to_a_standby_and_heartbeats_keep_it(market, tmp_path: Path) -> None:
    from marketplace import service

    flaky = provider(market, tmp_path, "flaky", "eu-north", "0.6")
    steady = provider(market, tmp_path, "steady", "us-east", "0.9")
    spare = provider(market, tmp_path, "spare", "ap-east", "1.5")
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 2, what="both units matched")
    market.rt.settings.unit_timeout_s = 2
    for _ in range(3):  # steady keeps beating; flaky went silent after taking its unit
        time.sleep(1)
        steady.client.heartbeat()
    assert service.reap(market.rt) == 1
    with market.rt.sessions() as s:
        units = {u.shard: u for u in s.scalars(select(Unit).where(Unit.job_id == job_id))}
        dropout = s.get(Provider, flaky.account.address)
        events = [e.data for e in s.scalars(select(Event).where(Event.kind == "unit_assigned")).all()]
    holders = {u.provider for u in units.values()}
    assert holders == {steady.account.address, spare.account.address}  # the standby took over at once
    moved = next(u for u in units.values() if u.provider == spare.account.address)
    assert moved.status == "assigned" and flaky.account.address in moved.dropped_by and moved.attempts == 2
    assert moved.excluded == []  # a dropout, not a cheat: a last resort for the unit, not banned from it
    assert events[-1]["how"] == f"standby for {flaky.account.address}"
    assert dropout.dropped == 1  # its reliability, and so its effective price, takes the hit
    assert dropout.observed_tps is None  # a silent dropout says nothing of its speed
    # a heartbeat for a unit that is not yours is refused
    with pytest.raises(MarketError) as err:
        flaky.client.heartbeat(moved.id)
    assert err.value.status == 409


def test_a_unit_not_submitted_by_its_deadline_is_taken_back_however_alive_its_provider_is(market,
                                                                                         tmp_path: Path) -> None:
    """A provider that keeps heartbeating but never finishes (stuck, or sitting on the unit) loses it at its deadline,
    set at assignment from its throughput (here: the floor, 2 s): reliability hit, passed over, a standby takes the
    unit at once. The node, told by its next heartbeat, stops training at the next step and submits nothing; the
    job completes on the standby."""
    from marketplace import service

    market.rt.settings.unit_timeout_s = 2  # the node heartbeats every 0.5 s
    market.rt.settings.unit_deadline_min_s, market.rt.settings.unit_deadline_factor = 2, 1
    slow = provider(market, tmp_path, "slow", "eu-north", "0.6")
    spare = provider(market, tmp_path, "spare", "us-east", "0.9")
    with market.rt.sessions.begin() as s:
        s.get(Provider, slow.account.address).verified_streak = 7
        # a benchmark understated to hold units longer: the deadline goes by the throughput the matching ranked it at
        # (delivered, else the market's median), never by the node's own claim
        s.get(Provider, slow.account.address).tokens_per_s = 1
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    unit = next(u for u in httpx.get(f"{market.url}/jobs/{job_id}").json()["units"])
    assert unit["provider"] == slow.account.address and unit["due"] is not None
    with market.rt.sessions() as s:
        ranked_at = {o.provider: o.throughput for o in service._offers(market.rt, s)}[slow.account.address]
    assert service.unit_seconds(spec, 1) > 10_000  # what the claim alone would have allowed, in seconds
    assert 1 <= unit["due"] - int(time.time()) <= max(2, service.unit_seconds(spec, ranked_at))
    train = slow.trainer

    def crawl(spec, start, workdir):  # 0.3 s a step: 6 s for the unit, three times its deadline
        def step(i: int, loss: float) -> None:
            time.sleep(0.3)
            slow._between_steps(i, loss)
        return train_unit(spec, start, workdir, on_step=step)

    slow.trainer = crawl
    reaped: list[int] = []

    def reaper() -> None:  # the beat task the fixture does not run
        end = time.monotonic() + 30
        while not reaped and time.monotonic() < end:
            time.sleep(0.25)
            if service.reap(market.rt):
                reaped.append(1)

    thread = threading.Thread(target=reaper)
    thread.start()
    assert slow.work_once() is True
    thread.join()
    slow.trainer = train
    assert reaped and 0 < slow._steps < spec.steps_per_unit  # stopped part-way, told by a refused heartbeat
    assert slow._withdrawn is not None and "not assigned" in slow._withdrawn
    timed_out = _events(market, "unit_timed_out")
    assert [e["provider"] for e in timed_out] == [slow.account.address]
    assert timed_out[0]["reason"].startswith("not submitted by its deadline")
    with market.rt.sessions() as s:
        u = s.get(Unit, unit["unit_id"])
        assert (u.provider, u.status, u.excluded) == (spare.account.address, "assigned", [])
        assert list(u.dropped_by) == [slow.account.address]
        dropout = s.get(Provider, slow.account.address)
        assert u.steps_done == 0 and dropout.dropped == 1 and dropout.verified_streak == 0  # its record starts over
        # it showed it trains a unit in more than the time it held it: from now on it is ranked (and its deadlines
        # set) at no more than that, no longer at the market's median
        at_most = timed_out[0]["delivered_at_most"]
        unit_tokens = spec.steps_per_unit * spec.batch_size * spec.model.ctx
        assert dropout.observed_tps == at_most and 1 <= at_most <= min(ranked_at, unit_tokens // 2)
        assert {o.provider: o.throughput for o in service._offers(market.rt, s)}[slow.account.address] == at_most
    assert any(e["how"] == f"standby for {slow.account.address}" for e in _events(market, "unit_assigned"))
    market.rt.settings.unit_deadline_min_s, market.rt.settings.unit_deadline_factor = 3600, 4
    drive(market, [slow, spare], verifier, job_id)
    with market.rt.sessions() as s:
        paid = {e.provider for e in s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                                        LedgerEntry.verification_id.is_(None)))}
    assert paid == {spare.account.address}


def test_a_trusted_host_is_sampled_at_half_the_rate_and_its_record_grows_with_each_checked_unit(market,
                                                                                                tmp_path: Path) -> None:
    """A provider with TRUST_AFTER_UNITS units verified in a row gets half the replays (paranoid on 40 one-step
    segments: 2 instead of 4; its 200 GMT staked against a 0.9 GMT unit keeps a 1% cheat's odds of being caught
    within its stake at 0.9965), and each verified unit that was replayed adds to its record."""
    from protocol.verification import TRUST_AFTER_UNITS

    host = provider(market, tmp_path, "host", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    with market.rt.sessions.begin() as s:
        s.get(Provider, host.account.address).verified_streak = TRUST_AFTER_UNITS
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=40, segment_len=1, batch_size=8, max_price=tokens(2),
                   verification="paranoid")
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [host], 1)
    sub = _events(market, "unit_submitted")[-1]
    assert (sub["trusted"], sub["rate"], len(sub["sampled"])) == (True, "1/20", 2)
    drive(market, [host], verifier, job_id)
    assert len(_rows(market)) == 2 and all(v.status == "passed" for v in _rows(market))
    view = httpx.get(f"{market.url}/providers/{host.account.address}").json()
    assert (view["verified_streak"], view["trusted"]) == (TRUST_AFTER_UNITS + 1, True)
    # the node's owner reads the same record with `gridmint node status`
    from typer.testing import CliRunner

    from gridmint.cli import app
    from node.wallet import save

    save(host.account, tmp_path / "host.json", "pw")
    got = CliRunner().invoke(app, ["node", "status", "--marketplace", market.url, "--wallet", str(tmp_path / "host.json")],
                             env={"GRIDMINT_WALLET_PASSWORD": "pw"})
    assert got.exit_code == 0, got.output
    record = json.loads(got.stdout)
    assert record["address"] == host.account.address and record["trusted"] is True
    assert (record["verified_streak"], record["completed"], record["unverified"]) == (TRUST_AFTER_UNITS + 1, 1, 0)
    assert set(record["payout"]) == {"pooled", "epoch", "cumulative", "claimed"}


def test_a_verifier_keeps_a_long_replay_alive_with_heartbeats_until_the_tasks_deadline(market, tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """A replay longer than the task timeout (a big segment on a slow machine) is not taken away while the verifier
    heartbeats; a task held past ``verify_deadline_s`` is handed out again whatever its heartbeats, and the verifier,
    told by its next beat (409), drops it without a verdict. The job completes."""
    import node.verifier_agent as va
    from marketplace import service

    market.rt.settings.unit_timeout_s = 2  # the verifier beats every 0.5 s
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [honest], 2)
    replay = va.check_segment

    def slow(*args, **kw):  # 4 s, twice the timeout, with the periodic reaper running meanwhile
        for _ in range(8):
            time.sleep(0.5)
            service.reap(market.rt)
        return replay(*args, **kw)

    monkeypatch.setattr(va, "check_segment", slow)
    assert verifier.verify_once() == "ok"
    first = [v for v in _rows(market) if v.status == "passed"]
    assert len(first) == 1 and first[0].verifier == verifier.account.address and first[0].heartbeat_at is not None
    market.rt.settings.verify_deadline_s = 1  # now a task may be held 1 s at most, heartbeats or not
    assert verifier.verify_once() == "withdrawn"
    assert [v.status for v in _rows(market) if v.id != first[0].id] == ["pending"]
    market.rt.settings.verify_deadline_s = 3600
    monkeypatch.setattr(va, "check_segment", replay)
    drive(market, [honest], verifier, job_id)
    assert [v.status for v in _rows(market)] == ["passed", "passed"]


def test_heartbeats_report_a_units_progress(market, tmp_path: Path) -> None:
    """Each heartbeat carries the steps trained so far; the job's view shows them, with the unit's deadline."""
    node = provider(market, tmp_path, "node", "us-east", "0.9")
    job_id = submit_job(market, JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8,
                                        max_price=tokens(2)))
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    unit_id = httpx.get(f"{market.url}/jobs/{job_id}").json()["units"][0]["unit_id"]
    beat = node.client.heartbeat(unit_id, 7)
    assert beat["units"] == [unit_id] and beat["due"][unit_id] > time.time()
    view = httpx.get(f"{market.url}/jobs/{job_id}").json()["units"][0]
    assert (view["steps_done"], view["due"]) == (7, beat["due"][unit_id])


def _events(market, kind: str) -> list[dict]:
    with market.rt.sessions() as s:
        return [e.data for e in s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id))]


def test_a_false_accusation_of_a_provider_on_another_plan_is_cleared_without_asking_it_anything(market,
                                                                                            tmp_path: Path) -> None:
    """An honest provider trains on its own plan (micro-batches: no CPU replay is bit for bit). A staked liar accuses
    it; the referee first repeats the verifier's check on its own plan, finds the segment within the tolerance and
    clears the provider there and then: no state is asked of it (it could not lose a dispute by being offline). That
    replay is the liar's own, bit for bit, and within the tolerance: the accusation is proven false, the bond
    forfeit, the liar benched; a careful verifier checks the rest; the provider keeps its stake and is paid."""
    honest = provider(market, tmp_path, "honest", "us-east", "0.9", plan="cpu/mb2")
    liar = staked_verifier(market, tmp_path, "liar", accuse_everything=True)
    careful = staked_verifier(market, tmp_path, "careful")
    vacct = liar.account
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=16, segment_len=8, batch_size=8, max_price=tokens(2),
                   verification="full")  # both segments checked: the liar takes one, the careful verifier the other
    # a fixed job id (so a fixed data order) whose honest segments land within the tolerance (0x33..33, before ids
    # named their customer: 0.29x and 0.07x; this one passed, its ratios not measured): under a random one, honest
    # drift passes it in a few percent of jobs, and then the referee rightly bisects
    job_id = submit_job(market, spec, job_id=fixed_job_id(0x33))
    _submitted(market, job_id, [honest], 1)
    assert liar.verify_once() == "fraud"
    market.wait(lambda: _events(market, "verifier_benched"), what="the liar benched")
    drive(market, [honest], [liar, careful], job_id)
    assert slashed(market) == set() and market.ops.stake_of(honest.account.address) == tokens(200)
    with market.rt.sessions() as s:
        unit = s.scalars(select(Unit).where(Unit.job_id == job_id)).one()
        checks = list(s.scalars(select(Verification).where(Verification.unit_id == unit.id)))
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                           LedgerEntry.verification_id.is_(None))))
    assert unit.plan == "cpu/mb2" and unit.status == "verified"
    assert sorted(v.status for v in checks) == ["passed", "verifier_wrong"]
    assert all(not (v.bisect or {}).get("reveals") for v in checks)
    assert _events(market, "reveal_requested") == [] and _events(market, "state_revealed") == []
    [wrong] = _events(market, "false_accusation")
    assert "the referee's replay agrees" in wrong["reason"] and wrong["verifier"] == vacct.address
    assert wrong["bonded"] and not wrong["good_faith"] and wrong["proven_false"]
    assert "within the tolerance" in wrong["faith_reason"] and int(wrong["bond_lost"]) == tokens(50)
    [benched] = _events(market, "verifier_benched")
    assert benched["verifier"] == vacct.address and "within the tolerance" in benched["reason"]
    assert market.ops.stake_of(vacct.address) == tokens(50)
    assert [e.provider for e in entries] == [honest.account.address]


@pytest.mark.parametrize("market", ["sqlite", "postgres"], indirect=True)
def test_an_honest_verifier_keeps_its_bond_when_honest_drift_passes_its_tolerance(market, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Honest training on another plan drifts from a CPU replay without bound in chaotic stretches: in this job, an
    honest micro-batch provider's segment 0 lands twice past the verifier's calibrated tolerance (test_referee's
    tight calibration, the same for the verifier and the referee). The honest verifier disputes it with a bond (on
    the referee's plan it bonds every dispute); the referee bisects and clears the provider, reproduces the
    verifier's replay bit for bit past the tolerance, and dismisses the accusation as made in good faith: the bond
    is released, no token moves, the provider is paid."""
    from test_referee import DRIFTING_JOB, DRIFTING_SPEC, drift_past_tolerance  # this directory is on sys.path

    from node import crosscheck
    from protocol import verification

    monkeypatch.setattr(crosscheck, "tolerance_for", drift_past_tolerance())

    honest = provider(market, tmp_path, "honest", "us-east", "0.9", plan="cpu/mb2")
    verifier = staked_verifier(market, tmp_path, "verifier")
    assert verifier.bond_margin == 1.0
    job_id = submit_job(market, DRIFTING_SPEC, job_id=DRIFTING_JOB)
    drive(market, [honest], verifier, job_id)
    assert slashed(market) == set() and market.ops.stake_of(honest.account.address) == tokens(200)
    assert market.ops.stake_of(verifier.account.address) == tokens(100)  # the bond came back
    wrong = _events(market, "false_accusation")
    assert len(wrong) == 1 and wrong[0]["bonded"] and wrong[0]["good_faith"] and not wrong[0]["proven_false"], wrong
    assert wrong[0]["bond_lost"] == "0" and "reproduced the verifier's replay on cpu" in wrong[0]["faith_reason"]
    assert _events(market, "verifier_benched") == []  # an honest verifier keeps its place too
    with market.rt.sessions() as s:
        unit = s.scalars(select(Unit).where(Unit.job_id == job_id)).one()
        checks = {v.segment: v for v in s.scalars(select(Verification).where(Verification.unit_id == unit.id))}
        paid = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                        LedgerEntry.verification_id.is_(None))))
    assert unit.status == "verified" and {k: v.status for k, v in checks.items()} == {0: "verifier_wrong", 1: "passed"}
    assert checks[0].accusation is not None and "bisected to step" in wrong[0]["reason"]
    # the referee's own replay backed the dispute, so it bisected: three states asked of the provider, each revealed
    assert len(checks[0].bisect["reveals"]) == 3
    assert [e["provider"] for e in _events(market, "state_revealed")] == [honest.account.address] * 3
    evidence = verification.fraud_evidence(unit.id, 0, honest.account.address)
    assert market.ops.evidence_used(evidence) and int(market.ops.dispute_of(evidence).provider, 16) == 0
    assert [e.provider for e in paid] == [honest.account.address]


def test_a_node_answers_a_reveal_between_steps_of_the_unit_it_is_training(market, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """A dispute can ask a node for a state while it trains another unit, and a unit may outlast the reveal deadline:
    the heartbeat thread sees the ask, the training thread answers it between two steps, and the unit in training
    comes out bit for bit as it would have without the interruption."""
    from test_referee import DRIFTING_JOB, DRIFTING_SPEC, drift_past_tolerance  # this directory is on sys.path

    from marketplace import service
    from node import checkpoint, crosscheck
    from node.crosscheck import Plan
    from node.trainer import model_only, train_unit

    monkeypatch.setattr(crosscheck, "tolerance_for", drift_past_tolerance())

    market.rt.settings.unit_timeout_s = 2  # the node heartbeats (and looks for reveal requests) every 0.5 s
    honest = provider(market, tmp_path, "honest", "us-east", "0.9", plan="cpu/mb2")
    verifier = staked_verifier(market, tmp_path, "verifier")
    job_a = submit_job(market, DRIFTING_SPEC, job_id=DRIFTING_JOB)
    _submitted(market, job_a, [honest], 1)
    verdicts = [verifier.verify_once(), verifier.verify_once()]
    assert sorted(verdicts) == ["fraud", "ok"]  # honest drift twice past the tolerance in segment 0: disputed
    market.wait(lambda: honest.client.next_reveal(), what="the referee asking for a state")
    spec_b = JobSpec(rounds=1, units_per_round=1, steps_per_unit=80, segment_len=20, batch_size=8,
                     max_price=tokens(2))
    job_b = submit_job(market, spec_b)
    market.wait(lambda: _assigned(market, job_b) == 1, what="job B's unit matched")
    assert honest.work_once()  # trains job B's unit, answering the referee in between
    kinds = [(e.kind, e.job_id) for e in _all_events(market)]
    submitted_b = kinds.index(("unit_submitted", job_b))
    assert ("state_revealed", job_a) in kinds[:submitted_b], kinds  # answered before the unit was done
    with market.rt.sessions() as s:  # job B's unit as submitted, and the global model it started from (read now:
        job = s.get(Job, job_b)      # once the unit is verified, the job's global model moves on)
        unit = s.scalars(select(Unit).where(Unit.job_id == job_b)).one()
        spec, proof, start_blob = service.unit_spec(job, unit), unit.proof, job.global_blob
    drive(market, [honest], verifier, job_a)  # whatever the bisection still asks, after the unit
    wrong = [e.data for e in _all_events(market) if e.kind == "false_accusation" and e.job_id == job_a]
    assert len(wrong) == 1 and wrong[0]["good_faith"] and slashed(market) == set()
    # the unit trained with the interruption is the unit trained without it
    start = model_only(checkpoint.load(market.rt.blobs.path(start_blob))[0])
    again = train_unit(spec, start, tmp_path / "again", plan=Plan.parse("cpu/mb2"))
    assert again.proof.to_dict() == proof


def _all_events(market) -> list[Event]:
    with market.rt.sessions() as s:
        return list(s.scalars(select(Event).order_by(Event.id)))


@pytest.mark.parametrize("bond_margin", [4.0, math.inf])
def test_a_cheat_declaring_another_plan_is_bisected_to_its_skipped_update_and_slashed(market, tmp_path: Path,
                                                                                    bond_margin: float) -> None:
    """A cheat that skips each segment's last optimizer update commits honest losses and declares a micro-batch plan
    to hide in the tolerance. The staked verifier's tolerant check still disputes it; the referee's bisection (the
    cheat revealing honestly re-derived states) ends on the segment's last step, whose one-step replay convicts.
    Far past the tolerance, the verifier bonds its accusation (an on-chain fraud proof); a verifier that bonds nothing
    (its margin never reached) still gets the cheat slashed, by the operator's governance path, with no bond at risk."""
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-last-update", plan="cpu/mb2")
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier", bond_margin=bond_margin)
    vacct = verifier.account
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=16, segment_len=8, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    drive(market, [cheat, honest], verifier, job_id)
    assert slashed(market) == {cheat.account.address} and market.ops.stake_of(cheat.account.address) == 0
    slash = _events(market, "provider_slashed")
    assert len(slash) == 1 and slash[0]["path"] == ("fraud-proof" if bond_margin < math.inf else "governance")
    assert market.ops.balance_of(verifier.account.address) == tokens(100)  # the bounty either way
    with market.rt.sessions() as s:
        fraud = s.scalars(select(Verification).where(Verification.status == "fraud")).one()
    assert (fraud.accusation is not None) == (bond_margin < math.inf)
    seg = slash[0]["segment"]
    assert f"bisected to step {seg * 8 + 7} in 3 reveal(s)" in slash[0]["reason"]  # the skipped update, found
    assert [e["provider"] for e in _events(market, "state_revealed")] == [cheat.account.address] * 3
    with market.rt.sessions() as s:
        units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
    assert all(u.status == "verified" and u.provider == honest.account.address for u in units)


def test_reveals_are_checked_and_a_provider_that_stays_silent_loses_the_dispute(market, tmp_path: Path) -> None:
    """Bad reveals are refused and change nothing: an unknown dispute (404), another provider's dispute or a step
    not asked (409), a Reveal signed by another key or a checkpoint that does not hash to the signed state (422).
    A provider that lets the deadline pass loses: a late reveal is refused and the referee slashes it."""
    from eth_account import Account

    from marketplace import service
    from protocol.signing import sign_typed, to_bytes32

    market.rt.settings.reveal_timeout_s = 4
    # a cheat (skips the segment's last update) hiding behind a micro-batch plan: the referee's replay backs the
    # dispute, so it bisects and asks the provider for states
    quiet = provider(market, tmp_path, "quiet", "us-east", "0.9", adversary="skip-last-update", plan="cpu/mb2")
    other = provider(market, tmp_path, "other", "eu-north", "3")  # too dear to be matched; only sends bad reveals
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=8, segment_len=8, batch_size=8, max_price=tokens(2))
    submit_job(market, spec)
    from node.crosscheck import Plan

    # declares a plan the batch of 8 cannot be cut into (as a client would that does not fit its micro-batches to
    # the batch: ProviderAgent.plan_for): refused at submission
    quiet.plan_for = lambda spec: Plan.parse("cpu/mb3")  # type: ignore[method-assign]
    with pytest.raises(MarketError) as err:
        market.wait(lambda: quiet.work_once(), what="the unit trained")
    assert err.value.status == 422 and "micro-batches" in str(err.value.detail)
    del quiet.plan_for  # (the agent's own again: cpu/mb2 splits a batch of 8)
    market.wait(lambda: quiet.work_once(), what="the unit trained and submitted")
    assert verifier.verify_once() == "fraud"
    ask = market.wait(lambda: quiet.client.next_reveal(), what="the referee asking for a state")
    assert ask["step"] == 4 and ask["plan"] == "cpu/mb2" and other.client.next_reveal() is None
    good = quiet.answer(ask)

    def refused(agent: ProviderAgent, body: dict, status: int) -> None:
        with pytest.raises(MarketError) as err:
            agent.client.reveal(body)
        assert err.value.status == status, err.value.detail

    refused(quiet, {**good, "verification_id": 10**6}, 404)
    refused(other, good, 409)  # not its segment
    refused(quiet, {**good, "step": 5}, 409)  # not the step the referee asked for
    forged = sign_typed(Account.create(), "Reveal", quiet.client.domain,
                        {"unitId": to_bytes32(ask["unit_id"]), "step": 4, "stateHash": to_bytes32(good["state_hash"])})
    refused(quiet, {**good, "signature": forged}, 422)
    start_blob = ask["checkpoint_blob"]  # a real checkpoint, but not the state the provider signed
    refused(quiet, {**good, "blob": start_blob}, 422)
    refused(quiet, {**good, "extra": 1}, 422)
    # a state signed and hashing right that is no training state of the unit (a tensor left out, or a NaN): every
    # ruling failed on it outside the guard that counts a bad reveal against the provider, and the dispute stalled
    # for ever, the cheat unslashed; refused now, so only a sound state (or the deadline) moves the dispute
    from node import checkpoint as ckpt
    from node.trainer import UnitSpec, checkpoint_metadata, state_hash

    state, _ = ckpt.load(market.rt.blobs.path(good["blob"]))
    name = sorted(k for k in state if k.startswith("model."))[0]
    for label, bad in (("missing", {k: v for k, v in state.items() if k != name}),
                       ("nan", {**state, name: state[name].clone().fill_(float("nan"))})):
        path = tmp_path / f"reveal-{label}.safetensors"
        ckpt.save(path, bad, checkpoint_metadata(UnitSpec.from_json(ask["spec"]), int(ask["segment"])))
        if label == "missing":  # no training state of the unit's model: refused at its upload already, not stored
            with pytest.raises(MarketError) as err:
                quiet.client.put_blob(path)
            assert err.value.status == 422 and "not a training state" in str(err.value.detail), err.value.detail
            assert not market.rt.blobs.has(ckpt.file_sha256(path).removeprefix("0x"))
            continue
        blob, h = quiet.client.put_blob(path), state_hash(bad)
        signed = sign_typed(quiet.account, "Reveal", quiet.client.domain,
                            {"unitId": to_bytes32(ask["unit_id"]), "step": 4, "stateHash": to_bytes32(h)})
        refused(quiet, {**good, "blob": blob, "state_hash": h, "signature": signed}, 422)
    with market.rt.sessions() as s:
        task = s.get(Verification, ask["verification_id"])
        assert task.status == "bisecting" and task.bisect["reveals"] == {}
    time.sleep(market.rt.settings.reveal_timeout_s + 1.5)
    refused(quiet, good, 409)  # too late
    service.reap(market.rt)  # the periodic sweep hands the overdue dispute back to the referee
    market.wait(lambda: quiet.account.address in slashed(market), what="the silent provider slashed")
    slash = _events(market, "provider_slashed")
    assert len(slash) == 1 and "did not reveal its state before step 4" in slash[0]["reason"]
    assert market.ops.stake_of(quiet.account.address) == 0


@pytest.mark.parametrize("plan", ["cpu", "cpu/mb2"])
def test_a_bf16_job_is_verified_on_the_providers_plan_and_its_cheat_slashed(market, tmp_path: Path, plan: str) -> None:
    """A job in bf16 autocast. On the default plan the verifier replays it in bf16 bit for bit and a step-skipping
    cheat is slashed by its fraud proof. On another plan (micro-batches) the verifier checks it within a tolerance
    calibrated in bf16; a cheat that skips each segment's last update is disputed without a bond (bf16 drift across
    plans hides a float8 cheat, so the verifier stakes nothing on it), bisected to the skipped step, and convicted by
    the referee's one-step replay measured against that step's own update; the honest provider is paid."""
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55",
                     adversary="skip-steps" if plan == "cpu" else "skip-last-update", plan=plan)
    honest = provider(market, tmp_path, "honest", "us-east", "0.9", plan=plan)
    verifier = staked_verifier(market, tmp_path, "verifier")
    vacct = verifier.account
    # a small model: bf16 on a CPU without bf16 units is slow, and the referee and the verifier each calibrate
    spec = JobSpec(model=ModelSpec(d_model=32, n_layer=1, n_head=2, ctx=32), rounds=1, units_per_round=2,
                   steps_per_unit=16, segment_len=8, batch_size=8, max_price=tokens(2), precision="bf16")
    job_id = submit_job(market, spec)
    drive(market, [cheat, honest], verifier, job_id)
    assert slashed(market) == {cheat.account.address} and market.ops.stake_of(cheat.account.address) == 0
    slash = _events(market, "provider_slashed")
    assert len(slash) == 1 and slash[0]["path"] == ("fraud-proof" if plan == "cpu" else "governance")
    with market.rt.sessions() as s:
        units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
        checks = list(s.scalars(select(Verification).where(Verification.unit_id.in_([u.id for u in units]))))
    assert all(u.status == "verified" and u.provider == honest.account.address and u.plan == plan for u in units)
    fraud = [v for v in checks if v.status == "fraud"]
    assert [v.provider for v in fraud] == [cheat.account.address]
    passed = [v for v in checks if v.status == "passed"]
    assert passed and all(v.provider == honest.account.address for v in passed)
    if plan == "cpu":
        for v in passed:  # bit for bit: the verifier's replay hash is the committed one
            u = next(u for u in units if u.id == v.unit_id)
            assert v.replayed_hash == u.proof["segments"][v.segment]["endHash"]
    else:
        disputed = [e for e in _events(market, "segment_disputed") if e["provider"] == cheat.account.address]
        assert fraud[0].accusation is None and "unbonded: a bf16 job across plans" in disputed[0]["reason"]
        seg = slash[0]["segment"]
        assert f"bisected to step {seg * 8 + 7} in 3 reveal(s)" in slash[0]["reason"]
        assert "relative to its update" in slash[0]["reason"]


@pytest.mark.parametrize("referee_plans", ["cpu,cpu/mb2", "cpu"])
def test_a_float8_cheat_is_caught_bit_for_bit_by_a_verifier_on_its_own_plan(market, tmp_path: Path,
                                                                           referee_plans: str) -> None:
    """A bf16 job. A cheat declares micro-batches (cpu/mb2) and runs one step of every segment with float8 weights:
    across plans that hides inside honest bf16 drift (a verifier on another plan does not dispute it: `gridmint bench
    proof`). A verifier on cpu/mb2 is handed the units trained on its own plan first and replays them bit for bit.
    Where the referee replays cpu/mb2 too (GRIDMINT_REFEREE_PLANS), the verifier bonds its accusation and the
    referee's exact replay convicts: slashed on the fraud proof, the verifier's bond back; the honest provider
    (default plan) is checked bit for bit as well and paid. Where it does not, the dispute goes unbonded (the
    verifier risks nothing) and the referee judges it across plans, where a float8 step may hide: its loss scan or
    bisection convicts some (`gridmint bench proof`, same_plan: 3 of 10 bf16 segments on the CPU) and clears the
    rest (the verifier overruled, no bond lost, not proven false)."""
    from node.crosscheck import Plan

    exact = referee_plans == "cpu,cpu/mb2"
    market.rt.settings.referee_plans = referee_plans
    assert httpx.get(f"{market.url}/config").json()["referee_plans"] == (["cpu", "cpu/mb2"] if exact else ["cpu"])
    market.rt.settings.canary_rate = 0.0
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="low-precision", plan="cpu/mb2")
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier", plan=Plan("cpu", 2))
    spec = JobSpec(model=ModelSpec(d_model=32, n_layer=1, n_head=2, ctx=32), rounds=1, units_per_round=2,
                   steps_per_unit=16, segment_len=8, batch_size=8, max_price=tokens(2), precision="bf16",
                   verification="full")
    job_id = submit_job(market, spec)
    for agent in (honest, cheat):  # one unit each, the honest one submitted (and its checks queued) first
        deadline = time.monotonic() + 60
        while not agent.work_once():
            assert time.monotonic() < deadline, "no unit to train"
            time.sleep(0.1)
    with market.rt.sessions() as s:
        plans = {u.provider: u.plan for u in s.scalars(select(Unit).where(Unit.job_id == job_id))}
        first_ids = sorted(v.id for v in s.scalars(select(Verification)))
    assert plans == {cheat.account.address: "cpu/mb2", honest.account.address: "cpu"}, plans
    assert verifier.verify_once() == "fraud"  # the cheat's unit first (its own plan), whatever the queue order
    disputed = _events(market, "segment_disputed")
    assert disputed and disputed[0]["provider"] == cheat.account.address
    assert "[cpu/mb2 bit for bit] replayed end state differs" in disputed[0]["reason"], disputed
    assert ("unbonded" not in disputed[0]["reason"]) if exact else \
        "[unbonded: the referee does not replay plan cpu/mb2 bit for bit]" in disputed[0]["reason"]
    drive(market, [cheat, honest], verifier, job_id)
    assert market.ops.stake_of(verifier.account.address) == tokens(100)  # its bond released, or none bonded
    slash = _events(market, "provider_slashed")
    if not exact:  # across plans: convicted by the scan or the bisection, or cleared (never on the verifier's back)
        assert all(e["path"] == "governance" and ("scanned" in e["reason"] or "bisected" in e["reason"])
                   for e in slash), slash
        overruled = _events(market, "false_accusation")
        assert all(not e["proven_false"] and not e["bonded"] and "cannot reproduce a replay on plan cpu/mb2"
                   in e["faith_reason"] for e in overruled), overruled
        assert slash or overruled
        return
    assert slashed(market) == {cheat.account.address} and market.ops.stake_of(cheat.account.address) == 0
    assert len(slash) == 1 and slash[0]["path"] == "fraud-proof", slash
    assert "[cpu/mb2] replayed bit for bit on the provider's own plan" in slash[0]["reason"], slash
    with market.rt.sessions() as s:
        units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
        checks = list(s.scalars(select(Verification).where(Verification.unit_id.in_([u.id for u in units]))))
    fraud = [v for v in checks if v.status == "fraud"]
    # each of the cheat's disputed segments ruled fraud (the first slashed it, bonded; the others found nothing left)
    assert fraud and {v.provider for v in fraud} == {cheat.account.address} and fraud[0].accusation is not None
    assert min(v.id for v in checks if v.provider == honest.account.address) == min(first_ids)  # queued first
    assert all(u.status == "verified" and u.provider == honest.account.address for u in units)
    passed = [v for v in checks if v.status == "passed"]
    for v in passed:  # bit for bit: the verifier's replay hash is the committed one
        u = next(u for u in units if u.id == v.unit_id)
        assert v.replayed_hash == u.proof["segments"][v.segment]["endHash"]
    assert passed


@pytest.mark.parametrize("kernels", ["ours", "other"])
def test_a_check_of_a_unit_on_an_exact_plan_waits_for_a_verifier_on_that_plan(market, tmp_path: Path,
                                                                               kernels: str) -> None:
    """A unit trained on micro-batches (cpu/mb2, an exact plan), or on the default plan with other kernels than the
    referee's: while a verifier on that plan and those kernels is around, its checks are kept for it
    (GRIDMINT_SAME_PLAN_HOLD_S) and a cpu verifier on the referee's kernels gets nothing; the one on the unit's own
    plan and kernels replays them bit for bit. Once it has not been seen for a while (or the hold has passed),
    anyone may."""
    from node.crosscheck import Plan

    market.rt.settings.canary_rate = 0.0
    plan = "cpu/mb2" if kernels == "ours" else "cpu"
    mb2 = provider(market, tmp_path, "mb2", "us-east", "0.9", plan=plan)
    cpu_verifier = staked_verifier(market, tmp_path, "cpu-verifier")
    same = staked_verifier(market, tmp_path, "mb2-verifier", plan=Plan.parse(plan))
    if kernels == "other":  # (said: these machines really compute alike, so the bits are the same)
        mb2.build = same.build = "torch-2.13.0.example/x86_64.genuineintel.avx512/aten-avx512"
        same.client.register_verifier(same.plan.label, same.build)
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    assert same.verify_once() is None  # it polls, staked: around (nothing to check yet)
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [mb2], 1)
    assert cpu_verifier.verify_once() is None  # kept for the verifier on the unit's own plan
    assert same.verify_once() == "ok"
    [done] = [v for v in _rows(market) if v.status != "pending"]
    with market.rt.sessions() as s:
        unit = s.get(Unit, done.unit_id)
        assert done.verifier == same.account.address and done.replayed_hash == \
            unit.proof["segments"][done.segment]["endHash"]  # bit for bit
    with market.rt.sessions.begin() as s:  # the cpu/mb2 verifier is gone (not seen for longer than a unit timeout)
        s.get(Verifier, same.account.address).staked_seen_at -= market.rt.settings.unit_timeout_s + 1
    assert cpu_verifier.verify_once() is not None  # checked within its tolerance, by a verifier on another plan


def test_an_unstaked_registration_on_an_exact_plan_holds_back_no_check(market, tmp_path: Path) -> None:
    """A registration needs no stake. One naming a unit's exact plan (cpu/mb2), repeated as often as it likes, held
    back every check of such units for GRIDMINT_SAME_PLAN_HOLD_S (600 s), though it could never take one: only a
    verifier whose poll for tasks found its stake enough is waited for."""
    from node.crosscheck import Plan

    market.rt.settings.canary_rate = 0.0
    mb2 = provider(market, tmp_path, "mb2", "us-east", "0.9", plan="cpu/mb2")
    cpu_verifier = staked_verifier(market, tmp_path, "cpu-verifier")
    free = VerifierAgent(market.url, market.account(), tmp_path / "free", plan=Plan.parse("cpu/mb2"))
    free.client.register_verifier(free.plan.label, free.build)
    with pytest.raises(MarketError) as err:  # it polls: refused, unstaked
        free.verify_once()
    assert err.value.status == 409 and "staked" in str(err.value.detail), err.value.detail
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    job_id = submit_job(market, spec)
    _submitted(market, job_id, [mb2], 1)
    free.client.register_verifier(free.plan.label, free.build)  # seen just now, still unstaked
    assert cpu_verifier.verify_once() is not None  # not held for it


def test_a_bf16_loss_faked_on_one_step_across_plans_is_scanned_and_slashed(market, tmp_path: Path) -> None:
    """A bf16 job on micro-batches; a cheat trains honestly there but commits one step's loss 3% lower. Its states
    are honest, so a bisection over them finds nothing, and a bf16 mean loss across plans is no evidence alone (it
    went unpunished before). The referee scans the disputed segment instead: the cheat reveals its state before every
    step, each step is replayed from it, and the faked step's loss, off the one the cheat submitted (and signed) by
    far more than one forward pass drifts, convicts: the step is named."""
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="fake-loss", plan="cpu/mb2")
    honest = provider(market, tmp_path, "honest", "us-east", "0.9", plan="cpu/mb2")
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(model=ModelSpec(d_model=32, n_layer=1, n_head=2, ctx=32), rounds=1, units_per_round=2,
                   steps_per_unit=16, segment_len=8, batch_size=8, max_price=tokens(2), precision="bf16",
                   verification="full")
    job_id = submit_job(market, spec)
    drive(market, [cheat, honest], verifier, job_id)
    slash = _events(market, "provider_slashed")
    assert slashed(market) == {cheat.account.address}, (slash, _events(market, "false_accusation"))
    assert market.ops.stake_of(cheat.account.address) == 0
    assert len(slash) == 1 and slash[0]["segment"] == 1, slash  # the middle segment of two
    reason = slash[0]["reason"]
    assert "scanned the segment's 8 steps" in reason and "step 12's loss is" in reason, reason  # 1 * 8 + 8 // 2
    assert "off the one it submitted" in reason, reason
    # every state of the segment but its two committed ends, asked of the cheat and revealed by it
    # (its honest segment 0 may be disputed too, on honest bf16 drift, and bisected: only segment 1 counts here)
    revealed = [e for e in _events(market, "state_revealed")
                if e["provider"] == cheat.account.address and e["segment"] == 1]
    assert [e["step"] for e in revealed] == list(range(9, 16)), _events(market, "state_revealed")
    # asked for all at once (one after another, each with its deadline) and ruled on once they were all in
    asks = [e for e in _events(market, "reveal_requested")
            if e["provider"] == cheat.account.address and e["segment"] == 1]
    assert [(e["step"], e["then"]) for e in asks] == [(9 + k, 6 - k) for k in range(7)], _events(market,
                                                                                              "reveal_requested")
    with market.rt.sessions() as s:
        units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
    assert all(u.status == "verified" and u.provider == honest.account.address for u in units)
    assert market.ops.stake_of(honest.account.address) > 0


def test_work_and_verifiers_on_other_kernels_are_checked_within_a_tolerance_and_bond_nothing(market,
                                                                                             tmp_path: Path) -> None:
    """The same plan replays bit for bit only on the same kernels (node.device.kernel_build). An honest provider that
    says it trains on other kernels (another CPU kind) is checked by a verifier on yet other kernels within a
    tolerance calibrated against other kernels (node.foreign), not bit for bit, and paid. That verifier's dispute of
    a cheat goes unbonded (the referee, on its own kernels, could not reproduce its replay to release a bond), and the
    cheat, on the referee's kernels, is convicted bit for bit and slashed on the governance path."""
    other = "torch-2.13.0.example/x86_64.genuineintel.avx512/aten-avx512"
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    honest.build = other
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    verifier = staked_verifier(market, tmp_path, "verifier")
    verifier.build = "torch-2.13.0.example/aarch64.arm.neon/aten-default"
    verifier.client.register_verifier(verifier.plan.label, verifier.build)
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=16, segment_len=4, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    drive(market, [cheat, honest], verifier, job_id)
    assert slashed(market) == {cheat.account.address}
    with market.rt.sessions() as s:
        units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
        assert s.get(Verifier, verifier.account.address).build == verifier.build
        checks = list(s.scalars(select(Verification).where(Verification.unit_id.in_([u.id for u in units]))))
    assert {u.build for u in units if u.status == "verified"} == {other}
    assert all(u.provider == honest.account.address for u in units if u.status == "verified")
    assert [v.provider for v in checks if v.status == "fraud"] == [cheat.account.address]
    assert all(v.status == "passed" for v in checks if v.provider == honest.account.address)
    disputed = _events(market, "segment_disputed")
    assert len(disputed) == 1 and "[cpu on other kernels on cpu]" in disputed[0]["reason"]
    assert "[unbonded: the referee computes with other kernels than this verifier]" in disputed[0]["reason"]
    assert [e["path"] for e in _events(market, "provider_slashed")] == ["governance"]
    assert market.ops.stake_of(verifier.account.address) == tokens(100)  # nothing was bonded


def test_a_node_or_verifier_on_another_gridmint_version_stops_before_any_work(market, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec hash binds the training recipe, data order and state hash (node.trainer.RECIPE); /config names the
    recipe, and a node or verifier on another one stops at start, before staking. A provider told a spec hash other
    than its own stops before training (its commitments would be refused after all that work) or answering a reveal,
    and a verifier whose hash differs from the one on a proof the marketplace accepted stops before judging (its
    replay would call honest work fraud and cost its bond): each with a VersionMismatch that says what to do, and
    nothing moves: the unit stays assigned, no verdict, no slash, stakes untouched."""
    from node import trainer

    # at start: a node or verifier whose recipe is not the marketplace's (GET /config) stops before it stakes
    assert httpx.get(market.url + "/config").json()["recipe"] == trainer.RECIPE
    old_node = market.account(gmt=tokens(500))
    cfg = AgentConfig(marketplace=market.url, chain_url="", region="us-east", price=tokens("0.9"), stake=tokens(200))
    outdated = ProviderAgent(cfg, old_node, tmp_path / "old", contracts=market.contracts(old_node))
    old_verifier = VerifierAgent(market.url, market.account(gmt=tokens(100)), tmp_path / "old-v")
    monkeypatch.setattr(trainer, "RECIPE", trainer.RECIPE.replace("blake3-state-v3", "sha256-state-v2"))
    with pytest.raises(VersionMismatch, match=r"recipe is .*blake3-state-v3, this node's .*sha256-state-v2"):
        outdated.setup()
    with pytest.raises(VersionMismatch, match="different GridMint versions"):
        old_verifier.keep_staked("", tokens(100), contracts=market.contracts(old_verifier.account))
    assert market.ops.stake_state(old_node.address).staked == 0
    assert market.ops.stake_state(old_verifier.account.address).staked == 0
    monkeypatch.undo()

    p = provider(market, tmp_path, "p", "us-east", "0.9")
    v = staked_verifier(market, tmp_path, "v")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    trained: list[str] = []
    train = p.trainer
    p.trainer = lambda sp, *a: trained.append(sp.unit_id) or train(sp, *a)  # type: ignore[method-assign]
    next_work = p.client.next_work

    handed: list[dict] = []

    def from_another_version() -> dict | None:  # the marketplace's own answer, as a marketplace on another recipe says it
        work = next_work()
        handed.extend([work] if work else [])
        return None if work is None else {**work, "spec_hash": "0x" + "ab" * 32}

    p.client.next_work = from_another_version  # type: ignore[method-assign]
    with pytest.raises(VersionMismatch, match="different GridMint versions; install the marketplace's version"):
        p.work_once()
    assert trained == [] and _assigned(market, job_id) == 1
    # nor does it answer a referee's reveal on another version: a state re-derived so would not chain to its proof
    ask = {"verification_id": 1, "unit_id": "0x" + "00" * 32, "segment": 0, "step": 1, "spec": handed[0]["spec"],
           "spec_hash": "0x" + "ab" * 32, "plan": "cpu", "checkpoint_blob": handed[0]["start_blob"], "deadline": 0}
    with pytest.raises(VersionMismatch, match="different GridMint versions"):
        p.answer(ask)
    p.client.next_work = next_work  # type: ignore[method-assign]
    assert p.work_once() and trained  # the same node on the marketplace's version: trained and submitted
    with market.rt.sessions() as s:
        unit = s.scalars(select(Unit).where(Unit.job_id == job_id)).one()
        assert unit.status == "submitted"
    # the verifier is another version: its recipe (so its spec hashes) differs from the marketplace's
    monkeypatch.setattr(trainer, "RECIPE", trainer.RECIPE.replace("blake3-state-v3", "sha256-state-v2"))
    with pytest.raises(VersionMismatch, match=r"recipe .*sha256-state-v2\): they run different GridMint versions"):
        v.verify_once()
    with market.rt.sessions() as s:
        assert [c.status for c in s.scalars(select(Verification).where(Verification.verifier == v.account.address))
                ] == ["assigned"]  # handed out, no verdict: it goes to another verifier when its time runs out
    assert slashed(market) == set() and _events(market, "false_accusation") == []
    assert market.ops.stake_state(v.account.address).staked == tokens(100)
    assert market.ops.stake_state(p.account.address).staked == tokens(200)


def _an_honest_drift_disputed(  # type: ignore[no-untyped-def]
        market, tmp_path: Path, monkeypatch) -> tuple[ProviderAgent, Any, dict[str, Any]]:
    """An honest provider on cpu/mb2 whose segment drifts past a tight calibration (test_referee's), disputed with a
    bond by an honest verifier on the referee's plan; the referee has asked the provider for a state: (provider,
    verifier, the ask)."""
    from test_referee import DRIFTING_JOB, DRIFTING_SPEC, drift_past_tolerance  # this directory is on sys.path

    from node import crosscheck

    monkeypatch.setattr(crosscheck, "tolerance_for", drift_past_tolerance())
    honest = provider(market, tmp_path, "honest", "us-east", "0.9", plan="cpu/mb2")
    verifier = staked_verifier(market, tmp_path, "verifier")
    _submitted(market, submit_job(market, DRIFTING_SPEC, job_id=DRIFTING_JOB), [honest], 1)
    verdicts: list[str | None] = []
    while "fraud" not in verdicts:
        verdicts.append(verifier.verify_once())
    ask = market.wait(lambda: honest.client.next_reveal(), what="the referee asking for a state")
    return honest, verifier, ask


def test_a_verifier_that_registers_anew_during_a_bisection_is_judged_as_it_replayed(market, tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """An honest, bonded dispute on the referee's plan (as above); while the referee bisects, the verifier's host
    upgrades torch and its agent registers again with other kernels: the referee judges the replay the verifier
    signed, made with the kernels it had then, and releases the bond (a review found it judged the new registration:
    "cannot reproduce a replay on other kernels", the bond forfeit)."""
    honest, verifier, _ = _an_honest_drift_disputed(market, tmp_path, monkeypatch)
    verifier.client.register_verifier(verifier.plan.label, verifier.build + "-upgraded")

    def ruled() -> list[dict[str, Any]]:
        honest.reveal_once()
        return _events(market, "false_accusation")

    wrong = market.wait(ruled, timeout=240, what="the dispute ruled")
    assert slashed(market) == set() and len(wrong) == 1 and wrong[0]["bonded"]
    assert wrong[0]["good_faith"] and wrong[0]["bond_lost"] == "0", wrong[0]
    assert market.ops.stake_of(verifier.account.address) == tokens(100)


def test_a_reveal_that_arrived_in_time_is_not_taken_for_silence_while_it_is_checked(market, tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """The state asked of a provider reaches the marketplace before its deadline, and its checks (read, hash, load)
    outlast the deadline: the sweep and the referee, run meanwhile, do not convict the provider for silence; the
    reveal is stored and the bisection goes on (a review found the provider slashed with its reveal answered
    "revealed")."""
    from marketplace import checking, service

    market.rt.settings.reveal_timeout_s = 8
    honest, _, ask = _an_honest_drift_disputed(market, tmp_path, monkeypatch)
    real = checking.check_uploaded_state
    ruled_meanwhile: list[str] = []

    def slow(spec, tensors, what):  # type: ignore[no-untyped-def]
        if "revealed" in what and not ruled_meanwhile:
            while int(time.time()) <= ask["deadline"]:
                time.sleep(0.1)
            service.reap(market.rt)  # the periodic sweep, past the deadline
            ruled_meanwhile.append(checking.adjudicate(market.rt, ask["verification_id"]))  # and the referee
        return real(spec, tensors, what)

    monkeypatch.setattr(checking, "check_uploaded_state", slow)
    body = honest.answer(ask)
    assert time.time() < ask["deadline"]
    assert honest.client.reveal(body) == {"status": "revealed"}
    assert ruled_meanwhile == ["bisecting"] and slashed(market) == set()
    with market.rt.sessions() as s:
        task = s.get(Verification, ask["verification_id"])
        assert task is not None and str(ask["step"]) in task.bisect["reveals"] and "receiving" not in task.bisect
