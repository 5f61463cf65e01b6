"""Epoch payout trees: one Merkle root over every account's *cumulative* earnings (pure: no chain, no I/O).

The encoding is the PayoutDistributor contract's, byte for byte (tests check one against the other):

- leaf  = keccak256(account (20 bytes) || cumulative (uint256, 32 bytes big-endian)), i.e. Solidity's
  ``keccak256(abi.encodePacked(account, cumulative))``. 52 bytes, so a leaf can never pass for an inner node.
- inner = keccak256(min(a, b) || max(a, b)), OpenZeppelin's ``Hashes.commutativeKeccak256``, so a proof is just
  the sibling hashes (``MerkleProof.verifyCalldata``), no left/right flags.
- shape: leaves sorted by hash; each level pairs neighbours; an odd last node moves up unchanged. 1,024 leaves
  give proofs of 10 hashes.

Cumulative means a leaf holds everything the account has earned since the first epoch, so the newest root alone
settles every earlier epoch: the contract pays ``cumulative - claimed so far``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from eth_utils import keccak

from ledger.values import to_address, to_uint
from protocol.errors import GridMintValueError


def leaf_hash(account: str, cumulative: int) -> bytes:
    """The contract's leaf for (``account``, ``cumulative`` base units)."""
    raw = bytes.fromhex(to_address(account)[2:])
    return keccak(raw + to_uint(cumulative, "cumulative").to_bytes(32, "big"))


def node_hash(a: bytes, b: bytes) -> bytes:
    """Parent of two nodes: keccak256 of the sorted pair."""
    return keccak(a + b) if a < b else keccak(b + a)


def verify_proof(root: bytes, account: str, cumulative: int, proof: Sequence[bytes]) -> bool:
    """True if ``proof`` leads from (``account``, ``cumulative``) to ``root`` (what the contract checks)."""
    node = leaf_hash(account, cumulative)
    for sibling in proof:
        node = node_hash(node, bytes(sibling))
    return node == bytes(root)


@dataclass(frozen=True)
class PayoutTree:
    """A built tree. ``levels[0]`` are the leaf hashes in tree order, ``levels[-1] == (root,)``."""

    entries: Mapping[str, int]
    levels: tuple[tuple[bytes, ...], ...]
    _position: Mapping[str, int] = field(repr=False, compare=False)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    @property
    def total(self) -> int:
        """Sum of every leaf's cumulative amount: what the root promises in all (``postRoot``'s ``total``)."""
        return sum(self.entries.values())

    @property
    def depth(self) -> int:
        return len(self.levels) - 1

    def cumulative(self, account: str) -> int:
        """``account``'s cumulative earnings in this tree (0 if it has no leaf)."""
        return self.entries.get(to_address(account), 0)

    def proof(self, account: str) -> list[bytes]:
        """Sibling hashes from ``account``'s leaf to the root; GridMintValueError if it has no leaf."""
        address = to_address(account)
        if address not in self._position:
            raise GridMintValueError(f"{address} has no leaf in this payout tree")
        index = self._position[address]
        proof = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                proof.append(level[sibling])
            index //= 2
        return proof


def build_payout_tree(cumulative: Mapping[str, int]) -> PayoutTree:
    """The tree over ``{account: cumulative base units}``. Accounts with 0 get no leaf (nothing to claim).

    Raises GridMintValueError for a bad address or amount, an address listed twice (in different spellings),
    or when no account has a positive amount (the contract refuses a zero root).
    """
    entries: dict[str, int] = {}
    for account, amount in cumulative.items():
        address = to_address(account)
        if address in entries:
            raise GridMintValueError(f"{address} is listed twice")
        if to_uint(amount, f"cumulative of {address}") > 0:
            entries[address] = amount
    if not entries:
        raise GridMintValueError("a payout tree needs at least one account with a positive cumulative amount")
    hashed = sorted((leaf_hash(a, v), a) for a, v in entries.items())
    position = {a: i for i, (_, a) in enumerate(hashed)}
    level = tuple(h for h, _ in hashed)
    levels = [level]
    while len(level) > 1:
        level = tuple(
            node_hash(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)
        )
        levels.append(level)
    return PayoutTree(entries, tuple(levels), position)


def accumulate(previous: Mapping[str, int], earned: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Cumulative earnings after one more epoch: ``previous`` plus each (account, amount) earned in it."""
    out = {to_address(a): to_uint(v, "cumulative") for a, v in previous.items()}
    for account, amount in earned:
        address = to_address(account)
        out[address] = out.get(address, 0) + to_uint(amount, "earned")
    return out
