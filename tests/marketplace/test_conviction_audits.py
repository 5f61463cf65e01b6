"""A proven cheat's work that passed its checks: the referee audits those passes (checking._audit_passes), and the
cheat is paid for none of a running job's units (checking._forfeit_unsettled). Against the real contracts on the
in-process EVM and a real SQLite / PostgreSQL ledger, and the whole story over real HTTP, a Celery worker and
Redis."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from marketplace import cancellation, checking, referee, service
from marketplace.common import check_fee_entry, unit_id_for
from marketplace.db import Event, Job, LedgerEntry, Provider, Unit, Verification, Verifier, check_fee_key, now_s
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import _events, _handed_in, _rows, _stocked, drive, job_status, provider, slashed, \
    staked_verifier, submit_job
from tests.marketplace.test_redo import _job, _owed, _unit
from tests.marketplace.test_settlement import World, make_world

CAP = tokens(2)
FRIEND, CAREFUL = "0x" + "a1" * 20, "0x" + "c3" * 20


@pytest.fixture()
def world(tmp_path: Path, db_url: str) -> World:
    w = make_world(tmp_path, db_url)
    w.rt.settings.audit_rate = 0.1  # the operator runs audits (this world has no worker: nothing is sent)
    return w




def _credited(w: World, unit_id: str, who: str, passes: list[tuple[str, int | None]], plan: str = "cpu",
              build: str | None = None) -> list[int]:
    """Unit ``unit_id`` verified for ``who`` at 1 GMT, on ``plan`` with ``build`` (the referee's kernels unless
    named): a pass of each segment by each verifier of ``passes``, with the time its audit was drawn (None: it was
    not), their fees owed. The checks' ids."""
    with w.rt.sessions.begin() as s:
        if s.get(Provider, who) is None:
            s.add(Provider(address=who, region="eu-north", gpu="test", vram_mb=8000, price=CAP, tokens_per_s=1000,
                           capacity=2, stake=tokens(100)))
        u = s.get(Unit, unit_id)
        assert u is not None
        u.status, u.provider, u.price, u.segment_blobs = "verified", who, tokens(1), ["a", "b"]
        u.plan, u.build = plan, build if build is not None else w.rt.referee_build()
        s.add(LedgerEntry(job_id=u.job_id, unit_id=u.id, provider=who, amount=tokens(1)))
        ids = []
        for seg, (verifier, audit_at) in enumerate(passes):
            c = Verification(unit_id=u.id, provider=who, segment=seg, status="passed", verifier=verifier,
                             verdict_at=now_s() - 3600 + seg, audit_at=audit_at)
            s.add(c)
            s.flush()
            s.add(check_fee_entry(u, c))
            ids.append(c.id)
        return ids


def _open_round_1(w: World, job_id: str, spec: JobSpec) -> None:
    with w.rt.sessions.begin() as s:  # round 0 averaged
        job = s.get(Job, job_id)
        assert job is not None
        job.round = 1
        service._create_round_units(s, job, spec, 1)




def _statuses(w: World, ids: list[int]) -> list[tuple[str, bool]]:
    with w.rt.sessions() as s:
        return [(c.status, c.audit_at is not None) for c in (s.get(Verification, i) for i in ids) if c is not None]


def _kinds(w: World, kind: str) -> list[dict]:  # type: ignore[type-arg]
    with w.rt.sessions() as s:
        return [e.data for e in s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id))]


def _submitted(w: World, unit_id: str, who: str, passed_by: str) -> list[int]:
    """Unit ``unit_id`` submitted by ``who`` (on the referee's plan and kernels): segment 0 passed by ``passed_by``,
    segment 1's check pending. The checks' ids."""
    with w.rt.sessions.begin() as s:
        u = s.get(Unit, unit_id)
        assert u is not None
        u.status, u.provider, u.price, u.segment_blobs = "submitted", who, tokens(1), ["a", "b"]
        u.plan, u.build = "cpu", w.rt.referee_build()
        checks = [Verification(unit_id=unit_id, provider=who, segment=0, status="passed", verifier=passed_by,
                               verdict_at=now_s() - 3600),
                  Verification(unit_id=unit_id, provider=who, segment=1, status="pending")]
        s.add_all(checks)
        s.flush()
        return [c.id for c in checks]




def test_a_conviction_draws_an_audit_of_each_pass_of_the_cheats_work_that_still_stands(world: World) -> None:
    """The cheat's units: one of an averaged round (a friend's pass of one segment, a careful verifier's pass of the
    other, audited already), one verified in the open round and one submitted (the one it was caught on, say), one
    verified in a one-unit job, one on CPU kernels the referee does not replay bit for bit and one on a GPU no
    referee runs on (a ruling there may need a state from the provider, which a convicted one may never reveal), one
    of a job settled a day ago, one cancelled by its customer's stop an hour ago (its passes paid all the same), one
    of a job settled over half the blob retention ago (its checkpoints go soon). Drawn: the friend's passes but the
    last three's, each once (a re-run draws nothing). The open rounds' three units wait for their audits with their
    claims (their other checks void, the verified ones' prices withdrawn), never credited, then go back to the pool;
    the other kernels' and the GPU's go back at once. The cheat's price is withheld in the running jobs, not in the
    settled one."""
    cheat, honest = (a.address for a in world.providers[:2])
    job_id, spec = _job(world, "conviction-audits", rounds=2, units=2)
    averaged = _credited(world, unit_id_for(job_id, 0, 0), cheat, [(FRIEND, None), (CAREFUL, now_s() - 20)])
    _credited(world, unit_id_for(job_id, 0, 1), honest, [(FRIEND, None)])
    _open_round_1(world, job_id, spec)
    redone = _credited(world, unit_id_for(job_id, 1, 0), cheat, [(FRIEND, None)])
    caught = _submitted(world, unit_id_for(job_id, 1, 1), cheat, FRIEND)
    foreign_job, _ = _job(world, "foreign-kernels", units=1)
    foreign = _credited(world, unit_id_for(foreign_job, 0, 0), cheat, [(FRIEND, None)], build="other-kernels")
    single_job, _ = _job(world, "one-unit", units=1)
    single = _credited(world, unit_id_for(single_job, 0, 0), cheat, [(FRIEND, None)])
    gpu_job, _ = _job(world, "gpu-without-referee", units=1)
    gpu = _credited(world, unit_id_for(gpu_job, 0, 0), cheat, [(FRIEND, None)], plan="cuda:h100", build="cu-kernels")
    recent_job, _ = _job(world, "settled-a-day-ago", units=1)
    recent = _credited(world, unit_id_for(recent_job, 0, 0), cheat, [(FRIEND, None)])
    old_job, _ = _job(world, "settled-long-ago", units=1)
    old = _credited(world, unit_id_for(old_job, 0, 0), cheat, [(FRIEND, None)])
    stopped_job, _ = _job(world, "stopped-an-hour-ago", units=1)
    stopped = _credited(world, unit_id_for(stopped_job, 0, 0), cheat, [(FRIEND, None)])
    with world.rt.sessions.begin() as s:
        job, unit = s.get(Job, stopped_job), s.get(Unit, unit_id_for(stopped_job, 0, 0))
        assert job is not None and unit is not None
        job.status, job.settled_at, unit.status = "cancelled", now_s() - 3600, "cancelled"
        for jid, ago in ((recent_job, 86400), (old_job, world.rt.settings.blob_retention_s // 2 + 60)):
            job = s.get(Job, jid)
            assert job is not None
            job.status, job.settled_at = "settled", now_s() - ago
    with world.rt.sessions.begin() as s:
        audits = checking._convicted(world.rt, s, cheat)
    build = world.rt.referee_build()
    assert sorted(audits) == sorted((c, build) for c in (averaged[0], redone[0], caught[0], single[0], recent[0],
                                                         stopped[0]))
    assert _statuses(world, averaged) == [("auditing", True), ("passed", True)]
    assert _statuses(world, redone + caught + recent) == [("auditing", True), ("auditing", True), ("void", False),
                                                          ("auditing", True)]
    assert _statuses(world, stopped) == [("auditing", True)]
    assert _statuses(world, single) == [("auditing", True)]
    assert _statuses(world, foreign + gpu + old) == [("passed", False)] * 3
    # their verdicts are an hour old, their audits just drawn: the sweep leaves them to the referee (a lost one is
    # sent again AUDIT_LOST_S after it was drawn)
    assert service.sweep(world.rt)["audit_check"] == 0
    [drawn] = _kinds(world, "passes_audited")
    assert (drawn["provider"], drawn["checks"]) == (cheat, 6)  # (the averaged unit's, the open rounds' three,
    # the settled job's and the stopped one's)
    held = [unit_id_for(job_id, 1, 0), unit_id_for(job_id, 1, 1), unit_id_for(single_job, 0, 0)]
    assert [(_unit(world, u).status, _unit(world, u).provider) for u in held] == [("submitted", cheat)] * 3
    # (the other kernels' and the GPU's units, of their jobs' open rounds, are redone at once: nothing audited)
    away = [unit_id_for(foreign_job, 0, 0), unit_id_for(gpu_job, 0, 0)]
    redos = {e["unit"]: e["forfeit"] for e in _kinds(world, "unit_redone")}
    assert redos == {u: str(tokens(1)) for u in (held[0], held[2], *away)}
    assert [_unit(world, u).status for u in away] == ["pending"] * 2
    with world.rt.sessions.begin() as s:
        assert checking._convicted(world.rt, s, cheat) == []  # a re-run (a second ruling on the same cheat)
    assert len(_kinds(world, "passes_audited")) == 1
    fee = tokens(1) // 2
    # the running job: the averaged unit stays, unpaid; the verifiers' fees stand (till an audit says otherwise; the
    # redone unit's too: the job's budget has room for them)
    assert _owed(world, job_id) == {honest: tokens(1), FRIEND: 3 * fee, CAREFUL: fee}
    assert _owed(world, recent_job) == {cheat: tokens(1), FRIEND: fee}
    # a one-unit job has no room for the redo beside its checks' fees: the held unit's price and fee (its pass under
    # audit) are withdrawn all the same (with the pass's fee left out, the redo was skipped: the cheat kept the unit)
    assert _owed(world, single_job) == {}
    assert [e["check_fees_forfeit"] for e in _kinds(world, "unit_redone") if e["unit"] == held[2]] == [str(fee)]
    for check, unit_id in ((redone[0], held[0]), (caught[0], held[1]), (single[0], held[2])):  # the audits hold
        with world.rt.sessions.begin() as s:
            c, u = s.get(Verification, check), s.get(Unit, unit_id)
            assert c is not None and u is not None
            c.status = "passed"
            checking.maybe_verified(s, u)
        assert (_unit(world, unit_id).status, _unit(world, unit_id).excluded) == ("pending", [cheat])
    assert _owed(world, job_id) == {honest: tokens(1), FRIEND: 3 * fee, CAREFUL: fee}  # nothing credited
    with world.rt.sessions.begin() as s:  # the stopped job's: its unit stays as the stop left it, its pay as it was
        c, u = s.get(Verification, stopped[0]), s.get(Unit, unit_id_for(stopped_job, 0, 0))
        assert c is not None and u is not None
        c.status = "passed"
        checking.maybe_verified(s, u)
    assert _unit(world, unit_id_for(stopped_job, 0, 0)).status == "cancelled"
    assert _owed(world, stopped_job) == {cheat: tokens(1), FRIEND: fee}


def test_where_the_operator_runs_no_audits_a_conviction_draws_none(world: World) -> None:
    """``settings.audit_rate`` 0: no pass is drawn, and the cheat's submitted unit goes back to the pool at once."""
    world.rt.settings.audit_rate = 0.0
    cheat, _ = (a.address for a in world.providers[:2])
    job_id, spec = _job(world, "no-audits", rounds=2, units=2)
    averaged = _credited(world, unit_id_for(job_id, 0, 0), cheat, [(FRIEND, None)])
    _open_round_1(world, job_id, spec)
    caught = _submitted(world, unit_id_for(job_id, 1, 0), cheat, FRIEND)
    with world.rt.sessions.begin() as s:
        assert checking._convicted(world.rt, s, cheat) == []
    assert _statuses(world, averaged + caught) == [("passed", False), ("passed", False), ("void", False)]
    assert _unit(world, unit_id_for(job_id, 1, 0)).status == "pending"
    assert not _kinds(world, "passes_audited")


def test_a_pass_of_a_proven_cheats_faked_segment_costs_its_verifier_the_fee_and_its_bench(world: World) -> None:
    """The referee's audit of the friend's pass (drawn at the cheat's conviction) proves the claim false: the
    friend, which replayed on the unit's own plan and kernels, is benched and its fee for that check withdrawn (its
    job still runs); its passes of an honest provider's unit of the averaged round stand. A failed audit of its pass
    in a job settled already leaves that fee: the settlement may be under way."""
    cheat, honest = (a.address for a in world.providers[:2])
    job_id, spec = _job(world, "friend-audited", rounds=2, units=2)
    [friend_pass] = _credited(world, unit_id_for(job_id, 0, 0), cheat, [(FRIEND, None)])
    _credited(world, unit_id_for(job_id, 0, 1), honest, [(FRIEND, None)])
    _open_round_1(world, job_id, spec)
    done_job, _ = _job(world, "friend-audited-done", units=1)
    [done_pass] = _credited(world, unit_id_for(done_job, 0, 0), cheat, [(FRIEND, None)])
    with world.rt.sessions.begin() as s:
        s.add(Verifier(address=FRIEND, plan="cpu", build=world.rt.referee_build()))
        s.get(Job, done_job).status = "done"  # type: ignore[union-attr]
    with world.rt.sessions.begin() as s:
        audits = checking._convicted(world.rt, s, cheat)
    assert [a for a, _ in audits] == [done_pass, friend_pass] or [a for a, _ in audits] == [friend_pass, done_pass]
    fee = tokens(1) // 2
    for check, job in ((friend_pass, job_id), (done_pass, done_job)):
        with world.rt.sessions.begin() as s:
            task = s.get(Verification, check)
            assert task is not None
            assert checking._audit_failed(world.rt, s, task, referee.Ruling(fraud=True, reason="test"), 0,
                                          b"\x02" * 32, 0) == []
    with world.rt.sessions() as s:
        ver = s.get(Verifier, FRIEND)
        assert ver is not None and ver.status == "benched" and ver.wrong == 2
        keys = set(s.scalars(select(LedgerEntry.unit_id)))
    assert _statuses(world, [friend_pass, done_pass]) == [("audit_failed", True)] * 2
    assert check_fee_key(friend_pass) not in keys and check_fee_key(done_pass) in keys
    assert _owed(world, job_id) == {honest: tokens(1), FRIEND: fee}  # its pass of the honest unit stands
    assert [e["check_fee_forfeit"] for e in _kinds(world, "fraud_confirmed")] == [str(fee), "0"]
    assert len(_kinds(world, "verifier_slashed")) == 1  # benched once: the second failure slashes nothing more


def _held_with_a_pass_audited_at_its_verdict(w: World, name: str, room: bool = True) -> tuple[str, str, int, int]:
    """A cheat's unit verified in the open round of a running job, its segment 0 passed by CAREFUL (that pass
    audited when its verdict came in) and segment 1 by FRIEND, both verifiers active; the cheat is then convicted:
    FRIEND's pass is drawn and the unit held ``submitted`` for that audit. ``room``: the job's other unit, an honest
    provider's, was paid under the cap, so the job can pay the redo beside the unit's fees; else the job is this one
    unit, and those fees are forfeit. The job, the unit, CAREFUL's and FRIEND's checks."""
    cheat, honest = (a.address for a in w.providers[:2])
    job_id, _ = _job(w, name, units=2 if room else 1)
    held = unit_id_for(job_id, 0, 0)
    careful, friend = _credited(w, held, cheat, [(CAREFUL, now_s() - 20), (FRIEND, None)])
    with w.rt.sessions.begin() as s:
        for who in (CAREFUL, FRIEND):
            s.add(Verifier(address=who, plan="cpu", build=w.rt.referee_build()))
    if room:
        _credited(w, unit_id_for(job_id, 0, 1), honest, [])
    with w.rt.sessions.begin() as s:
        assert [a for a, _ in checking._convicted(w.rt, s, cheat)] == [friend]
    assert _statuses(w, [careful, friend]) == [("passed", True), ("auditing", True)]
    assert _unit(w, held).status == "submitted"
    return job_id, held, careful, friend


@pytest.mark.parametrize("room", [True, False], ids=["fees-kept", "fees-forfeit"])
def test_a_stop_while_a_convicts_unit_waits_for_its_audits_credits_each_fee_once(world: World, room: bool) -> None:
    """The customer stops the job while the cheat's unit waits for the audit of FRIEND's pass. The stop credits the
    fee of each pass of a submitted unit it cancels, but CAREFUL's was credited when the unit was verified and kept
    at the conviction (the job had room for the redo): it is not credited again (it was, and the duplicate ledger
    key failed the stop, and with it every sweep that tried it). Where the conviction forfeit it for want of room,
    the stop, which frees that room, credits it. FRIEND's, under audit, stays as it was, and the sweep goes on."""
    job_id, held, careful, friend = _held_with_a_pass_audited_at_its_verdict(world, f"stop-held-{room}", room)
    fee = tokens(1) // 2
    with world.rt.sessions() as s:
        keys = set(s.scalars(select(LedgerEntry.unit_id).where(LedgerEntry.job_id == job_id)))
    assert (check_fee_key(careful) in keys, check_fee_key(friend) in keys) == (room, room)
    before = _owed(world, job_id)
    with world.rt.sessions.begin() as s:
        assert cancellation.stop_in(s, job_id, "cancelled on chain", 123)
    assert _unit(world, held).status == "cancelled"
    assert _statuses(world, [careful, friend]) == [("passed", True), ("auditing", True)]
    assert _owed(world, job_id) == (before if room else {**before, CAREFUL: fee})
    [stop] = _kinds(world, "job_cancelled")
    assert stop["check_fees"] == ({} if room else {str(careful): str(fee)})
    with world.rt.sessions.begin() as s:  # a second stop changes nothing
        assert not cancellation.stop_in(s, job_id, "cancelled on chain", 123)
    assert _owed(world, job_id) == (before if room else {**before, CAREFUL: fee})


def test_a_verifier_benched_while_a_convicts_unit_waits_for_its_audits_loses_its_fee_and_the_check_stays(
        world: World) -> None:
    """CAREFUL is benched (a canary caught it, say) while the cheat's unit waits for the audit of FRIEND's pass: its
    pass of that unit is not handed out again (nothing more is on a cheat's claim: it was, to a verifier whose
    replay then earned nothing), and its fee, kept at the conviction, is withdrawn (a benched verifier's passes are
    worth nothing; it was paid at settlement). A stop then credits it nothing."""
    job_id, held, careful, friend = _held_with_a_pass_audited_at_its_verdict(world, "bench-held")
    with world.rt.sessions.begin() as s:
        ver, cause = s.get(Verifier, CAREFUL), s.get(Verification, friend)
        assert ver is not None and cause is not None
        checking._bench(s, ver, cause, "caught by a canary (test)")
    with world.rt.sessions() as s:
        check = s.get(Verification, careful)
        assert check is not None and (check.status, check.verifier) == ("passed", CAREFUL)
        assert not list(s.scalars(select(Verification).where(Verification.unit_id == held,
                                                              Verification.status == "pending")))
    assert CAREFUL not in _owed(world, job_id) and FRIEND in _owed(world, job_id)
    [bench] = _kinds(world, "verifier_benched")
    assert bench["rechecks"] == 0 and bench["held_fees_withdrawn"] == str(tokens(1) // 2)
    with world.rt.sessions.begin() as s:
        assert cancellation.stop_in(s, job_id, "cancelled on chain", 123)
    assert CAREFUL not in _owed(world, job_id)


@pytest.mark.parametrize("market", ["sqlite", "postgres"], indirect=True)
def test_a_friends_passes_of_a_cheat_are_audited_once_an_honest_verifier_catches_it(market, tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """The whole story. A provider skips steps on every unit; its friend, a verifier passing whatever it is handed,
    checks its first unit (its pass not drawn for an audit), which is verified and averaged into the model. A
    careful verifier checks its second and disputes it: the referee convicts the cheat. The friend's pass of the
    first unit is audited then, fails, and costs the friend its whole stake and its fee; the cheat is paid nothing
    for the unit already in the model. An honest provider trains the second unit; the job settles paying it and the
    careful verifier alone, and the customer gets the rest back."""
    market.rt.settings.audit_rate = 1.0
    monkeypatch.setattr(checking, "audit_odds", lambda *a: 0.0)  # no pass is drawn when its verdict comes in
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    friend = staked_verifier(market, tmp_path, "friend", approve_everything=True)
    careful = staked_verifier(market, tmp_path, "careful")
    treasury, supply = market.deployment.treasury, market.ops.total_supply()
    treasury_before = market.ops.balance_of(treasury)
    spec = JobSpec(rounds=2, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    [first] = _handed_in(market, job_id, [cheat], 1)
    _stocked(market)
    assert friend.verify_once() == "ok"
    [friend_pass] = _rows(market, unit_id=first)

    def round_1() -> bool:
        with market.rt.sessions() as s:
            job = s.get(Job, job_id)
            return job is not None and job.round == 1

    market.wait(round_1, what="round 0 averaged")
    [second] = _handed_in(market, job_id, [cheat], 1)
    _stocked(market)
    market.wait(lambda: careful.verify_once() is None and cheat.account.address in slashed(market), timeout=120,
                what="the cheat slashed")
    market.wait(lambda: _rows(market, id=friend_pass.id)[0].status == "audit_failed", timeout=120,
                what="the friend's pass audited")
    assert market.ops.stake_state(friend.account.address).staked == 0
    # half the cheat's stake (the other half is the careful verifier's bounty) and the friend's whole stake
    assert market.ops.balance_of(treasury) - treasury_before == tokens(100) + tokens(100)
    [drawn] = _events(market, "passes_audited")
    assert (drawn["provider"], drawn["checks"]) == (cheat.account.address, 1)
    [withheld] = _events(market, "pay_withheld")
    assert (withheld["unit"], withheld["forfeit"]) == (first, str(tokens("0.55")))
    with market.rt.sessions() as s:  # the log tells the conviction first, then what follows from it
        told = list(s.scalars(select(Event.kind).where(Event.kind.in_(["provider_slashed", "passes_audited",
                                                                      "pay_withheld"])).order_by(Event.id)))
    assert told == ["provider_slashed", "passes_audited", "pay_withheld"]
    with market.rt.sessions() as s:
        ver = s.get(Verifier, friend.account.address)
        assert ver is not None and ver.status == "benched"
        assert s.get(Unit, first).status == "verified"  # type: ignore[union-attr]  # in the model
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    drive(market, [cheat, honest], careful, job_id)
    assert job_status(market, job_id) == "settled"
    with market.rt.sessions() as s:
        paid = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id)))
        second_unit = s.get(Unit, second)
        assert second_unit is not None and second_unit.provider == honest.account.address
    assert {e.provider for e in paid} == {honest.account.address, careful.account.address}
    escrow = market.ops.get_job(job_id)
    assert escrow.released == sum(e.amount for e in paid) < spec.budget()
    assert market.ops.total_supply() == supply
    page = httpx.get(f"{market.url}/web/jobs/{job_id}", timeout=10)
    assert page.status_code == 200 and "1 of their units averaged already, unpaid" in page.text


def test_a_friends_pass_of_the_very_unit_a_cheat_is_caught_on_is_audited_before_the_unit_is_redone(
        market, tmp_path: Path, monkeypatch) -> None:
    """Every segment of the unit is checked (level "full"): the cheat's friend passes one (not drawn for an audit
    then), a careful verifier disputes the other, and the referee convicts the cheat. The unit waits, its claim
    kept, for the audit of the friend's pass, which fails: the friend loses its whole stake. Only then does the unit
    go back to the pool; it is never credited to the cheat; an honest provider trains it and the job settles."""
    market.rt.settings.audit_rate = 1.0
    monkeypatch.setattr(checking, "audit_odds", lambda *a: 0.0)
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    friend = staked_verifier(market, tmp_path, "friend", approve_everything=True)
    careful = staked_verifier(market, tmp_path, "careful")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2),
                   verification="full")
    job_id = submit_job(market, spec)
    [unit_id] = _handed_in(market, job_id, [cheat], 1)
    _stocked(market)
    assert friend.verify_once() == "ok"
    [friend_pass] = _rows(market, unit_id=unit_id, verifier=friend.account.address)
    assert friend_pass.status == "passed"
    market.wait(lambda: careful.verify_once() is None and cheat.account.address in slashed(market), timeout=120,
                what="the cheat slashed")
    market.wait(lambda: _rows(market, id=friend_pass.id)[0].status == "audit_failed", timeout=120,
                what="the friend's pass audited")
    assert market.ops.stake_state(friend.account.address).staked == 0
    with market.rt.sessions() as s:
        kinds = [e.kind for e in s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))]
        unit = s.get(Unit, unit_id)
        assert unit is not None and (unit.status, unit.provider) == ("pending", None)
    assert "unit_verified" not in kinds
    [drawn] = _events(market, "passes_audited")
    assert (drawn["provider"], drawn["checks"]) == (cheat.account.address, 1)
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    drive(market, [cheat, honest], careful, job_id)
    with market.rt.sessions() as s:
        paid = {e.provider for e in s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id))}
    assert paid == {honest.account.address, careful.account.address}
