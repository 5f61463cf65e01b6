"""The referee's audits of passed checks (marketplace.checking.audit_check): a verifier colluding with the provider
tells a canary apart (the provider knows every true state), but not an audited pass from another. Over real HTTP, a
real Celery worker on Redis and the in-process EVM."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from marketplace import checking, service
from marketplace.db import Job, LedgerEntry, Unit, Verifier
from node import crosscheck
from node.crosscheck import Plan
from protocol import verification as vp
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.chainless import chainless_runtime
# (_rows lists canaries too: the market fixture plants none unless a test asks, and these do not)
from tests.marketplace.test_flow import (FIXED_CUSTOMER, _events, _handed_in, _rows, drive, fixed_job_id, job_status,
                                        provider, slashed, staked_verifier, submit_job)

#: one unit of two segments; the standard level checks one of them
ONE_UNIT = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))


def test_a_colluding_verifiers_pass_of_a_cheat_is_audited_and_costs_both_their_whole_stakes(market,
                                                                                            tmp_path: Path) -> None:
    """A provider skipping half its steps and a verifier passing whatever it is handed (its friend's work: no canary
    is planted here, as none would be on a colluder who tells them apart). The referee audits the pass: the claim
    does not replay, so the provider loses its whole stake and the verifier, which replayed on the unit's own plan
    (its pass asserted the bits the referee did not get), its own, both to the treasury; no bounty, no fee, no
    pay. The unit goes to an honest provider, whose audited check passes, and the job settles."""
    market.rt.settings.audit_rate = 1.0
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    friend = staked_verifier(market, tmp_path, "friend", approve_everything=True)
    treasury = market.deployment.treasury
    supply_before = market.ops.total_supply()
    job_id = submit_job(market, ONE_UNIT)
    [unit_id] = _handed_in(market, job_id, [cheat], 1)
    assert friend.verify_once() == "ok"  # the answer it gets is the one any pass gets
    [check] = _rows(market, unit_id=unit_id)
    market.wait(lambda: _rows(market, id=check.id)[0].status == "audit_failed", what="audited")
    assert slashed(market) == {cheat.account.address}
    assert market.ops.stake_state(cheat.account.address).staked == 0
    assert market.ops.stake_state(friend.account.address).staked == 0
    assert market.ops.balance_of(treasury) == tokens(200) + tokens(100)  # the whole of both stakes
    assert market.ops.balance_of(friend.account.address) == 0  # no bounty for a pass
    with market.rt.sessions() as s:
        ver = s.get(Verifier, friend.account.address)
        assert ver.status == "benched" and f"(verification {check.id})" in ver.benched_for and ver.wrong == 1
        unit = s.get(Unit, unit_id)
        assert unit.status == "pending" and cheat.account.address in unit.excluded
    [event] = _events(market, "provider_slashed")
    assert event["path"] == "audit" and event["amount"] == str(tokens(200))
    assert _events(market, "verifier_slashed")[0]["amount"] == str(tokens(100))
    # a duplicate of the step (the sweep sent it again) does nothing twice
    assert checking.audit_check(market.rt, check.id) == "audit_failed"
    assert market.ops.balance_of(treasury) == tokens(300) and len(_events(market, "provider_slashed")) == 1

    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    careful = staked_verifier(market, tmp_path, "careful")
    drive(market, [cheat, honest], careful, job_id)
    redone = [v for v in _rows(market, unit_id=unit_id) if v.id != check.id]
    assert [v.status for v in redone] == ["passed"] and redone[0].provider == honest.account.address
    assert _events(market, "audit_passed")  # the honest pass was audited too, and held
    with market.rt.sessions() as s:
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id)))
    # the honest provider's pay and the careful verifier's fee; nothing to the cheat or its friend
    assert {e.provider for e in entries} == {honest.account.address, careful.account.address}
    assert market.ops.total_supply() == supply_before


def test_a_pass_waits_for_its_audit_before_the_unit_is_paid_and_a_lost_audit_is_sent_again(market, tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """An honest pass drawn for an audit: the unit is not paid while the referee has not replayed it (the job's page
    says so); an audit whose send was lost (a broker away) is sent again by the sweep once ``AUDIT_LOST_S`` passed;
    the referee's replay holds, the check passes, the unit is paid, the verifier earns its fee. The draw is at the
    odds checking.audit_odds gives (here made 1)."""
    market.rt.settings.audit_rate = 0.001
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    odds, asked = checking.audit_odds, []
    monkeypatch.setattr(checking, "audit_odds", lambda *a: asked.append(odds(*a)) or 1.0)
    send, lost = market.rt.enqueue, []
    monkeypatch.setattr(market.rt, "enqueue", lambda name, args, queue=None: lost.append(args)
                        if name == "gridmint.audit_check" else send(name, args, queue))
    job_id = submit_job(market, ONE_UNIT)
    [unit_id] = _handed_in(market, job_id, [honest], 1)
    assert verifier.verify_once() == "ok"
    [check] = _rows(market, unit_id=unit_id)
    # what it read: the provider's first verdict, from the only verifier, on a plan of one provider (counted as
    # AUDIT_PEERS providers' work: a thin market's odds, 0.39 of the way to AUDIT_PEERS x the base on the first)
    assert check.status == "auditing" and lost == [[check.id]] and asked == [vp.audit_rate(0.001, 1, 1, 1, 1, 1, 1)]
    assert 0.004 < asked[0] < 0.005
    with market.rt.sessions() as s:
        assert s.get(Unit, unit_id).status == "submitted"  # not paid yet
    listed = httpx.get(f"{market.url}/jobs/{job_id}").json()["verifications"]
    assert [v["status"] for v in listed] == ["auditing"]
    monkeypatch.setattr(market.rt, "enqueue", send)
    assert service.sweep(market.rt)["audit_check"] == 0  # not given up on yet
    monkeypatch.setattr(service, "AUDIT_LOST_S", 0)
    time.sleep(1.1)
    assert service.sweep(market.rt)["audit_check"] == 1
    market.wait(lambda: _rows(market, id=check.id)[0].status == "passed", what="audited")
    drive(market, [honest], verifier, job_id)
    assert job_status(market, job_id) == "settled" and not slashed(market)
    with market.rt.sessions() as s:
        assert s.get(Unit, unit_id).status == "verified"
        fees = list(s.scalars(select(LedgerEntry).where(LedgerEntry.provider == verifier.account.address)))
    assert len(fees) == 1 and market.ops.stake_state(verifier.account.address).staked == tokens(100)
    assert checking.audit_check(market.rt, check.id) == "passed"  # a duplicate: nothing twice
    assert len(_events(market, "audit_passed")) == 1


def test_a_job_stopped_while_a_friends_pass_waits_for_its_audit_still_has_the_cheat_slashed(market, tmp_path: Path,
                                                                                            monkeypatch) -> None:
    """The customer cancels on chain while a colluding verifier's pass of a cheat waits for its audit (its send lost
    here, so that the stop lands first). The stop voids the unit's open checks but not the audit: a ruling, as an
    open dispute is. The job is stopped and settled (nothing verified: the whole budget is the customer's); the
    audit, sent again by the sweep, still costs the cheat and its friend their whole stakes, and pays nobody."""
    market.rt.settings.audit_rate = 1.0
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    friend = staked_verifier(market, tmp_path, "friend", approve_everything=True)
    treasury = market.deployment.treasury
    send, lost = market.rt.enqueue, []
    monkeypatch.setattr(market.rt, "enqueue", lambda name, args, queue=None: lost.append(args)
                        if name == "gridmint.audit_check" else send(name, args, queue))
    job_id = submit_job(market, ONE_UNIT, job_id=fixed_job_id(0xA5))
    [unit_id] = _handed_in(market, job_id, [cheat], 1)
    assert friend.verify_once() == "ok"
    [check] = _rows(market, unit_id=unit_id)
    assert check.status == "auditing" and lost == [[check.id]]

    market.contracts(FIXED_CUSTOMER).cancel_job(job_id)
    assert service.sweep(market.rt)["cancelled"] == 1
    market.wait(lambda: job_status(market, job_id) == "cancelled", what="the stop's settlement")
    assert _rows(market, id=check.id)[0].status == "auditing"  # not void: still to be ruled on
    [stop] = _events(market, "job_cancelled")
    assert stop["checks_voided"] == 0 and stop["unchecked"] == {unit_id: cheat.account.address}
    with market.rt.sessions() as s:
        assert s.get(Unit, unit_id).status == "cancelled"
        assert s.get(Job, job_id).refund == ONE_UNIT.budget()  # nothing verified, nothing paid
    assert not slashed(market)

    monkeypatch.setattr(market.rt, "enqueue", send)
    monkeypatch.setattr(service, "AUDIT_LOST_S", 0)
    time.sleep(1.1)
    assert service.sweep(market.rt)["audit_check"] == 1
    market.wait(lambda: _rows(market, id=check.id)[0].status == "audit_failed", what="audited")
    assert slashed(market) == {cheat.account.address}
    assert market.ops.balance_of(treasury) == tokens(200) + tokens(100)  # the whole of both stakes
    [event] = _events(market, "provider_slashed")
    assert event["path"] == "audit" and event["amount"] == str(tokens(200))
    with market.rt.sessions() as s:
        assert s.get(Verifier, friend.account.address).status == "benched"
        assert s.get(Unit, unit_id).status == "cancelled"  # stays stopped: nobody redoes work nobody pays for
        assert not list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id)))
    assert job_status(market, job_id) == "cancelled"


def test_a_cross_plan_verifiers_pass_of_a_cheat_costs_the_provider_its_stake_and_the_verifier_a_mark(
        market, tmp_path: Path) -> None:
    """A verifier on another plan passes within its tolerance: a pass of a claim the audit proves false is not a
    provable lie of its own (what it replayed was never the unit's bits), so it keeps its stake and its place, with
    the overruled pass counted against it; the provider loses its whole stake all the same."""
    market.rt.settings.audit_rate = 1.0
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    other = staked_verifier(market, tmp_path, "other-plan", plan=Plan("cpu", 2), approve_everything=True)
    job_id = submit_job(market, ONE_UNIT)
    [unit_id] = _handed_in(market, job_id, [cheat], 1)
    assert other.verify_once() == "ok"
    [check] = _rows(market, unit_id=unit_id)
    market.wait(lambda: _rows(market, id=check.id)[0].status == "audit_failed", what="audited")
    assert slashed(market) == {cheat.account.address}
    assert market.ops.stake_state(other.account.address).staked == tokens(100)
    with market.rt.sessions() as s:
        ver = s.get(Verifier, other.account.address)
        assert ver.status == "active" and ver.wrong == 1
    assert not _events(market, "verifier_slashed") and not _events(market, "verifier_benched")


def test_work_the_referee_does_not_replay_bit_for_bit_is_audited_within_the_tolerance(market, tmp_path: Path) -> None:
    """A unit trained on a plan the referee does not replay bit for bit (micro-batches): its audit is the referee's
    replay judged within the tolerance, which honest work meets at once (no state asked of the provider). A GPU plan
    is audited only where the referee replays it bit for bit (a referee judges a GPU plan only on that GPU)."""
    market.rt.settings.audit_rate = 1.0
    honest = provider(market, tmp_path, "honest", "us-east", "0.9", plan="cpu/mb2")
    verifier = staked_verifier(market, tmp_path, "verifier")
    job_id = submit_job(market, ONE_UNIT)
    [unit_id] = _handed_in(market, job_id, [honest], 1)
    assert verifier.verify_once() == "ok"
    [check] = _rows(market, unit_id=unit_id)
    market.wait(lambda: _rows(market, id=check.id)[0].status == "passed", timeout=300, what="audited")
    assert [e["audited"] for e in _events(market, "segment_passed")] == [True]
    [held] = _events(market, "audit_passed")
    assert "the referee's replay agrees" in held["reason"] and not _events(market, "reveal_requested")
    drive(market, [honest], verifier, job_id)
    assert job_status(market, job_id) == "settled" and not slashed(market)
    gpu, build = Plan.parse("cuda:h100"), "torch-2.13.0/cuda-12.4.sm90"
    assert not checking._auditable(market.rt, gpu, build)
    market.rt.settings.referee_plans, market.rt.settings.referee_gpu_builds = "cpu,cuda:h100", build
    assert checking._auditable(market.rt, gpu, build)
    assert not checking._auditable(market.rt, gpu, "torch-2.12.0/cuda-12.4.sm90")  # on other kernels (test_referee)


def test_a_friends_pass_of_a_cheat_hiding_in_the_drift_is_bisected_by_the_audit_and_the_cheat_slashed(
        market, tmp_path: Path) -> None:
    """A cheat skipping each segment's last optimizer update declares a micro-batch plan to hide in the tolerance;
    its friend passes the check. The referee's audit replays the segment past the tolerance and bisects it with the
    cheat's revealed states (the check stays auditing meanwhile; the cheat's agent answers as it would a dispute)
    down to the skipped step: the cheat's whole stake goes to the treasury, the friend, on another plan, gets a mark;
    an honest provider redoes the unit and the job settles."""
    market.rt.settings.audit_rate = 1.0
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-last-update", plan="cpu/mb2")
    friend = staked_verifier(market, tmp_path, "friend", approve_everything=True)
    treasury = market.deployment.treasury
    treasury_before = market.ops.balance_of(treasury)
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=16, segment_len=8, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    [unit_id] = _handed_in(market, job_id, [cheat], 1)
    assert friend.verify_once() == "ok"
    [check] = _rows(market, unit_id=unit_id)
    market.wait(lambda: bool(_events(market, "reveal_requested")), timeout=300, what="a state asked of the cheat")
    assert _rows(market, id=check.id)[0].status == "auditing"

    def answered() -> bool:  # the cheat's agent answers each ask, as it would a dispute's
        if _rows(market, id=check.id)[0].status != "auditing":
            return True
        cheat.reveal_once()
        return False

    market.wait(answered, timeout=300, what="the audit's bisection")
    assert _rows(market, id=check.id)[0].status == "audit_failed"
    [slash] = _events(market, "provider_slashed")
    assert slash["path"] == "audit" and f"bisected to step {check.segment * 8 + 7}" in slash["reason"]
    assert all(e["path"] == "audit" for e in _events(market, "reveal_requested"))
    assert [e["provider"] for e in _events(market, "state_revealed")] == [cheat.account.address] * 3
    assert slashed(market) == {cheat.account.address} and market.ops.stake_of(cheat.account.address) == 0
    assert market.ops.balance_of(treasury) - treasury_before == tokens(200)  # its whole stake, no bounty
    with market.rt.sessions() as s:
        ver = s.get(Verifier, friend.account.address)
        assert ver.status == "active" and ver.wrong == 1  # on another plan: a mark, not a provable lie
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    drive(market, [honest], verifier, job_id)
    assert job_status(market, job_id) == "settled"
    with market.rt.sessions() as s:
        assert s.get(Unit, unit_id).provider == honest.account.address


def _ruled_once_the_deadline_passes(market, check_id: int) -> None:  # type: ignore[no-untyped-def]
    """Run the periodic reap (which hands an audit whose provider let a reveal deadline pass back to the referee)
    until audit ``check_id`` is ruled on."""
    def ruled() -> bool:
        if _rows(market, id=check_id)[0].status != "auditing":
            return True
        service.reap(market.rt)
        return False

    market.wait(ruled, timeout=120, what="the audit ruled on at the deadline")


def test_an_audit_whose_provider_stays_silent_is_ruled_on_once_the_reveal_deadline_passes(market,
                                                                                           tmp_path: Path) -> None:
    """A cheat skipping steps on a micro-batch plan (the referee does not replay it bit for bit); its friend passes
    the check. The audit's replay is past the tolerance and asks the cheat for a state, which never comes: once the
    deadline passes, the periodic reap hands the audit back to the referee (as it does a dispute; it waited for the
    sweep's re-send, ``AUDIT_LOST_S`` after the draw), which rules: the silent cheat loses its whole stake. Nothing
    was replayed against the friend's pass (the cheat's silence spares its friend, at its own whole stake): it
    stands, with no mark (the next test: an honest verifier's pass must not pay for a provider's silence)."""
    market.rt.settings.audit_rate = 1.0
    market.rt.settings.reveal_timeout_s = 4
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps", plan="cpu/mb2")
    friend = staked_verifier(market, tmp_path, "friend", approve_everything=True)
    job_id = submit_job(market, ONE_UNIT)
    [unit_id] = _handed_in(market, job_id, [cheat], 1)
    assert friend.verify_once() == "ok"
    [check] = _rows(market, unit_id=unit_id)
    market.wait(lambda: bool(_events(market, "reveal_requested")), timeout=120, what="a state asked of the cheat")
    asked = time.monotonic()
    _ruled_once_the_deadline_passes(market, check.id)
    assert time.monotonic() - asked < checking.AUDIT_LOST_S / 2
    assert _rows(market, id=check.id)[0].status == "passed" and not _events(market, "state_revealed")
    [slash] = _events(market, "provider_slashed")
    assert slash["path"] == "audit" and "did not reveal its state" in slash["reason"]
    assert slashed(market) == {cheat.account.address} and market.ops.stake_of(cheat.account.address) == 0
    [unanswered] = _events(market, "audit_unanswered")
    assert unanswered["verification"] == check.id and unanswered["verifier"] == friend.account.address
    with market.rt.sessions() as s:
        ver = s.get(Verifier, friend.account.address)
        assert ver is not None and ver.status == "active" and ver.wrong == 0
    assert market.ops.stake_state(friend.account.address).staked == tokens(100)


def test_an_honest_verifier_on_the_units_own_plan_keeps_its_stake_when_the_provider_falls_silent(
        market, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An honest provider on a micro-batch plan the referee does not replay bit for bit, and an honest verifier on
    that very plan and kernels, whose pass replayed the segment bit for bit. The audit's replay across plans lands
    past the tolerance (honest drift does in a few percent of segments: simulated here, by the referee's first look
    reporting the drift its replay really has as past it) and asks the provider for a state, which never comes (its
    node crashed). The provider loses, by design; the verifier's pass, which nothing replayed contradicts, stands:
    it was benched and slashed of its whole stake (a review found it), as if its bits had been proven wrong."""
    market.rt.settings.audit_rate = 1.0
    market.rt.settings.reveal_timeout_s = 4
    real = crosscheck.check_segment_across

    def drifted(*args: Any, **kwargs: Any) -> crosscheck.CrossVerdict:
        v = real(*args, **kwargs)
        return dataclasses.replace(v, ok=False, kind="state", reason=f"(drift past the tolerance) {v.reason}")

    monkeypatch.setattr(crosscheck, "check_segment_across", drifted)
    honest = provider(market, tmp_path, "honest", "eu-north", "0.55", plan="cpu/mb2")
    careful = staked_verifier(market, tmp_path, "careful", plan=Plan("cpu", 2))
    job_id = submit_job(market, ONE_UNIT)
    [unit_id] = _handed_in(market, job_id, [honest], 1)
    assert careful.verify_once() == "ok"  # bit for bit, on the unit's own plan and kernels
    [check] = _rows(market, unit_id=unit_id)
    market.wait(lambda: bool(_events(market, "reveal_requested")), timeout=120, what="a state asked")
    _ruled_once_the_deadline_passes(market, check.id)
    assert _rows(market, id=check.id)[0].status == "passed"
    assert slashed(market) == {honest.account.address}  # it let the deadline pass
    with market.rt.sessions() as s:
        ver = s.get(Verifier, careful.account.address)
        assert ver is not None and (ver.status, ver.wrong) == ("active", 0)
    assert market.ops.stake_state(careful.account.address).staked == tokens(100)
    assert not _events(market, "verifier_slashed") and not _events(market, "verifier_benched")
    assert [e["verifier"] for e in _events(market, "audit_unanswered")] == [careful.account.address]


def test_a_verifier_checking_much_more_of_one_provider_than_of_its_plan_is_audited_more(tmp_path: Path,
                                                                                         db_url: str) -> None:
    """audit_odds reads who gave the provider's last AUDIT_WINDOW real verdicts, and who gave the market's real
    verdicts on work of the unit's plan since the oldest of those (canaries, older verdicts and other plans apart):
    a verifier that checked all of the provider and little else is audited at the raised rate; on a plan of fewer
    than AUDIT_PEERS providers, counted as that many providers' work, one checking it as the rest of the plan is at a
    thin market's rate, under the ring's; from AUDIT_PEERS providers on, at the base rate."""
    from marketplace.db import Job, Verification, make_sessionmaker, now_s
    from marketplace.settings import Settings

    settings = Settings(data_dir=tmp_path, db_url=db_url, audit_rate=0.1)
    sessions = make_sessionmaker(db_url)
    rt = chainless_runtime(settings, sessions=sessions)
    now, job = now_s(), "0x" + "02" * 32
    ring, fair, prov, other = ("0x" + f"{i:02x}" * 20 for i in range(1, 5))
    with sessions.begin() as s:
        s.add(Job(id=job, customer="0x" + "0" * 40, spec=JobSpec(max_price=1).model_dump(mode="json"), budget=1,
                  global_blob="0" * 64, status="done"))
        s.flush()
        cpu, theirs, gpu = (f"0x{i:064x}" for i in range(3))
        s.add_all([Unit(id=cpu, job_id=job, round=0, shard=0, status="submitted", plan="cpu"),
                   Unit(id=theirs, job_id=job, round=0, shard=1, status="submitted", plan="cpu"),
                   Unit(id=gpu, job_id=job, round=0, shard=2, status="submitted", plan="cuda:h100")])
        s.flush()

        def verdicts(unit: str, provider: str, verifier: str, n: int, at: int, **kw: object) -> list[Verification]:
            rows = [Verification(unit_id=unit, provider=provider, segment=i, status="passed", verifier=verifier,
                                 verdict_at=at + i, **kw) for i in range(n)]
            s.add_all(rows)
            s.flush()
            return rows

        verdicts(theirs, other, fair, 50, now - 1000)  # before the provider's window: not counted
        *_, ring_pass = verdicts(cpu, prov, ring, 40, now - 100)
        verdicts(theirs, other, fair, 30, now - 90)
        verdicts(theirs, other, ring, 5, now - 80)
        verdicts(theirs, other, fair, 30, now - 70, canary={"proof": {}})  # canaries: not a provider's claim
        verdicts(gpu, other, fair, 30, now - 60)  # another plan's checking
        odds = checking.audit_odds(rt, s, ring_pass, "cpu")  # two providers' work on the plan: prov's and other's
        assert odds == vp.audit_rate(0.1, 40, 40, 45, 75, 2, 2) > 0.5
        # the other provider's pass on the GPU plan: its verifier gave most of that provider's verdicts (111 of 116),
        # and all of the plan's (31), the plan's only provider: the rate of a plan of one provider
        *_, gpu_pass = verdicts(gpu, other, fair, 1, now - 50)
        assert checking.audit_odds(rt, s, gpu_pass, "cuda:h100") == vp.audit_rate(0.1, 111, 116, 31, 31, 1, 1) > 0.5
        # the provider checked by the two in turn, as the rest of the plan is: the rate of a plan of two providers,
        # well under the ring's
        rows = verdicts(cpu, prov, ring, 20, now - 40) + verdicts(cpu, prov, fair, 20, now - 20)
        verdicts(theirs, other, ring, 20, now - 40)
        verdicts(theirs, other, fair, 20, now - 20)
        assert checking.audit_odds(rt, s, rows[-1], "cpu") == vp.audit_rate(0.1, 20, 80, 70, 155, 2, 2) < odds / 2
        # twelve providers on the plan (AUDIT_PEERS): no missing peers counted; that verifier did less of the
        # provider's checking than of the plan's: the base rate
        for i in range(10):
            verdicts(theirs, "0x" + f"{0x10 + i:02x}" * 20, fair, 2, now - 10)
        assert checking.audit_odds(rt, s, rows[-1], "cpu") == 0.1
