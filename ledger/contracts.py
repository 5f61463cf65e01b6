"""Compiled GridMint contracts (Hardhat artifacts) and decoding of their custom-error reverts.

Artifacts are produced by ``npx hardhat build`` (``make setup``) into ``<repo>/artifacts``; set ``GRIDMINT_ARTIFACTS``
to read them from elsewhere. Nothing here talks to a chain.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_utils import keccak, to_checksum_address

from protocol.errors import GridMintError

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Default artifacts folder; ``artifacts_dir()`` honours ``GRIDMINT_ARTIFACTS`` at call time.
ARTIFACTS_DIR = Path(os.environ.get("GRIDMINT_ARTIFACTS", REPO_ROOT / "artifacts"))
#: The contracts ``ledger.deploy.deploy`` deploys, in deployment order.
CONTRACT_NAMES = ("GridToken", "GridTimelock", "GridStaking", "PayoutDistributor", "JobEscrow", "GridKillSwitch")

Abi = list[dict[str, Any]]


class ArtifactError(GridMintError, FileNotFoundError):
    """A compiled contract artifact is missing or unreadable."""


def artifacts_dir() -> Path:
    """The artifacts folder: ``$GRIDMINT_ARTIFACTS`` if set, else ``<repo>/artifacts``."""
    override = os.environ.get("GRIDMINT_ARTIFACTS")
    return Path(override) if override else REPO_ROOT / "artifacts"


def load_artifact(name: str) -> tuple[Abi, str]:
    """``(abi, creation bytecode as 0x-hex)`` of contract ``name`` (e.g. ``"GridToken"``).

    Raises ArtifactError, telling to run ``make setup``, when the contracts were not compiled.
    """
    return _load_artifact(artifacts_dir(), name)


@lru_cache(maxsize=32)
def _load_artifact(root: Path, name: str) -> tuple[Abi, str]:
    path = root / "contracts" / f"{name}.sol" / f"{name}.json"
    if not path.is_file():
        raise ArtifactError(
            f"contract artifact {path} not found: compile the contracts with `make setup` "
            f"(npm ci && npx hardhat build), or point GRIDMINT_ARTIFACTS at a built artifacts/ folder"
        )
    try:
        data = json.loads(path.read_text())
        abi, bytecode = data["abi"], data["bytecode"]
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"contract artifact {path} is unreadable ({exc}); rebuild with `make setup`") from exc
    if not isinstance(bytecode, str) or len(bytecode) <= 2:
        raise ArtifactError(f"contract artifact {path} has no bytecode (abstract contract?)")
    return abi, bytecode


@dataclass(frozen=True)
class DecodedError:
    """A revert decoded from its 4-byte selector: ``name`` (e.g. ``"EscrowInsufficientFunds"``) and ``args``.

    Addresses come back checksummed, ``bytes32`` as ``bytes``, integers as ``int``. ``name`` is ``"Error"`` for
    ``require(cond, "reason")`` and ``"Panic"`` for Solidity panics; ``None`` when the selector is unknown.
    """

    name: str | None
    args: tuple[object, ...]
    data: bytes

    def __str__(self) -> str:
        if self.name is None:
            return f"unknown revert 0x{self.data.hex()}" if self.data else "revert without data"
        return f"{self.name}({', '.join(_show(a) for a in self.args)})"


_BUILTIN_ERRORS: list[dict[str, Any]] = [
    {"type": "error", "name": "Error", "inputs": [{"type": "string", "name": "reason"}]},
    {"type": "error", "name": "Panic", "inputs": [{"type": "uint256", "name": "code"}]},
]


class ErrorDecoder:
    """Maps 4-byte selectors to the custom errors declared in a set of ABIs (including inherited OZ errors)."""

    def __init__(self, abis: list[Abi]) -> None:
        self._by_selector: dict[bytes, tuple[str, list[str]]] = {}
        for entry in [*_BUILTIN_ERRORS, *(e for abi in abis for e in abi)]:
            if entry.get("type") != "error":
                continue
            types = [_abi_type(i) for i in entry.get("inputs", [])]
            selector = keccak(text=f"{entry['name']}({','.join(types)})")[:4]
            self._by_selector[selector] = (entry["name"], types)

    def decode(self, data: bytes) -> DecodedError:
        """Decode raw revert data; unknown selectors or malformed payloads give ``name=None``."""
        known = self._by_selector.get(data[:4]) if len(data) >= 4 else None
        if known is None:
            return DecodedError(None, (), data)
        name, types = known
        try:
            values = abi_decode(types, data[4:])
        except (DecodingError, ValueError, OverflowError):
            return DecodedError(None, (), data)
        return DecodedError(name, tuple(_normalize(t, v) for t, v in zip(types, values)), data)

    def selector_names(self) -> set[str]:
        return {name for name, _ in self._by_selector.values()}


@lru_cache(maxsize=4)
def _gridmint_error_decoder(root: Path) -> ErrorDecoder:
    return ErrorDecoder([_load_artifact(root, name)[0] for name in CONTRACT_NAMES])


def gridmint_error_decoder() -> ErrorDecoder:
    """Decoder for every error the GridMint contracts (and the OZ code they inherit) can raise."""
    return _gridmint_error_decoder(artifacts_dir())


def _abi_type(param: dict[str, Any]) -> str:
    """Canonical ABI type of an input, expanding tuples (``(uint256,address)[]``)."""
    typ = str(param["type"])
    if typ.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in param["components"]) + ")" + typ[len("tuple") :]
    return typ


def _normalize(typ: str, value: object) -> object:
    if typ == "address" and isinstance(value, str):
        return to_checksum_address(value)
    return value


def _show(value: object) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return repr(value) if isinstance(value, str) else str(value)
