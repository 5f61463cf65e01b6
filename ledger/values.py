"""Argument checks shared by the chain client: ids, addresses and amounts (pure, no chain)."""
from __future__ import annotations

from eth_typing import ChecksumAddress
from eth_utils import is_address, to_checksum_address

from protocol.errors import GridMintValueError

MAX_UINT256 = 2**256 - 1


def to_bytes32(value: bytes | str, what: str = "id") -> bytes:
    """A 32-byte id (job, unit, evidence, root) from ``bytes`` or a ``0x``-hex string."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    elif isinstance(value, str) and value.startswith(("0x", "0X")):
        try:
            raw = bytes.fromhex(value[2:])
        except ValueError as exc:
            raise GridMintValueError(f"{what} is not hex: {value!r}") from exc
    else:
        raise GridMintValueError(f"{what} must be 32 bytes or a 0x-hex string, got {type(value).__name__}: {value!r}")
    if len(raw) != 32:
        raise GridMintValueError(f"{what} must be 32 bytes, got {len(raw)}: {value!r}")
    return raw


def to_address(value: str) -> ChecksumAddress:
    """Checksummed address; GridMintValueError if ``value`` is not one."""
    if not isinstance(value, str) or not is_address(value):
        raise GridMintValueError(f"not an address: {value!r}")
    return to_checksum_address(value)


def to_uint(value: int, what: str = "amount", bits: int = 256) -> int:
    """An unsigned integer of ``bits`` bits (amounts in base units, seconds, epochs). Floats and bools are refused:
    money is never a float."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GridMintValueError(f"{what} must be an int, got {type(value).__name__}: {value!r}")
    if not 0 <= value < 2**bits:
        raise GridMintValueError(f"{what} out of uint{bits} range: {value}")
    return value
