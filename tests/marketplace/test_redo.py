"""A convicted provider's units verified in a round not yet averaged are trained again by another provider, and it
is paid for none of a running job's units (checking._forfeit_unsettled): against the real contracts on the
in-process EVM and a real SQLite / PostgreSQL ledger, and the whole story over real HTTP, a Celery worker and
Redis."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from eth_utils import keccak
from sqlalchemy import select

from marketplace import cancellation, checking, referee, service, settlement
from gridmint.procs import new_database
from marketplace.common import check_fee_entry, model_config, unit_id_for
from marketplace.db import Event, Job, LedgerEntry, Provider, Unit, Verification, Verifier, check_fee_key
from node.adversary import ADVERSARIES
from node.model import init_state
from protocol.jobs import RANDOM_BYTES, new_job_id
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import _events, _handed_in, _stocked, drive, provider, slashed, staked_verifier, \
    submit_job
from tests.marketplace.test_settlement import World, make_world

CAP = tokens(2)  # the spec's max_price; two segments a unit: a passed check's fee is half the unit's price


@pytest.fixture()
def world(tmp_path: Path, db_url: str) -> World:
    return make_world(tmp_path, db_url)


def _job(w: World, name: str, rounds: int = 1, units: int = 3) -> tuple[str, JobSpec]:
    spec = JobSpec(rounds=rounds, units_per_round=units, steps_per_unit=10, segment_len=5, max_price=CAP)
    job_id = new_job_id(w.customer.address, keccak(text=name)[:RANDOM_BYTES])
    w.customer.fund_job(job_id, spec.budget())
    service.create_job(w.rt, w.customer.address, job_id, spec)
    return job_id, spec


def _providers(w: World) -> list[str]:
    with w.rt.sessions.begin() as s:
        for a in w.providers:
            if s.get(Provider, a.address) is None:
                s.add(Provider(address=a.address, region="eu-north", gpu="test", vram_mb=8000, price=CAP,
                               tokens_per_s=1000, capacity=2, stake=tokens(100)))
    return [a.address for a in w.providers]


def _verified(w: World, unit_id: str, who: str, price: int, checks: int = 0, verifier: str = "",
              blob: str | None = None) -> None:
    """Unit ``unit_id`` verified for ``who`` at ``price``: its price owed, and ``checks`` passed checks by
    ``verifier`` owed their fees (as checking.maybe_verified credits them)."""
    with w.rt.sessions.begin() as s:
        u = s.get(Unit, unit_id)
        assert u is not None
        u.status, u.provider, u.price, u.segment_blobs, u.final_blob = "verified", who, price, ["a", "b"], blob
        s.add(LedgerEntry(job_id=u.job_id, unit_id=u.id, provider=who, amount=price))
        for seg in range(checks):
            c = Verification(unit_id=u.id, provider=who, segment=seg, status="passed", verifier=verifier)
            s.add(c)
            s.flush()
            s.add(check_fee_entry(u, c))


def _convict(w: World, who: str) -> None:
    """What a fraud ruling or a failed audit does once ``who`` is slashed (checking._convicted)."""
    with w.rt.sessions.begin() as s:
        checking._convicted(w.rt, s, who)


def _owed(w: World, job_id: str) -> dict[str, int]:
    with w.rt.sessions() as s:
        out: dict[str, int] = {}
        for e in s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id)):
            out[e.provider] = out.get(e.provider, 0) + e.amount
        return out


def _unit(w: World, unit_id: str) -> Unit:
    with w.rt.sessions() as s:
        u = s.get(Unit, unit_id)
        assert u is not None
        return u


def _job_events(w: World, job_id: str, kind: str) -> list[dict]:  # type: ignore[type-arg]
    with w.rt.sessions() as s:
        return [e.data for e in s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == kind))]


@pytest.mark.parametrize("room", [True, False], ids=["room-for-the-fees", "no-room"])
def test_a_convicted_providers_unit_of_the_open_round_is_redone_and_its_price_forfeit(world: World,
                                                                                      room: bool) -> None:
    """The cheat had one unit verified (at the cap, one passed check) and one submitted when convicted: both go back
    to the pool with it excluded; its price for the verified one is no longer owed. The verifier that passed it keeps
    its fee where the job's other units left room in the budget for it (shard 1 paid under the cap), and loses it
    where they did not (shard 1 paid the most a unit can cost): the job never owes more than its escrow holds."""
    cheat, honest, verifier = _providers(world)[:3]
    job_id, spec = _job(world, f"redo-{room}")
    ids = [unit_id_for(job_id, 0, shard) for shard in range(3)]
    _verified(world, ids[0], cheat, CAP, checks=1, verifier=verifier)
    if room:
        _verified(world, ids[1], honest, tokens(1))
    else:  # the most a unit can cost: the cap and two fees
        _verified(world, ids[1], honest, CAP, checks=2, verifier=verifier)
    with world.rt.sessions.begin() as s:
        u = s.get(Unit, ids[2])
        assert u is not None
        u.status, u.provider = "submitted", cheat
    assert spec.unit_budget() == CAP + 2 * (CAP // 2)
    fee = CAP // 2
    _convict(world, cheat)

    for uid in (ids[0], ids[2]):
        u = _unit(world, uid)
        assert (u.status, u.provider, u.price, u.excluded) == ("pending", None, None, [cheat])
    assert _unit(world, ids[1]).status == "verified"
    [redone] = _job_events(world, job_id, "unit_redone")
    assert redone == {"unit": ids[0], "provider": cheat, "round": 0, "forfeit": str(CAP),
                      "check_fees_forfeit": "0" if room else str(fee)}
    owed = _owed(world, job_id)
    assert cheat not in owed
    assert owed == ({honest: tokens(1), verifier: fee} if room else {honest: CAP, verifier: 2 * fee})
    # at the worst, two more units at the most each can cost: within the budget the customer funded
    assert sum(owed.values()) + 2 * spec.unit_budget() <= spec.budget()
    with world.rt.sessions() as s:
        [check] = s.scalars(select(Verification).where(Verification.unit_id == ids[0]))
    assert check.status == "passed"  # the verifier's verdict stands: it replayed what it was handed, honestly
    assert (check_fee_key(check.id) in {e for e in _keys(world, job_id)}) == room
    # a re-run of the conviction (a retried task) changes nothing
    _convict(world, cheat)
    assert _owed(world, job_id) == owed and len(_job_events(world, job_id, "unit_redone")) == 1


def _keys(w: World, job_id: str) -> set[str]:
    with w.rt.sessions() as s:
        return set(s.scalars(select(LedgerEntry.unit_id).where(LedgerEntry.job_id == job_id)))


def test_units_of_an_averaged_round_stay_in_the_model_unpaid_and_a_stopped_jobs_stay_paid(world: World) -> None:
    """A round averaged already is in the customer's model: its units stay verified, but a proven cheat is not paid
    for them (the escrow keeps their price, the customer's at settlement); the verifiers' fees stand. The units of a
    job stopped (its customer cancelled) or done stay as they are: what settles them is settled on what they were. A
    re-run of the conviction changes nothing."""
    cheat, honest, verifier = _providers(world)
    job_id, spec = _job(world, "averaged", rounds=2, units=2)
    _verified(world, unit_id_for(job_id, 0, 0), cheat, tokens(1), checks=1, verifier=verifier)
    _verified(world, unit_id_for(job_id, 0, 1), honest, tokens(1))
    with world.rt.sessions.begin() as s:  # round 0 averaged: round 1 opens
        job = s.get(Job, job_id)
        assert job is not None
        job.round = 1
        service._create_round_units(s, job, spec, 1)
    _verified(world, unit_id_for(job_id, 1, 0), cheat, tokens(1))
    stopped, _ = _job(world, "stopped", units=2)
    _verified(world, unit_id_for(stopped, 0, 0), cheat, tokens(1))
    with world.rt.sessions.begin() as s:
        s.get(Job, stopped).status = "cancelling"  # type: ignore[union-attr]
    _convict(world, cheat)
    assert _unit(world, unit_id_for(job_id, 0, 0)).status == "verified"
    assert _unit(world, unit_id_for(job_id, 1, 0)).status == "pending"
    assert _unit(world, unit_id_for(stopped, 0, 0)).status == "verified"
    fee = tokens(1) // 2  # its check of one of two segments
    assert _owed(world, job_id) == {honest: tokens(1), verifier: fee}
    assert _owed(world, stopped) == {cheat: tokens(1)}
    assert [e["unit"] for e in _job_events(world, job_id, "unit_redone")] == [unit_id_for(job_id, 1, 0)]
    assert _job_events(world, job_id, "pay_withheld") == [
        {"unit": unit_id_for(job_id, 0, 0), "provider": cheat, "round": 0, "forfeit": str(tokens(1))}]
    assert not _job_events(world, stopped, "unit_redone") and not _job_events(world, stopped, "pay_withheld")
    _convict(world, cheat)
    assert _owed(world, job_id) == {honest: tokens(1), verifier: fee}
    assert len(_job_events(world, job_id, "pay_withheld")) == 1
    # settled: the withheld price is the customer's refund
    for shard in range(2):
        _verified(world, unit_id_for(job_id, 1, shard), honest, tokens(1))
    with world.rt.sessions.begin() as s:
        s.get(Job, job_id).status = "done"  # type: ignore[union-attr]
    assert settlement.settle_job(world.rt, job_id) == spec.budget() - 3 * tokens(1) - fee


def test_a_round_whose_unit_is_taken_back_while_it_averages_waits_for_the_redo(world: World, monkeypatch) -> None:
    """The conviction lands while the round's verified units are being averaged (service.advance reads them, then
    averages outside any transaction): the round does not close on the cheat's weights. It closes once the redo is
    verified, on the redo's."""
    cheat, honest = _providers(world)[:2]
    job_id, spec = _job(world, "race", units=2)
    cfg = model_config(spec)
    blobs = [world.rt.blobs.put_tensors(init_state(cfg, seed), {"kind": "test"}) for seed in (1, 2, 3)]
    units = [unit_id_for(job_id, 0, shard) for shard in range(2)]
    _verified(world, units[0], cheat, tokens(1), blob=blobs[0])
    _verified(world, units[1], honest, tokens(1), blob=blobs[1])
    before = _job_row(world, job_id).global_blob
    real = service.average_states

    def convicted_meanwhile(states):  # type: ignore[no-untyped-def]
        _convict(world, cheat)
        return real(states)

    monkeypatch.setattr(service, "average_states", convicted_meanwhile)
    assert service.advance(world.rt, job_id) == "running"
    job = _job_row(world, job_id)
    assert (job.status, job.round, job.global_blob) == ("running", 0, before)
    assert not _job_events(world, job_id, "round_done")
    assert _unit(world, units[0]).status == "pending"
    monkeypatch.setattr(service, "average_states", real)

    _verified(world, units[0], honest, tokens(1), blob=blobs[2])  # the redo, verified
    assert service.advance(world.rt, job_id) == "done"
    assert _job_row(world, job_id).global_blob != before
    assert len(_job_events(world, job_id, "round_done")) == 1
    assert settlement.settle_job(world.rt, job_id) == spec.budget() - tokens(2)
    assert _owed(world, job_id) == {honest: tokens(2)}


def _job_row(w: World, job_id: str) -> Job:
    with w.rt.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


@pytest.fixture()
def pg_world(tmp_path: Path, postgres_server: str) -> World:
    """A world on PostgreSQL alone: row locks (SQLite has one writer at a time)."""
    return make_world(tmp_path, new_database(postgres_server))


def _while_stopping(w: World, job_id: str, step: Callable[[], None]) -> list[BaseException]:
    """Run ``step`` in one thread while another stops ``job_id`` (cancellation.stop_in) in a transaction that takes
    the job's row first, then waits half a second (``step`` under way) before it changes the job's units and checks.
    What either raised."""
    stopping, started = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def stop() -> None:
        with w.rt.sessions.begin() as s:
            s.execute(select(Job.id).where(Job.id == job_id).with_for_update()).all()
            stopping.set()
            started.wait(10)
            time.sleep(0.5)
            assert cancellation.stop_in(s, job_id, "cancelled on chain (test)", 0)

    def other() -> None:
        stopping.wait(10)
        started.set()
        step()

    def caught(f: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                f()
            except BaseException as exc:  # noqa: BLE001 - returned to the test
                errors.append(exc)
        return run

    threads = [threading.Thread(target=caught(f)) for f in (stop, other)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return errors


def test_a_conviction_and_a_customers_stop_of_the_same_job_take_its_row_in_turn(pg_world: World) -> None:
    """On PostgreSQL: a customer's stop (cancellation.stop_in) takes the job's row, then its units and checks; a conviction changes
    the cheat's units, then reads the job's round with its row taken. Had the conviction taken the units first, the
    two would wait on each other (PostgreSQL aborts one). It takes the job's rows first: it waits for the stop, then
    finds the job stopping, its units cancelled, and leaves them."""
    cheat, honest = _providers(pg_world)[:2]
    job_id, _ = _job(pg_world, "stop-vs-conviction", units=3)
    units = [unit_id_for(job_id, 0, shard) for shard in range(3)]
    _verified(pg_world, units[0], cheat, tokens(1))
    with pg_world.rt.sessions.begin() as s:
        for uid, who in ((units[1], cheat), (units[2], honest)):
            u = s.get(Unit, uid)
            assert u is not None
            u.status, u.provider = "submitted", who
    assert not _while_stopping(pg_world, job_id, lambda: _convict(pg_world, cheat))
    assert _job_row(pg_world, job_id).status == "cancelling"
    assert [_unit(pg_world, u).status for u in units] == ["verified", "cancelled", "cancelled"]
    assert _owed(pg_world, job_id) == {cheat: tokens(1)}  # a stopped job's verified units are paid: what settles it
    assert not _job_events(pg_world, job_id, "unit_redone")
    with pg_world.rt.sessions() as s:
        prov = s.get(Provider, cheat)
        assert prov is not None and prov.status == "slashed"


def test_a_bench_and_a_customers_stop_of_the_same_job_take_its_row_in_turn(pg_world: World) -> None:
    """On PostgreSQL, as above for a verifier benched while the customer stops the job: the bench hands the check it
    held back to the pool and reopens the unit it passed; the stop voids the unit's checks. The bench takes the
    job's row first, waits for the stop, and then finds nothing of the job to redo."""
    honest, lazy = _providers(pg_world)[:2]
    job_id, _ = _job(pg_world, "stop-vs-bench", units=2)
    units = [unit_id_for(job_id, 0, shard) for shard in range(2)]
    with pg_world.rt.sessions.begin() as s:
        s.add(Verifier(address=lazy))
        u = s.get(Unit, units[1])
        assert u is not None
        u.status, u.provider = "submitted", honest
        held = Verification(unit_id=units[1], provider=honest, segment=0, status="assigned", verifier=lazy)
        s.add(held)  # the check it holds: handed back to the pool first (a lower id)
    _verified(pg_world, units[0], honest, tokens(1), checks=1, verifier=lazy)
    with pg_world.rt.sessions.begin() as s:
        cause = Verification(unit_id=units[1], provider=honest, segment=1, status="canary_missed", verifier=lazy,
                             canary={"kind": "test"})
        s.add(cause)

    def bench() -> None:
        with pg_world.rt.sessions.begin() as s:
            ver, why = s.get(Verifier, lazy), s.get(Verification, cause.id)
            assert ver is not None and why is not None
            checking._bench(s, ver, why, "it approved a planted known-bad segment (test)")

    assert not _while_stopping(pg_world, job_id, bench)
    assert [_unit(pg_world, u).status for u in units] == ["verified", "cancelled"]
    assert _owed(pg_world, job_id) == {honest: tokens(1), lazy: CAP // 2 // 2}  # paid as the stop found it
    assert not _job_events(pg_world, job_id, "unit_reopened")
    with pg_world.rt.sessions() as s:
        ver = s.get(Verifier, lazy)
        assert ver is not None and ver.status == "benched"
        assert s.get(Verification, held.id).status == "void"  # type: ignore[union-attr]


def test_two_failed_audits_crossing_jobs_take_their_rows_in_one_batch_each(pg_world: World, monkeypatch) -> None:
    """On PostgreSQL: two audits fail at once, each convicting one's provider and benching the other's verifier
    (each replayed on the unit's own bits), across two jobs: the first's provider and the second's verifier work in
    job A, the others in job B. Had each taken its provider's jobs, then its verifier's (two batches), the two would
    wait on each other: A then B, and B then A (PostgreSQL aborts one). Each takes all its rows first, in one
    batch: the second waits for the first, and both land. (Each step here pauses half a second after it takes its
    first rows, so that both are under way.)"""
    cheat_a, cheat_b, honest = _providers(pg_world)[:3]
    friend_a, friend_b = "0x" + "a1" * 20, "0x" + "b2" * 20
    job_a, _ = _job(pg_world, "crossing-a", units=2)
    job_b, _ = _job(pg_world, "crossing-b", units=2)
    audits = []
    with pg_world.rt.sessions.begin() as s:
        for job_id, cheat, friend, other in ((job_a, cheat_a, friend_a, friend_b), (job_b, cheat_b, friend_b, friend_a)):
            s.add(Verifier(address=friend))
            for shard, who in ((0, cheat), (1, honest)):
                u = s.get(Unit, unit_id_for(job_id, 0, shard))
                assert u is not None
                u.status, u.provider = "submitted", who
            audit = Verification(unit_id=unit_id_for(job_id, 0, 0), provider=cheat, segment=0, status="auditing",
                                 verifier=friend)
            # the other audit's verifier passed the honest unit of this job
            s.add_all([audit, Verification(unit_id=unit_id_for(job_id, 0, 1), provider=honest, segment=0,
                                           status="passed", verifier=other)])
            s.flush()
            audits.append(audit.id)
    lock, first = checking._lock_jobs, threading.local()

    def slow_lock(s, *job_ids) -> None:  # type: ignore[no-untyped-def]
        lock(s, *job_ids)
        if not getattr(first, "done", False):
            first.done = True
            time.sleep(0.5)

    monkeypatch.setattr(checking, "_lock_jobs", slow_lock)
    errors: list[BaseException] = []

    def fail(audit_id: int) -> None:
        try:
            with pg_world.rt.sessions.begin() as s:
                task = s.get(Verification, audit_id)
                assert task is not None
                checking._audit_failed(pg_world.rt, s, task, referee.Ruling(fraud=True, reason="test"), 0,
                                       b"\x01" * 32, 0)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=fail, args=(a,)) for a in audits]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    with pg_world.rt.sessions() as s:
        assert [s.get(Verification, a).status for a in audits] == ["audit_failed"] * 2  # type: ignore[union-attr]
        for cheat in (cheat_a, cheat_b):
            assert s.get(Provider, cheat).status == "slashed"  # type: ignore[union-attr]
        for friend in (friend_a, friend_b):
            assert s.get(Verifier, friend).status == "benched"  # type: ignore[union-attr]
        # each cheat's unit back to the pool; each friend's pass of the honest unit handed out again
        for job_id in (job_a, job_b):
            assert s.get(Unit, unit_id_for(job_id, 0, 0)).status == "pending"  # type: ignore[union-attr]
            [redo] = s.scalars(select(Verification).where(Verification.unit_id == unit_id_for(job_id, 0, 1)))
            assert (redo.status, redo.verifier) == ("pending", None)


def test_a_benched_verifiers_pass_on_a_unit_of_the_open_round_is_done_again_before_the_unit_is_paid(
        world: World) -> None:
    """A verifier caught approving a canary had passed a check of a unit that was then credited (its other check
    passed by a careful verifier). The round is not averaged yet: the unit goes back to ``submitted``, what it was
    credited (its price, both fees) withdrawn, the lazy pass handed out again, the careful one standing. Once the
    redone check passes, the unit is credited again, exactly once. A unit of an averaged round stays credited."""
    honest, lazy, careful = _providers(world)[:3]
    job_id, _ = _job(world, "reopen", units=2)
    old_job, old_spec = _job(world, "reopen-averaged", rounds=2, units=1)
    units = [unit_id_for(job_id, 0, shard) for shard in range(2)]
    old_unit = unit_id_for(old_job, 0, 0)
    with world.rt.sessions.begin() as s:
        s.add(Verifier(address=lazy))
        s.get(Provider, honest).completed, s.get(Provider, honest).verified_streak = 3, 3  # type: ignore[union-attr]
    _verified(world, units[0], honest, tokens(1), checks=1, verifier=lazy)
    _verified(world, units[1], honest, tokens(1), checks=1, verifier=careful)
    _verified(world, old_unit, honest, tokens(1), checks=1, verifier=lazy)
    with world.rt.sessions.begin() as s:
        second = Verification(unit_id=units[0], provider=honest, segment=1, status="passed", verifier=careful)
        s.add(second)
        s.flush()
        u = s.get(Unit, units[0])
        assert u is not None
        s.add(check_fee_entry(u, second))
        cause = Verification(unit_id=units[1], provider=honest, segment=1, status="canary_missed", verifier=lazy,
                             canary={"kind": "test"})
        s.add(cause)
        job = s.get(Job, old_job)
        assert job is not None
        job.round = 1  # the old job's round 0 averaged
        service._create_round_units(s, job, old_spec, 1)
    fee = CAP // 2 // 2  # a passed check: the unit's price (1 GMT) over its two segments
    owed = _owed(world, job_id)
    assert owed == {honest: tokens(2), lazy: fee, careful: 2 * fee}
    with world.rt.sessions.begin() as s:
        ver, why = s.get(Verifier, lazy), s.get(Verification, cause.id)
        assert ver is not None and why is not None
        checking._bench(s, ver, why, "it approved a planted known-bad segment (test)")

    assert _unit(world, units[0]).status == "submitted" and _unit(world, units[1]).status == "verified"
    assert _unit(world, old_unit).status == "verified" and _owed(world, old_job) == {honest: tokens(1), lazy: fee}
    with world.rt.sessions() as s:
        checks = {c.segment: c for c in s.scalars(select(Verification).where(Verification.unit_id == units[0]))}
        prov = s.get(Provider, honest)
        assert prov is not None and (prov.completed, prov.verified_streak) == (2, 2)
    assert (checks[0].status, checks[0].verifier) == ("pending", None)
    assert (checks[1].status, checks[1].verifier) == ("passed", careful)
    assert _owed(world, job_id) == {honest: tokens(1), careful: fee}  # unit 1's: its price and careful's fee
    [reopened] = _job_events(world, job_id, "unit_reopened")
    assert reopened == {"unit": units[0], "provider": honest, "verifier": lazy, "withdrawn": str(tokens(1) + 2 * fee)}
    [benched] = [e.data for e in _all(world) if e.kind == "verifier_benched"]
    assert benched["rechecks"] == 1  # the open round's pass: the averaged round's stands

    with world.rt.sessions.begin() as s:  # the careful verifier redoes the lazy pass
        c = s.get(Verification, checks[0].id)
        assert c is not None
        c.status, c.verifier = "passed", careful
        u = s.get(Unit, units[0])
        assert u is not None
        checking.maybe_verified(s, u)
    assert _unit(world, units[0]).status == "verified"
    assert _owed(world, job_id) == {honest: tokens(2), careful: 3 * fee}  # its two checks of unit 0, one of unit 1
    with world.rt.sessions() as s:
        prov = s.get(Provider, honest)
        assert prov is not None and (prov.completed, prov.verified_streak) == (3, 3)


def _all(w: World) -> list[Event]:
    with w.rt.sessions() as s:
        return list(s.scalars(select(Event).order_by(Event.id)))


@pytest.mark.parametrize("market", ["sqlite", "postgres"], indirect=True)
def test_a_cheats_unit_that_passed_is_trained_again_once_its_next_cheat_is_caught(market, tmp_path: Path) -> None:
    """The whole story: a provider trains its first unit honestly (verified, owed its price), cheats on its second,
    and is slashed for that one. The first goes back to the pool with the second: an honest provider trains both,
    the job settles on the honest provider's work alone, and the cheat is paid nothing."""
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55")
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    [first] = _handed_in(market, job_id, [cheat], 1)
    _stocked(market)

    def first_verified() -> bool:
        verifier.verify_once()
        with market.rt.sessions() as s:
            u = s.get(Unit, first)
            return u is not None and u.status == "verified"

    market.wait(first_verified, what="the cheat's honest unit verified")
    owed = {e.provider: e.amount for e in _ledger(market, job_id) if e.verification_id is None}
    assert owed == {cheat.account.address: tokens("0.55")}
    skip = ADVERSARIES["skip-steps"]
    cheat.trainer = lambda s, start, workdir: skip(s, start, workdir)
    [second] = _handed_in(market, job_id, [cheat], 1)  # (the first is verified, not submitted)
    assert second != first
    _stocked(market)
    market.wait(lambda: verifier.verify_once() is None and cheat.account.address in slashed(market), timeout=120,
                what="the cheat slashed")
    [redone] = _events(market, "unit_redone")
    assert (redone["unit"], redone["forfeit"]) == (first, str(tokens("0.55")))
    # no unit of the job was verified under the cap to make room for them: the fees of its passed checks go too
    assert int(redone["check_fees_forfeit"]) > 0
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    drive(market, [cheat, honest], verifier, job_id)
    with market.rt.sessions() as s:
        units = list(s.scalars(select(Unit).where(Unit.job_id == job_id)))
    assert {(u.status, u.provider) for u in units} == {("verified", honest.account.address)}
    paid = _ledger(market, job_id)
    assert cheat.account.address not in {e.provider for e in paid} and all(e.released for e in paid)
    assert {e.provider for e in paid if e.verification_id is None} == {honest.account.address}
    escrow = market.ops.get_job(job_id)
    assert escrow.released == sum(e.amount for e in paid) <= spec.budget()
    page = httpx.get(f"{market.url}/web/jobs/{job_id}", timeout=10)  # what the customer sees
    assert page.status_code == 200 and "1 of their verified units trained again by others, unpaid" in page.text
    assert "unit_redone" in page.text


def _ledger(market, job_id: str) -> list[LedgerEntry]:  # type: ignore[no-untyped-def]
    with market.rt.sessions() as s:
        return list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id)))


def test_a_round_that_diverges_while_a_unit_of_it_is_taken_back_fails_the_job_only_once_it_is_credited_again(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """``advance`` reads the round's units verified and averages them outside any transaction; meanwhile a canary
    benches the verifier that passed one of them, which takes that unit back to be checked again (its credit
    withdrawn), and the average diverges. The job used to fail there with the unit still ``submitted``: the redone
    check's verdict credited it to a job whose settlement had begun, so a settlement re-run after a crash released
    the first run's entries twice (and stuck on the escrow's count), or, settled first, left it owed for good. Now
    the job fails only on the units it averaged: the redo's verdict advances it again, and the failure then pays
    every entry once."""
    from protocol.errors import GridMintValueError

    honest, lazy, careful = _providers(world)[:3]
    job_id, _ = _job(world, "diverges-while-reopened", units=2)
    units = [unit_id_for(job_id, 0, shard) for shard in range(2)]
    _verified(world, units[0], honest, tokens(1), checks=1, verifier=lazy)
    _verified(world, units[1], honest, tokens(1), checks=1, verifier=careful)
    with world.rt.sessions.begin() as s:
        s.add(Verifier(address=lazy))
        cause = Verification(unit_id=units[1], provider=honest, segment=1, status="canary_missed", verifier=lazy,
                             canary={"kind": "test"})
        s.add(cause)
        s.flush()
        cause_id = cause.id

    def bench_then_diverge(states: object) -> object:  # advance's averaging, outside any transaction
        with world.rt.sessions.begin() as s:  # a canary catches the lazy verifier meanwhile (once)
            ver = s.get(Verifier, lazy)
            checking._bench(s, ver, s.get(Verification, cause_id), "it approved a canary (test)")
        raise GridMintValueError("the averaged model is not finite (test)")

    monkeypatch.setattr(service, "average_states", bench_then_diverge)
    assert service.advance(world.rt, job_id) == "running"  # (was "failing", with shard 0 to be checked again)
    assert _unit(world, units[0]).status == "submitted" and _job_row(world, job_id).status == "running"
    assert _owed(world, job_id) == {honest: tokens(1), careful: tokens(1) // 2}  # shard 0's credit withdrawn
    with world.rt.sessions.begin() as s:  # another verifier passes the check done again: credited again
        [redo] = s.scalars(select(Verification).where(Verification.unit_id == units[0],
                                                      Verification.status == "pending"))
        redo.status, redo.verifier = "passed", careful
        checking.maybe_verified(s, s.get(Unit, units[0]))  # type: ignore[arg-type]
    assert service.advance(world.rt, job_id) == "failing"  # the round diverges again: now the job fails
    settlement.settle_job(world.rt, job_id)
    assert _job_row(world, job_id).status == "failed"
    owed = _owed(world, job_id)
    assert owed == {honest: tokens(2), careful: tokens(1)}
    with world.rt.sessions() as s:
        assert not list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                            LedgerEntry.released.is_(False))))
    assert world.ops.get_job(job_id).released == sum(owed.values())
