"""Revert payloads from either backend's exception become the same domain error (pure: no chain)."""
from __future__ import annotations

from pathlib import Path

import pytest
from eth_abi import encode
from eth_tester.exceptions import TransactionFailed
from eth_utils import keccak
from web3.exceptions import ContractCustomError, Web3RPCError

from ledger.contracts import ErrorDecoder
from ledger.deploy import Deployment
from ledger.errors import (
    EscrowError,
    GovernanceError,
    InsufficientEscrowError,
    InsufficientStakeError,
    InvalidProofError,
    InvalidSignatureError,
    NothingToClaimError,
    PausedError,
    RootInDisputeError,
    SettlementError,
    StakeFrozenError,
    StakingError,
    TokenError,
    UnauthorizedError,
    chain_error,
    error_class,
    revert_payload,
)
from protocol.errors import ChainError, GridMintValueError, InsufficientFundsError, SignatureError

ABI = [
    {"type": "error", "name": "SettlementInvalidProof",
     "inputs": [{"type": "address", "name": "a"}, {"type": "uint256", "name": "e"}, {"type": "uint256", "name": "c"}]},
]
ACCOUNT = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
PAYLOAD = keccak(text="SettlementInvalidProof(address,uint256,uint256)")[:4] + encode(
    ["address", "uint256", "uint256"], [ACCOUNT, 3, 77]
)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("StakingInsufficientStake", InsufficientStakeError),
        ("StakingStillUnbonding", StakeFrozenError),
        ("StakingUnderDispute", StakeFrozenError),
        ("StakingEvidenceUsed", StakingError),
        ("EscrowInsufficientFunds", InsufficientEscrowError),
        ("EscrowJobClosed", EscrowError),
        ("SettlementInvalidProof", InvalidProofError),
        ("SettlementNothingToClaim", NothingToClaimError),
        ("SettlementRootInDispute", RootInDisputeError),
        ("SettlementUnderfunded", SettlementError),
        ("TimelockUnexpectedOperationState", GovernanceError),
        ("TimelockUnauthorizedCaller", UnauthorizedError),
        ("AccessControlUnauthorizedAccount", UnauthorizedError),
        ("EnforcedPause", PausedError),
        ("ExpectedPause", PausedError),
        ("ERC20InsufficientBalance", TokenError),
        ("ERC2612InvalidSigner", InvalidSignatureError),
        ("ECDSAInvalidSignature", InvalidSignatureError),
        ("Panic", ChainError),
        (None, ChainError),
    ],
)
def test_error_class_by_name(name: str | None, cls: type[ChainError]) -> None:
    assert error_class(name) is cls


def test_domain_errors_also_inherit_the_matching_builtin_families() -> None:
    assert issubclass(InsufficientStakeError, InsufficientFundsError) and issubclass(InsufficientStakeError, ValueError)
    assert issubclass(InsufficientEscrowError, InsufficientFundsError)
    assert issubclass(InvalidSignatureError, SignatureError)
    assert all(issubclass(c, ChainError) for c in (StakeFrozenError, PausedError, GovernanceError, TokenError))


def test_both_backends_exceptions_give_the_same_error() -> None:
    decoder = ErrorDecoder([ABI])
    py_evm = TransactionFailed(f"execution reverted: {PAYLOAD!r}")
    raw_bytes = TransactionFailed(PAYLOAD)
    hardhat = ContractCustomError("0x" + PAYLOAD.hex(), data="0x" + PAYLOAD.hex())
    rpc = Web3RPCError("reverted", rpc_response={"error": {"code": 3, "data": {"data": "0x" + PAYLOAD.hex()}}})
    for exc in (py_evm, raw_bytes, hardhat, rpc):
        assert revert_payload(exc) == PAYLOAD, exc
        err = chain_error(exc, decoder, "claim")
        assert type(err) is InvalidProofError
        assert (err.error_name, err.error_args) == ("SettlementInvalidProof", (ACCOUNT, 3, 77))
        assert "claim reverted: SettlementInvalidProof(" in str(err)


def test_a_revert_without_data_keeps_its_reason() -> None:
    err = chain_error(TransactionFailed("execution reverted: out of gas"), ErrorDecoder([]), "stake")
    assert type(err) is ChainError and err.error_name is None
    assert "out of gas" in str(err)
    unknown = chain_error(TransactionFailed(b"\xde\xad\xbe\xef"), ErrorDecoder([]), "stake")
    assert unknown.error_name is None and "0xdeadbeef" in str(unknown)


def test_deployment_files_without_the_newer_contracts_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(
        '{"chain_id": 31337, "token": "%s", "staking": "%s", "escrow": "%s", "treasury": "%s"}'
        % (ACCOUNT.lower(), ACCOUNT, ACCOUNT, ACCOUNT)
    )
    loaded = Deployment.from_json(path)
    assert (loaded.token, loaded.distributor, loaded.kill_switch, loaded.timelock) == (ACCOUNT, None, None, None)
    path.write_text("{}")
    with pytest.raises(GridMintValueError, match="not a GridMint deployment"):
        Deployment.from_json(path)
