"""``GridMintContracts``: one typed client over every GridMint contract, acting as one account.

Money is ``int`` base units (18 decimals) everywhere. Write methods wait for the receipt and raise a domain
``ChainError`` subclass (``ledger.errors``) on a revert, with the decoded custom error in ``error_name`` /
``error_args``; both backends give the same name and args for the same revert. ``slash``, ``release``,
``release_to_pool``, ``close_job``, ``claim``, ``claim_payout`` and ``claim_payout_batch`` are idempotent: they check
first and return False/0 without sending when there is nothing to do, and a lost race also returns False/0 instead
of raising.

The operations live in one module per contract family, stacked into this class:
``staking_ops`` (token + staking) -> ``escrow_ops`` -> ``settlement_ops`` -> ``governance_ops``.
"""
from __future__ import annotations

from eth_account.signers.local import LocalAccount

from ledger.governance_ops import GovernanceOps


class GridMintContracts(GovernanceOps):
    """GridToken, GridStaking, JobEscrow, PayoutDistributor, GridKillSwitch and GridTimelock as ``account``."""

    def as_account(self, account: LocalAccount) -> GridMintContracts:
        """The same deployment, acting as another account."""
        return GridMintContracts(self.chain, self.deployment, account)
