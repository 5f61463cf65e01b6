"""Providers that drop out, against the real contracts on the in-process EVM and a real database (SQLite and
PostgreSQL), through the service's own steps (register, match, next_work, submit_result, reap, verify) with the
Celery queue recorded instead of run.

- A take-back is conditional (``common.take_back``): a result accepted while the reaper runs stands and is paid; a
  reap that lands first refuses the result (409) instead of being overwritten; a unit that leaves its provider takes
  that provider's open checks with it.
- A dropout is a last resort for the unit it dropped, not banned from it for good (``Unit.dropped_by``); a cheat is.
- Only providers seen lately are offered work (``settings.resolved_provider_live_s``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from sqlalchemy import event, select, update

from marketplace import checking, service, standby
from marketplace.common import Conflict
from marketplace.db import Event, Job, LedgerEntry, Provider, Unit, Verification, now_s
from marketplace.matching import Demand, Offer, match_last_resort
from marketplace.settings import Settings
from node import checkpoint
from node.device import kernel_build
from node.replay import check_segment
from node.trainer import UnitSpec, model_only, train_unit
from protocol.jobs import RANDOM_BYTES, new_job_id
from protocol.money import tokens
from protocol.proof import TrainingProof
from protocol.schemas import JobSpec, ModelSpec, ProviderRegister, ResultSubmit, VerdictSubmit, VerifierRegister
from protocol.signing import sign_typed, to_bytes32
from tests.marketplace.test_settlement import World, make_world


@pytest.fixture()
def world(tmp_path: Path, db_url: str) -> World:
    w = make_world(tmp_path, db_url)
    w.rt.settings.canary_rate = 0.0  # no planted known-bad tasks: each check handed out is a real one
    return w


def _spec(level: str = "none", units: int = 1) -> JobSpec:
    """A unit of two 2-step segments on a tiny model: trained and replayed in well under a second."""
    return JobSpec(model=ModelSpec(d_model=16, n_layer=1, n_head=2, ctx=16), rounds=1, units_per_round=units,
                   steps_per_unit=4, segment_len=2, batch_size=2, max_price=tokens(5), verification=level)


def _staked(w: World, acct: LocalAccount) -> None:
    w.ops.transfer(acct.address, tokens(100))
    w.ops.as_account(acct).stake(tokens(100))  # the minimum: settings.min_stake, settings.min_verifier_stake


def _provider(w: World, i: int, price: int) -> LocalAccount:
    acct = w.providers[i]
    _staked(w, acct)
    service.register_provider(w.rt, acct.address, ProviderRegister(
        region="eu-north", gpu="cpu", vram_mb=16_000, price=str(price), tokens_per_s=10_000, capacity=1))
    return acct


def _job(w: World, name: str, spec: JobSpec) -> str:
    job_id = new_job_id(w.customer.address, keccak(text=name)[:RANDOM_BYTES])
    w.customer.fund_job(job_id, spec.budget())
    service.create_job(w.rt, w.customer.address, job_id, spec)
    return job_id


def _unit(w: World, job_id: str) -> Unit:
    with w.rt.sessions() as s:
        return s.scalars(select(Unit).where(Unit.job_id == job_id)).one()


def _train(w: World, acct: LocalAccount, tmp: Path) -> ResultSubmit:
    """What ProviderAgent.work_once does: pull its unit, train it, upload, sign."""
    work = service.next_work(w.rt, acct.address)
    assert work is not None, f"nothing assigned to {acct.address}"
    spec = UnitSpec.from_json(work["spec"])
    start, _ = checkpoint.load(w.rt.blobs.read(work["start_blob"]))
    res = train_unit(spec, model_only(start), tmp / f"{acct.address[2:10]}-{spec.unit_id[2:10]}")
    segments = [w.rt.blobs.put_file(p) for p in res.segment_paths]
    final = w.rt.blobs.put_file(res.final_path)
    return ResultSubmit(unit_id=spec.unit_id, proof=res.proof.to_dict(), final_blob=final, segment_blobs=segments,
                        proof_signature=sign_typed(acct, "TrainingProof", w.rt.domain, res.proof.signable_fields()),
                        losses=[float(x) for x in res.losses], plan="cpu", build=kernel_build("cpu"))


def _verify(w: World, verifier: LocalAccount) -> tuple[int, str] | None:
    """What VerifierAgent.verify_once does on the referee's plan: take a task, replay it bit for bit, sign."""
    task = checking.next_verification(w.rt, verifier.address)
    if task is None:
        return None
    spec, proof, seg = UnitSpec.from_json(task["spec"]), TrainingProof.from_dict(task["proof"]), task["segment"]
    v = check_segment(spec, proof, seg, w.rt.blobs.path(task["checkpoint_blob"]))
    replayed = v.replayed_end if v.replayed_end.startswith("0x") else "0x" + v.replayed_end
    msg = {"unitId": to_bytes32(spec.unit_id), "segment": seg, "ok": v.ok,
           "claimedHash": to_bytes32(proof.segments[seg].end_hash), "replayedHash": to_bytes32(replayed)}
    return task["verification_id"], checking.record_verdict(w.rt, verifier.address, VerdictSubmit(
        verification_id=task["verification_id"], ok=v.ok, replayed_hash=replayed,
        signature=sign_typed(verifier, "Verdict", w.rt.domain, msg), reason=v.reason[:200]))


def _overdue(w: World, job_id: str) -> None:
    """The unit's provider is alive (it beat a second ago) and its deadline has just passed: the reaper's to take."""
    with w.rt.sessions.begin() as s:
        s.execute(update(Unit).where(Unit.job_id == job_id).values(heartbeat_at=now_s() - 1, deadline_at=now_s() - 1))


def _silent(w: World, job_id: str) -> None:
    """The unit's provider has not been heard from for longer than the heartbeat deadline (a link blip)."""
    ago = now_s() - w.rt.settings.unit_timeout_s - 5
    with w.rt.sessions.begin() as s:
        s.execute(update(Unit).where(Unit.job_id == job_id, Unit.status == "assigned")
                  .values(assigned_at=ago, heartbeat_at=ago))
        s.execute(update(Provider).where(Provider.address.in_(select(Unit.provider).where(Unit.job_id == job_id)))
                  .values(last_seen=ago))


def _events(w: World, job_id: str, kind: str) -> list[dict[str, Any]]:
    with w.rt.sessions() as s:
        return [e.data for e in s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == kind))]


# ---------------------------------------------------------------- D1: the reaper and a result, at once


def test_a_result_accepted_while_the_reaper_runs_stands_and_is_paid(world: World, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper reads A's unit as overdue; A's result is accepted (202) before the reaper writes. The reaper used to
    overwrite it (UPDATE ... WHERE id = ?): the unit went to standby B, A counted as a dropout and never paid, and
    A's checks left pending under A's name, later handed out over B's proof (a dispute of them slashed A for B's
    work). Now the take-back finds the unit submitted and leaves it: A's checks are its own, pass, and A is paid."""
    a, b = _provider(world, 0, tokens(1)), _provider(world, 1, tokens(2))
    verifier = world.providers[2]
    _staked(world, verifier)
    service.register_verifier(world.rt, verifier.address, VerifierRegister(plan="cpu", build=kernel_build("cpu")))
    job = _job(world, "race-submit-first", _spec("full"))
    service.run_matching(world.rt)
    result = _train(world, a, tmp_path)
    _overdue(world, job)
    real_pick, fired = standby.pick_standbys, []

    def submit_meanwhile(*args: Any, **kw: Any) -> Any:  # reap has read the unit and not yet written
        if not fired:
            fired.append(True)
            service.submit_result(world.rt, a.address, result)  # another API process: committed, 202 to the node
        return real_pick(*args, **kw)

    monkeypatch.setattr(standby, "pick_standbys", submit_meanwhile)
    assert service.reap(world.rt) == 0
    assert fired
    unit = _unit(world, job)
    assert (unit.status, unit.provider, unit.dropped_by) == ("submitted", a.address, {})
    with world.rt.sessions() as s:
        assert s.get(Provider, a.address).dropped == 0
        checks = list(s.scalars(select(Verification).where(Verification.unit_id == unit.id)))
        assert s.scalars(select(Unit).where(Unit.provider == b.address)).all() == []
    assert [(v.provider, v.status) for v in checks] == [(a.address, "pending")] * 2
    assert _events(world, job, "unit_timed_out") == []
    assert service.next_work(world.rt, b.address) is None  # the standby was handed nothing
    verdicts = [_verify(world, verifier), _verify(world, verifier)]
    assert [r for _, r in verdicts] == ["passed", "passed"] and _verify(world, verifier) is None
    with world.rt.sessions() as s:
        assert s.get(Unit, unit.id).status == "verified"
        paid = [(e.provider, e.amount) for e in s.scalars(select(LedgerEntry).where(
            LedgerEntry.job_id == job, LedgerEntry.verification_id.is_(None)))]
    assert paid == [(a.address, tokens(1))]


def test_a_reap_that_lands_first_refuses_the_result(world: World, tmp_path: Path) -> None:
    """The other order: submit_result has read the unit as still A's, and the reaper takes it (to standby B) before
    the result's write. The write used to go through regardless (UPDATE ... WHERE id = ?): B's unit marked submitted
    with A's proof, checks created for A. Now it is conditional: the result is refused (409), the unit stays B's
    and no check is created."""
    a, b = _provider(world, 0, tokens(1)), _provider(world, 1, tokens(2))
    job = _job(world, "race-reap-first", _spec("full"))
    service.run_matching(world.rt)
    result = _train(world, a, tmp_path)
    _overdue(world, job)
    engine, armed = world.rt.sessions.kw["bind"], [True]

    def reap_first(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if armed[0] and statement.lstrip().upper().startswith("UPDATE UNITS"):  # the result's write, about to run
            armed[0] = False
            assert service.reap(world.rt) == 1  # the beat worker, another connection: committed first

    event.listen(engine, "before_cursor_execute", reap_first)
    try:
        with pytest.raises(Conflict, match="no longer assigned"):
            service.submit_result(world.rt, a.address, result)
    finally:
        event.remove(engine, "before_cursor_execute", reap_first)
    assert not armed[0]
    unit = _unit(world, job)
    assert (unit.status, unit.provider, unit.proof) == ("assigned", b.address, None)
    assert set(unit.dropped_by) == {a.address}
    with world.rt.sessions() as s:
        assert s.scalars(select(Verification)).all() == []


def test_a_unit_taken_back_voids_its_providers_open_checks(world: World) -> None:
    """Whenever a unit leaves a provider its open checks of it go too (void: never handed out over the next holder's
    work, never paid); checks already done, and canaries, are left to their own paths. Here a unit still assigned to
    A carries checks of A (what the old lost update left behind) when the reaper takes it."""
    a = _provider(world, 0, tokens(1))
    job = _job(world, "void-checks", _spec("full"))
    service.run_matching(world.rt)
    unit = _unit(world, job)
    with world.rt.sessions.begin() as s:
        for seg, status in enumerate(["pending", "assigned", "held", "passed"]):
            s.add(Verification(unit_id=unit.id, provider=a.address, segment=seg % 2, status=status))
        s.add(Verification(unit_id=unit.id, provider=a.address, segment=0, status="assigned", canary={"held": 0}))
    _silent(world, job)
    assert service.reap(world.rt) == 1
    with world.rt.sessions() as s:
        got = [(v.status, v.canary is not None) for v in s.scalars(select(Verification).order_by(Verification.id))]
    assert got == [("void", False), ("void", False), ("void", False), ("passed", False), ("assigned", True)]


# ---------------------------------------------------------------- D3: every provider dropped the unit once


def test_a_unit_every_provider_dropped_once_goes_back_to_one_that_is_back(world: World, tmp_path: Path) -> None:
    """A two-provider market where each node's link drops once while it holds the unit. The dropouts used to be
    excluded from the unit for good: pending for ever, the job never done. Now a dropout is passed over while
    another provider has a free slot, and is the last resort once it is back (seen since it dropped the unit)."""
    a, b = _provider(world, 0, tokens(1)), _provider(world, 1, tokens(2))
    job = _job(world, "two-blips", _spec())
    service.run_matching(world.rt)
    assert _unit(world, job).provider == a.address
    _silent(world, job)
    assert service.reap(world.rt) == 1
    assert _unit(world, job).provider == b.address  # the standby, at once: A is passed over while B is free
    _silent(world, job)
    assert service.reap(world.rt) == 1
    unit = _unit(world, job)
    assert unit.status == "pending" and set(unit.dropped_by) == {a.address, b.address} and unit.excluded == []
    assert service.run_matching(world.rt) == []  # neither is back yet
    assert service.next_work(world.rt, b.address) is None  # B is: it polls for work again
    assert [(g.unit_id, g.provider) for g in service.run_matching(world.rt)] == [(unit.id, b.address)]
    with world.rt.sessions() as s:
        ranked = {p.address: p.dropped for p in s.scalars(select(Provider))}
    assert ranked[a.address] == ranked[b.address] == 1  # each dropout still counts against its ranking
    service.submit_result(world.rt, b.address, _train(world, b, tmp_path))
    assert service.advance(world.rt, job) == "done"
    with world.rt.sessions() as s:
        assert s.get(Job, job).status == "done"


def test_a_dropout_is_the_last_resort_and_a_cheat_is_never_let_back() -> None:
    """The rule itself (pure): a unit's dropouts are let back in only for the units nobody else has a free slot
    for, and only into the slots left; a provider excluded for fraud stays out."""
    offers = [Offer("0xa", "eu-north", 1, 8000, 100), Offer("0xb", "eu-north", 2, 8000, 100),
              Offer("0xc", "eu-north", 1, 8000, 100, free_slots=2)]
    demands = [Demand("u1", 8000, 100, 5, excluded=frozenset({"0xc"})),
               Demand("u2", 8000, 100, 5, excluded=frozenset({"0xa", "0xb", "0xc"})),
               Demand("u3", 8000, 100, 5, excluded=frozenset({"0xa", "0xb", "0xc"}))]
    lifted = {"u1": frozenset({"0xc"}), "u2": frozenset({"0xa", "0xc"}), "u3": frozenset({"0xb"})}
    got = {g.unit_id: g.provider for g in match_last_resort(offers, demands, lifted)}
    # u1 goes to A (free, not its dropout); u2 falls back to C (its dropout; A's slot is taken); u3's only let-back
    # dropout is B (C dropped it too, and is excluded for fraud there: never)
    assert got == {"u1": "0xa", "u2": "0xc", "u3": "0xb"}
    assert match_last_resort(offers[:1], demands[1:2], {}) == []  # nobody lifted: the unit waits


# ---------------------------------------------------------------- D5: a provider gone for good


def test_a_provider_not_seen_lately_is_offered_no_work(world: World) -> None:
    """A cheap provider gone for good used to be handed a unit in every matching round (and picked as a standby),
    each sitting until the reaper took it back. Now only providers seen within ``provider_live_s`` are offered work:
    the dearer live one gets the unit, the gone one is no standby when the live one blips, and it is offered work
    again once it polls."""
    gone, alive = _provider(world, 0, tokens(1)), _provider(world, 1, tokens(3))
    window = world.rt.settings.resolved_provider_live_s()
    with world.rt.sessions.begin() as s:  # just out of the window (a week, in the reviewer's case)
        s.execute(update(Provider).where(Provider.address == gone.address).values(last_seen=now_s() - window - 1))
    job = _job(world, "gone", _spec())
    assert [g.provider for g in service.run_matching(world.rt)] == [alive.address]
    _silent(world, job)  # the live one blips: the gone one is no standby
    assert service.reap(world.rt) == 1
    assert _unit(world, job).status == "pending"
    assert [e["how"] for e in _events(world, job, "unit_assigned")] == ["matching round"]
    assert service.run_matching(world.rt) == []
    assert service.next_work(world.rt, gone.address) is None  # back: it polls for work
    assert [g.provider for g in service.run_matching(world.rt)] == [gone.address]


def test_the_live_window_follows_the_heartbeat_deadline() -> None:
    assert Settings(unit_timeout_s=120).resolved_provider_live_s() == 360  # 3 heartbeat deadlines
    assert Settings(unit_timeout_s=2).resolved_provider_live_s() == 60  # never under 4 beats at 15 s
    assert Settings(unit_timeout_s=120, provider_live_s=900).resolved_provider_live_s() == 900


# ---------------------------------------------------------------- a matching round against what commits meanwhile

def _offering(w: World, i: int, price: int, capacity: int = 1) -> LocalAccount:
    acct = w.providers[i]
    _staked(w, acct)
    service.register_provider(w.rt, acct.address, ProviderRegister(
        region="eu-north", gpu="cpu", vram_mb=16_000, price=str(price), tokens_per_s=10_000, capacity=capacity))
    return acct


def _held(w: World) -> dict[str, list[str]]:
    with w.rt.sessions() as s:
        out: dict[str, list[str]] = {}
        for u in s.scalars(select(Unit).where(Unit.status == "assigned")):
            out.setdefault(str(u.provider), []).append(u.id)
        return out


def _during_matching(monkeypatch: pytest.MonkeyPatch, meanwhile: Any) -> list[bool]:
    """Run ``meanwhile()`` (another worker's step: its own transaction, committed) once a matching round has read
    its pending units and offers, before it writes its assignments."""
    from marketplace import matching

    real, fired = matching.match_last_resort, []

    def hooked(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(True)
            meanwhile()
        return real(*args, **kwargs)

    monkeypatch.setattr(matching, "match_last_resort", hooked)
    return fired


def test_a_matching_round_and_a_reaps_standby_at_once_never_overfill_a_provider(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round reads A (one slot) free for a pending unit; meanwhile the reaper hands A, as standby, a silent
    provider's unit. The round wrote its decision over that: A held 2 units for its 1 slot, each with a deadline
    for 1 queued (a late dropout to come). Now an assignment is conditional on what the database has when it is
    written: the round's is refused, and its unit waits for the next."""
    _offering(world, 0, tokens(2))
    held_by_x = _job(world, "held-by-x", _spec())
    service.run_matching(world.rt)
    a = _offering(world, 1, tokens(1))
    pending = _job(world, "pending", _spec())
    _silent(world, held_by_x)
    fired = _during_matching(monkeypatch, lambda: service.reap(world.rt))
    assert service.run_matching(world.rt) == [] and fired
    assert _held(world)[a.address] == [_unit(world, held_by_x).id]  # the standby's, alone
    assert _unit(world, pending).status == "pending"
    with world.rt.sessions() as s:
        prov = s.get(Provider, a.address)
        assert prov is not None and prov.assigned == 1


def test_two_matching_rounds_at_once_never_overfill_a_provider_nor_undo_the_others_assignment(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 1 reads one pending unit and A, B free; round 2 (another worker) reads after a cheaper C registered and
    a second job came, assigns the first unit to C and the second to A, and commits. Round 1 then wrote the first
    unit to A (C's assignment silently undone; A 2 units for 1 slot). Now it is refused."""
    a = _offering(world, 0, tokens(2))
    _offering(world, 1, tokens(3))
    first = _job(world, "first", _spec())
    c = world.providers[2]

    def other_round() -> None:
        _job(world, "second", _spec().model_copy(update={"vram_mb": 12_000}))  # too big for C
        _staked(world, c)
        service.register_provider(world.rt, c.address, ProviderRegister(
            region="eu-north", gpu="cpu", vram_mb=8_000, price=str(tokens(1)), tokens_per_s=10_000, capacity=1))
        assert len(service.run_matching(world.rt)) == 2

    fired = _during_matching(monkeypatch, other_round)
    assert service.run_matching(world.rt) == [] and fired
    held = _held(world)
    assert held[c.address] == [_unit(world, first).id] and len(held[a.address]) == 1 and len(held) == 2


def test_a_stop_or_a_conviction_during_a_matching_round_stands(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A customer's stop commits while a round decides: the round wrote the cancelled unit back to ``assigned`` (a
    provider then trained it for nothing, and it counted as open work for ever). A provider convicted while a round
    decides got work all the same. Now both stand."""
    from marketplace import cancellation

    a = _offering(world, 0, tokens(1))
    stopped = _job(world, "stopped", _spec())

    def stop() -> None:
        with world.rt.sessions.begin() as s:
            assert cancellation.stop_in(s, stopped, "cancelled by the customer", 123)

    fired = _during_matching(monkeypatch, stop)
    assert service.run_matching(world.rt) == [] and fired
    assert _unit(world, stopped).status == "cancelled" and service.next_work(world.rt, a.address) is None
    monkeypatch.undo()
    convicted = _job(world, "to-a-cheat", _spec())

    def convict() -> None:  # what checking._convicted commits first
        with world.rt.sessions.begin() as s:
            s.execute(update(Provider).where(Provider.address == a.address).values(status="slashed", stake=0))

    fired = _during_matching(monkeypatch, convict)
    assert service.run_matching(world.rt) == [] and fired
    assert _unit(world, convicted).status == "pending" and a.address not in _held(world)


def test_the_reaper_hands_no_unit_to_a_provider_it_takes_one_from_in_the_same_pass(world: World) -> None:
    """X and Y, cheap, each silent on a unit; Z, dearer, live with free slots. The reaper offered X's unit to Y and
    Y's to X (both still "seen lately"): each waited another timeout, and each dropout was counted twice. Now a
    provider the pass takes a unit from is no standby in it: Z takes both."""
    x = _offering(world, 0, tokens(1), capacity=2)
    on_x = _job(world, "on-x", _spec())
    service.run_matching(world.rt)
    y = _offering(world, 1, tokens(1), capacity=2)
    with world.rt.sessions.begin() as s:  # X full for now: Y takes the second job
        s.execute(update(Provider).where(Provider.address == x.address).values(capacity=1))
    on_y = _job(world, "on-y", _spec())
    service.run_matching(world.rt)
    with world.rt.sessions.begin() as s:
        s.execute(update(Provider).where(Provider.address == x.address).values(capacity=2))
    assert _held(world) == {x.address: [_unit(world, on_x).id], y.address: [_unit(world, on_y).id]}
    z = _offering(world, 2, tokens(2), capacity=2)
    _silent(world, on_x)
    _silent(world, on_y)
    assert service.reap(world.rt) == 2
    assert sorted(_held(world)[z.address]) == sorted([_unit(world, on_x).id, _unit(world, on_y).id])


def test_a_provider_whose_terms_change_while_a_round_decides_is_not_given_the_unit(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-registers with less VRAM than the job needs and a higher ask while a round decides: the unit stays
    pending for the next round (a review found it handed over at the old ask, on a GPU too small for it)."""
    a = _offering(world, 0, tokens(1))
    big = _spec().model_copy(update={"vram_mb": 12_000})
    job = None

    def rereg() -> None:
        service.register_provider(world.rt, a.address, ProviderRegister(
            region="eu-north", gpu="cpu", vram_mb=8_000, price=str(tokens(4)), tokens_per_s=10_000, capacity=1))

    # create the job without the automatic round firing our hook: run_matching is only called explicitly
    job = _job(world, "big", big)
    fired = _during_matching(monkeypatch, rereg)
    got = service.run_matching(world.rt)
    assert fired
    u = _unit(world, job)
    with world.rt.sessions() as s:
        p = s.get(Provider, a.address)
    assert got == [] and u.status == "pending", (
        f"assigned to a provider that now has {p.vram_mb} MB (< 12000) at {u.price} (its ask now {p.price})")


def test_a_provider_whose_stake_falls_short_while_a_round_decides_is_not_given_the_unit(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A poll for work reads A's stake fallen below the minimum (and writes it) while a round decides: the unit
    stays pending (a review found it handed to A, staked 1 GMT against a minimum of 100)."""
    a = _offering(world, 0, tokens(1))
    job = _job(world, "j", _spec())

    def short() -> None:  # what next_work commits when the chain says the stake fell short
        with world.rt.sessions.begin() as s:
            s.execute(update(Provider).where(Provider.address == a.address).values(stake=tokens(1)))

    fired = _during_matching(monkeypatch, short)
    got = service.run_matching(world.rt)
    assert fired
    u = _unit(world, job)
    assert got == [] and u.status == "pending", f"assigned to {u.provider}, staked 1 GMT < min 100"


def _two_each_holding_a_unit(w: World) -> tuple[LocalAccount, LocalAccount, str, str]:
    """Providers 0 (asking 1 GMT) and 1 (2 GMT), each given a job's one unit: (first, second, its job, its job)."""
    x = _offering(w, 0, tokens(1))
    j1 = _job(w, "j1", _spec())
    service.run_matching(w.rt)
    y = _offering(w, 1, tokens(2))
    j2 = _job(w, "j2", _spec())
    service.run_matching(w.rt)
    assert _held(w) == {x.address: [_unit(w, j1).id], y.address: [_unit(w, j2).id]}
    return x, y, j1, j2


def test_a_provider_reaped_for_silence_gets_no_work_till_seen_again(world: World) -> None:
    """X (cheap) and Y each hold a unit; a third job's unit waits. X goes silent and is reaped: the round after
    gives X nothing (a review found it given the waiting unit, silent for over a heartbeat deadline); once X is
    seen again, it is offered work again."""
    x, y, j1, j2 = _two_each_holding_a_unit(world)
    j3 = _job(world, "j3", _spec())
    service.run_matching(world.rt)
    assert _unit(world, j3).status == "pending"
    _silent(world, j1)
    assert service.reap(world.rt) == 1
    service.run_matching(world.rt)
    held = _held(world)
    assert x.address not in held, f"silent X (last seen > unit_timeout ago) was given {held.get(x.address)}"
    assert service.next_work(world.rt, x.address) is None  # back: a poll for work
    service.run_matching(world.rt)
    assert x.address in _held(world)


def test_a_provider_reaped_for_silence_is_no_later_dropouts_standby(world: World) -> None:
    """X is reaped for silence (Z takes its unit). A pass later W goes silent: its unit does not go to X, still
    silent, as standby (a review found it did: the live window is 3 heartbeat deadlines)."""
    x, w_, j1, j2 = _two_each_holding_a_unit(world)
    _silent(world, j1)
    z = _offering(world, 2, tokens(3))
    assert service.reap(world.rt) == 1
    assert _held(world)[z.address] == [_unit(world, j1).id]
    _silent(world, j2)
    # keep X's last_seen as _silent left it (unit_timeout + 5 s ago): within the live window, past the deadline
    assert service.reap(world.rt) == 1
    held = _held(world)
    assert x.address not in held, f"the standby for W's unit is X, silent: {held}"


def test_units_queued_on_a_provider_are_timed_from_the_hand_in_before(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """P (2 slots) gets both units of a job at once and trains them one after another (next_work hands out the
    oldest), each in 10 s: its delivered throughput is one unit per 10 s (a review found the second timed from its
    assignment, 20 s: half P's speed, and a provider of k slots ranked as k times slower)."""
    p = _offering(world, 0, tokens(1), capacity=2)
    job = _job(world, "two", _spec(units=2))
    assert len(service.run_matching(world.rt)) == 2
    t0 = now_s()
    with world.rt.sessions.begin() as s:
        s.execute(update(Unit).where(Unit.job_id == job).values(assigned_at=t0 - 20))
    spec = _spec(units=2)
    tokens_per_unit = spec.steps_per_unit * spec.batch_size * spec.model.ctx
    for when in (t0 - 10, t0):
        body = _train(world, p, tmp_path)
        monkeypatch.setattr(service, "now_s", lambda when=when: when)
        service.submit_result(world.rt, p.address, body)
        monkeypatch.undo()
    with world.rt.sessions() as s:
        got = s.get(Provider, p.address).observed_tps
    real = tokens_per_unit // 10
    assert got == real, f"P trained each unit in 10 s ({real} tokens/s); recorded {got}"


def _two_units_assigned_20_s_ago(w: World, name: str) -> tuple[LocalAccount, str, int, JobSpec]:
    """A provider of 2 slots given both units of a 2-unit job 20 s before ``t0`` (now), its busy stretch from then:
    (provider, job id, t0, the job's spec)."""
    p = _offering(w, 0, tokens(1), capacity=2)
    job = _job(w, name, _spec(units=2))
    assert len(service.run_matching(w.rt)) == 2
    t0 = now_s()
    with w.rt.sessions.begin() as s:
        s.execute(update(Unit).where(Unit.job_id == job).values(assigned_at=t0 - 20))
        s.execute(update(Provider).where(Provider.address == p.address).values(busy_since=t0 - 20))
    return p, job, t0, _spec(units=2)


def test_results_held_back_and_handed_in_together_are_not_measured_faster(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """P (2 slots) gets both units at t0 - 20 and trains them in 10 s each, but holds the first result back and
    hands both in at t0, one right after the other: its delivered throughput is no more than it trained at (a review
    found the second timed from the first's hand-in, 1 s: P ranked at several times its speed, cheaper than it is)."""
    p, job, t0, spec = _two_units_assigned_20_s_ago(world, "burst")
    first = _train(world, p, tmp_path)
    monkeypatch.setattr(service, "now_s", lambda: t0)
    service.submit_result(world.rt, p.address, first)
    service.submit_result(world.rt, p.address, _train(world, p, tmp_path))  # the same second
    with world.rt.sessions() as s:
        got = s.get(Provider, p.address).observed_tps
    assert got <= spec.steps_per_unit * spec.batch_size * spec.model.ctx // 10, got


def test_a_provider_is_matched_and_paid_only_while_its_stake_covers_twenty_units_at_its_ask(world: World) -> None:
    """The proof bench's catch odds are measured at a stake of STAKE_UNITS (20) units: a provider asking 8 GMT with
    the flat 100 GMT minimum staked (12.5 units) is not matched, is told what it needs when it polls, and is matched
    once it stakes 160 (the flat minimum alone let it take work on which a 1% cheat was caught before its pay passed
    its stake less often than measured). The quote counts its catch odds at that stake."""
    from marketplace.common import Conflict
    from protocol import verification

    dear = _offering(world, 0, tokens(8))
    spec = _spec().model_copy(update={"max_price": tokens(10)})
    job = _job(world, "dear", spec)
    assert service.run_matching(world.rt) == [] and _unit(world, job).status == "pending"
    with pytest.raises(Conflict, match="staking at least 160.0000 GMT at an ask of 8.0000 GMT"):
        service.next_work(world.rt, dear.address)
    world.ops.transfer(dear.address, tokens(60))
    world.ops.as_account(dear).stake(tokens(60))
    service.register_provider(world.rt, dear.address, ProviderRegister(
        region="eu-north", gpu="cpu", vram_mb=16_000, price=str(tokens(8)), tokens_per_s=10_000, capacity=1))
    service.run_matching(world.rt)
    assert _unit(world, job).provider == dear.address
    assert verification.provider_min_stake(tokens(8), tokens(100)) == tokens(160)
    assert verification.provider_min_stake(tokens(1), tokens(100)) == tokens(100)  # the flat minimum below 5 GMT
    at_floor = verification.quote("standard", n_segments=8, unit_price=tokens(10),
                                  stake=verification.provider_min_stake(tokens(10), tokens(100)))
    at_flat = verification.quote("standard", n_segments=8, unit_price=tokens(10), stake=tokens(100))
    assert at_floor.catch_within_stake_1pct > at_flat.catch_within_stake_1pct


def test_a_queued_unit_reaped_late_is_bounded_over_the_busy_stretch(world: World, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """P (2 slots) gets both units at t0 - 20 and hands in the first at t0 - 10 (10 s a unit); the second is not in
    by its deadline at t0: P's throughput is bounded at two units in 20 s, one per 10 s, not one unit in the 20 s
    the second waited behind the first (a review found the bound k times too low for k queued units)."""
    p, job, t0, spec = _two_units_assigned_20_s_ago(world, "two")
    per_unit = spec.steps_per_unit * spec.batch_size * spec.model.ctx
    body = _train(world, p, tmp_path)
    monkeypatch.setattr(service, "now_s", lambda: t0 - 10)
    service.submit_result(world.rt, p.address, body)
    monkeypatch.undo()
    with world.rt.sessions() as s:
        assert s.get(Provider, p.address).observed_tps == per_unit // 10
    with world.rt.sessions.begin() as s:  # the second: P alive, its deadline just passed
        s.execute(update(Unit).where(Unit.job_id == job, Unit.status == "assigned")
                  .values(heartbeat_at=t0 - 1, deadline_at=t0 - 1))
    monkeypatch.setattr(service, "now_s", lambda: t0)
    assert service.reap(world.rt) == 1
    with world.rt.sessions() as s:
        got = s.get(Provider, p.address).observed_tps
    assert got == per_unit // 10, got


def test_units_in_hand_are_backed_at_their_own_price_whatever_the_ask_says_since(world: World,
                                                                                   tmp_path: Path) -> None:
    """A provider's stake must cover 20 units at the price of the units it holds, not at the ask it registers since
    (a review found one that raised its ask lose its units in hand and its finished result, and one that lowered it
    and unbonded hand in a dear unit on the flat minimum)."""
    from marketplace.common import Conflict

    def ask(acct: LocalAccount, price: int) -> None:
        service.register_provider(world.rt, acct.address, ProviderRegister(
            region="eu-north", gpu="cpu", vram_mb=16_000, price=str(price), tokens_per_s=10_000, capacity=1))

    cheap = _offering(world, 0, tokens(1))
    job = _job(world, "raise", _spec())
    service.run_matching(world.rt)
    assert _unit(world, job).provider == cheap.address and _unit(world, job).price == tokens(1)
    ask(cheap, tokens(6))  # its next units' ask needs 120; the unit it holds, 100
    assert service.next_work(world.rt, cheap.address) is not None  # its unit is still its own
    service.submit_result(world.rt, cheap.address, _train(world, cheap, tmp_path))
    assert _unit(world, job).status in ("submitted", "verified")
    dear = _offering(world, 1, tokens(8))
    world.ops.transfer(dear.address, tokens(60))
    world.ops.as_account(dear).stake(tokens(60))
    ask(dear, tokens(8))
    job2 = _job(world, "lower", _spec().model_copy(update={"max_price": tokens(10)}))
    service.run_matching(world.rt)
    assert _unit(world, job2).provider == dear.address and _unit(world, job2).price == tokens(8)
    result = _train(world, dear, tmp_path)
    ask(dear, tokens(1))
    world.ops.as_account(dear).request_unbond(tokens(60))
    with pytest.raises(Conflict, match="staking at least 160.0000 GMT at an ask of 8.0000 GMT"):
        service.submit_result(world.rt, dear.address, result)


def test_a_refused_reveal_buys_no_grace_past_its_deadline(world: World, tmp_path: Path) -> None:
    """A reveal sent in time is marked as being checked (no silence ruled till it is stored, for a grace past the
    deadline); one its checks refuse (signed by another key) drops the mark: the ask is overdue at its deadline (a
    review found a bad reveal sent just before the deadline held the ruling off for the whole grace)."""
    from eth_account import Account

    from marketplace import checking, referee
    from node.trainer import state_hash
    from protocol.errors import ProofError
    from protocol.schemas import RevealSubmit

    p = _offering(world, 0, tokens(1))
    job = _job(world, "reveal", _spec("full"))
    service.run_matching(world.rt)
    body = _train(world, p, tmp_path)
    service.submit_result(world.rt, p.address, body)
    deadline = now_s() + 30
    with world.rt.sessions.begin() as s:
        task = s.scalars(select(Verification).where(Verification.unit_id == body.unit_id)).first()
        task.status, task.bisect = "bisecting", {"asked": 2, "deadline": deadline, "reveals": {}, "more": []}
        vid = task.id
    blob = body.segment_blobs[-1]
    tensors, _ = checkpoint.load(world.rt.blobs.read(blob))
    h = state_hash(tensors)
    wrong = Account.create()  # a bad reveal: signed by another key
    sig = sign_typed(wrong, "Reveal", world.rt.domain,
                     {"unitId": to_bytes32(body.unit_id), "step": 2, "stateHash": to_bytes32(h)})
    with pytest.raises(ProofError):
        checking.record_reveal(world.rt, p.address, RevealSubmit(verification_id=vid, step=2, state_hash=h,
                                                                 blob=blob, signature=sig))
    with world.rt.sessions() as s:
        b = s.get(Verification, vid).bisect
    assert "receiving" not in b and referee.overdue(b, deadline + 1), b
