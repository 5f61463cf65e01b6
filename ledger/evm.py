"""Compatibility façade: the EVM chain client's public names, now split across smaller modules.

- ``ledger.chain``: ``Chain`` (in-process py-evm or JSON-RPC, locally signed transactions, snapshots, time).
- ``ledger.deploy``: ``Deployment``, ``Governance`` and ``deploy()``.
- ``ledger.client``: ``GridMintContracts`` (built from ``staking_ops``, ``escrow_ops``, ``settlement_ops``,
  ``governance_ops``).
- ``ledger.errors``: domain errors decoded from custom-error reverts.
- ``ledger.payout_tree``: the epoch payout Merkle tree (pure).
"""
from __future__ import annotations

from ledger.chain import Chain
from ledger.client import GridMintContracts
from ledger.client_base import PAUSABLE, ROLE_CONTRACTS, role_id
from ledger.contracts import DecodedError
from ledger.deploy import Deployment, Governance, deploy
from ledger.escrow_ops import JobState
from ledger.governance_ops import TimelockOp
from ledger.staking_ops import StakeState, gpu_class_id
from ledger.values import MAX_UINT256, to_address, to_bytes32, to_uint
from protocol.errors import ChainError

__all__ = [
    "MAX_UINT256",
    "PAUSABLE",
    "ROLE_CONTRACTS",
    "Chain",
    "ChainError",
    "DecodedError",
    "Deployment",
    "Governance",
    "GridMintContracts",
    "JobState",
    "StakeState",
    "TimelockOp",
    "deploy",
    "gpu_class_id",
    "role_id",
    "to_address",
    "to_bytes32",
    "to_uint",
]
