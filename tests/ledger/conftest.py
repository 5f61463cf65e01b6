"""Fixtures for the ledger suite: one ``chain`` fixture, parametrized over the in-process py-evm chain and a real
Hardhat JSON-RPC node, so every chain test is written once and runs on both backends."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account.signers.local import LocalAccount

from ledger.contracts import CONTRACT_NAMES, ArtifactError, load_artifact
from ledger.devchain import HardhatNode
from ledger.evm import Chain, Deployment, GridMintContracts, deploy
from protocol.money import tokens

SUPPLY = tokens(1_000_000)
BOUNTY_BPS = 5000


@pytest.fixture(scope="session")
def artifacts() -> None:
    """Fail (never skip) every chain test with one clear line when the contracts were not compiled."""
    problem = None
    try:
        for name in CONTRACT_NAMES:
            load_artifact(name)
    except ArtifactError as exc:
        problem = str(exc)
    if problem is not None:
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def hardhat_node() -> Iterator[HardhatNode]:
    """One ``npx hardhat node`` for the whole session (started only if a hardhat test runs)."""
    with HardhatNode() as node:
        yield node


@pytest.fixture(scope="module", params=["in_process", "hardhat"])
def chain(request: pytest.FixtureRequest, artifacts: None) -> Chain:
    if request.param == "in_process":
        return Chain.in_process()
    node: HardhatNode = request.getfixturevalue("hardhat_node")
    return Chain.http(node.url)


@dataclass(frozen=True)
class World:
    """A fresh deployment and one client per participant. ``admin`` deployed and holds every role."""

    chain: Chain
    deployment: Deployment
    admin: GridMintContracts
    customer: GridMintContracts
    provider: GridMintContracts
    provider2: GridMintContracts
    verifier: GridMintContracts
    outsider: GridMintContracts
    treasury: str
    supply: int = SUPPLY
    bounty_bps: int = BOUNTY_BPS

    @property
    def holders(self) -> list[str]:
        """Every address that can hold GMT in these tests, contracts included."""
        people = [self.admin, self.customer, self.provider, self.provider2, self.verifier, self.outsider]
        return [p.address for p in people] + [self.treasury, self.deployment.staking, self.deployment.escrow]

    def total_held(self) -> int:
        return sum(self.admin.balance_of(a) for a in self.holders)


@pytest.fixture(scope="module")
def deployed_world(chain: Chain) -> World:
    """Contracts deployed once per module and backend; ``world`` rolls the chain back after every test."""
    admin, customer, provider, provider2, verifier, outsider, treasury = chain.dev_accounts(7)
    deployment = deploy(chain, admin, supply=SUPPLY, treasury=treasury.address, bounty_bps=BOUNTY_BPS)
    client = GridMintContracts(chain, deployment, admin)
    for account in (customer, provider, provider2):
        client.transfer(account.address, tokens(10_000))

    def as_(account: LocalAccount) -> GridMintContracts:
        return client.as_account(account)

    return World(
        chain, deployment, client, as_(customer), as_(provider), as_(provider2), as_(verifier), as_(outsider),
        treasury.address,
    )


@pytest.fixture
def world(chain: Chain, deployed_world: World) -> Iterator[World]:
    """``deployed_world`` in its freshly deployed state: every test's transactions are reverted afterwards."""
    snapshot = chain.snapshot()
    yield deployed_world
    chain.revert(snapshot)
