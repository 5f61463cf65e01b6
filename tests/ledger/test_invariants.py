"""Stateful invariant test: Hypothesis drives random operation sequences against the real contracts on the
in-process EVM (``ledger.campaign.Harness``), and every invariant is checked after every step:

token totals conserved; each contract's balance equals what it owes (stakes; open escrows + claimables; deposits -
claims); no account claims more than its cumulative entitlement; nothing moves while paused; a slashed account never
gets the slashed part back; and every on-chain figure equals the Python model's.

The second half shows the checks can fail: a corrupted model, tokens moved behind the model's back, a wrong
prediction and an over-promising root that is not voided are each reported.

Runs derandomized (a fixed seed derived from the test) with a step budget that fits in about a minute.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from ledger.campaign import N_JOBS, UNITS, Harness, run_campaign
from ledger.campaign_model import StakeM
from ledger.chain import Chain

STAKERS = st.integers(min_value=0, max_value=4)  # 3 providers, then 2 verifiers
PROVIDERS = st.integers(min_value=0, max_value=2)
CUSTOMERS = st.integers(min_value=0, max_value=1)
JOB = st.integers(min_value=0, max_value=N_JOBS - 1)
UNIT = st.integers(min_value=0, max_value=len(UNITS) - 1)
#: Amounts relative to what the model says the operation can take (see ``portion``). Hypothesis treats the first
#: value of ``sampled_from`` as the simplest, so the list starts with the one that usually succeeds.
PORTION = st.sampled_from(["some", "all", "one", "too_much", "zero"])
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
    ("claim_payout", 11), ("claim_payout_batch", 5), ("set_dispute_window", 1), ("slash", 3), ("accuse", 4),
    ("resolve", 3), ("dismiss", 2), ("pause", 1), ("unpause", 4),
)
OPERATION = st.sampled_from([name for name, weight in OPERATIONS for _ in range(weight)])


class CampaignMachine(RuleBasedStateMachine):
    """Each step is one ``Harness`` operation: it sends the transaction(s) and compares the outcome (success or the
    exact custom error) with the model; the invariant then reads the whole system in one GridLens call."""

    harness: ClassVar[Harness]

    def __init__(self) -> None:
        super().__init__()
        self.h = self.harness
        self.h.reset()

    @initialize()
    def start_with_stakes_and_funded_jobs(self) -> None:
        """Every staker bonds 1,000, each customer funds two jobs, and a first batch is in the pool under an honest
        root, so that short sequences reach the deeper flows (claims, disputes, voids) instead of spending their
        steps on setting up."""
        for who in range(len(self.h.cast.stakers)):
            self.h.stake(who, 1_000)
        for job in range(N_JOBS):
            self.h.fund(job % 2, job, 10_000)
        self.h.release_to_pool(0, 0, [300, 40, 5])
        self.h.post_root("honest")

    def _stake(self, who: int) -> StakeM:
        return self.h.model.stakes.get(self.h.cast.stakers[who].address) or StakeM()

    @rule(op=OPERATION, data=st.data())
    def step(self, op: str, data: st.DataObject) -> None:
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
                     draw(st.integers(0, 1), label="verifier"), reuse=draw(st.booleans(), label="reuse"))

    def accuse(self, draw: Draw) -> None:
        verifier, who = draw(st.integers(0, 1), label="verifier"), draw(STAKERS, label="who")
        s = self._stake(who)
        self.h.accuse(verifier, who, portion(draw(PORTION, label="kind"), s.staked + s.unbonding),
                      reuse=draw(st.booleans(), label="reuse"))

    def resolve(self, draw: Draw) -> None:
        self.h.resolve(draw(st.integers(0, 3), label="pick"), draw(st.booleans(), label="fraud"))

    def dismiss(self, draw: Draw) -> None:
        self.h.dismiss(draw(st.integers(0, 3), label="pick"))

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
