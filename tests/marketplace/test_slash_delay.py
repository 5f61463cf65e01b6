"""A slash that waits out GridStaking's slash delay (a production deployment has one): the cheat's stake leaves it at
once, nobody is paid until the delay has passed, then the marketplace's sweep pays the bounty and the treasury's
share exactly once; a slash the guardian voids meanwhile (one sent with a stolen operator key) goes back to the
account and is never paid."""
from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account
from eth_utils import keccak
from sqlalchemy import select

from ledger.staking_ops import SlashEvent
from marketplace import checking, service, slashes
from marketplace.db import Event, Slash, Unit
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import drive, provider, slashed, staked_verifier, submit_job

DELAY = 3600
SPEC = JobSpec(rounds=1, units_per_round=2, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))


def _caught(market, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A skip-steps cheat caught and slashed (governance path, bounty to the verifier) under a slash delay."""
    market.ops.set_slash_delay(DELAY)
    assert market.ops.slash_delay() == DELAY
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    verifier.accuse = False
    treasury = market.deployment.treasury
    before = market.ops.balance_of(treasury)
    drive(market, [cheat, honest], verifier, submit_job(market, SPEC))
    assert slashed(market) == {cheat.account.address}
    with market.rt.sessions() as s:
        rows = list(s.scalars(select(Slash)))
    assert [(r.account, r.amount, r.done_at) for r in rows] == [(cheat.account.address, tokens(200), None)]
    return cheat, verifier, treasury, before, rows[0].evidence


def _outcome(market, evidence: str) -> tuple[str | None, list[str]]:  # type: ignore[no-untyped-def]
    with market.rt.sessions() as s:
        row = s.get(Slash, evidence)
        kinds = [e.kind for e in s.scalars(select(Event).where(Event.kind.like("slash_%")).order_by(Event.id))]
    return row.outcome, kinds


def test_a_slash_is_paid_out_once_its_delay_has_passed(market, tmp_path: Path) -> None:
    cheat, verifier, treasury, before, evidence = _caught(market, tmp_path)
    assert market.ops.stake_of(cheat.account.address) == 0  # gone at the verdict: it cannot be withdrawn
    assert market.ops.balance_of(verifier.account.address) == 0 and market.ops.balance_of(treasury) == before
    assert market.ops.total_pending_slashes() == tokens(200)
    assert service.sweep(market.rt)["slashes_paid"] == 0  # not yet
    assert market.ops.balance_of(verifier.account.address) == 0
    market.chain.advance_time(DELAY)
    assert service.sweep(market.rt)["slashes_paid"] == 1
    assert market.ops.balance_of(verifier.account.address) == tokens(100)  # the bounty: half the 200 stake
    assert market.ops.balance_of(treasury) - before == tokens(100)
    assert market.ops.total_pending_slashes() == 0
    assert service.sweep(market.rt)["slashes_paid"] == 0  # exactly once
    assert market.ops.balance_of(verifier.account.address) == tokens(100)
    assert _outcome(market, evidence) == ("paid", ["slash_pending", "slash_paid"])


def test_a_slash_the_guardian_voids_goes_back_and_is_never_paid(market, tmp_path: Path) -> None:
    cheat, verifier, treasury, before, evidence = _caught(market, tmp_path)
    assert market.ops.void_slash(evidence)  # the dev deployer holds GUARDIAN_ROLE
    assert market.ops.stake_of(cheat.account.address) == tokens(200)
    market.chain.advance_time(DELAY)
    assert service.sweep(market.rt)["slashes_paid"] == 0
    assert market.ops.balance_of(verifier.account.address) == 0 and market.ops.balance_of(treasury) == before
    assert _outcome(market, evidence) == ("gone", ["slash_pending", "slash_gone"])
    assert not market.ops.finalize_slash(evidence)  # nothing left to pay


def test_a_cheat_whose_stake_a_thief_slashed_first_is_slashed_again_once_the_guardian_voids_the_theft(
        market, tmp_path: Path) -> None:
    """A thief with the operator key slashes a provider's stake to itself; the provider turns out a cheat and is
    convicted meanwhile, with nothing left to slash. The guardian voids the theft: the stake comes back to the cheat,
    and the sweep slashes it again, the bounty to the verifier that caught it."""
    market.ops.set_slash_delay(DELAY)
    cheat = provider(market, tmp_path, "cheat", "eu-north", "0.55", adversary="skip-steps")
    honest = provider(market, tmp_path, "honest", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    verifier.accuse = False
    job_id = submit_job(market, SPEC)

    def handed_in() -> bool:
        cheat.work_once()
        honest.work_once()
        with market.rt.sessions() as s:
            return s.scalar(select(Unit.id).where(Unit.provider == cheat.account.address,
                                                  Unit.status == "submitted")) is not None

    market.wait(handed_in, what="the cheat's unit handed in")
    thief, theft = Account.create().address, keccak(text="theft")
    assert market.ops.slash(cheat.account.address, tokens(200), thief, theft)  # the stolen key's SLASHER_ROLE
    drive(market, [cheat, honest], verifier, job_id)
    assert slashed(market) == {cheat.account.address}
    with market.rt.sessions() as s:
        (redo,) = list(s.scalars(select(Slash)))
        assert (redo.kind, redo.account, redo.beneficiary, redo.done_at) == (
            "redo", cheat.account.address, verifier.account.address, None)
    assert service.sweep(market.rt)["slashes_paid"] == 0 and market.ops.stake_of(cheat.account.address) == 0
    assert market.ops.void_slash(theft)  # the guardian (the dev deployer holds GUARDIAN_ROLE)
    assert market.ops.stake_of(cheat.account.address) == tokens(200)  # back to the cheat, for a moment
    assert service.sweep(market.rt)["slashes_paid"] == 0  # slashed again, held for the delay
    assert market.ops.stake_of(cheat.account.address) == 0
    market.chain.advance_time(DELAY + 1)  # (the latest block may be a second behind the redo's)
    assert service.sweep(market.rt)["slashes_paid"] == 1
    assert market.ops.balance_of(verifier.account.address) == tokens(100) and market.ops.balance_of(thief) == 0
    assert _outcome(market, redo.evidence) == ("paid", ["slash_held_over", "slash_redone", "slash_paid"])
    assert service.sweep(market.rt)["slashes_paid"] == 0 and market.ops.total_pending_slashes() == 0


def test_a_sweep_goes_on_past_a_slash_it_cannot_pay_while_staking_is_paused(market, tmp_path: Path) -> None:
    _caught(market, tmp_path)
    market.chain.advance_time(DELAY)  # due, not yet paid ...
    market.ops.pause_all()  # ... when the guardian pauses: finalizeSlash reverts till the unpause
    assert service.sweep(market.rt)["slashes_paid"] == 0  # the rest of the sweep still runs


def test_a_false_accusers_bond_held_by_a_thiefs_slash_is_taken_again_once_the_guardian_voids_it(market) -> None:
    """The same for a bond: a verifier's stake slashed by a thief while its accusation is open; the referee then
    finds the accusation false, with the bond cut to nothing. After the void the bond is taken again, for the
    treasury."""
    market.ops.set_slash_delay(DELAY)
    cheat_free, liar = market.account(gmt=tokens(300)), market.account(gmt=tokens(300))
    for who in (cheat_free, liar):
        market.contracts(who).stake(tokens(200))
    evidence, theft = keccak(text="false accusation"), keccak(text="theft")
    market.ops.accuse(cheat_free.address, evidence, tokens(1),
                      market.contracts(liar).sign_accusation(cheat_free.address, evidence, tokens(1)))
    bond = market.ops.dispute_of(evidence).bond
    assert bond == tokens(50)
    thief = Account.create().address
    assert market.ops.slash(liar.address, tokens(200), thief, theft)  # cuts the open bond to nothing
    assert market.ops.resolve_dispute(evidence, False) == 0  # the penalty finds nothing
    treasury = market.deployment.treasury
    before = market.ops.balance_of(treasury)
    assert slashes.hold_over_bond(market.rt, liar.address, evidence)  # (as the referee's step calls it)
    assert not slashes.hold_over_bond(market.rt, liar.address, evidence)  # once
    assert market.ops.void_slash(theft)
    assert market.ops.stake_of(liar.address) == tokens(200)
    service.sweep(market.rt)
    assert market.ops.stake_of(liar.address) == tokens(150)  # the bond, taken again; the rest is the liar's
    market.chain.advance_time(DELAY + 1)
    assert service.sweep(market.rt)["slashes_paid"] == 1
    assert market.ops.balance_of(treasury) - before == bond and market.ops.balance_of(thief) == 0


def _staked(market, amount: int):  # type: ignore[no-untyped-def]
    acct = market.account(gmt=tokens(500))
    market.contracts(acct).stake(amount)
    return acct


def _robbed(market, stolen: int):  # type: ignore[no-untyped-def]
    """Under a slash delay: a cheat staking 200 whose ``stolen`` of it a thief's pending slash holds; its verifier,
    the thief, the theft's evidence and the cheat's conviction's."""
    market.ops.set_slash_delay(DELAY)
    cheat, verifier, thief = _staked(market, tokens(200)), Account.create().address, Account.create().address
    theft, conviction = keccak(text="theft"), keccak(text="conviction")
    assert market.ops.slash(cheat.address, stolen, thief, theft)
    return cheat, verifier, thief, theft, conviction


def test_two_redos_never_take_one_void_twice_nor_stake_added_since(market) -> None:
    """Two convictions of one account find its stake held by a thief's slash: the void gives back 200, taken once
    (by whichever redo goes first); the 100 the account stakes afterwards is not the thieves' nor the redos'."""
    market.ops.set_slash_delay(DELAY)
    cheat, verifier, thief = _staked(market, tokens(200)), Account.create().address, Account.create().address
    theft = keccak(text="theft")
    assert market.ops.slash(cheat.address, tokens(200), thief, theft)
    for n in (1, 2):  # each conviction's governance slash finds nothing left, and notes a redo
        assert checking._slash_whole_stake(market.rt, cheat.address, verifier, keccak(text=f"conviction {n}")) == 0
    with market.rt.sessions() as s:
        assert sorted(r.kind for r in s.scalars(select(Slash))) == ["redo", "redo"]
    assert market.ops.void_slash(theft)
    service.sweep(market.rt)
    assert market.ops.stake_of(cheat.address) == 0 and market.ops.pending_slashes_of(cheat.address) == tokens(200)
    market.chain.advance_time(DELAY + 1)
    assert service.sweep(market.rt)["slashes_paid"] == 1
    market.contracts(cheat).stake(tokens(100))  # new stake, after all that
    for _ in range(2):
        service.sweep(market.rt)
        market.chain.advance_time(DELAY + 1)
    assert market.ops.stake_of(cheat.address) == tokens(100)
    assert market.ops.balance_of(verifier) == tokens(100) and market.ops.balance_of(thief) == 0
    with market.rt.sessions() as s:
        assert sorted(r.outcome for r in s.scalars(select(Slash))) == ["nothing", "paid"]


def test_a_redo_goes_ahead_once_the_slashes_that_held_the_stake_cannot_be_voided(market) -> None:
    """Two thefts; the guardian voids one and misses the other, which becomes final and is never paid out: the redo
    does not wait for it for ever, it takes what the void gave back once the other can no longer be voided."""
    market.ops.set_slash_delay(DELAY)
    cheat, verifier, thief = _staked(market, tokens(200)), Account.create().address, Account.create().address
    first, second = keccak(text="theft 1"), keccak(text="theft 2")
    assert market.ops.slash(cheat.address, tokens(100), thief, first)
    assert market.ops.slash(cheat.address, tokens(100), thief, second)
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, keccak(text="conviction")) == 0
    assert market.ops.void_slash(first)
    service.sweep(market.rt)
    assert market.ops.stake_of(cheat.address) == tokens(100)  # the second theft may still be voided: it waits
    market.chain.advance_time(DELAY + 1)
    service.sweep(market.rt)  # the second theft is final (nobody paid it out): the 100 given back is slashed again
    assert market.ops.stake_of(cheat.address) == 0
    market.chain.advance_time(DELAY + 1)
    assert service.sweep(market.rt)["slashes_paid"] == 1
    assert market.ops.balance_of(verifier) == tokens(50)


def _stopped_after_the_send(market, monkeypatch, account, verifier, conviction) -> None:  # type: ignore[no-untyped-def]
    """The conviction's step sends its slash of ``account`` (or finds nothing to send) and stops before what follows
    the send: its redo, noted before the send, is left unarmed."""
    real_after = slashes.after_slash

    def crash(*_a: object) -> None:
        raise RuntimeError("worker lost after the send")

    monkeypatch.setattr(slashes, "after_slash", crash)
    with pytest.raises(RuntimeError):
        checking._slash_whole_stake(market.rt, account, verifier, conviction)
    monkeypatch.setattr(slashes, "after_slash", real_after)


def test_a_conviction_that_stops_after_its_send_still_slashes_again_what_a_later_void_gives_back(
        market, monkeypatch) -> None:
    """The step stops between sending the conviction's slash and noting what it could not take; the guardian voids
    the theft before the step runs again. The re-run finds nothing pending any more, yet the redo noted before the
    send is armed by it, and the sweep takes the stake the void gave back."""
    cheat, verifier, thief, theft, conviction = _robbed(market, tokens(150))
    _stopped_after_the_send(market, monkeypatch, cheat.address, verifier, conviction)
    assert market.ops.slash_of(conviction).amount == tokens(50)  # sent: what the theft left
    assert market.ops.void_slash(theft)
    assert market.ops.stake_of(cheat.address) == tokens(150)
    service.sweep(market.rt)  # the redo waits for its step to arm it: nothing moves
    assert market.ops.stake_of(cheat.address) == tokens(150)
    checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction)  # the re-run: sends nothing again
    service.sweep(market.rt)
    assert market.ops.stake_of(cheat.address) == 0
    market.chain.advance_time(DELAY + 1)
    assert service.sweep(market.rt)["slashes_paid"] == 2  # the conviction's 50 and the redo's 150
    assert market.ops.balance_of(verifier) == tokens(100) and market.ops.balance_of(thief) == 0


def test_a_conviction_that_stops_before_its_send_takes_the_void_once_and_never_later_stake(
        market, monkeypatch) -> None:
    """The step stops before its send; the guardian voids the theft; the re-run's slash takes the stake the void gave
    back itself. The redo noted on the first run must not take it again from stake the cheat adds later."""
    cheat, verifier, thief, theft, conviction = _robbed(market, tokens(150))
    real_slash = market.rt.contracts.slash

    def crash(*_a: object) -> bool:
        raise RuntimeError("worker lost before the send")

    monkeypatch.setattr(market.rt.contracts, "slash", crash)
    with pytest.raises(RuntimeError):
        checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction)
    with market.rt.sessions() as s:
        assert [r.kind for r in s.scalars(select(Slash))] == ["redo"]  # noted, not armed
    assert market.ops.void_slash(theft)
    service.sweep(market.rt)  # no conviction landed: an unarmed redo takes nothing
    assert market.ops.stake_of(cheat.address) == tokens(200)
    monkeypatch.setattr(market.rt.contracts, "slash", real_slash)
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction) == tokens(200)
    market.contracts(cheat).stake(tokens(100))  # new stake, after the conviction
    for _ in range(2):
        service.sweep(market.rt)
        market.chain.advance_time(DELAY + 1)
    service.sweep(market.rt)
    assert market.ops.stake_of(cheat.address) == tokens(100)
    assert market.ops.balance_of(verifier) == tokens(100) and market.ops.balance_of(thief) == 0


def test_a_false_verdict_that_stops_after_its_send_still_takes_the_bond_a_later_void_gives_back(market) -> None:
    """The bond's path: the redo is noted before the verdict is sent; the step stops after it; the void lands; the
    re-run (which finds nothing pending) arms it, and the bond is taken again for the treasury."""
    market.ops.set_slash_delay(DELAY)
    accused, liar = _staked(market, tokens(200)), _staked(market, tokens(200))
    evidence, theft, thief = keccak(text="false accusation"), keccak(text="theft"), Account.create().address
    market.ops.accuse(accused.address, evidence, tokens(1),
                      market.contracts(liar).sign_accusation(accused.address, evidence, tokens(1)))
    assert market.ops.slash(liar.address, tokens(200), thief, theft)
    treasury = market.deployment.treasury
    assert slashes.before_slash(market.rt, liar.address, treasury, evidence, bond=True)
    assert market.ops.resolve_dispute(evidence, False) == 0  # ... and the step stops here
    assert market.ops.void_slash(theft)
    before = market.ops.balance_of(treasury)
    assert not slashes.before_slash(market.rt, liar.address, treasury, evidence, bond=True)  # the re-run
    assert not slashes.hold_over_bond(market.rt, liar.address, evidence)  # arms the redo noted before the send
    service.sweep(market.rt)
    assert market.ops.stake_of(liar.address) == tokens(150)
    market.chain.advance_time(DELAY + 1)
    assert service.sweep(market.rt)["slashes_paid"] == 1
    assert market.ops.balance_of(treasury) - before == tokens(50) and market.ops.balance_of(thief) == 0


def test_a_redo_never_counts_a_slash_sent_after_the_conviction(market) -> None:
    """A re-run of the step after the conviction's slash finds the account's stake held by a slash sent after that
    one (of stake added since): that slash held nothing the conviction wanted, so no redo takes what its void gives
    back."""
    market.ops.set_slash_delay(DELAY)
    cheat, verifier, thief = _staked(market, tokens(200)), Account.create().address, Account.create().address
    conviction, theft = keccak(text="conviction"), keccak(text="theft")
    assert market.ops.slash(cheat.address, tokens(200), verifier, conviction)  # the send; its step stops after it
    market.contracts(cheat).stake(tokens(100))
    assert market.ops.slash(cheat.address, tokens(100), thief, theft)
    slashes.after_slash(market.rt, cheat.address, verifier, conviction)  # the re-run
    with market.rt.sessions() as s:
        assert [r.kind for r in s.scalars(select(Slash))] == ["payout"]  # the conviction's, no redo
    assert market.ops.void_slash(theft)
    for _ in range(2):
        service.sweep(market.rt)
        market.chain.advance_time(DELAY + 1)
    assert market.ops.stake_of(cheat.address) == tokens(100)


def _settle(market) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        service.sweep(market.rt)
        market.chain.advance_time(DELAY + 1)
    service.sweep(market.rt)


def test_a_rerun_whose_conviction_takes_the_void_itself_takes_it_once(market) -> None:
    """The conviction finds the whole stake held by the theft and sends nothing (its redo armed); the step stops
    before its commit, the guardian voids the theft, and the re-run's conviction takes the 200 itself. The redo must
    not take them again out of stake the cheat adds later (found by a review)."""
    cheat, verifier, thief, theft, conviction = _robbed(market, tokens(200))
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction) == 0
    assert market.ops.void_slash(theft)
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction) == tokens(200)  # the re-run
    market.contracts(cheat).stake(tokens(100))
    _settle(market)
    assert market.ops.stake_of(cheat.address) == tokens(100) and market.ops.balance_of(thief) == 0
    assert market.ops.balance_of(verifier) == tokens(100)


def test_a_void_between_the_stake_read_and_the_send_is_taken_by_the_conviction(market, monkeypatch) -> None:
    """The step reads 50 (the theft holds 150); the guardian's void lands before the send: the conviction takes all
    200 there when it lands (found by a review: it took the 50 it had read, and the void fell before the redo's
    count)."""
    cheat, verifier, thief, theft, conviction = _robbed(market, tokens(150))
    real = market.rt.contracts.slash

    def void_first(*a: object) -> bool:
        assert market.ops.void_slash(theft)  # the guardian, at that moment
        monkeypatch.setattr(market.rt.contracts, "slash", real)
        return real(*a)

    monkeypatch.setattr(market.rt.contracts, "slash", void_first)
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction) == tokens(50)
    _settle(market)
    assert market.ops.stake_of(cheat.address) == 0 and market.ops.balance_of(thief) == 0
    assert market.ops.balance_of(verifier) == tokens(100)


def test_a_theft_landing_between_the_redos_note_and_the_send_is_taken_again_after_its_void(
        market, monkeypatch) -> None:
    """The redo is noted with theft 1; theft 2 lands before the send; the conviction takes what is left. The redo
    waits for both, and once both are voided takes back what both held (found by a review: only theft 1's)."""
    market.ops.set_slash_delay(DELAY)
    cheat, verifier, thief = _staked(market, tokens(300)), Account.create().address, Account.create().address
    first, second, conviction = keccak(text="theft 1"), keccak(text="theft 2"), keccak(text="conviction")
    assert market.ops.slash(cheat.address, tokens(100), thief, first)
    real = slashes.before_slash

    def then_theft(*a: object, **k: object) -> bool:
        out = real(*a, **k)
        assert market.ops.slash(cheat.address, tokens(100), thief, second)  # the thief, at that moment
        return out

    monkeypatch.setattr(slashes, "before_slash", then_theft)
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction) == tokens(100)
    monkeypatch.setattr(slashes, "before_slash", real)
    assert market.ops.void_slash(first)
    service.sweep(market.rt)  # theft 2 may still be voided: the redo waits for it
    assert market.ops.stake_of(cheat.address) == tokens(100)
    assert market.ops.void_slash(second)
    _settle(market)
    assert market.ops.stake_of(cheat.address) == 0 and market.ops.balance_of(thief) == 0
    assert market.ops.balance_of(verifier) == tokens(150)


def _stopped_after_a_late_theft(market, monkeypatch):  # type: ignore[no-untyped-def]
    """A cheat staking 200 whose conviction's step noted no redo (nothing held the stake at the note), a thief's
    slash of 150 landing before the send, the conviction taking the 50 left, and the step stopping after the send
    (the hooks restored after): the cheat, its verifier, the thief, the theft's evidence and the conviction's."""
    market.ops.set_slash_delay(DELAY)
    cheat, verifier, thief = _staked(market, tokens(200)), Account.create().address, Account.create().address
    theft, conviction = keccak(text="theft"), keccak(text="conviction")
    real_before, real_after = slashes.before_slash, slashes.after_slash

    def then_theft(*a: object, **k: object) -> bool:
        out = real_before(*a, **k)
        assert market.ops.slash(cheat.address, tokens(150), thief, theft)  # the thief, at that moment
        return out

    def crash(*_a: object) -> None:
        raise RuntimeError("worker lost after the send")

    monkeypatch.setattr(slashes, "before_slash", then_theft)
    monkeypatch.setattr(slashes, "after_slash", crash)
    with pytest.raises(RuntimeError):
        checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction)
    monkeypatch.setattr(slashes, "before_slash", real_before)
    monkeypatch.setattr(slashes, "after_slash", real_after)
    with market.rt.sessions() as s:
        assert list(s.scalars(select(Slash))) == []  # nothing noted: nothing held the stake at the note
    assert market.ops.slash_of(conviction).amount == tokens(50)
    return cheat, verifier, thief, theft, conviction


def test_a_theft_between_the_note_and_the_send_voided_before_the_rerun_is_still_taken_again(
        market, monkeypatch) -> None:
    """Nothing held the stake when the step noted its redo (none noted); a theft lands before the send, the
    conviction takes what it left, and the step stops before what follows the send; the guardian voids the theft
    before the re-run. The re-run finds nothing pending, yet the theft held the stake where the conviction took
    it: the redo is noted from there, and takes the 150 the void gave back."""
    cheat, verifier, thief, theft, conviction = _stopped_after_a_late_theft(market, monkeypatch)
    assert market.ops.void_slash(theft)
    checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction)  # the re-run: sends nothing again
    _settle(market)
    assert market.ops.stake_of(cheat.address) == 0 and market.ops.balance_of(thief) == 0
    assert market.ops.balance_of(verifier) == tokens(100)  # half of the 50 and of the 150


def test_a_redo_noted_late_counts_what_a_conviction_took_before_its_note(market, monkeypatch) -> None:
    """As above, but after the void a second conviction takes the 150 the void gave back, and the cheat stakes 100
    more, all before the first step runs again. The redo the re-run notes counts what slashes took from the first
    conviction's place on, not from its own note: it takes nothing, and the 100 staked since stays the cheat's."""
    cheat, verifier, thief, theft, conviction = _stopped_after_a_late_theft(market, monkeypatch)
    assert market.ops.void_slash(theft)
    second = keccak(text="second conviction")
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, second) == tokens(150)
    market.contracts(cheat).stake(tokens(100))  # new stake, after all that
    checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction)  # the re-run: sends nothing again
    _settle(market)
    assert market.ops.stake_of(cheat.address) == tokens(100)
    assert market.ops.balance_of(verifier) == tokens(100) and market.ops.balance_of(thief) == 0


def _convicted_over_a_theft(market, monkeypatch, late: bool):  # type: ignore[no-untyped-def]
    """A cheat staking 200, a thief's slash of 150 pending, the conviction taking the 50 left: its redo noted before
    the send, or (``late``) by the re-run of a step that stopped after the send having noted none (the theft landed
    between the note and the send). Returns the cheat, its verifier, the thief, the theft's evidence, the
    conviction's, and the re-run (a no-op unless ``late``), to call once the case has played out."""
    if late:
        cheat, verifier, thief, theft, conviction = _stopped_after_a_late_theft(market, monkeypatch)
    else:
        cheat, verifier, thief, theft, conviction = _robbed(market, tokens(150))
        assert checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction) == tokens(50)

    def rerun() -> None:
        if late:
            checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction)

    return cheat, verifier, thief, theft, conviction, rerun


@pytest.mark.parametrize("late", [False, True])
def test_a_slash_voided_after_the_void_takes_none_of_what_it_gave_back(market, monkeypatch, late: bool) -> None:
    """After the theft's void the thief slashes the 150 again, and the guardian voids that too: the second theft took
    nothing in the end, and the redo takes the 150 (found by a review: it counted the second theft as taken)."""
    cheat, verifier, thief, theft, _, rerun = _convicted_over_a_theft(market, monkeypatch, late)
    again = keccak(text="theft again")
    assert market.ops.void_slash(theft)
    assert market.ops.slash(cheat.address, tokens(150), thief, again)
    assert market.ops.void_slash(again)
    rerun()
    _settle(market)
    assert market.ops.stake_of(cheat.address) == 0 and market.ops.balance_of(thief) == 0
    assert market.ops.balance_of(verifier) == tokens(100)


@pytest.mark.parametrize("late", [False, True])
def test_a_slash_before_the_void_took_added_stake_not_what_the_void_gives_back(market, monkeypatch, late: bool) -> None:
    """The cheat stakes 100 more; a second theft takes those 100 (never voided); then the guardian voids the first
    theft. The second theft could not take stake given back after it: the redo takes the 150 (found by a review:
    it subtracted the second theft)."""
    cheat, verifier, thief, theft, _, rerun = _convicted_over_a_theft(market, monkeypatch, late)
    market.contracts(cheat).stake(tokens(100))
    assert market.ops.slash(cheat.address, tokens(100), thief, keccak(text="theft again"))
    assert market.ops.void_slash(theft)
    rerun()
    _settle(market)
    assert market.ops.stake_of(cheat.address) == 0 and market.ops.balance_of(verifier) == tokens(100)


@pytest.mark.parametrize("late", [False, True])
def test_a_conviction_the_guardian_voids_is_not_redone(market, monkeypatch, late: bool) -> None:
    """The guardian voids the conviction itself (overturned) as well as the theft: nothing is redone, the account
    keeps its 200 (found by a review: the redo took the theft's 150 all the same)."""
    cheat, verifier, thief, theft, conviction, rerun = _convicted_over_a_theft(market, monkeypatch, late)
    assert market.ops.void_slash(conviction)
    assert market.ops.void_slash(theft)
    rerun()
    _settle(market)
    assert market.ops.stake_of(cheat.address) == tokens(200)
    assert market.ops.balance_of(verifier) == 0 and market.ops.balance_of(thief) == 0


def test_given_back_replays_the_slashes_and_voids_in_chain_order() -> None:
    """What a redo may take: the held slash's void gives 150 back; a slash before it took other stake; one after it
    takes the given-back stake first, and its own void gives that back; the slash redone and the redo are skipped."""
    def ev(i: int, evidence: str, kind: str, amount: int) -> SlashEvent:
        return SlashEvent((10 + i, 0), evidence, kind, amount)

    held, events = {"0xtheft": 150}, [ev(0, "0xother", "slashed", 100), ev(1, "0xtheft", "voided", 150)]
    assert slashes.given_back(events, held) == 150
    events += [ev(2, "0xlater", "slashed", 120)]
    assert slashes.given_back(events, held) == 30
    assert slashes.given_back([*events, ev(3, "0xlater", "voided", 120)], held) == 150
    assert slashes.given_back([*events, ev(3, "0xredo", "slashed", 30)], held, skip={"0xredo"}) == 30
    assert slashes.given_back([*events, ev(3, "0xredo", "slashed", 30)], held) == 0


@pytest.mark.parametrize("late", [False, True])
def test_a_redo_goes_out_before_the_given_back_stake_can_be_withdrawn(market, monkeypatch, late: bool) -> None:
    """Unbonding shorter than the slash delay: once the theft is voided the redo goes out at the next sweep, not
    after the conviction's own delay, and the cheat has nothing left to unbond (found by a review: a redo that
    waited for the conviction let it withdraw the 150)."""
    cheat, verifier, thief, theft, conviction, rerun = _convicted_over_a_theft(market, monkeypatch, late)
    market.ops.set_unbonding_delay(600)
    assert market.ops.void_slash(theft)
    rerun()
    service.sweep(market.rt)
    assert market.ops.stake_state(cheat.address).staked == 0
    _settle(market)
    assert market.ops.balance_of(cheat.address) == tokens(300)  # what it held beside its 200 staked
    assert market.ops.balance_of(verifier) == tokens(100)


@pytest.mark.parametrize("late", [False, True])
def test_a_conviction_the_guardian_voids_after_its_redo_went_out_takes_the_redo_with_it(
        market, monkeypatch, late: bool) -> None:
    """The theft voided, the redo goes out (150 pending under its own evidence); then the guardian voids the
    conviction (overturned): GridStaking voids the redo with it, and the account keeps its 200."""
    cheat, verifier, thief, theft, conviction, rerun = _convicted_over_a_theft(market, monkeypatch, late)
    assert market.ops.void_slash(theft)
    rerun()
    service.sweep(market.rt)
    redo = slashes.redo_evidence(conviction)
    assert market.ops.slash_of(redo).amount == tokens(150) and market.ops.stake_of(cheat.address) == 0
    assert market.ops.void_slash(conviction)
    assert market.ops.slash_of(redo).amount == 0 and market.ops.stake_of(cheat.address) == tokens(200)
    _settle(market)
    assert market.ops.stake_of(cheat.address) == tokens(200)
    assert market.ops.balance_of(verifier) == 0 and market.ops.balance_of(thief) == 0
    assert _outcome(market, "0x" + redo.hex())[0] == "gone"


def test_two_sweeps_at_once_never_redo_one_void_twice(market, monkeypatch) -> None:
    """Two convictions found the whole 200 held by a thief's slash; the first one's step stopped before arming its
    redo. The void gives the 200 back and the cheat stakes 100 more. A sweep sends the second redo (200); while its
    send is on its way, the first step runs again (arming its redo) and a second sweep starts (the next beat). The
    second sweep leaves the redos to the first (the lease): the void's 200 is taken once and the 100 stays the
    cheat's (without the lease the second sweep sent the first redo, 200, before the second redo's send landed,
    whose 200 then took the added 100: 300 pending)."""
    cheat, verifier, thief, theft, first = _robbed(market, tokens(200))
    second = keccak(text="conviction 2")
    _stopped_after_the_send(market, monkeypatch, cheat.address, verifier, first)
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, second) == 0
    assert market.ops.void_slash(theft)
    market.contracts(cheat).stake(tokens(100))
    real_slash, inner = market.rt.contracts.slash, []

    def overlapped(*a: object) -> bool:
        monkeypatch.setattr(market.rt.contracts, "slash", real_slash)
        slashes.after_slash(market.rt, cheat.address, verifier, first)  # the first step's re-run arms its redo
        inner.append(service.sweep(market.rt))  # the next beat's sweep, meanwhile
        return real_slash(*a)

    monkeypatch.setattr(market.rt.contracts, "slash", overlapped)
    service.sweep(market.rt)
    assert inner and market.ops.pending_slashes_of(cheat.address) == tokens(200)
    _settle(market)
    assert market.ops.stake_of(cheat.address) == tokens(100)
    assert market.ops.balance_of(verifier) == tokens(100) and market.ops.balance_of(thief) == 0


def test_a_sweep_never_redoes_a_redo_another_sweep_closed_since_it_listed_it(market, monkeypatch) -> None:
    """The void gives back 150, which the cheat withdraws (a development chain: no unbonding delay); a sweep lists the
    open redo, and before it takes the lease another sweep closes the redo as "nothing" (nothing left to take); the
    cheat stakes 100. The first sweep's list is stale: the redo is closed, and the 100 stays the cheat's (found by a
    review: it took them)."""
    cheat, verifier, thief, theft, _, _ = _convicted_over_a_theft(market, monkeypatch, False)
    market.ops.set_unbonding_delay(0)
    assert market.ops.void_slash(theft)
    market.contracts(cheat).request_unbond(tokens(150))
    market.contracts(cheat).withdraw()
    real, inner = slashes._redos, []

    def after_another(rt, redos):  # type: ignore[no-untyped-def]
        if not inner:
            inner.append("running")
            monkeypatch.setattr(slashes, "_redos", real)
            inner.append(service.sweep(rt))  # the other sweep, start to end
            market.contracts(cheat).stake(tokens(100))
        return real(rt, redos)

    monkeypatch.setattr(slashes, "_redos", after_another)
    service.sweep(market.rt)
    assert inner and market.ops.pending_slashes_of(cheat.address) == tokens(50)  # the conviction's, no more
    _settle(market)
    assert market.ops.stake_of(cheat.address) == tokens(100) and market.ops.balance_of(verifier) == tokens(25)


def test_a_redo_sent_by_a_sweep_that_failed_before_its_row_then_voided_closes_as_gone(market, monkeypatch) -> None:
    """A sweep sends the redo and fails before it updates the redo's row; the guardian then voids the conviction,
    which voids the redo: the next sweep closes the row as "gone", not "slashed" (found by a review)."""
    cheat, verifier, thief, theft, conviction, _ = _convicted_over_a_theft(market, monkeypatch, False)
    assert market.ops.void_slash(theft)
    real = market.rt.contracts.slash

    def sent_then_fail(*a: object) -> bool:
        real(*a)
        raise RuntimeError("worker lost after the redo's send")

    monkeypatch.setattr(market.rt.contracts, "slash", sent_then_fail)
    service.sweep(market.rt)  # (the failure is logged; the sweep goes on)
    monkeypatch.setattr(market.rt.contracts, "slash", real)
    redo = slashes.redo_evidence(conviction)
    assert market.ops.slash_of(redo).amount == tokens(150)
    assert market.ops.void_slash(conviction)
    _settle(market)
    assert _outcome(market, "0x" + redo.hex())[0] == "gone"
    assert market.ops.stake_of(cheat.address) == tokens(200) and market.ops.balance_of(verifier) == 0


def test_a_redo_that_fails_holds_back_no_payout(market, monkeypatch) -> None:
    """A redo's step fails with something other than a chain error: the sweep logs it and goes on to pay out the
    conviction that is due (found by a review: the error ended the sweep); the redo goes out at the next sweep."""
    cheat, verifier, thief, theft, conviction, _ = _convicted_over_a_theft(market, monkeypatch, False)
    assert market.ops.void_slash(theft)
    market.chain.advance_time(DELAY + 1)
    real = slashes._redo

    def fail(*_a: object) -> int:
        raise RuntimeError("a bug in the redo")

    monkeypatch.setattr(slashes, "_redo", fail)
    assert service.sweep(market.rt)["slashes_paid"] == 1  # the conviction's 50
    monkeypatch.setattr(slashes, "_redo", real)
    _settle(market)
    assert market.ops.stake_of(cheat.address) == 0 and market.ops.balance_of(verifier) == tokens(100)


def test_a_conviction_that_took_nothing_voided_after_its_redo_went_out_takes_the_redo_with_it(market) -> None:
    """The thief's slash held the whole 200, so the conviction took nothing (no slash of its own pending); its redo
    takes the 200 the void gave back. The guardian then overturns the conviction: voiding it voids the redo alone
    (found by a review: there was nothing to void under the conviction's evidence, and the redo stood)."""
    cheat, verifier, thief, theft, conviction = _robbed(market, tokens(200))
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction) == 0
    assert market.ops.void_slash(theft)
    service.sweep(market.rt)
    redo = slashes.redo_evidence(conviction)
    assert market.ops.slash_of(redo).amount == tokens(200) and market.ops.slash_of(conviction).amount == 0
    assert market.ops.void_slash(conviction)
    _settle(market)
    assert market.ops.stake_of(cheat.address) == tokens(200) and market.ops.balance_of(verifier) == 0
    assert _outcome(market, "0x" + redo.hex())[0] == "gone"


def test_voiding_a_conviction_whose_redo_is_final_sends_nothing(market) -> None:
    """A conviction that took nothing, its redo past its own delay (final, not yet paid out): the client's void has
    nothing to void and sends nothing (found by a review: it sent, and the chain refused it), and the redo is paid."""
    cheat, verifier, thief, theft, conviction = _robbed(market, tokens(200))
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction) == 0
    assert market.ops.void_slash(theft)
    service.sweep(market.rt)
    market.chain.advance_time(DELAY + 1)
    assert market.ops.void_slash(conviction) is False
    _settle(market)
    assert market.ops.stake_of(cheat.address) == 0 and market.ops.balance_of(verifier) == tokens(100)


@pytest.mark.parametrize("estimated_at", ["next block", "latest block"])
def test_voiding_a_conviction_whose_redo_turns_final_in_the_next_block_sends_nothing_done(
        market, monkeypatch, estimated_at: str) -> None:
    """The latest block a second before the redo's deadline: the client sees it pending, but the next block is at
    the deadline, where the chain counts it final and refuses the void: False, nothing voided (found by a review:
    the refusal was raised). Also where the node estimates gas against the latest block (geth's default), so the
    void is sent and fails on chain, undecoded (found by a second review)."""
    cheat, verifier, thief, theft, conviction = _robbed(market, tokens(200))
    assert checking._slash_whole_stake(market.rt, cheat.address, verifier, conviction) == 0
    assert market.ops.void_slash(theft)
    service.sweep(market.rt)
    ready = market.ops.slash_of(slashes.redo_evidence(conviction)).ready_at
    market.chain.advance_time(ready - 1 - market.chain.timestamp())  # (the in-process chain: the next block at ready)
    assert market.chain.timestamp() == ready - 1
    if estimated_at == "latest block":
        monkeypatch.setattr(market.chain.w3.eth, "estimate_gas", lambda *_a, **_k: 200_000)
    assert market.ops.void_slash(conviction) is False
    assert market.ops.slash_of(slashes.redo_evidence(conviction)).amount == tokens(200)
