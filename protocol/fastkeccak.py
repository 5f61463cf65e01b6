"""Keccak-256 through pysha3 for every eth-hash user in the process (eth-utils, eth-account, web3, py-evm).

eth-hash picks pycryptodome when both are installed: ~20 us per small hash against ~1.5 us for pysha3's C code, and a
signed request computes several (EIP-712 digest, address checksum), py-evm thousands per block. ``install()`` swaps the
backend of the shared ``eth_hash.auto.keccak`` object in place, so it works whenever it runs (modules hold that object,
not its backend). ``GRIDMINT_KECCAK=eth-hash`` leaves eth-hash's own choice alone."""
from __future__ import annotations

import os

_EMPTY = bytes.fromhex("c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470")


def install() -> str:
    """Route ``eth_hash.auto.keccak`` to pysha3 if it is importable; returns the backend in use."""
    import eth_hash.auto

    if os.environ.get("GRIDMINT_KECCAK") == "eth-hash":
        return "eth-hash auto"
    try:
        from eth_hash.backends.pysha3 import PySha3Backend
    except ImportError:
        return "eth-hash auto"
    backend = PySha3Backend()
    if backend.keccak256(b"") != _EMPTY:  # never trust a hash backend without a known answer
        return "eth-hash auto"
    k = eth_hash.auto.keccak
    k._backend = backend  # noqa: SLF001 - the shared object every module imported
    k.hasher = backend.keccak256
    k.preimage = backend.preimage
    return "pysha3"
