"""Domain errors for contract reverts, and turning either backend's revert exception into one.

Every revert raises a ``ChainError`` subclass chosen by the decoded custom error's name, so callers can catch
``NothingToClaimError`` or ``InsufficientStakeError`` instead of comparing strings; ``error_name`` and
``error_args`` keep the decoded values (e.g. ``("EscrowInsufficientFunds", (job_id, 0, 5))``) on both backends.
"""
from __future__ import annotations

import ast
from typing import Any

from eth_tester.exceptions import TransactionFailed
from web3.exceptions import ContractLogicError, Web3RPCError

from ledger.contracts import ErrorDecoder
from protocol.errors import ChainError, InsufficientFundsError, SignatureError


class StakingError(ChainError):
    """GridStaking refused (``Staking*`` errors)."""


class EscrowError(ChainError):
    """JobEscrow refused (``Escrow*`` errors)."""


class SettlementError(ChainError):
    """PayoutDistributor refused (``Settlement*`` errors)."""


class GovernanceError(ChainError):
    """The TimelockController refused: not scheduled, not ready yet, already done (``Timelock*`` errors)."""


class TokenError(ChainError):
    """GridToken refused (``ERC20*`` / ``ERC2612*`` errors)."""


class InvalidSignatureError(ChainError, SignatureError):
    """A signature the contract could not recover (``ECDSAInvalidSignature*``), or a permit signed by the wrong key
    (``ERC2612InvalidSigner``)."""


class PausedError(ChainError):
    """The kill switch is on (``EnforcedPause``), or unpause was asked of an unpaused contract (``ExpectedPause``)."""


class UnauthorizedError(ChainError):
    """The sender lacks the role (``AccessControlUnauthorizedAccount(account, role)``)."""


class InsufficientStakeError(StakingError, InsufficientFundsError):
    """Not enough free stake: ``StakingInsufficientStake(account, have, need)``."""


class StakeFrozenError(StakingError):
    """Unbonding or withdrawal refused: still unbonding, or under dispute."""


class InsufficientEscrowError(EscrowError, InsufficientFundsError):
    """The job holds less than the release: ``EscrowInsufficientFunds(job, available, need)``."""


class InvalidProofError(SettlementError):
    """The Merkle proof does not lead from (account, cumulative) to that epoch's root."""


class NothingToClaimError(SettlementError):
    """The leaf's cumulative amount is not above what the account already claimed."""


class RootInDisputeError(SettlementError):
    """The root is still inside its dispute window (``SettlementRootInDispute(epoch, claimableAt)``)."""


_BY_NAME: dict[str, type[ChainError]] = {
    "StakingInsufficientStake": InsufficientStakeError,
    "StakingStillUnbonding": StakeFrozenError,
    "StakingUnderDispute": StakeFrozenError,
    "EscrowInsufficientFunds": InsufficientEscrowError,
    "SettlementInvalidProof": InvalidProofError,
    "SettlementNothingToClaim": NothingToClaimError,
    "SettlementRootInDispute": RootInDisputeError,
    "EnforcedPause": PausedError,
    "ExpectedPause": PausedError,
    "AccessControlUnauthorizedAccount": UnauthorizedError,
    "TimelockUnauthorizedCaller": UnauthorizedError,
    "ERC2612InvalidSigner": InvalidSignatureError,
}
_BY_PREFIX: tuple[tuple[str, type[ChainError]], ...] = (
    ("Staking", StakingError),
    ("Escrow", EscrowError),
    ("Settlement", SettlementError),
    ("Timelock", GovernanceError),
    ("ERC20", TokenError),
    ("ERC2612", TokenError),
    ("ECDSA", InvalidSignatureError),
)


def error_class(name: str | None) -> type[ChainError]:
    """The domain error class for a decoded custom error name (``ChainError`` when none fits)."""
    if name is None:
        return ChainError
    if name in _BY_NAME:
        return _BY_NAME[name]
    for prefix, cls in _BY_PREFIX:
        if name.startswith(prefix):
            return cls
    return ChainError


def revert_payload(exc: BaseException) -> bytes | str | None:
    """Raw revert bytes from either backend's exception, else a text reason, else None.

    py-evm: eth-tester raises ``TransactionFailed("execution reverted: b'...'")`` (the bytes survive only as their
    repr, which ``ast.literal_eval`` reads back safely). JSON-RPC: web3 raises ``ContractCustomError`` /
    ``ContractLogicError`` with ``.data`` as 0x-hex, or ``Web3RPCError`` whose response carries ``error.data``.
    """
    data: Any = None
    if isinstance(exc, TransactionFailed):
        first: Any = exc.args[0] if exc.args else ""
        if isinstance(first, BaseException):
            first = first.args[0] if first.args else ""
        if isinstance(first, bytes):
            return first
        text = str(first).removeprefix("execution reverted: ")
        if text[:2] in ("b'", 'b"'):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = None
            if isinstance(value, bytes):
                return value
        return text
    if isinstance(exc, ContractLogicError):
        data = exc.data
    elif isinstance(exc, Web3RPCError) and isinstance(exc.rpc_response, dict):
        error = exc.rpc_response.get("error")
        data = error.get("data") if isinstance(error, dict) else None
    if isinstance(data, dict):  # some nodes nest it: {"data": "0x...", "message": ...}
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    return None


_BUILTIN_DECODER = ErrorDecoder([])


def chain_error(exc: BaseException, errors: ErrorDecoder | None, label: str) -> ChainError:
    """The domain error for a revert exception raised by either backend (decoded with ``errors``)."""
    payload = revert_payload(exc)
    if isinstance(payload, bytes):
        decoded = (errors or _BUILTIN_DECODER).decode(payload)
        cls = error_class(decoded.name)
        return cls(f"{label} reverted: {decoded}", error_name=decoded.name, error_args=decoded.args)
    reason = payload if isinstance(payload, str) and payload else str(exc)
    return ChainError(f"{label} failed: {reason}")
