"""Fixtures for the ledger suite: one ``chain`` fixture, parametrized over the in-process py-evm chain and a real
Hardhat JSON-RPC node, so every chain test is written once and runs on both backends.

Two deployments: ``world`` is a development deployment (no delays: unstake is immediate, roots are claimable at
once); ``timed_world`` has real delays (unbonding, dispute window, cancel grace, timelock) and a verifier bond, for
the flows that depend on time. Both roll the chain back after every test."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from ledger.contracts import CONTRACT_NAMES, ArtifactError, load_artifact
from ledger.devchain import HardhatNode
from ledger.evm import Chain, Deployment, GridMintContracts, deploy
from protocol.jobs import RANDOM_BYTES, job_id_bytes
from protocol.money import tokens

SUPPLY = tokens(1_000_000)
BOUNTY_BPS = 5000
#: The timed deployment's parameters (seconds, and the verifier bond in base units).
TIMED = {
    "unbonding_delay_s": 1_000,
    "dispute_window_s": 600,
    "cancel_grace_s": 120,
    "timelock_delay_s": 300,
    "verifier_bond": 100,
}


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
    """A fresh deployment and one client per participant. ``admin`` deployed and holds every role; customer,
    provider, provider2 and verifier start with 10,000 GMT, outsider with none."""

    chain: Chain
    deployment: Deployment
    admin: GridMintContracts
    customer: GridMintContracts
    provider: GridMintContracts
    provider2: GridMintContracts
    verifier: GridMintContracts
    outsider: GridMintContracts
    treasury: str
    params: dict[str, int]
    supply: int = SUPPLY
    bounty_bps: int = BOUNTY_BPS

    @property
    def holders(self) -> list[str]:
        """Every address that can hold GMT in these tests, contracts included."""
        people = [self.admin, self.customer, self.provider, self.provider2, self.verifier, self.outsider]
        d = self.deployment
        contracts = [d.staking, d.escrow, d.distributor]
        return [p.address for p in people] + [self.treasury] + [c for c in contracts if c is not None]

    def total_held(self) -> int:
        return sum(self.admin.balance_of(a) for a in self.holders)

    def job(self, label: str = "job-1") -> bytes:
        """A job id of ``customer``'s, the same for the same label (JobEscrow lets only the address it starts with
        fund it first: protocol.jobs)."""
        return job_id_bytes(self.customer.address, keccak(text=label)[:RANDOM_BYTES])


def _make_world(chain: Chain, **params: Any) -> World:
    admin, customer, provider, provider2, verifier, outsider, treasury = chain.dev_accounts(7)
    deployment = deploy(chain, admin, supply=SUPPLY, treasury=treasury.address, bounty_bps=BOUNTY_BPS, **params)
    client = GridMintContracts(chain, deployment, admin)
    for account in (customer, provider, provider2, verifier):
        client.transfer(account.address, tokens(10_000))

    def as_(account: LocalAccount) -> GridMintContracts:
        return client.as_account(account)

    return World(
        chain, deployment, client, as_(customer), as_(provider), as_(provider2), as_(verifier), as_(outsider),
        treasury.address, dict(params),
    )


@pytest.fixture(scope="module")
def deployed_world(chain: Chain) -> World:
    """A development deployment (zero delays, unbonding included: ``deploy`` defaults to a week), once per module and
    backend; ``world`` rolls back every test."""
    return _make_world(chain, unbonding_delay_s=0)


@pytest.fixture(scope="module")
def timed_deployed_world(chain: Chain) -> World:
    """A deployment with the ``TIMED`` delays and verifier bond, once per module and backend."""
    return _make_world(chain, **TIMED)


@pytest.fixture
def world(chain: Chain, deployed_world: World) -> Iterator[World]:
    """``deployed_world`` in its freshly deployed state: every test's transactions are reverted afterwards."""
    snapshot = chain.snapshot()
    yield deployed_world
    chain.revert(snapshot)


@pytest.fixture
def timed_world(chain: Chain, timed_deployed_world: World) -> Iterator[World]:
    """``timed_deployed_world``, rolled back (chain state and clock) after every test."""
    snapshot = chain.snapshot()
    yield timed_deployed_world
    chain.revert(snapshot)
