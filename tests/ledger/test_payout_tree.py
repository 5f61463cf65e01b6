"""``ledger.payout_tree`` against itself (pure) and against PayoutDistributor on both backends.

The same tree must verify in Python and pay on chain: trees of 1, 2, 3 and 1,024 leaves, every proof checked in
Python and claimed on chain, and a tampered amount or proof refused by both.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from eth_abi.packed import encode_packed
from eth_utils import keccak, to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.campaign import RpcDriver, calldata
from ledger.errors import InvalidProofError
from ledger.payout_tree import PayoutTree, accumulate, build_payout_tree, leaf_hash, node_hash, verify_proof
from protocol.errors import GridMintValueError

if TYPE_CHECKING:  # fixtures come from conftest.py; never import it at run time (module-name clashes)
    from conftest import World

#: On py-evm a claim takes ~0.1 s, so of the 1,024-leaf tree a fixed sample is mined there (every leaf is mined on
#: the Hardhat node, where a raw claim takes ~3 ms). Every leaf is verified in Python on both.
PY_EVM_SAMPLE_EVERY = 64


def accounts(n: int, salt: str = "leaf") -> list[str]:
    return [to_checksum_address(keccak(text=f"{salt}-{i}")[:20]) for i in range(n)]


def entitlements(n: int) -> dict[str, int]:
    return {a: 10**15 * (i + 1) + i for i, a in enumerate(accounts(n))}


def tampered(proof: list[bytes]) -> list[bytes]:
    """The proof with one bit of its first sibling flipped (or, for a one-leaf tree, one bogus sibling added)."""
    if not proof:
        return [b"\x01" * 32]
    first = bytearray(proof[0])
    first[0] ^= 1
    return [bytes(first), *proof[1:]]


# ---------------------------------------------------------------- pure


def test_leaf_is_the_contract_encoding() -> None:
    account, amount = accounts(1)[0], 123_456_789 * 10**18
    assert leaf_hash(account, amount) == keccak(encode_packed(["address", "uint256"], [account, amount]))
    assert len(encode_packed(["address", "uint256"], [account, amount])) == 52  # never a 64-byte inner node
    a, b = keccak(b"a"), keccak(b"b")
    assert node_hash(a, b) == node_hash(b, a) == keccak(min(a, b) + max(a, b))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 1024])
def test_every_proof_verifies_and_tampering_never_does(n: int) -> None:
    entries = entitlements(n)
    tree = build_payout_tree(entries)
    assert tree.total == sum(entries.values())
    assert tree.depth == (n - 1).bit_length()
    for account, amount in entries.items():
        proof = tree.proof(account)
        assert len(proof) <= tree.depth
        assert verify_proof(tree.root, account, amount, proof)
        assert not verify_proof(tree.root, account, amount + 1, proof)
        assert not verify_proof(tree.root, account, amount, tampered(proof))
    if n == 1:
        only = next(iter(entries))
        assert tree.root == leaf_hash(only, entries[only]) and tree.proof(only) == []
    if n == 1024:
        assert {len(tree.proof(a)) for a in entries} == {10}


def test_odd_node_moves_up_unchanged() -> None:
    tree = build_payout_tree(entitlements(3))
    leaves = tree.levels[0]
    assert tree.levels[1] == (node_hash(leaves[0], leaves[1]), leaves[2])
    assert tree.root == node_hash(tree.levels[1][0], leaves[2])


def test_another_accounts_proof_does_not_verify() -> None:
    entries = entitlements(4)
    tree = build_payout_tree(entries)
    a, b = list(entries)[:2]
    assert not verify_proof(tree.root, a, entries[b], tree.proof(b))
    assert not verify_proof(tree.root, a, entries[a], tree.proof(b))


def test_bad_inputs_are_refused() -> None:
    a, b = accounts(2)
    with pytest.raises(GridMintValueError, match="at least one"):
        build_payout_tree({})
    with pytest.raises(GridMintValueError, match="at least one"):
        build_payout_tree({a: 0})
    with pytest.raises(GridMintValueError, match="twice"):
        build_payout_tree({a: 1, a.lower(): 2})
    for bad in (-1, 1.5, True):
        with pytest.raises(GridMintValueError):
            build_payout_tree({a: bad})  # type: ignore[dict-item]
    with pytest.raises(GridMintValueError):
        build_payout_tree({"0x1234": 1})
    with pytest.raises(GridMintValueError, match="no leaf"):
        build_payout_tree({a: 1}).proof(b)
    assert build_payout_tree({a: 5, b: 0}).entries == {a: 5}  # a zero leaf pays nothing: left out


def test_accumulate_adds_each_epoch() -> None:
    a, b = accounts(2)
    first = accumulate({}, [(a, 5), (b, 1), (a, 2)])
    assert first == {a: 7, b: 1}
    assert accumulate(first, [(b.lower(), 10)]) == {a: 7, b: 11}
    assert first == {a: 7, b: 1}  # the previous epoch is not modified


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(
    amounts=st.lists(st.integers(min_value=1, max_value=2**128), min_size=1, max_size=40),
    pick=st.integers(min_value=0),
    delta=st.integers(min_value=1, max_value=2**64),
)
def test_random_trees_verify_and_reject_tampering(amounts: list[int], pick: int, delta: int) -> None:
    entries = dict(zip(accounts(len(amounts), "random"), amounts))
    tree = build_payout_tree(entries)
    assert all(verify_proof(tree.root, a, v, tree.proof(a)) for a, v in entries.items())
    account = list(entries)[pick % len(entries)]
    proof = tree.proof(account)
    assert not verify_proof(tree.root, account, entries[account] + delta, proof)
    assert not verify_proof(tree.root, account, entries[account], tampered(proof))


# ---------------------------------------------------------------- against the contract (both backends)


def _post(world: World, tree: PayoutTree) -> int:
    admin = world.admin
    admin.deposit_to_pool(tree.total)
    epoch = admin.latest_epoch() + 1
    admin.post_tree(epoch, tree)  # the development deployment has no dispute window: claimable at once
    return epoch


@pytest.mark.parametrize("n", [1, 2, 3, 1024])
def test_tree_pays_on_chain_exactly_what_python_verifies(world: World, n: int) -> None:
    admin, chain = world.admin, world.chain
    entries = entitlements(n)
    tree = build_payout_tree(entries)
    epoch = _post(world, tree)
    assert admin.root_of(epoch) == tree.root

    # Tampering is refused on chain as it is in Python (checked before the honest claims, which would otherwise
    # make the tampered ones fail for another reason).
    probe = list(entries)[-1]
    proof = tree.proof(probe)
    for amount, bad_proof in ((entries[probe] + 1, proof), (entries[probe], tampered(proof))):
        assert not verify_proof(tree.root, probe, amount, bad_proof)
        with pytest.raises(InvalidProofError) as exc_info:
            admin.claim_payout_for(probe, epoch, amount, bad_proof)
        assert exc_info.value.error_args == (probe, epoch, amount)

    for account, amount in entries.items():
        assert verify_proof(tree.root, account, amount, tree.proof(account))
    if n > 3 and chain.backend == "http":
        driver = RpcDriver(chain)
        now = chain.timestamp()
        signature = "claimFor(address,uint256,uint256,bytes32[])"
        failed = [
            a for i, (a, v) in enumerate(entries.items())
            if driver.send(admin.account, world.deployment.distributor, calldata(signature, a, epoch, v, tree.proof(a)),
                           now + 1 + i) is not None
        ]
        assert failed == []
        claimed = list(entries)[::PY_EVM_SAMPLE_EVERY]
    else:
        claimed = list(entries)[:: PY_EVM_SAMPLE_EVERY if n > 3 else 1]
        for account in claimed:
            assert admin.claim_payout_for(account, epoch, entries[account], tree.proof(account)) == entries[account]
    for account in claimed:
        assert admin.claimed(account) == entries[account]
        assert admin.balance_of(account) == entries[account]
        assert admin.claim_payout_for(account, epoch, entries[account], tree.proof(account)) == 0  # a retry
    paid = sum(entries[a] for a in claimed) if chain.backend != "http" or n <= 3 else tree.total
    assert admin.balance_of(world.deployment.distributor) == tree.total - paid
    assert world.total_held() + paid == world.supply  # the paid leaves are outside world.holders
