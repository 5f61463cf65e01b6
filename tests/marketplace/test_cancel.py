"""A customer's cancel on chain (JobEscrow.cancel), followed by the marketplace: against the real contracts on the
in-process EVM and a real database (SQLite and PostgreSQL), through the service's own steps (create_job, sweep,
advance, heartbeat, settle_job) with the Celery queue recorded instead of run.

The rule under test (marketplace.cancellation): units verified by the time the marketplace sees the cancel are paid
into the payout pool within the grace, every other unit is cancelled and its provider stopped, the rest of the escrow
is the customer's close; when it is too late the job still ends (``cancelled``) with its unpaid work on record, and
nothing is retried forever."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from eth_utils import keccak
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from ledger.errors import PausedError
from ledger.escrow_ops import JobState
from marketplace import cancellation, checking, service, settlement
from marketplace.app import create_app
from marketplace.common import Conflict, model_config, unit_id_for
from marketplace.db import Event, Job, LedgerEntry, PayoutEpoch, Provider, Unit, Verification
from node.model import init_state
from protocol.jobs import RANDOM_BYTES, new_job_id
from protocol.money import tokens
from protocol.schemas import Heartbeat, JobSpec
from protocol.signing import sign_request
from tests.marketplace.test_settlement import World, make_world

GRACE = 3600  # ledger.deploy's default cancel_grace_s, which make_world deploys with
PRICE = tokens(2)  # the spec's max_price: what each unit is paid here


@pytest.fixture()
def world(tmp_path: Path, db_url: str) -> World:
    return make_world(tmp_path, db_url)


def _spec(rounds: int = 1, units: int = 5) -> JobSpec:
    return JobSpec(rounds=rounds, units_per_round=units, steps_per_unit=10, segment_len=5, max_price=PRICE)


def _job(w: World, name: str, spec: JobSpec) -> str:
    """Fund ``spec``'s budget on chain and submit it (service.create_job, as POST /jobs does)."""
    job_id = new_job_id(w.customer.address, keccak(text=name)[:RANDOM_BYTES])
    w.customer.fund_job(job_id, spec.budget())
    service.create_job(w.rt, w.customer.address, job_id, spec)
    return job_id


def _provider(s: Session, address: str) -> None:
    if s.get(Provider, address) is None:
        s.add(Provider(address=address, region="eu-north", gpu="test", vram_mb=8000, price=PRICE, tokens_per_s=1000,
                       capacity=2, stake=tokens(100)))


def _midway(w: World, job_id: str) -> dict[str, str]:
    """Round 0 of ``job_id`` midway: shards 0 and 1 verified (provider 0 and 1 owed their price), shard 2 being
    trained by provider 2, shard 3 submitted by provider 0 with one check pending, one out with a verifier and one
    disputed, shard 4 still pending. Returns the unit ids by name."""
    ids = {name: unit_id_for(job_id, 0, shard)
           for shard, name in enumerate(["paid0", "paid1", "training", "submitted", "pending"])}
    p = [a.address for a in w.providers]
    now = int(time.time())
    with w.rt.sessions.begin() as s:
        for a in p[:3]:
            _provider(s, a)
        s.flush()
        for name, who in (("paid0", 0), ("paid1", 1)):
            u = s.get(Unit, ids[name])
            u.status, u.provider, u.price = "verified", p[who], PRICE
            s.add(LedgerEntry(job_id=job_id, unit_id=u.id, provider=p[who], amount=PRICE))
        u = s.get(Unit, ids["training"])
        u.status, u.provider, u.price, u.assigned_at, u.deadline_at = "assigned", p[2], PRICE, now, now + 3600
        u = s.get(Unit, ids["submitted"])
        u.status, u.provider, u.price = "submitted", p[0], PRICE
        for seg, status in enumerate(["pending", "assigned", "disputed"]):
            s.add(Verification(unit_id=u.id, provider=p[0], segment=seg, status=status,
                               verifier=None if status == "pending" else p[1]))
    return ids


def _units(w: World, job_id: str) -> dict[str, str]:
    with w.rt.sessions() as s:
        return {u.id: u.status for u in s.scalars(select(Unit).where(Unit.job_id == job_id))}


def _job_row(w: World, job_id: str) -> Job:
    with w.rt.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _entries(w: World, job_id: str) -> list[LedgerEntry]:
    with w.rt.sessions() as s:
        return list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id)))


def _events(w: World, job_id: str, kind: str) -> list[dict[str, Any]]:
    with w.rt.sessions() as s:
        return [e.data for e in s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == kind))]


# ---------------------------------------------------------------- the pure rule


def test_escrow_stop_names_a_cancel_or_a_close_and_nothing_else() -> None:
    customer, nobody = "0x" + "12" * 20, "0x" + "00" * 20
    assert cancellation.escrow_stop(JobState(customer, 10, 0, False, 10)) is None
    assert "cancelled" in (cancellation.escrow_stop(JobState(customer, 10, 2, False, 8, 1_700_000_000)) or "")
    assert "1700000000" in (cancellation.escrow_stop(JobState(customer, 10, 2, False, 8, 1_700_000_000)) or "")
    assert "closed" in (cancellation.escrow_stop(JobState(customer, 10, 10, True, 0)) or "")
    assert cancellation.escrow_stop(JobState(nobody, 0, 0, False, 0)) is None  # never funded: not this rule's


def test_the_sweep_reads_many_escrows_per_chain_call_and_agrees_with_reading_each(world: World,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep read every running job's escrow with one chain call each (at scale, thousands a minute against a
    remote node); GridLens reads a thousand per call. Both ways give the same states: funded, cancelled (with the
    deadline in force), closed, never funded."""
    from dataclasses import replace as replaced

    from ledger import escrow_ops
    from ledger.evm import GridMintContracts

    w = world
    ids = [new_job_id(w.customer.address, keccak(text=f"lens-{i}")[:RANDOM_BYTES]) for i in range(5)]
    for job_id in ids[:4]:
        w.customer.fund_job(job_id, tokens(1))
    w.customer.cancel_job(ids[1])
    w.ops.close_job(ids[2])  # done and closed by the operator
    w.customer.cancel_job(ids[3])
    w.ops.pause_all()  # paused time pushes a cancel's deadline back: the lens reports the one in force
    w.chain.advance_time(100)
    each = {j: (st.closed, st.closable_at) for j in ids for st in [w.ops.get_job(j)]}
    assert each[ids[0]] == (False, 0) and each[ids[1]][1] > 0 and each[ids[2]] == (True, 0) and each[ids[4]] == (False, 0)
    calls: list[str] = []
    real_call = type(w.ops)._call
    monkeypatch.setattr(type(w.ops), "_call", lambda self, c, fn, *a: calls.append(fn) or real_call(self, c, fn, *a))
    monkeypatch.setattr(escrow_ops, "LENS_JOBS_PER_CALL", 2)
    assert w.ops.deployment.lens is not None and w.ops.escrow_states(ids) == each
    assert calls.count("read") == 3 and "getJob" not in calls  # 5 jobs, 2 per call
    calls.clear()
    without = GridMintContracts(w.chain, replaced(w.ops.deployment, lens=None), w.ops.account)
    assert without.escrow_states(ids) == each and calls.count("getJob") == 5  # a deployment from before the lens
    w.ops.unpause_all()


# ---------------------------------------------------------------- create_job


def test_the_same_job_submitted_twice_at_once_is_a_409_not_a_500(world: World,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two submissions of one job id at once: both read "no such job", one inserts it, the other's insert broke
    the unique key (IntegrityError: a 500). The loser now gets the Conflict a later duplicate gets."""
    w = world
    job_id = _job(w, "twice", _spec())
    real_get = Session.get
    monkeypatch.setattr(Session, "get", lambda self, entity, ident, **kw: None if entity is Job
                        else real_get(self, entity, ident, **kw))  # its check ran before the other committed
    with pytest.raises(Conflict, match="already exists"):
        service.create_job(w.rt, w.customer.address, job_id, _spec())
    monkeypatch.undo()
    assert _job_row(w, job_id).status == "running" and len(_units(w, job_id)) == 5


def test_a_job_on_an_escrow_whose_cancel_is_pending_is_refused_with_409(world: World) -> None:
    """The reviewer's first step: fund, cancel on chain, then POST /jobs. It used to be accepted (and run to
    nothing). Now 409, saying why and what to do; no job is created."""
    spec = _spec(units=2)
    job_id = new_job_id(world.customer.address)
    world.customer.fund_job(job_id, spec.budget())
    closable_at = world.customer.cancel_job(job_id)
    with pytest.raises(Conflict, match=f"cancelled on chain: it pays no work after {closable_at}"):
        service.create_job(world.rt, world.customer.address, job_id, spec)
    body = json.dumps({"job_id": job_id, "spec": spec.model_dump(mode="json")}).encode()
    headers = sign_request(world.customer.account, world.rt.domain, "POST", "/jobs", body, time.time_ns() // 1000,
                           int(time.time()) + 60)
    r = TestClient(create_app(world.rt)).post("/jobs", content=body, headers={**headers,
                                                                                 "content-type": "application/json"})
    assert r.status_code == 409 and "was cancelled on chain" in r.json()["detail"] and "fund a new job id" in r.text
    with world.rt.sessions() as s:
        assert s.get(Job, job_id) is None


# ---------------------------------------------------------------- stop and settle within the grace


def test_a_cancel_stops_the_job_pays_what_was_verified_and_leaves_the_rest_to_the_customer(world: World) -> None:
    w = world
    spec = _spec()
    job_id = _job(w, "midway", spec)
    ids = _midway(w, job_id)
    assert service.sweep(w.rt)["cancelled"] == 0  # not cancelled: the sweep leaves it running
    assert _job_row(w, job_id).status == "running"
    w.customer.cancel_job(job_id)
    w.queued.clear()
    got = service.sweep(w.rt)
    assert got["cancelled"] == 1 and got["settle"] == 0  # settled once, queued by the stop itself
    assert [q for q in w.queued if q[0] != "gridmint.adjudicate"] == [("gridmint.settle", [job_id])]
    assert _job_row(w, job_id).status == "cancelling"
    assert _units(w, job_id) == {ids["paid0"]: "verified", ids["paid1"]: "verified", ids["training"]: "cancelled",
                                 ids["submitted"]: "cancelled", ids["pending"]: "cancelled"}
    with w.rt.sessions() as s:
        checks = [v.status for v in s.scalars(select(Verification).order_by(Verification.segment))]
    assert checks == ["void", "void", "disputed"]  # no replay of unpaid work; an open dispute is still ruled on
    [stop] = _events(w, job_id, "job_cancelled")
    assert stop["verified_units"] == 2 and stop["cancelled_units"] == 3
    assert stop["stopped_training"] == {ids["training"]: w.providers[2].address}

    # the provider training a cancelled unit is told at its next heartbeat (409: the agent stops at its next step)
    with pytest.raises(Conflict, match="not assigned"):
        service.heartbeat(w.rt, w.providers[2].address, Heartbeat(unit_id=ids["training"], steps_done=3))
    assert service.run_matching(w.rt) == []  # nothing left to hand out
    # provider 0 stays "unverified" while the dispute over its cancelled unit may still ask it to reveal a state
    api = TestClient(create_app(w.rt))
    assert api.get(f"/providers/{w.providers[0].address}").json()["unverified"] == 1

    before = w.ops.balance_of(w.customer.address)
    refund = settlement.settle_job(w.rt, job_id)
    assert refund == spec.budget() - 2 * PRICE
    assert w.ops.total_deposited() == 2 * PRICE  # the verified pay is in the payout pool
    assert all(e.released and e.batch for e in _entries(w, job_id))
    escrow = w.ops.get_job(job_id)
    assert not escrow.closed and escrow.released == 2 * PRICE  # the rest waits for the customer's close
    job = _job_row(w, job_id)
    assert (job.status, job.refund) == ("cancelled", refund)
    [settled] = _events(w, job_id, "job_cancel_settled")
    assert settled["paid"] == str(2 * PRICE) and settled["escrow_closed"] is False and "unpaid" not in settled
    assert ("gridmint.epoch", []) in w.queued
    view = api.get(f"/jobs/{job_id}").json()
    assert view["status"] == "cancelled" and view["refund"] == str(refund)
    assert 'http-equiv="refresh"' not in api.get(f"/web/jobs/{job_id}").text  # a final state: the page stops

    # the providers are paid through the epoch root; the customer closes after the grace and gets the rest
    assert settlement.post_epoch(w.rt) == 1
    assert w.as_provider(1).claim_from_tree(1, settlement.tree_of(_epoch_row(w, 1))) == PRICE
    w.chain.advance_time(GRACE)
    assert w.customer.close_job(job_id) == refund
    assert w.ops.balance_of(w.customer.address) == before + refund
    # settled for good: a later sweep queues nothing for it
    w.queued.clear()
    assert service.sweep(w.rt) == {"adjudicate": 1, "punish_verifier": 0, "advance": 0, "settle": 0, "cancelled": 0,
                                   "stock_canaries": 0, "audit_check": 0,
                                   "slashes_paid": 0}
    assert all(name != "gridmint.settle" for name, _ in w.queued)


def test_checks_that_passed_on_a_unit_the_cancel_stopped_are_paid_their_fees(world: World) -> None:
    """The verifier did the replay the customer's level asked for; only the unit's other checks were left when the
    customer cancelled. Its fee is credited at the stop (once) and paid with the cancel's settlement, not refunded;
    a check a benched verifier passed (a canary caught it approving blind) and a canary earn nothing."""
    from marketplace.db import Verifier

    w = world
    spec = _spec()
    job_id = _job(w, "fees", spec)
    ids = _midway(w, job_id)
    careful, lazy = w.providers[1].address, w.providers[2].address  # two wallets acting as verifiers here
    with w.rt.sessions.begin() as s:
        s.add(Verifier(address=careful))
        s.add(Verifier(address=lazy, status="benched", benched_for="it approved a planted known-bad segment"))
        u = s.get(Unit, ids["submitted"])
        u.segment_blobs = ["a" * 64, "b" * 64]  # two segments: a check's fee is half the unit's price
        s.add(Verification(unit_id=u.id, provider=u.provider, segment=0, status="passed", verifier=careful))
        s.add(Verification(unit_id=u.id, provider=u.provider, segment=1, status="passed", verifier=lazy))
        s.add(Verification(unit_id=u.id, provider=u.provider, segment=1, status="passed", verifier=careful,
                           canary={"held": None}))
        s.flush()
        paid_check = s.scalar(select(Verification.id).where(Verification.verifier == careful,
                                                            Verification.status == "passed",
                                                            Verification.canary.is_(None)))
    w.customer.cancel_job(job_id)
    assert service.sweep(w.rt)["cancelled"] == 1
    fee = PRICE // 2
    [stop] = _events(w, job_id, "job_cancelled")
    assert stop["check_fees"] == {str(paid_check): str(fee)}
    entries = _entries(w, job_id)
    assert [(e.provider, e.amount, e.verification_id) for e in entries if e.verification_id is not None] == \
        [(careful, fee, paid_check)]
    assert not cancellation.stop_in(w.rt.sessions(), job_id, "again", 1)  # stopped once: credited once
    refund = settlement.settle_job(w.rt, job_id)
    assert refund == spec.budget() - 2 * PRICE - fee
    assert w.ops.get_job(job_id).released == 2 * PRICE + fee == w.ops.total_deposited()
    assert settlement.post_epoch(w.rt) == 1
    tree = settlement.tree_of(_epoch_row(w, 1))
    assert w.as_provider(1).claim_from_tree(1, tree) == PRICE + fee  # its own verified unit's pay and the fee


def _epoch_row(w: World, n: int) -> PayoutEpoch:
    with w.rt.sessions() as s:
        row = s.get(PayoutEpoch, n)
        assert row is not None
        return row


def test_a_crash_mid_cancel_settlement_is_finished_by_the_retry_and_pays_once(world: World) -> None:
    """The settle task dies after its releaseToPool went through and before the ledger recorded it, and is lost;
    the marketplace then stays away past the grace. The sweep queues it again, and the retry finds the batch on
    chain: it records it as paid (not as unpaid: the money did move), sends nothing, and the job ends cancelled."""
    w = world
    job_id = _job(w, "crash", _spec())
    ids = _midway(w, job_id)
    w.customer.cancel_job(job_id)
    service.sweep(w.rt)
    batch = settlement.batch_id_for(job_id, [ids["paid0"], ids["paid1"]])
    assert w.ops.release_to_pool(job_id, batch, 2 * PRICE)  # the crashed run's transaction
    w.chain.advance_time(GRACE + 60)  # from now on the escrow refuses any new release
    w.queued.clear()
    assert service.sweep(w.rt)["settle"] == 1 and ("gridmint.settle", [job_id]) in w.queued
    refund = settlement.settle_job(w.rt, job_id)
    assert w.ops.total_deposited() == 2 * PRICE and w.ops.get_job(job_id).released == 2 * PRICE  # not twice
    assert all(e.released and e.batch == batch for e in _entries(w, job_id))
    assert _job_row(w, job_id).status == "cancelled" and _events(w, job_id, "cancel_unpaid") == []
    # a re-run of the task (acks_late redelivery) moves nothing
    assert settlement.settle_job(w.rt, job_id) == refund
    assert w.ops.total_deposited() == 2 * PRICE
    assert w.customer.close_job(job_id) == refund == _spec().budget() - 2 * PRICE


def test_a_verdict_that_races_the_stop_credits_nothing(world: World) -> None:
    """A verifier's last pass lands on a unit its job's stop has just cancelled (the verdict's transaction read the
    unit before the stop committed): the unit stays cancelled and no ledger entry is written."""
    w = world
    job_id = _job(w, "race", _spec())
    ids = _midway(w, job_id)
    with w.rt.sessions.begin() as s:
        for v in s.scalars(select(Verification).where(Verification.unit_id == ids["submitted"])):
            v.status = "passed"  # every check of the unit passed: the next verdict's transaction will credit it
    w.customer.cancel_job(job_id)
    with w.rt.sessions.begin() as s:
        unit = s.get(Unit, ids["submitted"])  # the verdict's transaction reads the unit: still submitted
        assert unit is not None and unit.status == "submitted"
        with w.rt.sessions.begin() as other:  # meanwhile the sweep stops the job
            assert cancellation.stop_in(other, job_id, "cancelled on chain", 1)
        checking.maybe_verified(s, unit)
        assert unit.status != "verified"  # the session's copy does not pretend either
    assert _units(w, job_id)[ids["submitted"]] == "cancelled"
    assert [e.unit_id for e in _entries(w, job_id)] == [ids["paid0"], ids["paid1"]]


# ---------------------------------------------------------------- too late: the grace is over


@pytest.mark.parametrize("customer_closed", [False, True], ids=["grace-over", "customer-closed"])
def test_a_job_whose_escrow_refuses_for_good_ends_cancelled_with_its_unpaid_work_recorded(
    world: World, customer_closed: bool
) -> None:
    """The reviewer's repro: the job ran on after the cancel, its units were verified, and it was settled only after
    the grace (and maybe after the customer's close, which refunded everything). settle_job used to raise
    EscrowJobCancelled / EscrowJobClosed on every retry and the sweep re-queued it every minute, forever. Now the job
    ends 'cancelled', a cancel_unpaid event lists the verified entries left unpaid, and nothing is retried."""
    w = world
    job_id = w.fund_done_job("late", [(0, PRICE), (1, PRICE)], budget=2 * PRICE)
    w.customer.cancel_job(job_id)
    w.chain.advance_time(GRACE + 1)  # training took longer than the grace
    if customer_closed:
        assert w.customer.close_job(job_id) == 2 * PRICE  # the whole budget back
    refund = settlement.settle_job(w.rt, job_id)
    assert refund == 2 * PRICE and w.ops.total_deposited() == 0
    job = _job_row(w, job_id)
    assert (job.status, job.refund) == ("cancelled", 2 * PRICE)
    [unpaid] = _events(w, job_id, "cancel_unpaid")
    assert unpaid["unpaid"] == str(2 * PRICE) and unpaid["escrow_closed"] is customer_closed
    assert unpaid["reason"].count("EscrowJobClosed" if customer_closed else "EscrowJobCancelled") == 1
    assert sorted(e["provider"] for e in unpaid["entries"]) == sorted(p.address for p in w.providers[:2])
    assert all(not e.released for e in _entries(w, job_id))  # on record as unpaid, not pretended paid
    w.queued.clear()
    assert service.sweep(w.rt)["settle"] == 0 and w.queued == []
    assert settlement.settle_job(w.rt, job_id) == refund  # a stray retry returns at once, sending nothing
    if not customer_closed:
        assert w.customer.close_job(job_id) == 2 * PRICE


def test_a_cancel_the_marketplace_sees_only_after_the_customer_closed_still_ends_the_job(world: World) -> None:
    """The marketplace was away for the whole grace and the customer closed meanwhile: the next sweep stops the job
    and its settlement ends it 'cancelled' with its verified pay on record as unpaid."""
    w = world
    job_id = _job(w, "away", _spec())
    _midway(w, job_id)
    w.customer.cancel_job(job_id)
    w.chain.advance_time(GRACE + 1)
    assert w.customer.close_job(job_id) == _spec().budget()
    assert service.sweep(w.rt)["cancelled"] == 1
    settlement.settle_job(w.rt, job_id)
    assert _job_row(w, job_id).status == "cancelled"
    [unpaid] = _events(w, job_id, "cancel_unpaid")
    assert unpaid["unpaid"] == str(2 * PRICE) and len(unpaid["entries"]) == 2


# ---------------------------------------------------------------- a pause, a new round


def test_a_kill_switch_pause_across_the_nominal_grace_does_not_cost_the_providers_their_pay(world: World) -> None:
    """Cancel, the guardian pauses everything before the marketplace settles (its settle task fails: the task retries
    and the sweep re-queues it), the unpause lands after the nominal end of the grace. The escrow's deadline moved
    back by the time paused, so the retried settlement still pays the verified units."""
    w = world
    job_id = _job(w, "paused", _spec())
    _midway(w, job_id)
    closable_at = w.customer.cancel_job(job_id)
    w.chain.advance_time(60)
    w.ops.pause_all()
    assert service.sweep(w.rt)["cancelled"] == 1  # reads work while paused; the stop is the marketplace's own
    with pytest.raises(PausedError, match="EnforcedPause"):
        settlement.settle_job(w.rt, job_id)
    assert _job_row(w, job_id).status == "cancelling"
    w.chain.advance_time(GRACE)
    assert w.ops.unpause_all() is not None  # the timelock's delay is 0 here: executed at once
    assert w.chain.timestamp() > closable_at  # past the nominal grace ...
    assert w.ops.get_job(job_id).closable_at > w.chain.timestamp()  # ... not past the deadline in force
    w.queued.clear()
    assert service.sweep(w.rt)["settle"] == 1
    settlement.settle_job(w.rt, job_id)
    assert w.ops.total_deposited() == 2 * PRICE and _job_row(w, job_id).status == "cancelled"
    assert _events(w, job_id, "cancel_unpaid") == []


def test_a_pause_of_the_payout_distributor_alone_does_not_cost_the_providers_their_pay(world: World) -> None:
    """The guardian pauses payouts only (claims on a bad root, say) while a cancelled job settles. releaseToPool
    deposits into the distributor; when a paused distributor refused deposits, the escrow's grace (which counts
    only the escrow's paused time) ran out meanwhile and the verified pay went back to the customer. Deposits stay
    open: the pay reaches the pool inside the grace, and only its claim waits for the unpause."""
    w = world
    job_id = _job(w, "pp", _spec())
    _midway(w, job_id)  # 2 units verified (2 x PRICE owed), 3 not
    w.customer.cancel_job(job_id)
    assert service.sweep(w.rt)["cancelled"] == 1
    w.ops._send(w.ops.distributor, "pause")  # noqa: SLF001 - the operator is the distributor's guardian too
    assert w.ops.paused()["distributor"] and not w.ops.paused()["escrow"]
    refund = settlement.settle_job(w.rt, job_id)
    assert w.ops.total_deposited() == 2 * PRICE and refund == _spec().budget() - 2 * PRICE
    assert _job_row(w, job_id).status == "cancelled" and _events(w, job_id, "cancel_unpaid") == []
    w.chain.advance_time(GRACE + 1)
    assert w.customer.close_job(job_id) == refund  # the customer gets the rest, not the providers' pay
    with pytest.raises(PausedError):
        settlement.post_epoch(w.rt)  # roots and claims wait for the unpause
    w.ops.unpause_all()
    assert settlement.post_epoch(w.rt) == 1


def test_a_round_finished_after_the_cancel_opens_no_new_round(world: World) -> None:
    """advance reads the escrow before it opens a round: the finished round is still averaged into the customer's
    model and paid, no unit of the next round is created, and the job goes to its settlement."""
    w = world
    spec = _spec(rounds=2, units=2)
    job_id = _job(w, "rounds", spec)
    final = w.rt.blobs.put_tensors(init_state(model_config(spec), spec.seed + 1), {"kind": "test"})
    with w.rt.sessions.begin() as s:
        for u in s.scalars(select(Unit).where(Unit.job_id == job_id)):
            u.status, u.provider, u.price, u.final_blob = "verified", w.providers[0].address, PRICE, final
            s.add(LedgerEntry(job_id=job_id, unit_id=u.id, provider=w.providers[0].address, amount=PRICE))
    blob = _job_row(w, job_id).global_blob
    w.customer.cancel_job(job_id)
    w.queued.clear()
    assert service.advance(w.rt, job_id) == "cancelling"
    job = _job_row(w, job_id)
    assert job.round == 0 and job.global_blob != blob and len(job.eval_losses) == 2
    assert set(_units(w, job_id).values()) == {"verified"} and len(_units(w, job_id)) == 2
    assert w.queued == [("gridmint.settle", [job_id])]
    assert settlement.settle_job(w.rt, job_id) == spec.budget() - 2 * PRICE
    assert w.ops.total_deposited() == 2 * PRICE
