"""The same reverts decode to the same ChainError on both backends (addresses aside, which differ by dev keys)."""
from __future__ import annotations

import pytest
from eth_utils import keccak

from ledger.devchain import HardhatNode
from ledger.evm import Chain, GridMintContracts, deploy
from protocol.errors import ChainError

JOB = keccak(text="cross-backend-job")


def _revert_signatures(chain: Chain) -> list[tuple[str | None, tuple[object, ...]]]:
    admin, customer, provider = chain.dev_accounts(3)
    client = GridMintContracts(chain, deploy(chain, admin, supply=10**24, treasury=admin.address), admin)
    client.transfer(customer.address, 1_000)
    names: dict[str, str] = {admin.address: "admin", customer.address: "customer", provider.address: "provider"}
    seen: list[tuple[str | None, tuple[object, ...]]] = []
    attempts = [
        lambda: client.release(JOB, keccak(text="u1"), provider.address, 5),  # unfunded
        lambda: client.as_account(customer).fund_job(JOB, 100),
        lambda: client.release(JOB, keccak(text="u2"), provider.address, 101),  # over-release
        lambda: client.as_account(provider).unstake(1),
        lambda: client.as_account(provider).release(JOB, keccak(text="u3"), provider.address, 1),
    ]
    for attempt in attempts:
        try:
            attempt()
        except ChainError as exc:
            args = tuple(names.get(a, a) if isinstance(a, str) else a for a in exc.error_args)
            seen.append((exc.error_name, args))
    return seen


@pytest.mark.usefixtures("artifacts")
def test_reverts_decode_identically(hardhat_node: HardhatNode) -> None:
    in_process = _revert_signatures(Chain.in_process())
    over_http = _revert_signatures(Chain.http(hardhat_node.url))
    assert in_process == over_http
    assert [name for name, _ in in_process] == [
        "EscrowInsufficientFunds",
        "EscrowInsufficientFunds",
        "StakingInsufficientStake",
        "AccessControlUnauthorizedAccount",
    ]
    assert in_process[0] == ("EscrowInsufficientFunds", (JOB, 0, 5))
    assert in_process[1] == ("EscrowInsufficientFunds", (JOB, 100, 101))
    assert in_process[2] == ("StakingInsufficientStake", ("provider", 0, 1))
