"""Stateful invariant test: Hypothesis drives random operation sequences against the real contracts on the
in-process EVM (``ledger.campaign.Harness``), and every invariant is checked after every step:

token totals conserved; each contract's balance equals what it owes (stakes + slashes waiting out the slash delay;
open escrows + claimables; deposits - claims); no account claims more than its cumulative entitlement; nothing moves
while paused; a slashed account never gets the slashed part back unless the guardian voids the slash in time; and every
on-chain figure (each pending slash's included) equals the Python model's.

The second half shows the checks can fail: a corrupted model, tokens moved behind the model's back, a pending slash
the model does not know, a void the stake flows do not count, a wrong prediction and an over-promising root that is
not voided are each reported.

Runs derandomized (a fixed seed derived from the test) with a step budget that fits in about a minute.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from ledger.campaign import N_JOBS, UNITS, Harness, run_campaign, start_episode
from ledger.campaign_model import PendingSlashM, StakeM
from ledger.staking_ops import redo_evidence
from ledger.chain import Chain

STAKERS = st.integers(min_value=0, max_value=4)  # 3 providers, then 2 verifiers
PROVIDERS = st.integers(min_value=0, max_value=2)
CUSTOMERS = st.integers(min_value=0, max_value=1)
JOB = st.integers(min_value=0, max_value=N_JOBS - 1)
UNIT = st.integers(min_value=0, max_value=len(UNITS) - 1)
#: Amounts relative to what the model says the operation can take (see ``portion``). Hypothesis treats the first
#: value of ``sampled_from`` as the simplest, so the list starts with the one that usually succeeds.
PORTION = st.sampled_from(["some", "all", "one", "too_much", "zero"])
#: When a finalize or void of a pending slash runs: as the sequence has it, a second before its deadline in force, or
#: at it.
TIMING = st.sampled_from(["now", "before", "deadline"])
#: Mostly False: Hypothesis draws ``st.booleans()`` True about half the time, which would spend most finalizes and
#: voids on slashes no longer pending, and most examples without a slash delay.
RARELY = st.sampled_from([False, False, False, True])
Draw = Callable[..., Any]  # ``st.DataObject.draw``

MACHINE_SETTINGS = settings(
    max_examples=8,
    stateful_step_count=40,
    derandomize=True,  # the same sequences on every run: never flaky
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def portion(kind: str, fits: int) -> int:
    """An amount for an operation that can take at most ``fits``: some of it, all of it, 1, one too many, or 0."""
    return {"some": fits // 2 + 1 if fits else 7, "all": fits or 50, "one": 1, "too_much": fits + 1, "zero": 0}[kind]


@pytest.fixture(scope="module")
def harness(artifacts: None) -> Iterator[Harness]:
    """One deployment on a fresh in-process chain; tests ``reset()`` it to the set-up state (a chain snapshot)."""
    h = Harness(Chain.in_process(), raise_on_violation=True)
    yield h


#: The operations and their weights (as in ``ledger.campaign.random_op``). One Hypothesis rule draws an operation
#: from this table and then its arguments: separate rules would let Hypothesis's rule ordering (argument-less rules
#: first, e.g. ``pause``) and per-example rule subsets dominate a small step budget. ``advance_time`` comes first
#: because Hypothesis starts from the simplest choices: its first example then costs no transactions at all.
OPERATIONS: tuple[tuple[str, int], ...] = (
    ("advance_time", 7), ("stake", 10), ("fund", 8), ("release_to_pool", 9), ("release", 6), ("request_unbond", 6),
    ("withdraw", 5), ("lock", 4), ("cancel", 3), ("close", 4), ("claim_escrow", 4), ("post_root", 8), ("void_root", 1),
    ("claim_payout", 11), ("claim_payout_batch", 5), ("set_dispute_window", 1), ("slash", 6), ("accuse", 4),
    ("resolve", 3), ("dismiss", 2), ("finalize_slash", 3), ("void_slash", 2), ("set_slash_delay", 1), ("pause", 1),
    ("unpause", 4),
)
OPERATION = st.sampled_from([name for name, weight in OPERATIONS for _ in range(weight)])
#: The weights while a slash waits out its delay: its finalize or void comes soon (most steps would otherwise draw them
#: while nothing is pending, and a 40-step sequence would seldom pay out or void one).
PENDING_WEIGHTS = {"finalize_slash": 16, "void_slash": 10}
OPERATION_WHILE_PENDING = st.sampled_from(
    [name for name, weight in OPERATIONS for _ in range(PENDING_WEIGHTS.get(name, weight))]
)


class CampaignMachine(RuleBasedStateMachine):
    """Each step is one ``Harness`` operation: it sends the transaction(s) and compares the outcome (success or the
    exact custom error) with the model; the invariant then reads the whole system in one GridLens call."""

    harness: ClassVar[Harness]

    def __init__(self) -> None:
        super().__init__()
        self.h = self.harness
        self.h.reset()

    @initialize(immediate_slashes=RARELY)
    def start_with_stakes_and_funded_jobs(self, immediate_slashes: bool) -> None:
        """Every staker bonds 1,000, each customer funds two jobs, and a first batch is in the pool under an honest
        root, so that short sequences reach the deeper flows (claims, disputes, voids) instead of spending their
        steps on setting up. Slashes wait out the deployed slash delay, or governance first switches it off."""
        start_episode(self.h, immediate_slashes)
        for who in range(len(self.h.cast.stakers)):
            self.h.stake(who, 1_000)
        for job in range(N_JOBS):
            self.h.fund(job % 2, job, 10_000)
        self.h.release_to_pool(0, 0, [300, 40, 5])
        self.h.post_root("honest")

    def _stake(self, who: int) -> StakeM:
        return self.h.model.stakes.get(self.h.cast.stakers[who].address) or StakeM()

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        op = data.draw(OPERATION_WHILE_PENDING if self.h.model.pending_slashes else OPERATION, label="op")
        getattr(self, op)(data.draw)

    def stake(self, draw: Draw) -> None:
        self.h.stake(draw(STAKERS, label="who"), draw(st.sampled_from([300, 1_000, 10, 2_000_000, 0]), label="amount"))

    def request_unbond(self, draw: Draw) -> None:
        who = draw(STAKERS, label="who")
        s = self._stake(who)
        self.h.request_unbond(who, portion(draw(PORTION, label="kind"), 0 if s.open_disputes else s.free()))

    def withdraw(self, draw: Draw) -> None:
        self.h.withdraw(draw(STAKERS, label="who"))

    def lock(self, draw: Draw) -> None:
        who, unlock = draw(STAKERS, label="who"), draw(st.booleans(), label="unlock")
        s = self._stake(who)
        self.h.lock(who, portion(draw(PORTION, label="kind"), s.locked if unlock else s.free()), unlock=unlock)

    def fund(self, draw: Draw) -> None:
        amount = st.sampled_from([1_000, 10_000, 100, 5_000_000, 0])
        self.h.fund(draw(CUSTOMERS, label="who"), draw(JOB, label="job"), draw(amount, label="amount"))

    def release(self, draw: Draw) -> None:
        job = draw(JOB, label="job")
        j = self.h.model.jobs.get(self.h.jobs[job])
        fits = j.funded - j.released if j and not j.closed else 0
        self.h.release(job, draw(UNIT, label="unit"), draw(PROVIDERS, label="provider"),
                       portion(draw(PORTION, label="kind"), fits))

    def release_to_pool(self, draw: Draw) -> None:
        shares = st.lists(st.sampled_from([40, 0, 5, 300]), min_size=3, max_size=3)
        self.h.release_to_pool(draw(JOB, label="job"), draw(UNIT, label="batch"), draw(shares, label="shares"))

    def cancel(self, draw: Draw) -> None:
        self.h.cancel(draw(CUSTOMERS, label="who"), draw(JOB, label="job"))

    def close(self, draw: Draw) -> None:
        self.h.close(draw(st.none() | CUSTOMERS, label="who (None: the settler)"), draw(JOB, label="job"))

    def claim_escrow(self, draw: Draw) -> None:
        self.h.claim_escrow(draw(PROVIDERS, label="provider"))

    def post_root(self, draw: Draw) -> None:
        self.h.post_root(draw(st.sampled_from(["honest", "bad_then_void", "inflated", "skip"]), label="mode"))

    def void_root(self, draw: Draw) -> None:
        self.h.void_root()

    def claim_payout(self, draw: Draw) -> None:
        mode = st.sampled_from(["claimable", "latest", "oldest", "tampered", "foreign"])
        self.h.claim_payout(draw(STAKERS, label="who"), draw(mode, label="mode"))

    def claim_payout_batch(self, draw: Draw) -> None:
        self.h.claim_payout_batch(draw(st.sampled_from(["claimable", "latest", "tampered", "mismatch"]), label="mode"))

    def set_dispute_window(self, draw: Draw) -> None:
        self.h.set_dispute_window(draw(st.sampled_from([100, 0, 10, 400]), label="window"))

    def slash(self, draw: Draw) -> None:
        who = draw(STAKERS, label="who")
        s = self._stake(who)
        self.h.slash(who, portion(draw(PORTION, label="kind"), s.staked + s.unbonding),
                     draw(st.integers(0, 1), label="verifier"), reuse=draw(st.booleans(), label="reuse"),
                     redo=draw(st.one_of(st.none(), st.integers(0, 3)), label="redo"))

    def accuse(self, draw: Draw) -> None:
        verifier, who = draw(st.integers(0, 1), label="verifier"), draw(STAKERS, label="who")
        s = self._stake(who)
        self.h.accuse(verifier, who, portion(draw(PORTION, label="kind"), s.staked + s.unbonding),
                      reuse=draw(st.booleans(), label="reuse"))

    def resolve(self, draw: Draw) -> None:
        self.h.resolve(draw(st.integers(0, 3), label="pick"), draw(st.booleans(), label="fraud"))

    def dismiss(self, draw: Draw) -> None:
        self.h.dismiss(draw(st.integers(0, 3), label="pick"))

    def finalize_slash(self, draw: Draw) -> None:
        self.h.finalize_slash(draw(st.integers(0, 3), label="pick"), draw(st.integers(0, 7), label="sender"),
                              stale=draw(RARELY, label="stale"), timing=draw(TIMING, label="timing"))

    def void_slash(self, draw: Draw) -> None:
        sender = draw(STAKERS, label="sender") if draw(RARELY, label="not the guardian") else None
        self.h.void_slash(draw(st.integers(0, 3), label="pick"), sender, stale=draw(RARELY, label="stale"),
                          timing=draw(TIMING, label="timing"))

    def set_slash_delay(self, draw: Draw) -> None:
        self.h.set_slash_delay(draw(st.sampled_from([60, 0, 20, 300]), label="delay"))

    def pause(self, draw: Draw) -> None:
        self.h.pause()

    def unpause(self, draw: Draw) -> None:
        self.h.unpause()  # through the timelock; does nothing unless paused

    def advance_time(self, draw: Draw) -> None:
        self.h.advance_time(draw(st.sampled_from([5, 30, 60, 120, 400]), label="seconds"))

    @invariant()
    def every_invariant_holds(self) -> None:
        # A step whose transactions all reverted as predicted changed no contract state, so the last full check
        # still holds for it; check_if_changed() re-reads everything after any state change.
        assert self.h.check_if_changed() == []


def test_random_operation_sequences_keep_every_invariant(harness: Harness) -> None:
    CampaignMachine.harness = harness
    before = harness.stats.ops
    run_state_machine_as_test(CampaignMachine, settings=MACHINE_SETTINGS)
    assert harness.stats.violations == []
    assert harness.stats.ops - before >= 200  # the budget really ran


def test_seeded_campaign_runs_clean(harness: Harness) -> None:
    """``run_campaign`` (what ``gridmint bench settlement`` runs at length) on a short seeded sequence."""
    harness.reset()
    stats = run_campaign(harness, 40, seed=7, episode=20)
    assert stats.violations == []
    assert {"stake", "fund"} <= set(stats.succeeded)


def _accused(harness: Harness) -> tuple[Harness, Any, int]:
    """The harness reset to a provider staking 1,000 and a verifier staking 500 that accuses it (a bond of 100 on one
    open dispute): the harness, the verifier and its index among the stakers."""
    harness.reset()
    verifier = harness.cast.verifiers[0]
    v_index = harness.cast.stakers.index(verifier)
    harness.stake(0, 1_000)
    harness.stake(v_index, 500)
    harness.accuse(0, 0, 10)
    return harness, verifier, v_index


def test_a_dismissed_dispute_releases_the_bond_and_matches_the_model(harness: Harness) -> None:
    """The good-faith verdict on the real contract and the model: a verifier accuses, the referee dismisses; every
    invariant holds, the bond is free again, a second dismiss (and a resolve) of the spent evidence revert as
    predicted."""
    h, verifier, v_index = _accused(harness)
    assert h.model.stake_of(verifier.address).bonded == 100 and len(h.model.disputes) == 1
    before = h.stats.succeeded.get("dismiss", 0)  # the harness is shared: its stats count every test's operations
    h.dismiss(0)
    assert h.stats.succeeded.get("dismiss", 0) == before + 1 and h.model.disputes == {}
    s = h.model.stake_of(verifier.address)
    assert (s.bonded, s.staked, s.open_disputes) == (0, 500, 0)
    reverts = h.stats.reverts_expected
    h.dismiss(0)
    h.resolve(0, fraud=False)
    assert h.stats.reverts_expected == reverts + 2
    assert h.check() == [] and h.stats.violations == []


def test_a_pause_inside_a_cancels_grace_extends_it_on_chain_and_in_the_model(harness: Harness) -> None:
    """JobEscrow's paused-time accounting against the model: a cancel (grace 30 s), the kill switch 10 s later,
    the timelocked unpause 100 s after that. The deadline moves back by the time paused: a release after the nominal
    deadline still pays, the customer's close is refused until the moved deadline, and from then on releases revert
    and the close refunds the rest; the chain and the model agree at every step (GridLens included, read while
    paused)."""
    harness.reset()
    h, job = harness, harness.jobs[0]
    h.fund(0, 0, 1_000)
    h.cancel(0, 0)
    nominal = h.model.jobs[job].closable_at
    h.advance_time(10)
    h.pause()
    h.advance_time(100)
    assert h.check() == []
    h.unpause()
    deadline = h.model.deadline(h.model.jobs[job])
    assert nominal < h.model.now < deadline and deadline == nominal + h.model.paused_total > nominal + 100
    succeeded, reverts = dict(h.stats.succeeded), h.stats.reverts_expected
    h.release(0, 0, 0, 100)  # past the nominal deadline: still paid
    h.close(0, 0)  # the customer, before the moved deadline: EscrowCancelPending
    assert h.stats.succeeded.get("release", 0) == succeeded.get("release", 0) + 1
    assert h.stats.reverts_expected == reverts + 1
    h.advance_time(deadline - h.model.now - 1)  # the next transaction runs at the deadline
    h.release(0, 1, 0, 100)  # EscrowJobCancelled
    h.close(0, 0)
    assert h.stats.reverts_expected == reverts + 2
    assert h.stats.succeeded.get("close", 0) == succeeded.get("close", 0) + 1
    assert h.model.jobs[job].closed and h.check() == [] and h.stats.violations == []


def test_a_pause_during_unbonding_extends_it_on_chain_and_in_the_model(harness: Harness) -> None:
    """GridStaking's paused-time accounting against the model (review R1): an unbond request (delay 50 s), the kill
    switch 10 s later, the timelocked unpause 100 s after that. The unbonding's deadline moves back by the time
    paused: a withdraw after the nominal deadline reverts StakingStillUnbonding, one at the moved deadline pays; the
    chain and the model agree at every step (GridLens's unbondingReadyAt included, read while paused)."""
    harness.reset()
    h = harness
    h.stake(0, 1_000)
    h.request_unbond(0, 400)
    s = h.model.stake_of(h.cast.stakers[0].address)
    nominal = s.ready_at
    h.advance_time(10)
    h.pause()
    h.advance_time(100)
    assert h.check() == []
    h.unpause()
    deadline = h.model.ready_at(s)
    assert nominal < h.model.now < deadline and deadline == nominal + h.model.paused_total > nominal + 100
    succeeded, reverts = dict(h.stats.succeeded), h.stats.reverts_expected
    h.withdraw(0)  # past the nominal deadline: StakingStillUnbonding
    assert h.stats.reverts_expected == reverts + 1
    h.advance_time(deadline - h.model.now - 1)  # the next transaction runs at the deadline
    h.withdraw(0)
    assert h.stats.succeeded.get("withdraw", 0) == succeeded.get("withdraw", 0) + 1
    assert s.unbonding == 0 and h.check() == [] and h.stats.violations == []


def test_a_bond_slashed_away_is_not_taken_again_from_later_stake(harness: Harness) -> None:
    """Review R4 against the model: a verifier bonds 100 on an accusation, a governance slash takes its whole stake
    (the bond with it), it stakes 300 again, and the accusation is ruled false. The verdict takes nothing more: the
    300 stays staked and free, on chain and in the model."""
    h, verifier, v_index = _accused(harness)
    h.slash(v_index, 500, 1)
    s = h.model.stake_of(verifier.address)
    assert (s.staked, s.bonded, s.open_disputes) == (0, 0, 1)
    h.stake(v_index, 300)
    slashed = h.model.slashed.get(verifier.address, 0)
    h.resolve(0, fraud=False)
    assert h.model.disputes == {} and h.model.slashed.get(verifier.address, 0) == slashed
    assert (s.staked, s.bonded, s.open_disputes, s.free()) == (300, 0, 0, 300)
    assert h.check() == [] and h.stats.violations == []


def _slashed_pending(h: Harness, who: int, amount: int) -> tuple[bytes, PendingSlashM]:
    """A governance slash of ``amount`` from staker ``who`` (bounty to verifier 0) under the deployed slash delay: its
    evidence and the model's pending slash."""
    assert h.model.params.slash_delay == h.params.slash_delay > 0
    pending = set(h.model.pending_slashes)
    h.slash(who, amount, 0)
    (evidence,) = set(h.model.pending_slashes) - pending
    return evidence, h.model.pending_slashes[evidence]


def test_a_delayed_slash_pays_out_only_after_its_delay_not_counting_a_pause(harness: Harness) -> None:
    """The slash delay against the model: a governance slash takes 400 of a provider's 1,000 at once but pays nobody
    (a finalize right away reverts StakingSlashNotReady); 10 s later the kill switch, 100 s paused (a finalize then
    reverts EnforcedPause), the timelocked unpause. The deadline moved back by the time paused: a finalize after the
    nominal deadline, or a second before the moved one, reverts StakingSlashNotReady; one at the moved deadline pays
    the verifier its bounty and the treasury the rest; a second finalize, and a void, find nothing pending. Chain and
    model agree at every step (each slashOf and totalPendingSlashes included)."""
    harness.reset()
    h = harness
    provider, verifier = h.cast.stakers[0].address, h.cast.verifiers[0].address
    h.stake(0, 1_000)
    evidence, ps = _slashed_pending(h, 0, 400)
    treasury, bounty = h.model.balances.get(h.cast.treasury, 0), h.model.balances[verifier]
    assert (ps.account, ps.verifier, ps.amount, ps.bounty) == (provider, verifier, 400, 200)
    assert h.model.stake_of(provider).staked == 600 and h.model.total_pending_slashes() == 400
    assert h.client.slash_of(evidence).amount == 400 and h.client.total_pending_slashes() == 400
    refused = dict(h.stats.refused)
    h.finalize_slash(0)
    assert h.stats.refused.get("StakingSlashNotReady", 0) == refused.get("StakingSlashNotReady", 0) + 1
    nominal = ps.ready_at
    h.advance_time(10)
    h.pause()
    h.advance_time(100)
    h.finalize_slash(0, sender=3)
    assert h.stats.refused.get("EnforcedPause", 0) == refused.get("EnforcedPause", 0) + 1
    assert h.check() == []
    h.unpause()
    deadline = h.model.slash_ready_at(ps)
    assert nominal < h.model.now < deadline and deadline == nominal + h.model.paused_total > nominal + 100
    h.finalize_slash(0, sender=3)  # past the nominal deadline, not the one in force
    h.finalize_slash(0, sender=3, timing="before")  # a second before the one in force
    assert h.stats.refused.get("StakingSlashNotReady", 0) == refused.get("StakingSlashNotReady", 0) + 3
    assert h.model.now == deadline - 1
    finalized = h.stats.succeeded.get("finalize_slash", 0)
    h.finalize_slash(0, sender=3, timing="deadline")
    assert h.model.now == deadline and h.stats.succeeded.get("finalize_slash", 0) == finalized + 1
    assert h.model.pending_slashes == {} and h.model.balances[verifier] == bounty + 200
    assert h.model.balances[h.cast.treasury] == treasury + 200
    h.finalize_slash(0)
    h.void_slash(0)
    assert h.stats.refused.get("StakingUnknownSlash", 0) == refused.get("StakingUnknownSlash", 0) + 2
    assert h.client.slash_of(evidence).amount == 0 and h.client.total_pending_slashes() == 0
    assert h.check() == [] and h.stats.violations == []


def test_the_guardian_voids_a_slash_in_time_and_the_stake_comes_back(harness: Harness) -> None:
    """A fraud verdict takes a provider's whole stake (700 staked + 300 unbonding) into a pending slash. A staker
    cannot void it (AccessControlUnauthorizedAccount); the guardian pauses and voids it while paused: the 1,000 comes
    back as staked (free to unbond again), counted as restored in the stake flows (stake in + restored == withdrawn +
    slashed + staked + unbonding). A second slash cannot be voided at its deadline (StakingSlashFinal) and is paid."""
    h, verifier, v_index = _accused(harness)
    provider = h.cast.stakers[0].address
    h.request_unbond(0, 300)
    h.resolve(0, fraud=True)
    (evidence,) = h.model.pending_slashes
    s = h.model.stake_of(provider)
    assert (s.staked, s.unbonding, h.model.pending_slashes[evidence].amount) == (0, 0, 1_000)
    refused = dict(h.stats.refused)
    h.void_slash(0, sender=v_index)
    assert h.stats.refused.get("AccessControlUnauthorizedAccount", 0) == refused.get(
        "AccessControlUnauthorizedAccount", 0) + 1
    h.pause()
    voided = h.stats.succeeded.get("void_slash", 0)
    h.void_slash(0)
    assert h.stats.succeeded.get("void_slash", 0) == voided + 1 and h.model.pending_slashes == {}
    assert (s.staked, s.unbonding, s.open_disputes, s.free()) == (1_000, 0, 0, 1_000)
    assert h.model.slashed[provider] == h.model.restored[provider] == 1_000
    assert h.check() == []
    h.unpause()
    h.request_unbond(0, 1_000)  # the voided stake is free again
    assert h.stats.succeeded.get("request_unbond", 0) >= 1 and s.unbonding == 1_000
    evidence, ps = _slashed_pending(h, 0, 250)
    h.void_slash(0, timing="deadline")
    assert h.stats.refused.get("StakingSlashFinal", 0) == refused.get("StakingSlashFinal", 0) + 1
    h.finalize_slash(0, sender=1)
    assert h.model.pending_slashes == {} and h.model.slash_paid[provider] == 250
    assert h.model.slashed[provider] == 1_250 and h.model.restored[provider] == 1_000
    assert h.check() == [] and h.stats.violations == []


def test_voiding_a_slash_voids_its_redo_too_unless_the_redo_is_final(harness: Harness) -> None:
    """A slash of 300 and its redo (200, under GridStaking.redoEvidenceOf of its evidence) pending, beside another
    staker's slash: the guardian voids the first, and the redo goes with it (the account gets 500 back); the other
    slash stays. Where the redo is final already (sent under a shorter delay), the void leaves it to be paid; where
    the slash has nothing pending of its own (paid out), the void voids its redo alone."""
    h = harness
    h.reset()
    h.stake(0, 1_000)
    h.stake(1, 1_000)
    first, _ = _slashed_pending(h, 0, 300)
    other, _ = _slashed_pending(h, 1, 100)
    h.slash(0, 200, 1, redo=sorted(h.model.pending_slashes).index(first))
    redo = redo_evidence(first)
    assert set(h.model.pending_slashes) == {first, other, redo} and h.client.slash_of(redo).amount == 200
    voided = h.stats.succeeded.get("void_slash", 0)
    h.void_slash(sorted(h.model.pending_slashes).index(first))
    assert h.stats.succeeded.get("void_slash", 0) == voided + 1
    assert set(h.model.pending_slashes) == {other} and h.client.slash_of(redo).amount == 0
    assert h.model.stake_of(h.cast.stakers[0].address).staked == 1_000 and h.client.evidence_used(redo)
    assert h.check() == []
    second, _ = _slashed_pending(h, 0, 300)  # again, its redo under a 20 s delay: final before the first is
    h.set_slash_delay(20)
    h.slash(0, 200, 1, redo=sorted(h.model.pending_slashes).index(second))
    h.advance_time(30)
    h.void_slash(sorted(h.model.pending_slashes).index(second))
    assert h.client.slash_of(second).amount == 0 and h.client.slash_of(redo_evidence(second)).amount == 200
    h.finalize_slash(sorted(h.model.pending_slashes).index(redo_evidence(second)))
    assert h.client.slash_of(redo_evidence(second)).amount == 0
    assert h.model.stake_of(h.cast.stakers[0].address).staked == 800
    assert h.check() == []
    h.set_slash_delay(60)  # a third slash, paid out; its redo, sent 30 s after it, still pending: voided alone
    pending = set(h.model.pending_slashes)
    h.slash(0, 100, 0)
    (third,) = set(h.model.pending_slashes) - pending
    h.advance_time(30)
    h.slash(0, 50, 1, redo=sorted(h.model.pending_slashes).index(third))
    h.advance_time(31)
    h.finalize_slash(sorted(h.model.pending_slashes).index(third))
    assert h.client.slash_of(third).amount == 0 and h.client.slash_of(redo_evidence(third)).amount == 50
    h.void_slash(sorted(h.model.slash_evidence.keys() - set(h.model.pending_slashes)).index(third), stale=True)
    assert h.client.slash_of(redo_evidence(third)).amount == 0
    assert h.model.stake_of(h.cast.stakers[0].address).staked == 700
    assert h.check() == [] and h.stats.violations == []


def test_a_voided_slash_backs_the_open_bonds_it_cut_again(harness: Harness) -> None:
    """A governance slash of an accusing verifier's whole 500 cuts its bond (100) with it; the guardian voids the slash:
    the 500 is staked again and backs the bond again, so the false verdict still costs the bond (a pending penalty of
    100, no verifier). Where the dispute closed between the slash and the void, there is no bond left to back: the
    void gives back the stake only. Chain and model agree throughout."""
    h, verifier, v_index = _accused(harness)
    s = h.model.stake_of(verifier.address)
    evidence, _ = _slashed_pending(h, v_index, 500)
    assert (s.staked, s.bonded, s.bonds_open, h.model.pending_slashes[evidence].bond_cut) == (0, 0, 100, 100)
    h.void_slash(0)
    assert (s.staked, s.bonded, s.free()) == (500, 100, 400) and h.check() == []
    h.resolve(0, fraud=False)
    (penalty,) = h.model.pending_slashes.values()
    assert (penalty.account, penalty.verifier, penalty.amount) == (verifier.address, None, 100)
    assert (s.staked, s.bonded, s.bonds_open) == (400, 0, 0)
    h.accuse(0, 0, 10)
    evidence, _ = _slashed_pending(h, v_index, 400)
    assert (s.staked, s.bonded, s.bonds_open) == (0, 0, 100)
    h.dismiss(0)  # the bond is released: there is none open any more
    h.void_slash(sorted(h.model.pending_slashes).index(evidence))
    assert evidence not in h.model.pending_slashes
    assert (s.staked, s.bonded, s.bonds_open, s.free()) == (400, 0, 0, 400)
    assert h.check() == [] and h.stats.violations == []


def test_a_slash_delay_change_applies_to_later_slashes_and_zero_pays_at_once(harness: Harness) -> None:
    """Governance raises the slash delay to 300 while a slash waits out 60: that one keeps its deadline (paid at it),
    the next waits 300. With the delay set to 0 a slash pays at once: slashOf stays empty and a finalize of its
    evidence reverts StakingUnknownSlash. A false accusation's penalty waits like any slash, all of it the treasury's
    (no verifier in slashOf)."""
    h, verifier, v_index = _accused(harness)
    first, ps = _slashed_pending(h, 0, 100)
    h.set_slash_delay(300)
    h.resolve(0, fraud=False)  # the verifier's bond (100) becomes a pending penalty, under the new delay
    penalties = [e for e, p in h.model.pending_slashes.items() if p.verifier is None]
    assert len(penalties) == 1 and h.model.pending_slashes[penalties[0]].account == verifier.address
    late = h.model.pending_slashes[penalties[0]]
    assert late.ready_at - ps.ready_at > 200 and h.check() == []
    h.finalize_slash(sorted(h.model.pending_slashes).index(first), timing="deadline")
    assert first not in h.model.pending_slashes and penalties[0] in h.model.pending_slashes
    h.set_slash_delay(0)
    treasury = h.model.balances.get(h.cast.treasury, 0)
    pending = dict(h.model.pending_slashes)
    h.slash(0, 50, 1)
    assert h.model.pending_slashes == pending and h.model.balances[h.cast.treasury] == treasury + 25
    refused = h.stats.refused.get("StakingUnknownSlash", 0)
    h.finalize_slash(0, stale=True)
    assert h.stats.refused.get("StakingUnknownSlash", 0) == refused + 1
    h.finalize_slash(0, timing="deadline")  # the penalty, under its 300 s
    assert h.model.pending_slashes == {} and h.model.slash_paid[verifier.address] == 100
    assert h.check() == [] and h.stats.violations == []


# ---------------------------------------------------------------- the checks can fail


@pytest.fixture
def lenient(harness: Harness) -> Iterator[Harness]:
    """The harness reset, collecting violations instead of raising; reset again afterwards."""
    harness.reset()
    harness.raise_on_violation = False
    seen = len(harness.stats.violations)
    yield harness
    del harness.stats.violations[seen:]
    harness.raise_on_violation = True
    harness.reset()


def test_check_reports_a_model_that_disagrees_with_the_chain(lenient: Harness) -> None:
    h = lenient
    h.stake(0, 100)
    assert h.check() == []
    h.model.balances[h.cast.providers[0].address] += 1
    violations = h.check()
    assert any(h.cast.providers[0].address in v and "!= model" in v for v in violations), violations


def test_check_reports_tokens_moved_behind_the_models_back(lenient: Harness) -> None:
    h = lenient
    customer = h.client.as_account(h.cast.customers[0])
    customer.transfer(h.deployment.escrow, 5)  # a stray transfer the escrow does not account for
    violations = h.check()
    assert any(v.startswith("escrow holds") for v in violations), violations
    assert any(h.cast.customers[0].address in v for v in violations), violations


def test_check_reports_stake_that_came_back_after_a_slash(lenient: Harness) -> None:
    h = lenient
    h.stake(0, 1_000)
    h.slash(0, 400, 0)
    assert h.check() == []
    h.model.slashed[h.cast.stakers[0].address] = 0  # as if the slashed 400 were still owed back to the provider
    assert any("stake flows" in v for v in h.check())


def test_check_reports_a_pending_slash_the_model_does_not_know(lenient: Harness) -> None:
    h = lenient
    h.stake(0, 1_000)
    evidence, _ = _slashed_pending(h, 0, 400)
    assert h.check() == []
    del h.model.pending_slashes[evidence]  # as if the slash had been paid at once
    violations = h.check()
    assert any(v.startswith("totalPendingSlashes 400") for v in violations), violations
    assert any(v.startswith(f"slash {evidence.hex()[:8]}") for v in violations), violations


def test_check_reports_a_void_the_stake_flows_do_not_count(lenient: Harness) -> None:
    h = lenient
    h.stake(0, 1_000)
    _slashed_pending(h, 0, 400)
    h.void_slash(0)
    assert h.check() == []
    h.model.restored.clear()  # as if the voided 400 had come from nowhere
    assert any("stake flows" in v for v in h.check())


def test_harness_reports_a_wrong_prediction(lenient: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = lenient
    monkeypatch.setattr(h.model, "withdraw", lambda account: None)  # a model that thinks every withdraw succeeds
    h.withdraw(0)
    assert h.stats.violations[-1].endswith("withdraw: expected success, got StakingNothingToWithdraw")


def test_harness_reports_a_paused_flow_that_moved(lenient: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = lenient
    h.pause()
    monkeypatch.setattr(h.model, "paused", False)  # a model that forgot the kill switch: predicts a stake succeeds
    h.stake(0, 10)
    assert h.stats.violations[-1].endswith("stake: expected success, got EnforcedPause")
    assert any("paused (1, 1, 1)" in v for v in h.check())


def test_check_reports_an_over_promising_root_that_was_not_voided(
    lenient: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = lenient
    h.fund(0, 0, 1_000)
    h.release_to_pool(0, 0, [100, 50, 0])
    monkeypatch.setattr(h, "void_root", lambda epoch=None: None)  # the guardian misses it
    h.post_root("bad_then_void")  # the first account's leaf says 1 more than the ledger, under the honest total
    victim = sorted(h.model.ledger)[0]
    h.advance_time(h.params.dispute_window + 1)
    h.claim_payout([a.address for a in h.cast.stakers].index(victim), "latest")
    entitled = h.model.ledger[victim]
    assert any(f"claimed {entitled + 1} > entitlement {entitled}" in v for v in h.check())
