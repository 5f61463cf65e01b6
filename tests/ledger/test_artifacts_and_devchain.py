"""Artifact loading, revert decoding and the Hardhat node wrapper (no chain needed except where noted)."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from eth_abi import encode
from eth_account import Account
from eth_utils import keccak

from ledger.contracts import ArtifactError, ErrorDecoder, gridmint_error_decoder, load_artifact
from ledger.devchain import DevChainError, HardhatNode, hardhat_dev_keys
from ledger.evm import to_bytes32, to_uint
from protocol.errors import GridMintValueError


def test_missing_artifacts_say_make_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDMINT_ARTIFACTS", str(tmp_path))
    with pytest.raises(ArtifactError, match="make setup"):
        load_artifact("GridToken")


@pytest.mark.usefixtures("artifacts")
def test_decoder_knows_own_and_inherited_errors() -> None:
    decoder = gridmint_error_decoder()
    assert {"EscrowInsufficientFunds", "StakingEvidenceUsed", "EnforcedPause", "ERC20InsufficientAllowance"} <= (
        decoder.selector_names()
    )
    job = keccak(text="j")
    data = keccak(text="EscrowInsufficientFunds(bytes32,uint256,uint256)")[:4] + encode(
        ["bytes32", "uint256", "uint256"], [job, 3, 9]
    )
    decoded = decoder.decode(data)
    assert (decoded.name, decoded.args) == ("EscrowInsufficientFunds", (job, 3, 9))
    assert decoder.decode(b"\xde\xad\xbe\xef").name is None
    reason = ErrorDecoder([]).decode(keccak(text="Error(string)")[:4] + encode(["string"], ["nope"]))
    assert (reason.name, reason.args) == ("Error", ("nope",))


def test_ids_and_amounts_are_validated() -> None:
    assert to_bytes32("0x" + "ab" * 32) == b"\xab" * 32
    for bad in (b"\x00" * 31, "ab" * 32, "0x" + "ab" * 33, 7):
        with pytest.raises(GridMintValueError):
            to_bytes32(bad)  # type: ignore[arg-type]
    for bad_amount in (1.0, True, -1, 2**256):
        with pytest.raises(GridMintValueError):
            to_uint(bad_amount)  # type: ignore[arg-type]


def test_hardhat_dev_keys_match_hardhat() -> None:
    addresses = [Account.from_key(k).address for k in hardhat_dev_keys(3)]
    assert addresses == [
        "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
        "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
        "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
    ]


def test_node_without_node_modules_says_make_setup(tmp_path: Path) -> None:
    with pytest.raises(DevChainError, match="make setup"):
        HardhatNode(repo_root=tmp_path).start()


def _live_members(pgid: int) -> list[int]:
    """PIDs in process group ``pgid`` that are not zombies."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry))
    return live


def test_node_serves_and_stop_kills_the_whole_group() -> None:
    node = HardhatNode()
    with node:
        pgid = node.pid
        assert pgid is not None
        assert node.url.startswith("http://127.0.0.1:")
        assert len(_live_members(pgid)) >= 2  # npx and the node it started
    deadline = time.monotonic() + 5
    while _live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_members(pgid) == []


def test_node_start_failure_shows_its_log() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DevChainError) as exc_info:
            HardhatNode(port=port, startup_timeout=30).start()
    # Either hardhat exits complaining about the port, or (if it answered on it) we never get here.
    assert "exited with code" in str(exc_info.value)
    assert "EADDRINUSE" in str(exc_info.value) or "address already in use" in str(exc_info.value).lower()
