"""The referee's audits of passed checks (marketplace.checking.audit_check): a verifier colluding with the provider
tells a canary apart (the provider knows every true state), but not an audited pass from another. Over real HTTP, a
real Celery worker on Redis and the in-process EVM."""
from __future__ import annotations

import time
from pathlib import Path

import httpx
from sqlalchemy import select

from marketplace import checking, service
from marketplace.db import LedgerEntry, Unit, Verifier
from node.crosscheck import Plan
from protocol.money import tokens
from protocol.schemas import JobSpec
# (_rows lists canaries too: the market fixture plants none unless a test asks, and these do not)
from tests.marketplace.test_flow import (_events, _handed_in, _rows, drive, job_status, provider, slashed,
                                        staked_verifier, submit_job)

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
    odds checking.audit_odds gives (here made 1; what it read: the base rate, the only verifier around)."""
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
    assert check.status == "auditing" and lost == [[check.id]] and asked == [0.001]
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


def test_work_the_referee_cannot_replay_bit_for_bit_is_not_audited(market, tmp_path: Path) -> None:
    """A unit trained on a plan the referee does not replay bit for bit (micro-batches) is never drawn for an audit:
    its replay could only judge it within a tolerance, where a cheat and its friend pass too (its checks' own
    verifiers and the bisection of a dispute judge it)."""
    market.rt.settings.audit_rate = 1.0
    honest = provider(market, tmp_path, "honest", "us-east", "0.9", plan="cpu/mb2")
    verifier = staked_verifier(market, tmp_path, "verifier")
    job_id = submit_job(market, ONE_UNIT)
    [unit_id] = _handed_in(market, job_id, [honest], 1)
    assert verifier.verify_once() == "ok"
    assert [v.status for v in _rows(market, unit_id=unit_id)] == ["passed"]
    assert [e["audited"] for e in _events(market, "segment_passed")] == [False]


def test_a_verifier_doing_more_than_its_share_of_a_providers_checking_is_audited_more(tmp_path: Path,
                                                                                      db_url: str) -> None:
    """audit_odds reads who gave the provider's last AUDIT_WINDOW real verdicts (canaries and other providers' checks
    apart) and how many verifiers are around that could check its plan (active, seen with their stake within
    unit_timeout_s, the provider itself apart): a verifier that gave all of them is audited at the raised rate, one
    at its fair share at the base rate; a CPU unit's checkers include GPU verifiers, a GPU unit's do not include CPU
    ones."""
    from marketplace.blobs import BlobStore
    from marketplace.db import Job, Verification, make_sessionmaker, now_s
    from marketplace.runtime import Runtime
    from marketplace.settings import Settings
    from protocol import verification as vp

    settings = Settings(data_dir=tmp_path, db_url=db_url, audit_rate=0.1, unit_timeout_s=120)
    sessions = make_sessionmaker(db_url)
    rt = Runtime(settings=settings, sessions=sessions, blobs=BlobStore(settings.blob_dir()), chain_id=1,
                 contracts=None, enqueue=lambda name, args, queue=None: None)
    now, job = now_s(), "0x" + "02" * 32
    addr = {name: "0x" + f"{i + 1:02x}" * 20 for i, name in enumerate(
        ["ring", "fair", "gpu", "cpu2", "stale", "benched", "prov", "other"])}
    with sessions.begin() as s:
        s.add(Job(id=job, customer="0x" + "0" * 40, spec=JobSpec(max_price=1).model_dump(mode="json"), budget=1,
                  global_blob="0" * 64, status="done"))
        s.flush()
        s.add_all([Unit(id=f"0x{0:064x}", job_id=job, round=0, shard=0, status="submitted", plan="cpu"),
                   Unit(id=f"0x{1:064x}", job_id=job, round=0, shard=1, status="submitted", plan="cuda:h100")])
        for name, plan, status, seen in [("ring", "cpu", "active", now), ("fair", "cpu", "active", now - 60),
                                         ("gpu", "cuda:h100", "active", now), ("cpu2", "cpu/mb2", "active", now),
                                         ("stale", "cpu", "active", now - 500), ("benched", "cpu", "benched", now),
                                         ("prov", "cpu", "active", now)]:
            s.add(Verifier(address=addr[name], plan=plan, status=status, staked_seen_at=seen))
        s.flush()

        def verdicts(verifier: str, n: int, provider: str = addr["prov"], **kw: object) -> list[Verification]:
            rows = [Verification(unit_id=f"0x{0:064x}", provider=provider, segment=i, status="passed",
                                 verifier=verifier, verdict_at=now - 100 + i, **kw) for i in range(n)]
            s.add_all(rows)
            s.flush()
            return rows

        *_, ring = verdicts(addr["ring"], 40)
        verdicts(addr["fair"], 30, canary={"proof": {}})  # canaries: not the provider's claims
        verdicts(addr["fair"], 30, provider=addr["other"])  # another provider's checking
        # around for a CPU unit: ring, fair, gpu, cpu2 (not the stale one, the benched one, nor the provider)
        assert checking.audit_odds(rt, s, ring, "cpu", now) == vp.audit_rate(0.1, 40, 40, 4) > 0.1
        *_, gpu_pass = verdicts(addr["gpu"], 1)
        assert checking.audit_odds(rt, s, gpu_pass, "cuda:h100", now) == vp.audit_rate(0.1, 1, 41, 1) == 0.1
        # the same provider checked by four verifiers in turn: each at its fair share, the base rate
        s.query(Verification).filter(Verification.verifier == addr["ring"]).delete()
        order = [addr[n] for n in ("ring", "fair", "gpu", "cpu2")] * 20
        rows = [Verification(unit_id=f"0x{0:064x}", provider=addr["prov"], segment=i, status="passed", verifier=v,
                             verdict_at=now + i) for i, v in enumerate(order)]
        s.add_all(rows)
        s.flush()
        assert checking.audit_odds(rt, s, rows[-1], "cpu", now) == 0.1
