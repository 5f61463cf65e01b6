"""The chain client, written once and run on both backends (in-process py-evm and a Hardhat node).

This module uses the development deployment (``world``: no delays). Time-dependent flows (unbonding, accusations,
epoch roots, the kill switch and the timelock) are in ``test_evm_flows.py``."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from eth_account import Account
from eth_utils import keccak

from ledger.errors import PausedError, UnauthorizedError
from ledger.evm import Chain, Deployment, JobState, role_id
from protocol.errors import ChainError, GridMintValueError

if TYPE_CHECKING:  # fixtures come from conftest.py; never import it at run time (module-name clashes)
    from conftest import World

UNIT_A = keccak(text="unit-a")
UNIT_B = keccak(text="unit-b")
EVIDENCE = keccak(text="evidence-1")


def expect_revert(exc_info: pytest.ExceptionInfo[ChainError], name: str, *args: object) -> None:
    assert exc_info.value.error_name == name, str(exc_info.value)
    assert exc_info.value.error_args == args, str(exc_info.value)


class TestDeploy:
    def test_supply_roles_and_state(self, world: World) -> None:
        admin = world.admin
        assert admin.total_supply() == world.supply
        assert world.total_held() == world.supply
        for role in ("DEFAULT_ADMIN_ROLE", "GUARDIAN_ROLE", "SLASHER_ROLE", "SETTLER_ROLE"):
            assert admin.has_role(role, admin.address), role
            assert not admin.has_role(role, world.outsider.address), role
        assert admin.paused() == {"staking": False, "escrow": False, "distributor": False}
        assert admin.contract_balances() == {"staking": 0, "escrow": 0, "distributor": 0}
        assert world.deployment.chain_id == world.chain.chain_id

    def test_deployment_json_round_trip(self, world: World, tmp_path: Path) -> None:
        path = tmp_path / "deployment.json"
        text = world.deployment.to_json(path)
        assert Deployment.from_json(path) == world.deployment
        assert path.read_text() == text

    def test_events_are_read_from_the_deployment_block_on(self, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
        """A deployment on a chain with history (the world's, here) keeps the block it was deployed from (its file
        keeps it); the client reads events from there on, never from genesis, and finds them."""
        from ledger.client import GridMintContracts
        from ledger.deploy import deploy

        chain = world.chain
        sender = chain.dev_accounts(1)[0]
        chain.send_eth(sender, Account.create().address, 1)
        before = int(chain.w3.eth.block_number)
        deployment = deploy(chain, sender, supply=10**21, treasury=sender.address)
        assert deployment.from_block == before > 0
        ops = GridMintContracts(chain, deployment, sender)
        ops.stake(10**20)
        ops.slash(sender.address, 10**19, Account.create().address, EVIDENCE)
        asked: list[int] = []
        real = chain.w3.eth.get_logs

        def spy(params):  # type: ignore[no-untyped-def]
            b = params["fromBlock"]
            asked.append(int(b, 0) if isinstance(b, str) else int(b))
            return real(params)

        monkeypatch.setattr(chain.w3.eth, "get_logs", spy)
        assert ops.slash_position(EVIDENCE) is not None
        assert asked and min(asked) >= before, asked

    def test_grant_role_is_idempotent_and_effective(self, world: World) -> None:
        job = world.job()
        assert world.admin.grant_role("UNIT_SETTLER_ROLE", world.outsider.address) is True
        assert world.admin.grant_role("UNIT_SETTLER_ROLE", world.outsider.address) is False
        world.customer.fund_job(job, 100)
        assert world.outsider.release(job, UNIT_A, world.provider.address, 10) is True

    def test_send_eth(self, chain: Chain) -> None:
        sender = chain.dev_accounts(1)[0]
        fresh = Account.create().address
        chain.send_eth(sender, fresh, 12_345)
        assert chain.eth_balance(fresh) == 12_345


class TestStaking:
    def test_stake_and_unstake(self, world: World) -> None:
        p = world.provider
        p.stake(600)
        p.stake(400)  # approves again: the first approve was spent
        assert p.stake_of(p.address) == 1000
        assert p.total_staked() == 1000
        assert p.contract_balances()["staking"] == 1000
        # With no unbonding delay (a development deployment) unstake = request_unbond + withdraw at once.
        p.unstake(250)
        assert p.stake_of(p.address) == 750
        assert p.stake_state(p.address).unbonding == 0
        assert p.total_staked() == 750
        assert p.balance_of(p.address) == 10_000 * 10**18 - 750
        assert world.total_held() == world.supply

    def test_request_unbond_and_withdraw_without_delay(self, world: World) -> None:
        p = world.provider
        p.stake(500)
        assert p.request_unbond(200) <= world.chain.timestamp()
        assert (p.stake_of(p.address), p.stake_state(p.address).unbonding, p.total_staked()) == (300, 200, 500)
        assert p.withdraw() == 200
        assert p.withdraw() == 0  # nothing pending: no transaction
        assert (p.total_staked(), p.contract_balances()["staking"]) == (300, 300)

    def test_unstake_more_than_staked_reverts_with_args(self, world: World) -> None:
        world.provider.stake(100)
        with pytest.raises(ChainError) as exc_info:
            world.provider.unstake(101)
        expect_revert(exc_info, "StakingInsufficientStake", world.provider.address, 100, 101)

    def test_slash_splits_bounty_and_is_idempotent(self, world: World) -> None:
        world.provider.stake(1000)
        verifier, treasury = world.verifier.address, world.treasury
        verifier_before = world.admin.balance_of(verifier)
        assert world.admin.slash(world.provider.address, 301, verifier, EVIDENCE) is True
        bounty = 301 * world.bounty_bps // 10_000
        assert world.admin.balance_of(verifier) - verifier_before == bounty
        assert world.admin.balance_of(treasury) == 301 - bounty
        assert world.admin.stake_of(world.provider.address) == 699
        assert world.admin.evidence_used(EVIDENCE)
        # Same evidence again (as bytes or hex): nothing is sent, nothing changes.
        assert world.admin.slash(world.provider.address, 301, verifier, EVIDENCE) is False
        assert world.admin.slash(world.provider.address, 5, verifier, "0x" + EVIDENCE.hex()) is False
        assert world.admin.stake_of(world.provider.address) == 699
        assert world.admin.balance_of(verifier) - verifier_before == bounty
        assert world.total_held() == world.supply

    def test_slash_caps_at_the_stake(self, world: World) -> None:
        world.provider.stake(80)
        verifier_before = world.admin.balance_of(world.verifier.address)
        assert world.admin.slash(world.provider.address, 10**30, world.verifier.address, EVIDENCE)
        assert world.admin.stake_of(world.provider.address) == 0
        paid = world.admin.balance_of(world.verifier.address) - verifier_before
        assert (paid, world.admin.balance_of(world.treasury)) == (40, 40)

    def test_slash_lost_race_returns_false(self, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
        world.provider.stake(100)
        world.admin.slash(world.provider.address, 1, world.verifier.address, EVIDENCE)
        # Another settler process used the evidence between our check and our send.
        monkeypatch.setattr(type(world.admin), "evidence_used", lambda self, evidence: False)
        assert world.admin.slash(world.provider.address, 1, world.verifier.address, EVIDENCE) is False

    def test_slash_needs_slasher_role(self, world: World) -> None:
        world.provider.stake(100)
        with pytest.raises(ChainError) as exc_info:
            world.outsider.slash(world.provider.address, 1, world.verifier.address, EVIDENCE)
        expect_revert(exc_info, "AccessControlUnauthorizedAccount", world.outsider.address, role_id("SLASHER_ROLE"))


class TestEscrow:
    def test_full_cycle_conserves_tokens(self, world: World) -> None:
        job = world.job()
        c, p1, p2, admin = world.customer, world.provider, world.provider2, world.admin
        start = {a: admin.balance_of(a) for a in (c.address, p1.address, p2.address)}
        steps = [
            lambda: c.fund_job(job, 1_000),
            lambda: admin.release(job, UNIT_A, p1.address, 300),
            lambda: admin.release(job, UNIT_B, p2.address, 450),
            lambda: admin.close_job(job),  # the settler closes a finished job
            lambda: p1.claim(),
            lambda: p2.claim(),
        ]
        results = []
        for step in steps:
            results.append(step())
            assert world.total_held() == world.supply
        assert results[1:] == [True, True, 250, 300, 450]
        assert admin.get_job(job) == JobState(c.address, 1_000, 750, True, 0)
        assert admin.balance_of(c.address) == start[c.address] - 750
        assert admin.balance_of(p1.address) == start[p1.address] + 300
        assert admin.balance_of(p2.address) == start[p2.address] + 450
        assert admin.contract_balances() == {"staking": 0, "escrow": 0, "distributor": 0}

    def test_release_is_idempotent_per_unit(self, world: World) -> None:
        job = world.job()
        world.customer.fund_job(job, 100)
        assert world.admin.release(job, UNIT_A, world.provider.address, 40) is True
        assert world.admin.release(job, UNIT_A, world.provider.address, 40) is False
        assert world.admin.release("0x" + job.hex(), "0x" + UNIT_A.hex(), world.provider.address, 40) is False
        assert world.admin.claimable(world.provider.address) == 40
        assert world.admin.get_job(job).remaining == 60

    def test_release_lost_race_returns_false(self, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
        job = world.job()
        world.customer.fund_job(job, 100)
        world.admin.release(job, UNIT_A, world.provider.address, 40)
        monkeypatch.setattr(type(world.admin), "unit_released", lambda self, job, unit: False)
        assert world.admin.release(job, UNIT_A, world.provider.address, 40) is False
        assert world.admin.claimable(world.provider.address) == 40

    def test_unfunded_release_reverts_with_decoded_args(self, world: World) -> None:
        job = world.job()
        with pytest.raises(ChainError) as exc_info:
            world.admin.release(job, UNIT_A, world.provider.address, 5)
        expect_revert(exc_info, "EscrowInsufficientFunds", job, 0, 5)

    def test_over_release_reverts_with_decoded_args(self, world: World) -> None:
        job = world.job()
        world.customer.fund_job(job, 100)
        world.admin.release(job, UNIT_A, world.provider.address, 30)
        with pytest.raises(ChainError) as exc_info:
            world.admin.release(job, UNIT_B, world.provider.address, 71)
        expect_revert(exc_info, "EscrowInsufficientFunds", job, 70, 71)
        assert world.admin.unit_released(job, UNIT_B) is False

    def test_other_funder_and_outsider_close_revert(self, world: World) -> None:
        job = world.job()
        world.customer.fund_job(job, 100)
        with pytest.raises(ChainError) as exc_info:
            world.provider.fund_job(job, 1)
        expect_revert(exc_info, "EscrowNotCustomer", job, world.provider.address, world.customer.address)
        with pytest.raises(ChainError) as exc_info:
            world.outsider.close_job(job)
        expect_revert(exc_info, "EscrowNotAuthorized", job, world.outsider.address)

    def test_a_job_id_copied_from_the_customer_cannot_be_funded_first(self, world: World) -> None:
        """Review R3: the first funder of an id became its customer, so one who copied the id from a pending
        fundWithPermit and funded 1 base unit first made the customer's transaction revert (EscrowNotCustomer)."""
        job = world.job()
        with pytest.raises(ChainError) as exc_info:
            world.provider.fund_job(job, 1)
        expect_revert(exc_info, "EscrowJobIdNotYours", job, world.provider.address)
        with pytest.raises(ChainError) as exc_info:
            world.provider.fund_job_with_permit(job, 1)
        expect_revert(exc_info, "EscrowJobIdNotYours", job, world.provider.address)
        world.customer.fund_job_with_permit(job, 500)
        assert world.customer.get_job(job) == JobState(world.customer.address, 500, 0, False, 500)

    def test_close_and_claim_are_idempotent(self, world: World) -> None:
        job = world.job()
        world.customer.fund_job(job, 100)
        world.admin.release(job, UNIT_A, world.provider.address, 10)
        assert world.admin.close_job(job) == 90  # a settler may close; the refund goes to the customer
        assert world.customer.close_job(job) == 0  # already closed: nothing is sent
        assert world.provider.claim() == 10
        assert world.provider.claim() == 0
        assert world.outsider.claim() == 0
        with pytest.raises(ChainError) as exc_info:
            world.customer.fund_job(job, 1)
        expect_revert(exc_info, "EscrowJobClosed", job)

    def test_fund_with_permit_needs_no_approve(self, world: World) -> None:
        job = world.job()
        c = world.customer
        nonce_before = c.token.functions.nonces(c.address).call()
        c.fund_job_with_permit(job, 500)
        assert c.get_job(job) == JobState(c.address, 500, 0, False, 500)
        assert c.token.functions.allowance(c.address, world.deployment.escrow).call() == 0
        assert c.token.functions.nonces(c.address).call() == nonce_before + 1
        c.fund_job_with_permit(job, 1)  # a second permit uses the next nonce
        assert c.get_job(job).funded == 501


class TestPause:
    def test_pause_blocks_every_flow_and_unpause_restores(self, world: World) -> None:
        job = world.job()
        admin, c, p = world.admin, world.customer, world.provider
        p.stake(100)
        c.fund_job(job, 100)
        admin.release(job, UNIT_A, p.address, 10)
        admin.pause_all()
        assert admin.paused() == {"staking": True, "escrow": True, "distributor": True}
        admin.pause_all()  # idempotent: nothing is sent

        flows = {
            "stake": lambda: p.stake(1),
            "unstake": lambda: p.unstake(1),
            "slash": lambda: admin.slash(p.address, 1, world.verifier.address, EVIDENCE),
            "fund": lambda: c.fund_job(job, 1),
            "fund_with_permit": lambda: c.fund_job_with_permit(job, 1),
            "release": lambda: admin.release(job, UNIT_B, p.address, 1),
            "release_to_pool": lambda: admin.release_to_pool(job, UNIT_B, 1),
            "close": lambda: admin.close_job(job),
            "claim": lambda: p.claim(),
        }
        for name, flow in flows.items():
            with pytest.raises(PausedError) as exc_info:
                flow()
            assert exc_info.value.error_name == "EnforcedPause", name
        admin.deposit_to_pool(1)  # money into the payout pool stays open: a pause stops money out

        assert admin.unpause_all() is not None  # the timelock's delay is 0 here: scheduled and executed at once
        assert admin.paused() == {"staking": False, "escrow": False, "distributor": False}
        assert admin.unpause_all() is None  # nothing paused: nothing scheduled
        p.stake(1)
        p.unstake(1)
        assert admin.slash(p.address, 1, world.verifier.address, EVIDENCE)
        c.fund_job(job, 1)
        assert admin.release(job, UNIT_B, p.address, 1)
        assert admin.close_job(job) == 90
        assert p.claim() == 11
        assert world.total_held() == world.supply

    def test_only_guardians_pause(self, world: World) -> None:
        with pytest.raises(UnauthorizedError) as exc_info:
            world.outsider.pause_all()
        expect_revert(exc_info, "AccessControlUnauthorizedAccount", world.outsider.address, role_id("GUARDIAN_ROLE"))


class TestConcurrency:
    def test_threads_sending_as_one_account_do_not_collide(self, world: World) -> None:
        recipients = [Account.create().address for _ in range(8)]
        errors: list[BaseException] = []

        def send(to: str) -> None:
            try:
                world.admin.transfer(to, 7)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(r,)) for r in recipients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert [world.admin.balance_of(r) for r in recipients] == [7] * 8


def test_bad_inputs_are_refused_before_sending(world: World) -> None:
    job = world.job()
    with pytest.raises(GridMintValueError):
        world.customer.fund_job(b"short", 1)
    with pytest.raises(GridMintValueError):
        world.customer.fund_job("0x" + "zz" * 32, 1)
    with pytest.raises(GridMintValueError):
        world.customer.fund_job(job, 1.5)  # type: ignore[arg-type]
    with pytest.raises(GridMintValueError):
        world.customer.transfer("not-an-address", 1)
    with pytest.raises(GridMintValueError):
        world.admin.grant_role("KING_ROLE", world.outsider.address)


class TestRevertPaths:
    def test_mined_revert_decodes_like_a_simulated_one(self, world: World) -> None:
        """With explicit gas nothing is simulated: py-evm mines a status-0 receipt (decoded by replaying it),
        Hardhat reports the revert from eth_sendRawTransaction. Both must give the same ChainError."""
        job = world.job()
        admin = world.admin
        data = admin.escrow.encode_abi("release", args=[job, UNIT_A, world.provider.address, 5])
        with pytest.raises(ChainError) as exc_info:
            world.chain.transact(
                admin.account, to=admin.escrow.address, data=data, gas=200_000, errors=admin._errors, label="release"
            )
        expect_revert(exc_info, "EscrowInsufficientFunds", job, 0, 5)
        # The reverted transaction used its nonce on both backends; the next one still goes through.
        admin.transfer(world.outsider.address, 1)
        assert admin.balance_of(world.outsider.address) == 1
