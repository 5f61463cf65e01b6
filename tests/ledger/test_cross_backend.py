"""The same reverts decode to the same domain error, name and args on both backends.

Values that legitimately differ between two chains (dev-key addresses, timestamps, random timelock salts) are
replaced by labels before comparing; everything else must be identical.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
from eth_utils import keccak

from ledger.devchain import HardhatNode
from ledger.evm import Chain, GridMintContracts, deploy
from ledger.payout_tree import build_payout_tree
from protocol.errors import ChainError
from protocol.jobs import RANDOM_BYTES, job_id_bytes

Seen = tuple[str, str | None, tuple[object, ...]]


def _revert_signatures(chain: Chain) -> list[Seen]:
    admin, customer, provider, verifier = chain.dev_accounts(4)
    deployment = deploy(
        chain, admin, supply=10**24, treasury=admin.address, unbonding_delay_s=1_000, dispute_window_s=600,
        verifier_bond=100, timelock_delay_s=300,
    )
    client = GridMintContracts(chain, deployment, admin)
    client.transfer(customer.address, 1_000)
    as_customer, as_provider = client.as_account(customer), client.as_account(provider)
    job = job_id_bytes(customer.address, keccak(text="cross-backend-job")[:RANDOM_BYTES])  # the customer's
    labels: dict[object, str] = {admin.address: "admin", customer.address: "customer", provider.address: "provider",
                                 verifier.address: "verifier", job: "job"}
    seen: list[Seen] = []

    def attempt(action: Callable[[], object]) -> None:
        try:
            action()
        except ChainError as exc:
            args = tuple(labels.get(a, a) if isinstance(a, (str, int, bytes)) else a for a in exc.error_args)
            seen.append((type(exc).__name__, exc.error_name, args))

    attempt(lambda: client.release(job, keccak(text="u1"), provider.address, 5))  # unfunded
    attempt(lambda: as_provider.fund_job(job, 1))  # the customer's id: no one else may fund it first (review R3)
    as_customer.fund_job(job, 100)
    attempt(lambda: client.release(job, keccak(text="u2"), provider.address, 101))  # over-release
    attempt(lambda: as_provider.unstake(1))
    attempt(lambda: as_provider.release(job, keccak(text="u3"), provider.address, 1))
    # unbonding
    client.transfer(provider.address, 1_000)
    as_provider.stake(100)
    labels[as_provider.request_unbond(50)] = "ready_at"
    attempt(as_provider.withdraw)
    # accusations
    signature = client.as_account(verifier).sign_accusation(provider.address, keccak(text="ev"), 10)
    attempt(lambda: client.accuse(provider.address, keccak(text="ev"), 10, signature))
    # epoch roots
    tree = build_payout_tree({provider.address: 60})
    attempt(lambda: as_provider.claim_from_tree(1, tree))
    client.release_to_pool(job, keccak(text="b1"), 60)
    client.post_tree(1, tree)
    labels[client.latest_claimable_at()] = "claimable_at"
    attempt(lambda: as_provider.claim_from_tree(1, tree))
    chain.advance_time(600)
    attempt(lambda: as_provider.claim_payout(1, 61, tree.proof(provider.address)))
    attempt(lambda: client.post_root(2, tree.root, 61))
    # kill switch and timelock
    client.pause_all()
    attempt(lambda: as_customer.fund_job(job, 1))
    op = client.unpause_all()
    assert op is not None
    labels[op.id] = "op"
    attempt(lambda: client.execute(op))
    attempt(lambda: as_customer.void_root(1))
    return seen


@pytest.mark.usefixtures("artifacts")
def test_reverts_decode_identically(hardhat_node: HardhatNode) -> None:
    in_process = _revert_signatures(Chain.in_process())
    over_http = _revert_signatures(Chain.http(hardhat_node.url))
    assert in_process == over_http
    ready = 1 << 2  # TimelockController state bitmap: the operation was expected Ready (OperationState 2)
    assert in_process == [
        ("InsufficientEscrowError", "EscrowInsufficientFunds", ("job", 0, 5)),
        ("EscrowError", "EscrowJobIdNotYours", ("job", "provider")),
        ("InsufficientEscrowError", "EscrowInsufficientFunds", ("job", 100, 101)),
        ("InsufficientStakeError", "StakingInsufficientStake", ("provider", 0, 1)),
        ("UnauthorizedError", "AccessControlUnauthorizedAccount", ("provider", keccak(text="UNIT_SETTLER_ROLE"))),
        ("StakeFrozenError", "StakingStillUnbonding", ("provider", "ready_at")),
        ("InsufficientStakeError", "StakingInsufficientStake", ("verifier", 0, 100)),
        ("SettlementError", "SettlementUnknownEpoch", (1, 0)),
        ("RootInDisputeError", "SettlementRootInDispute", (1, "claimable_at")),
        ("InvalidProofError", "SettlementInvalidProof", ("provider", 1, 61)),
        ("SettlementError", "SettlementUnderfunded", (2, 61, 60)),
        ("PausedError", "EnforcedPause", ()),
        ("GovernanceError", "TimelockUnexpectedOperationState", ("op", ready.to_bytes(32, "big"))),
        ("UnauthorizedError", "AccessControlUnauthorizedAccount", ("customer", keccak(text="GUARDIAN_ROLE"))),
    ]
