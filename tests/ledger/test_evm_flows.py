"""Time-dependent flows of the chain client on both backends (in-process py-evm and a Hardhat node).

Runs on ``timed_world`` (conftest ``TIMED``): unbonding delay 1,000 s, dispute window 600 s, cancel grace 120 s,
timelock delay 300 s, verifier bond 100. Every revert is checked by its domain error class, custom-error name and
decoded arguments, so the same assertion holds on both backends.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from eth_utils import keccak

from ledger.errors import (
    EscrowError,
    GovernanceError,
    InsufficientEscrowError,
    InsufficientStakeError,
    InvalidProofError,
    PausedError,
    RootInDisputeError,
    SettlementError,
    StakeFrozenError,
    StakingError,
    UnauthorizedError,
)
from ledger.evm import JobState, StakeState, role_id
from ledger.payout_tree import accumulate, build_payout_tree
from ledger.staking_ops import Dispute
from protocol.errors import ChainError, InsufficientFundsError
from protocol.signing import recover_accusation, sign_accusation

if TYPE_CHECKING:  # fixtures come from conftest.py; never import it at run time (module-name clashes)
    from conftest import World

BATCH_1 = keccak(text="batch-1")
BATCH_2 = keccak(text="batch-2")
UNIT = keccak(text="flows-unit")
EVIDENCE = keccak(text="flows-evidence")
EVIDENCE_2 = keccak(text="flows-evidence-2")


def expect(exc_info: pytest.ExceptionInfo[ChainError], cls: type[ChainError], name: str, *args: object) -> None:
    assert type(exc_info.value) is cls, f"{type(exc_info.value).__name__}: {exc_info.value}"
    assert (exc_info.value.error_name, exc_info.value.error_args) == (name, args), str(exc_info.value)


def test_advance_time_puts_the_latest_block_there_every_time(timed_world: World) -> None:
    """The dev chains' clock: the latest block stands ``seconds`` on (py-evm left it one second short, and a second
    ``advance_time(1)`` did not move it)."""
    chain = timed_world.chain
    before = chain.timestamp()
    at = chain.advance_time(100)
    assert chain.timestamp() == at >= before + 100
    for _ in range(3):
        previous, at = at, chain.advance_time(1)
        assert chain.timestamp() == at > previous


class TestUnbonding:
    def test_request_then_withdraw_after_the_delay(self, timed_world: World) -> None:
        w, p = timed_world, timed_world.provider
        p.stake(1_000)
        before = p.balance_of(p.address)
        ready_at = p.request_unbond(400)
        assert ready_at == w.chain.timestamp() + w.params["unbonding_delay_s"]
        assert p.stake_state(p.address) == StakeState(600, 0, 0, 400, ready_at, 0)
        assert (p.stake_of(p.address), p.free_stake_of(p.address), p.total_staked()) == (600, 600, 1_000)

        with pytest.raises(StakeFrozenError) as exc_info:
            p.withdraw()
        expect(exc_info, StakeFrozenError, "StakingStillUnbonding", p.address, ready_at)

        w.chain.advance_time(w.params["unbonding_delay_s"])
        assert p.withdraw() == 400
        assert p.withdraw() == 0  # nothing pending: no transaction
        assert p.balance_of(p.address) == before + 400
        assert (p.total_staked(), p.contract_balances()["staking"]) == (600, 600)
        assert w.total_held() == w.supply

    def test_a_second_request_adds_up_and_restarts_the_delay(self, timed_world: World) -> None:
        w, p = timed_world, timed_world.provider
        p.stake(1_000)
        first = p.request_unbond(100)
        w.chain.advance_time(w.params["unbonding_delay_s"] - 100)
        second = p.request_unbond(50)
        assert second > first
        assert p.stake_state(p.address).unbonding == 150
        w.chain.advance_time(200)  # the first request would be ready now, the restarted delay is not
        with pytest.raises(StakeFrozenError) as exc_info:
            p.withdraw()
        expect(exc_info, StakeFrozenError, "StakingStillUnbonding", p.address, second)
        w.chain.advance_time(w.params["unbonding_delay_s"])
        assert p.withdraw() == 150

    def test_a_pause_during_unbonding_does_not_count_toward_the_delay(self, timed_world: World) -> None:
        """Review R1: unbond 400 (delay 1,000 s), the kill switch 10 s later, the unpause through the timelock 1,300 s
        on. The request used to be withdrawable the moment the pause ended, before a slash could land. Now its
        deadline moves back by the time paused, and stake_state reports that deadline while paused and after."""
        w, p, admin = timed_world, timed_world.provider, timed_world.admin
        p.stake(1_000)
        ready_at = p.request_unbond(400)
        w.chain.advance_time(10)
        admin.pause_all()
        paused_at = w.chain.timestamp()
        op = admin.unpause_all()
        assert op is not None
        w.chain.advance_time(w.params["unbonding_delay_s"] + 300)
        assert p.stake_state(p.address).unbonding_ready_at == ready_at + (w.chain.timestamp() - paused_at)
        admin.execute(op)
        unpaused_at = w.chain.timestamp()
        assert not any(admin.paused().values()) and unpaused_at > ready_at  # past the nominal delay
        deadline = ready_at + (unpaused_at - paused_at)
        assert p.stake_state(p.address) == StakeState(600, 0, 0, 400, deadline, 0)
        with pytest.raises(StakeFrozenError) as exc_info:
            p.withdraw()
        expect(exc_info, StakeFrozenError, "StakingStillUnbonding", p.address, deadline)
        w.chain.advance_time(deadline - w.chain.timestamp())
        assert p.withdraw() == 400
        assert w.total_held() == w.supply

    def test_unstake_with_a_delay_only_requests(self, timed_world: World) -> None:
        w, p = timed_world, timed_world.provider
        p.stake(100)
        p.unstake(30)
        assert (p.stake_of(p.address), p.stake_state(p.address).unbonding) == (70, 30)
        w.chain.advance_time(w.params["unbonding_delay_s"])
        assert p.withdraw() == 30

    def test_cannot_unbond_more_than_free_stake(self, timed_world: World) -> None:
        p = timed_world.provider
        p.stake(100)
        with pytest.raises(InsufficientStakeError) as exc_info:
            p.request_unbond(101)
        expect(exc_info, InsufficientStakeError, "StakingInsufficientStake", p.address, 100, 101)
        assert isinstance(exc_info.value, InsufficientFundsError)
        with pytest.raises(StakingError) as zero_info:
            p.request_unbond(0)
        expect(zero_info, StakingError, "StakingZeroAmount")

    def test_slash_reaches_unbonding_stake_and_the_slashed_part_never_comes_back(self, timed_world: World) -> None:
        w, p, admin = timed_world, timed_world.provider, timed_world.admin
        p.stake(1_000)
        before = p.balance_of(p.address)
        p.request_unbond(800)
        # 200 staked + 800 unbonding: a slash of 500 takes the 200 staked first, then 300 of the unbonding.
        assert admin.slash(p.address, 500, w.verifier.address, EVIDENCE)
        state = p.stake_state(p.address)
        assert (state.staked, state.unbonding) == (0, 500)
        w.chain.advance_time(w.params["unbonding_delay_s"])
        assert p.withdraw() == 500
        assert p.balance_of(p.address) == before + 500
        assert p.total_staked() == 0
        assert w.total_held() == w.supply


class TestLock:
    def test_locked_stake_cannot_be_unbonded_until_unlocked(self, timed_world: World) -> None:
        admin, p = timed_world.admin, timed_world.provider
        p.stake(1_000)
        admin.lock_stake(p.address, 300)
        assert p.stake_state(p.address).locked == 300
        assert (p.stake_of(p.address), p.free_stake_of(p.address)) == (1_000, 700)
        with pytest.raises(InsufficientStakeError) as exc_info:
            p.request_unbond(701)
        expect(exc_info, InsufficientStakeError, "StakingInsufficientStake", p.address, 700, 701)
        with pytest.raises(InsufficientStakeError) as lock_info:
            admin.lock_stake(p.address, 701)
        expect(lock_info, InsufficientStakeError, "StakingInsufficientStake", p.address, 700, 701)

        admin.unlock_stake(p.address, 200)
        assert p.free_stake_of(p.address) == 900
        with pytest.raises(StakingError) as unlock_info:
            admin.unlock_stake(p.address, 101)
        expect(unlock_info, StakingError, "StakingInsufficientLocked", p.address, 100, 101)
        admin.unlock_stake(p.address, 100)
        p.request_unbond(1_000)
        assert p.stake_state(p.address).unbonding == 1_000

    def test_only_lockers_lock(self, timed_world: World) -> None:
        w = timed_world
        w.provider.stake(10)
        with pytest.raises(UnauthorizedError) as exc_info:
            w.outsider.lock_stake(w.provider.address, 1)
        expect(exc_info, UnauthorizedError, "AccessControlUnauthorizedAccount", w.outsider.address,
               role_id("LOCKER_ROLE"))


class TestAccusation:
    def _open_dispute(self, w: World, amount: int = 400) -> None:
        w.provider.stake(1_000)
        w.verifier.stake(500)
        signature = w.verifier.sign_accusation(w.provider.address, EVIDENCE, amount)
        w.admin.accuse(w.provider.address, EVIDENCE, amount, signature)  # the referee relays a signed accusation

    def test_client_and_protocol_sign_one_encoding_that_the_contract_accepts(self, timed_world: World) -> None:
        """The client's sign_accusation and protocol.signing's (the node verifier's) give the same bytes, and
        GridStaking recovers the verifier from them: one EIP-712 encoding, checked against the contract."""
        w = timed_world
        w.provider.stake(1_000)
        w.verifier.stake(500)
        staking = w.deployment.staking
        theirs = sign_accusation(w.verifier.account, w.chain.chain_id, staking, w.provider.address, EVIDENCE, 400)
        ours = w.verifier.sign_accusation(w.provider.address, EVIDENCE, 400)
        assert ours == bytes.fromhex(theirs.removeprefix("0x")) and len(ours) == 65
        assert w.verifier.sign_accusation(w.provider.address, "0x" + EVIDENCE.hex(), 400) == ours  # hex evidence too
        signer = recover_accusation(w.chain.chain_id, staking, w.provider.address, EVIDENCE, theirs, 400)
        assert signer == w.verifier.address
        with pytest.raises(UnauthorizedError) as exc_info:  # only the referee relays: the signer itself cannot
            w.verifier.accuse(w.provider.address, EVIDENCE, 400, ours)
        expect(exc_info, UnauthorizedError, "AccessControlUnauthorizedAccount", w.verifier.address,
               role_id("REFEREE_ROLE"))
        assert not w.admin.dispute_of(EVIDENCE).is_open
        assert w.admin.stake_state(w.provider.address).open_disputes == 0  # nothing frozen
        w.admin.accuse(w.provider.address, EVIDENCE, 400, ours)
        bond = w.params["verifier_bond"]
        assert w.admin.dispute_of(EVIDENCE) == Dispute(w.provider.address, w.verifier.address, 400, bond)
        # protocol's signature (0x-hex) submitted as bytes works just the same.
        w.admin.accuse(w.provider.address, EVIDENCE_2, 400, bytes.fromhex(
            sign_accusation(w.verifier.account, w.chain.chain_id, staking, w.provider.address, EVIDENCE_2, 400)[2:]))
        assert w.admin.dispute_of(EVIDENCE_2).verifier == w.verifier.address

    def test_accusation_bonds_the_verifier_and_freezes_both(self, timed_world: World) -> None:
        w = timed_world
        self._open_dispute(w)
        bond = w.params["verifier_bond"]
        assert w.verifier.stake_state(w.verifier.address) == StakeState(500, 0, bond, 0, 0, 1)
        assert w.provider.stake_state(w.provider.address).open_disputes == 1
        assert w.admin.free_stake_of(w.provider.address) == 0
        assert w.admin.free_stake_of(w.verifier.address) == 0
        assert not w.admin.meets_min_stake(w.provider.address, "H100-80GB")
        with pytest.raises(StakeFrozenError) as exc_info:
            w.provider.request_unbond(1)
        expect(exc_info, StakeFrozenError, "StakingUnderDispute", w.provider.address, 1)
        with pytest.raises(StakeFrozenError) as verifier_info:
            w.verifier.request_unbond(1)
        expect(verifier_info, StakeFrozenError, "StakingUnderDispute", w.verifier.address, 1)

    def test_fraud_slashes_the_providers_whole_stake_and_pays_the_bounty(self, timed_world: World) -> None:
        w = timed_world
        self._open_dispute(w, amount=400)  # the accused amount does not cap the slash
        verifier_balance = w.admin.balance_of(w.verifier.address)
        assert w.admin.resolve_dispute(EVIDENCE, fraud=True) == 1_000
        bounty = 1_000 * w.bounty_bps // 10_000
        assert w.admin.balance_of(w.verifier.address) - verifier_balance == bounty
        assert w.admin.balance_of(w.treasury) == 1_000 - bounty
        assert w.provider.stake_state(w.provider.address) == StakeState(0, 0, 0, 0, 0, 0)
        assert w.verifier.stake_state(w.verifier.address) == StakeState(500, 0, 0, 0, 0, 0)
        assert w.admin.evidence_used(EVIDENCE)
        # The evidence is spent: neither another accusation nor a governance slash can reuse it.
        signature = w.verifier.sign_accusation(w.provider.address, EVIDENCE, 1)
        with pytest.raises(StakingError) as exc_info:
            w.admin.accuse(w.provider.address, EVIDENCE, 1, signature)
        expect(exc_info, StakingError, "StakingEvidenceUsed", EVIDENCE)
        assert w.admin.slash(w.provider.address, 1, w.verifier.address, EVIDENCE) is False
        w.provider.stake(10)
        w.provider.request_unbond(10)  # the dispute is over
        assert w.total_held() == w.supply

    def test_a_self_accusation_for_1_wei_still_costs_the_provider_everything(self, timed_world: World) -> None:
        """The cheat's second staked key (provider2) accuses it first for 1 wei, spending the evidence before an
        honest verifier can; the fraud verdict still takes all of the provider's stake, unbonding part included."""
        w = timed_world
        w.provider.stake(1_000)
        w.provider.request_unbond(300)
        w.provider2.stake(w.params["verifier_bond"])
        w.verifier.stake(500)
        w.admin.accuse(w.provider.address, EVIDENCE, 1, w.provider2.sign_accusation(w.provider.address, EVIDENCE, 1))
        honest = w.verifier.sign_accusation(w.provider.address, EVIDENCE, 400)
        with pytest.raises(StakingError) as honest_info:
            w.admin.accuse(w.provider.address, EVIDENCE, 400, honest)
        expect(honest_info, StakingError, "StakingEvidenceUsed", EVIDENCE)
        assert w.admin.resolve_dispute(EVIDENCE, fraud=True) == 1_000
        state = w.provider.stake_state(w.provider.address)
        assert (state.staked, state.unbonding) == (0, 0)
        assert w.admin.balance_of(w.treasury) == 1_000 - 1_000 * w.bounty_bps // 10_000
        assert w.total_held() == w.supply

    def test_false_accusation_costs_the_verifier_its_bond(self, timed_world: World) -> None:
        w = timed_world
        self._open_dispute(w)
        verifier_balance = w.admin.balance_of(w.verifier.address)
        bond = w.params["verifier_bond"]
        assert w.admin.resolve_dispute(EVIDENCE, fraud=False) == bond
        assert w.admin.balance_of(w.verifier.address) == verifier_balance  # no bounty for a false accusation
        assert w.admin.balance_of(w.treasury) == bond
        assert w.verifier.stake_state(w.verifier.address) == StakeState(500 - bond, 0, 0, 0, 0, 0)
        assert w.provider.stake_state(w.provider.address) == StakeState(1_000, 0, 0, 0, 0, 0)
        with pytest.raises(StakingError) as exc_info:
            w.admin.resolve_dispute(EVIDENCE, fraud=True)
        expect(exc_info, StakingError, "StakingUnknownDispute", EVIDENCE)
        assert w.total_held() == w.supply

    def test_accusations_that_are_refused(self, timed_world: World) -> None:
        w = timed_world
        w.provider.stake(1_000)
        # The verifier has not staked: it cannot bond.
        signature = w.verifier.sign_accusation(w.provider.address, EVIDENCE, 10)
        with pytest.raises(InsufficientStakeError) as exc_info:
            w.admin.accuse(w.provider.address, EVIDENCE, 10, signature)
        expect(exc_info, InsufficientStakeError, "StakingInsufficientStake", w.verifier.address, 0,
               w.params["verifier_bond"])
        # A provider cannot accuse itself (to turn its own slash into a bounty).
        own = w.provider.sign_accusation(w.provider.address, EVIDENCE, 10)
        with pytest.raises(StakingError) as self_info:
            w.admin.accuse(w.provider.address, EVIDENCE, 10, own)
        expect(self_info, StakingError, "StakingSelfAccusation", w.provider.address)
        # Nothing to slash on an account with no stake.
        w.verifier.stake(500)
        empty = w.verifier.sign_accusation(w.outsider.address, EVIDENCE, 10)
        with pytest.raises(StakingError) as empty_info:
            w.admin.accuse(w.outsider.address, EVIDENCE, 10, empty)
        expect(empty_info, StakingError, "StakingNothingToSlash", w.outsider.address)
        # A signature over other values recovers another (unstaked) address.
        with pytest.raises(InsufficientStakeError):
            w.admin.accuse(w.provider.address, EVIDENCE, 11, signature)
        # The same open evidence cannot be accused twice.
        good = w.verifier.sign_accusation(w.provider.address, EVIDENCE_2, 10)
        w.admin.accuse(w.provider.address, EVIDENCE_2, 10, good)
        with pytest.raises(StakingError) as twice_info:
            w.admin.accuse(w.provider.address, EVIDENCE_2, 10, good)
        expect(twice_info, StakingError, "StakingEvidenceUsed", EVIDENCE_2)

    def test_only_referees_resolve(self, timed_world: World) -> None:
        w = timed_world
        self._open_dispute(w)
        with pytest.raises(UnauthorizedError) as exc_info:
            w.outsider.resolve_dispute(EVIDENCE, fraud=True)
        expect(exc_info, UnauthorizedError, "AccessControlUnauthorizedAccount", w.outsider.address,
               role_id("REFEREE_ROLE"))


class TestEscrowCancel:
    def test_customer_cancels_then_closes_after_the_grace(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        w, c, admin = timed_world, timed_world.customer, timed_world.admin
        c.fund_job(job, 1_000)
        closable_at = c.cancel_job(job)
        assert closable_at == w.chain.timestamp() + w.params["cancel_grace_s"]
        assert c.get_job(job).closable_at == closable_at
        with pytest.raises(EscrowError) as fund_info:
            c.fund_job(job, 1)
        expect(fund_info, EscrowError, "EscrowJobCancelled", job, closable_at)
        with pytest.raises(EscrowError) as early_info:
            c.close_job(job)
        expect(early_info, EscrowError, "EscrowCancelPending", job, closable_at)
        assert admin.release(job, UNIT, w.provider.address, 100)  # verified within the grace: still paid
        w.chain.advance_time(w.params["cancel_grace_s"])
        before = c.balance_of(c.address)
        assert c.close_job(job) == 900
        assert c.balance_of(c.address) == before + 900
        assert c.get_job(job) == JobState(c.address, 1_000, 100, True, 0, closable_at)

    def test_nothing_is_released_after_the_grace_so_the_customer_gets_the_rest(self, timed_world: World) -> None:
        """A reviewer's repro: fund 1,000, cancel (grace 120 s), wait 10,000 s; the settler's release 900 and
        releaseToPool 100 must be refused, and the customer's close refunds all 1,000."""
        job = timed_world.job("flows-job")
        w, c, admin = timed_world, timed_world.customer, timed_world.admin
        c.fund_job(job, 1_000)
        closable_at = c.cancel_job(job)
        w.chain.advance_time(10_000)
        with pytest.raises(EscrowError) as release_info:
            admin.release(job, UNIT, w.provider.address, 900)
        expect(release_info, EscrowError, "EscrowJobCancelled", job, closable_at)
        with pytest.raises(EscrowError) as pool_info:
            admin.release_to_pool(job, BATCH_1, 100)
        expect(pool_info, EscrowError, "EscrowJobCancelled", job, closable_at)
        before = c.balance_of(c.address)
        assert c.close_job(job) == 1_000
        assert c.balance_of(c.address) == before + 1_000
        assert w.total_held() == w.supply

    def test_a_pause_inside_the_grace_does_not_count_against_it(self, timed_world: World) -> None:
        """A reviewer's repro: fund 1,000, cancel (grace 120 s), the guardian's kill switch 10 s later, the unpause
        through the timelock (300 s: longer than the grace). Units verified before the cancel used to be unpayable
        after the unpause (EscrowJobCancelled) and the customer's close took everything. Now the deadline moves back
        by the time paused: the settler still pays until then, the customer's close waits until then and refunds
        the rest."""
        job = timed_world.job("flows-job")
        w, c, admin = timed_world, timed_world.customer, timed_world.admin
        c.fund_job(job, 1_000)
        closable_at = c.cancel_job(job)
        w.chain.advance_time(10)
        admin.pause_all()
        paused_at = w.chain.timestamp()
        op = admin.unpause_all()
        assert op is not None
        w.chain.advance_time(w.params["timelock_delay_s"] + 1)
        admin.execute(op)
        unpaused_at = w.chain.timestamp()
        assert not any(admin.paused().values()) and unpaused_at > closable_at  # past the nominal grace
        deadline = closable_at + (unpaused_at - paused_at)
        assert c.get_job(job).closable_at == deadline
        with pytest.raises(EscrowError) as early_info:
            c.close_job(job)
        expect(early_info, EscrowError, "EscrowCancelPending", job, deadline)
        assert admin.release_to_pool(job, BATCH_1, 600)
        w.chain.advance_time(deadline - w.chain.timestamp())
        with pytest.raises(EscrowError) as late_info:
            admin.release(job, UNIT, w.provider.address, 100)
        expect(late_info, EscrowError, "EscrowJobCancelled", job, deadline)
        assert c.close_job(job) == 400
        assert c.get_job(job) == JobState(c.address, 1_000, 600, True, 0, deadline)
        assert w.total_held() == w.supply

    def test_only_the_customer_cancels(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        job2 = timed_world.job("flows-job-2")
        w = timed_world
        w.customer.fund_job(job, 10)
        with pytest.raises(EscrowError) as exc_info:
            w.provider.cancel_job(job)
        expect(exc_info, EscrowError, "EscrowNotCustomer", job, w.provider.address, w.customer.address)
        with pytest.raises(EscrowError) as unknown_info:
            w.customer.cancel_job(job2)
        expect(unknown_info, EscrowError, "EscrowUnknownJob", job2)


class TestPayoutPool:
    def test_release_to_pool_is_once_per_batch(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        w, admin = timed_world, timed_world.admin
        w.customer.fund_job(job, 1_000)
        assert admin.release_to_pool(job, BATCH_1, 600) is True
        assert admin.release_to_pool(job, BATCH_1, 600) is False  # retried: nothing sent
        assert admin.batch_released(job, BATCH_1)
        assert admin.total_deposited() == 600
        assert admin.contract_balances() == {"staking": 0, "escrow": 400, "distributor": 600}
        assert admin.get_job(job).released == 600
        with pytest.raises(InsufficientEscrowError) as exc_info:
            admin.release_to_pool(job, BATCH_2, 401)
        expect(exc_info, InsufficientEscrowError, "EscrowInsufficientFunds", job, 400, 401)
        assert w.total_held() == w.supply

    def test_release_to_pool_lost_race_returns_false(self, timed_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
        job = timed_world.job("flows-job")
        w = timed_world
        w.customer.fund_job(job, 100)
        w.admin.release_to_pool(job, BATCH_1, 10)
        monkeypatch.setattr(type(w.admin), "batch_released", lambda self, job, batch: False)
        assert w.admin.release_to_pool(job, BATCH_1, 10) is False
        assert w.admin.total_deposited() == 10

    def test_cumulative_roots_pay_each_account_once_across_epochs(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        w, admin, p1, p2 = timed_world, timed_world.admin, timed_world.provider, timed_world.provider2
        window = w.params["dispute_window_s"]
        w.customer.fund_job(job, 10_000)
        start = {p.address: p.balance_of(p.address) for p in (p1, p2)}

        # epoch 1: p1 earned 100, p2 200
        admin.release_to_pool(job, BATCH_1, 300)
        ledger = accumulate({}, [(p1.address, 100), (p2.address, 200)])
        tree1 = build_payout_tree(ledger)
        admin.post_tree(1, tree1)
        claimable_at = admin.latest_claimable_at()
        assert claimable_at == w.chain.timestamp() + window
        with pytest.raises(RootInDisputeError) as exc_info:
            p1.claim_from_tree(1, tree1)
        expect(exc_info, RootInDisputeError, "SettlementRootInDispute", 1, claimable_at)
        w.chain.advance_time(window)
        assert p1.claim_from_tree(1, tree1) == 100
        assert p1.claim_from_tree(1, tree1) == 0  # an idempotent retry: nothing sent, nothing paid

        # epochs 2 and 3: p1 earns 250 then 50; p2 does not claim until epoch 3
        for epoch, batch, earned in ((2, BATCH_2, [(p1.address, 250)]), (3, UNIT, [(p1.address, 50), (p2.address, 5)])):
            admin.release_to_pool(job, batch, sum(v for _, v in earned))
            ledger = accumulate(ledger, earned)
            admin.post_tree(epoch, build_payout_tree(ledger))
            w.chain.advance_time(window)
        tree3 = build_payout_tree(ledger)
        assert admin.latest_epoch() == 3 and admin.root_of(3) == tree3.root
        assert p1.claim_from_tree(3, tree3) == 300  # 400 cumulative - 100 already claimed
        assert p2.claim_from_tree(3, tree3) == 205  # one claim for three epochs
        assert p2.claim_from_tree(1, tree1) == 0  # an older, smaller leaf pays nothing more
        assert (admin.claimed(p1.address), admin.claimed(p2.address)) == (400, 205)
        assert p1.balance_of(p1.address) - start[p1.address] == 400
        assert p2.balance_of(p2.address) - start[p2.address] == 205
        assert admin.balance_of(w.deployment.distributor) == admin.total_deposited() - 605 == 0
        assert w.total_held() == w.supply

    def test_claim_for_pays_the_account_not_the_sender(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        w, admin, p1 = timed_world, timed_world.admin, timed_world.provider
        w.customer.fund_job(job, 1_000)
        admin.release_to_pool(job, BATCH_1, 70)
        tree = build_payout_tree({p1.address: 70})
        admin.post_tree(1, tree)
        w.chain.advance_time(w.params["dispute_window_s"])
        before = admin.balance_of(p1.address), admin.balance_of(admin.address)
        assert admin.claim_payout_for(p1.address, 1, 70, tree.proof(p1.address)) == 70
        assert admin.claim_payout_for(p1.address, 1, 70, tree.proof(p1.address)) == 0
        assert (admin.balance_of(p1.address), admin.balance_of(admin.address)) == (before[0] + 70, before[1])

    def test_claim_payout_batch_pushes_pay_to_each_account_once(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        w, admin, p1, p2 = timed_world, timed_world.admin, timed_world.provider, timed_world.provider2
        w.customer.fund_job(job, 1_000)
        admin.release_to_pool(job, BATCH_1, 300)
        tree1 = build_payout_tree({p1.address: 100, p2.address: 200})
        admin.post_tree(1, tree1)
        rows = [(a, tree1.cumulative(a), tree1.proof(a)) for a in (p1.address, p2.address, p2.address)]
        with pytest.raises(RootInDisputeError) as dispute_info:
            w.outsider.claim_payout_batch(1, rows)
        expect(dispute_info, RootInDisputeError, "SettlementRootInDispute", 1, admin.latest_claimable_at())
        w.chain.advance_time(w.params["dispute_window_s"])
        assert p1.claim_from_tree(1, tree1) == 100  # p1 claims itself first: its entry is stale
        before = {a: admin.balance_of(a) for a in (p1.address, p2.address, w.outsider.address)}
        assert w.outsider.claim_payout_batch(1, rows) == 200  # anyone may push; p2 listed twice is paid once
        assert {a: admin.balance_of(a) - v for a, v in before.items()} == {
            p1.address: 0, p2.address: 200, w.outsider.address: 0}
        sent = w.outsider.last_receipt
        assert w.outsider.claim_payout_batch(1, rows) == 0  # a retry: everything already paid, nothing sent
        assert w.outsider.last_receipt is sent

        admin.release_to_pool(job, BATCH_2, 70)
        tree2 = build_payout_tree({p1.address: 150, p2.address: 200, w.verifier.address: 20})
        admin.post_tree(2, tree2)
        w.chain.advance_time(w.params["dispute_window_s"])
        assert admin.claim_tree_batch(2, tree2) == 70  # p1 +50, verifier +20, p2 nothing new
        assert (admin.claimed(p1.address), admin.claimed(p2.address), admin.claimed(w.verifier.address)) == (150, 200, 20)
        assert admin.balance_of(w.deployment.distributor) == 0
        assert w.total_held() == w.supply

    def test_claim_payout_batch_is_refused_whole_for_one_bad_proof(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        w, admin, p1, p2 = timed_world, timed_world.admin, timed_world.provider, timed_world.provider2
        w.customer.fund_job(job, 1_000)
        admin.release_to_pool(job, BATCH_1, 300)
        tree = build_payout_tree({p1.address: 100, p2.address: 200})
        admin.post_tree(1, tree)
        w.chain.advance_time(w.params["dispute_window_s"])
        rows = [(p1.address, 100, tree.proof(p1.address)), (p2.address, 201, tree.proof(p2.address))]
        with pytest.raises(InvalidProofError) as proof_info:
            admin.claim_payout_batch(1, rows)
        expect(proof_info, InvalidProofError, "SettlementInvalidProof", p2.address, 1, 201)
        assert (admin.claimed(p1.address), admin.claimed(p2.address)) == (0, 0)  # nobody in the batch was paid
        with pytest.raises(SettlementError) as length_info:  # the client never builds this; the contract refuses it
            admin._send(admin.distributor, "claimMany", 1, [p1.address], [100], [])  # noqa: SLF001
        expect(length_info, SettlementError, "SettlementLengthMismatch", 1, 1, 0)

    def test_bad_claims_are_refused_with_their_values(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        w, admin, p1, p2 = timed_world, timed_world.admin, timed_world.provider, timed_world.provider2
        w.customer.fund_job(job, 1_000)
        admin.release_to_pool(job, BATCH_1, 300)
        tree = build_payout_tree({p1.address: 100, p2.address: 200})
        with pytest.raises(SettlementError) as unknown_info:
            p1.claim_payout(1, 100, tree.proof(p1.address))
        expect(unknown_info, SettlementError, "SettlementUnknownEpoch", 1, 0)
        admin.post_tree(1, tree)
        w.chain.advance_time(w.params["dispute_window_s"])
        with pytest.raises(InvalidProofError) as amount_info:
            p1.claim_payout(1, 101, tree.proof(p1.address))  # tampered amount
        expect(amount_info, InvalidProofError, "SettlementInvalidProof", p1.address, 1, 101)
        with pytest.raises(InvalidProofError):
            p1.claim_payout(1, 200, tree.proof(p2.address))  # someone else's leaf
        with pytest.raises(InvalidProofError):
            p1.claim_payout(1, 100, [bytes(32)])  # a forged sibling
        assert p1.claim_payout(1, 100, tree.proof(p1.address)) == 100

    def test_roots_that_are_refused(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        w, admin = timed_world, timed_world.admin
        w.customer.fund_job(job, 1_000)
        admin.release_to_pool(job, BATCH_1, 300)
        tree = build_payout_tree({w.provider.address: 300})
        with pytest.raises(SettlementError) as epoch_info:
            admin.post_tree(2, tree)
        expect(epoch_info, SettlementError, "SettlementWrongEpoch", 2, 1)
        with pytest.raises(SettlementError) as funded_info:
            admin.post_root(1, tree.root, 301)  # promises more than the pool received
        expect(funded_info, SettlementError, "SettlementUnderfunded", 1, 301, 300)
        with pytest.raises(SettlementError) as zero_info:
            admin.post_root(1, bytes(32), 1)
        expect(zero_info, SettlementError, "SettlementZeroRoot")
        admin.post_tree(1, tree)
        claimable_at = admin.latest_claimable_at()
        with pytest.raises(RootInDisputeError) as dispute_info:
            admin.post_tree(2, tree)  # the previous root is still in its dispute window
        expect(dispute_info, RootInDisputeError, "SettlementRootInDispute", 1, claimable_at)
        with pytest.raises(UnauthorizedError) as role_info:
            w.outsider.post_tree(2, tree)
        expect(role_info, UnauthorizedError, "AccessControlUnauthorizedAccount", w.outsider.address,
               role_id("POSTER_ROLE"))

    def test_guardian_voids_a_bad_root_inside_the_window(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        w, admin, p1, p2 = timed_world, timed_world.admin, timed_world.provider, timed_world.provider2
        window = w.params["dispute_window_s"]
        w.customer.fund_job(job, 1_000)
        admin.release_to_pool(job, BATCH_1, 300)
        good1 = build_payout_tree({p1.address: 100, p2.address: 200})
        admin.post_tree(1, good1)
        w.chain.advance_time(window)
        # A wrong epoch-2 root: p2's earnings moved to p1, with an honest-looking total.
        admin.release_to_pool(job, BATCH_2, 100)
        bad = build_payout_tree({p1.address: 400})
        admin.post_tree(2, bad)
        admin.void_root(2)
        assert (admin.latest_epoch(), admin.root_of(2)) == (1, bytes(32))
        with pytest.raises(SettlementError) as gone_info:
            p1.claim_payout(2, 400, bad.proof(p1.address))
        expect(gone_info, SettlementError, "SettlementUnknownEpoch", 2, 1)
        assert p2.claim_from_tree(1, good1) == 200  # the previous root stays claimable
        # The corrected root is posted at once (the voided one no longer blocks) and pays after its window.
        good2 = build_payout_tree({p1.address: 200, p2.address: 200})
        admin.post_tree(2, good2)
        w.chain.advance_time(window)
        with pytest.raises(SettlementError) as late_info:
            admin.void_root(2)
        expect(late_info, SettlementError, "SettlementNotVoidable", 2, 2, admin.latest_claimable_at())
        assert p1.claim_from_tree(2, good2) == 200
        with pytest.raises(UnauthorizedError):
            w.outsider.void_root(2)

    def test_deposit_needs_an_amount(self, timed_world: World) -> None:
        with pytest.raises(SettlementError) as exc_info:
            timed_world.admin.deposit_to_pool(0)
        expect(exc_info, SettlementError, "SettlementZeroAmount")


class TestKillSwitchAndTimelock:
    def test_pause_all_stops_every_flow_until_the_timelock_unpauses(self, timed_world: World) -> None:
        job = timed_world.job("flows-job")
        job2 = timed_world.job("flows-job-2")
        w = timed_world
        admin, c, p, v = w.admin, w.customer, w.provider, w.verifier
        delay = w.params["timelock_delay_s"]
        p.stake(1_000)
        v.stake(500)
        p.request_unbond(100)
        c.fund_job(job, 1_000)
        admin.release(job, UNIT, p.address, 10)
        admin.release_to_pool(job, BATCH_1, 100)
        tree = build_payout_tree({p.address: 100})
        admin.post_tree(1, tree)
        signature = v.sign_accusation(p.address, EVIDENCE, 10)
        admin.accuse(p.address, EVIDENCE, 10, signature)
        w.chain.advance_time(max(w.params["dispute_window_s"], w.params["unbonding_delay_s"]))
        balances = {a: admin.balance_of(a) for a in w.holders}

        admin.pause_all()
        assert admin.paused() == {"staking": True, "escrow": True, "distributor": True}
        blocked = {
            "stake": lambda: p.stake(1),
            "request_unbond": lambda: p.request_unbond(1),
            "withdraw": lambda: p.withdraw(),
            "accuse": lambda: admin.accuse(p.address, EVIDENCE_2, 1, v.sign_accusation(p.address, EVIDENCE_2, 1)),
            "resolve": lambda: admin.resolve_dispute(EVIDENCE, fraud=True),
            "slash": lambda: admin.slash(p.address, 1, v.address, EVIDENCE_2),
            "fund": lambda: c.fund_job(job2, 1),
            "fund_with_permit": lambda: c.fund_job_with_permit(job2, 1),
            "cancel": lambda: c.cancel_job(job),
            "release": lambda: admin.release(job, BATCH_2, p.address, 1),
            "release_to_pool": lambda: admin.release_to_pool(job, BATCH_2, 1),
            "close": lambda: admin.close_job(job),
            "claim": lambda: p.claim(),
            # (not deposit: money into the payout pool stays open while paused, test_evm_client's pause test)
            "post_root": lambda: admin.post_tree(2, tree),
            "claim_payout": lambda: p.claim_from_tree(1, tree),
        }
        for name, flow in blocked.items():
            with pytest.raises(PausedError) as exc_info:
                flow()
            assert exc_info.value.error_name == "EnforcedPause", name
        assert {a: admin.balance_of(a) for a in w.holders} == balances  # nothing moved

        # A guardian can stop everything but cannot restart it: unpausing needs the timelock.
        with pytest.raises(UnauthorizedError) as direct_info:
            admin._send(admin.staking, "unpause")  # noqa: SLF001 - the raw call a compromised guardian would try
        expect(direct_info, UnauthorizedError, "AccessControlUnauthorizedAccount", admin.address,
               role_id("GOVERNOR_ROLE"))
        op = admin.unpause_all()
        assert op is not None and op.ready_at == w.chain.timestamp() + delay
        assert all(admin.paused().values())
        with pytest.raises(GovernanceError) as early_info:
            admin.execute(op)
        assert early_info.value.error_name == "TimelockUnexpectedOperationState"
        assert early_info.value.error_args[0] == op.id
        w.chain.advance_time(delay)
        admin.execute(op)
        assert admin.operation_done(op)
        assert admin.paused() == {"staking": False, "escrow": False, "distributor": False}

        with pytest.raises(StakeFrozenError):
            p.withdraw()  # still under dispute
        assert admin.resolve_dispute(EVIDENCE, fraud=False) == w.params["verifier_bond"]  # fraud would take all
        assert p.withdraw() == 100
        assert p.claim_from_tree(1, tree) == 100
        assert p.claim() == 10
        assert w.total_held() == w.supply

    def test_parameters_change_only_through_the_timelock(self, timed_world: World) -> None:
        w, admin = timed_world, timed_world.admin
        op = admin.set_unbonding_delay(5)
        assert admin.unbonding_delay() == w.params["unbonding_delay_s"]  # scheduled, not yet executed
        assert not admin.operation_done(op)
        w.chain.advance_time(w.params["timelock_delay_s"])
        admin.execute(op)
        assert admin.unbonding_delay() == 5
        with pytest.raises(GovernanceError) as again_info:
            admin.execute(op)  # done operations cannot run twice
        assert again_info.value.error_name == "TimelockUnexpectedOperationState"
        with pytest.raises(UnauthorizedError) as proposer_info:
            w.outsider.set_unbonding_delay(0)
        expect(proposer_info, UnauthorizedError, "AccessControlUnauthorizedAccount", w.outsider.address,
               role_id("PROPOSER_ROLE"))
        with pytest.raises(UnauthorizedError):
            admin._send(admin.staking, "setUnbondingDelay", 0)  # noqa: SLF001 - only the timelock governs
