"""Epoch settlement operations of the typed client: the payout pool, roots and cumulative claims."""
from __future__ import annotations

from collections.abc import Sequence

from web3.logs import DISCARD
from web3.types import TxReceipt

from ledger.escrow_ops import EscrowOps
from ledger.payout_tree import PayoutTree
from ledger.values import to_address, to_bytes32, to_uint

#: Gas for a claim sent without an estimate (a 1,024-leaf claim uses ~45-60k; deeper trees add ~1k per level).
CLAIM_GAS_LIMIT = 150_000
#: Entries per ``claim_payout_batch`` call that keep a claimMany transaction well under a block's gas limit: in a
#: 1,024-leaf tree an entry costs ~25k gas when the account claimed before and holds GMT, ~60k for a first claim by
#: a new holder (measured by ``gridmint bench settlement`` and the PayoutDistributor gas pin), so 200 entries use
#: ~5-12M gas of a 30M block.
CLAIM_BATCH_SIZE = 200


class SettlementOps(EscrowOps):
    def deposit_to_pool(self, amount: int) -> TxReceipt:
        """Approve (if short) and deposit ``amount`` into the payout pool (JobEscrow.releaseToPool does this)."""
        amount = to_uint(amount)
        with self._account_op():
            self._ensure_allowance(self.distributor.address, amount)
            return self._send(self.distributor, "deposit", amount)

    def post_root(self, epoch: int, root: bytes | str, total: int) -> TxReceipt:
        """Post epoch ``epoch``'s root over cumulative earnings summing to ``total`` (needs POSTER_ROLE).

        ``epoch`` must be ``latest_epoch() + 1`` and the previous root past its dispute window."""
        return self._send(self.distributor, "postRoot", to_uint(epoch, "epoch", 32), to_bytes32(root, "root"), to_uint(total))

    def post_tree(self, epoch: int, tree: PayoutTree) -> TxReceipt:
        """``post_root(epoch, tree.root, tree.total)``."""
        return self.post_root(epoch, tree.root, tree.total)

    def void_root(self, epoch: int) -> TxReceipt:
        """Guardian: void the latest root while it is inside its dispute window."""
        return self._send(self.distributor, "voidRoot", to_uint(epoch, "epoch", 32))

    def voided_roots(self, epoch: int) -> list[bytes]:
        """Every root the guardian voided at ``epoch`` (its ``RootVoided`` events, oldest first): how a poster that
        crashed after sending a root tells "voided" from "never sent" (both leave the chain's latest epoch below)."""
        logs = self._logs(self.distributor, "RootVoided", epoch=to_uint(epoch, "epoch", 32))
        return [bytes(e["args"]["root"]) for e in logs]

    def latest_epoch(self) -> int:
        return int(self._call(self.distributor, "latestEpoch"))

    def root_of(self, epoch: int) -> bytes:
        return bytes(self._call(self.distributor, "rootOf", to_uint(epoch, "epoch", 32)))

    def latest_claimable_at(self) -> int:
        """When the latest root becomes (or became) claimable; 0 before the first root."""
        return int(self._call(self.distributor, "latestClaimableAt"))

    def dispute_window(self) -> int:
        return int(self._call(self.distributor, "disputeWindow"))

    def claimed(self, account: str) -> int:
        """Cumulative amount ``account`` has claimed from the payout pool so far."""
        return int(self._call(self.distributor, "claimed", to_address(account)))

    def total_deposited(self) -> int:
        return int(self._call(self.distributor, "totalDeposited"))

    def claim_payout(self, epoch: int, cumulative: int, proof: Sequence[bytes], *, gas: int | None = None) -> int:
        """Claim everything owed to this account up to epoch ``epoch``'s root, whose leaf says ``cumulative``.

        Returns the amount paid; 0, sending nothing, if ``cumulative`` is not above what was already claimed (so a
        retried claim is harmless). Raises InvalidProofError / RootInDisputeError / PausedError otherwise.
        ``gas`` skips the estimate (benchmarks measure the receipt's gasUsed either way).
        """
        cumulative = to_uint(cumulative, "cumulative")
        if cumulative <= self.claimed(self.address):
            return 0
        args = (to_uint(epoch, "epoch", 32), cumulative, [to_bytes32(p, "proof node") for p in proof])
        receipt = self._send_once(self.distributor, "claim", *args, gas=gas, done="SettlementNothingToClaim")
        return 0 if receipt is None else int(self._event_arg(self.distributor, "Claimed", receipt, "amount"))

    def claim_from_tree(self, epoch: int, tree: PayoutTree) -> int:
        """``claim_payout`` with this account's leaf and proof from ``tree`` (epoch ``epoch``'s tree)."""
        return self.claim_payout(epoch, tree.cumulative(self.address), tree.proof(self.address))

    def claim_payout_for(
        self, account: str, epoch: int, cumulative: int, proof: Sequence[bytes], *, gas: int | None = None
    ) -> int:
        """Claim on behalf of ``account`` (the tokens go to ``account``); same idempotence as ``claim_payout``."""
        account, cumulative = to_address(account), to_uint(cumulative, "cumulative")
        if cumulative <= self.claimed(account):
            return 0
        args = (account, to_uint(epoch, "epoch", 32), cumulative, [to_bytes32(p, "proof node") for p in proof])
        receipt = self._send_once(self.distributor, "claimFor", *args, gas=gas, done="SettlementNothingToClaim")
        return 0 if receipt is None else int(self._event_arg(self.distributor, "Claimed", receipt, "amount"))

    def claim_payout_batch(
        self, epoch: int, entries: Sequence[tuple[str, int, Sequence[bytes]]], *, gas: int | None = None
    ) -> int:
        """Push payouts with one ``claimMany``: each ``(account, cumulative, proof)`` from epoch ``epoch``'s tree pays
        ``account`` (to itself, never to the sender) what it is owed beyond what it already claimed. Anyone may send
        it; the operator pays every provider each epoch this way, one call per batch of up to ``CLAIM_BATCH_SIZE``.

        Idempotent: entries whose account already claimed ``cumulative`` or more (or that repeat an account with no
        higher amount) are dropped before sending, and 0 is returned, sending nothing, when none is left; an entry a
        racing claim paid meanwhile is skipped by the contract. Returns the total paid (the receipt's Claimed
        events). Raises InvalidProofError if any remaining entry's proof is wrong (then nobody in the batch is paid),
        RootInDisputeError inside the root's dispute window, PausedError under the kill switch.
        ``gas`` skips the estimate.
        """
        epoch = to_uint(epoch, "epoch", 32)
        owed: dict[str, int] = {}
        pending: list[tuple[str, int, list[bytes]]] = []
        for account, cumulative, proof in entries:
            account, cumulative = to_address(account), to_uint(cumulative, "cumulative")
            if account not in owed:
                owed[account] = self.claimed(account)
            if cumulative <= owed[account]:
                continue
            owed[account] = cumulative
            pending.append((account, cumulative, [to_bytes32(p, "proof node") for p in proof]))
        if not pending:
            return 0
        receipt = self._send(
            self.distributor, "claimMany", epoch, [a for a, _, _ in pending], [c for _, c, _ in pending],
            [p for _, _, p in pending], gas=gas,
        )
        paid = self.distributor.events["Claimed"]().process_receipt(receipt, errors=DISCARD)
        return sum(int(log["args"]["amount"]) for log in paid)

    def claim_tree_batch(self, epoch: int, tree: PayoutTree, accounts: Sequence[str] | None = None) -> int:
        """``claim_payout_batch`` for ``accounts`` (default: every leaf of ``tree``, epoch ``epoch``'s tree), sent in
        batches of ``CLAIM_BATCH_SIZE``; returns the total paid."""
        chosen = list(tree.entries) if accounts is None else [to_address(a) for a in accounts]
        total = 0
        for start in range(0, len(chosen), CLAIM_BATCH_SIZE):
            batch = chosen[start : start + CLAIM_BATCH_SIZE]
            total += self.claim_payout_batch(epoch, [(a, tree.cumulative(a), tree.proof(a)) for a in batch])
        return total
