"""Job ids: the 32-byte keys of JobEscrow, bound to their customer.

A job id is the customer's address (its first 20 bytes) followed by 12 bytes the customer picks at random. JobEscrow
lets only the address in an id fund it first (``EscrowJobIdNotYours``), so someone who copies an id from a pending
``fundWithPermit`` cannot fund it first and take the job (review R3). The marketplace refuses a submission whose id
is not the signer's (``JobIdNotYours``, 422) before it asks the chain.
"""
from __future__ import annotations

import secrets

from eth_utils import is_hex_address, to_checksum_address

from protocol.errors import GridMintValueError

#: The bytes after the customer's address: 2**96 ids per customer, so two drawn at random do not collide.
RANDOM_BYTES = 12
_HEX = frozenset("0123456789abcdefABCDEF")


class JobIdNotYours(GridMintValueError):
    """A job id that does not start with the address that would own it: JobEscrow would refuse to fund it."""

    def __init__(self, job_id: str, customer: str) -> None:
        super().__init__(f"job id {job_id} is not {customer}'s: a job id is the customer's address (20 bytes) followed "
                         f"by {RANDOM_BYTES} random bytes, e.g. {new_job_id(customer)}")
        self.job_id = job_id
        self.customer = customer


def new_job_id(customer: str, tail: bytes | None = None) -> str:
    """A fresh job id for ``customer`` (a 0x address): ``0x`` + its 20 bytes + ``tail`` (``RANDOM_BYTES`` bytes;
    drawn at random if not given), 64 lowercase hex digits as ``protocol.schemas.Bytes32Hex`` wants."""
    if not is_hex_address(customer):
        raise GridMintValueError(f"customer must be a 0x address, got {customer!r}")
    tail = secrets.token_bytes(RANDOM_BYTES) if tail is None else tail
    if len(tail) != RANDOM_BYTES:
        raise GridMintValueError(f"a job id's tail is {RANDOM_BYTES} bytes, got {len(tail)}")
    return "0x" + customer[2:].lower() + tail.hex()


def job_id_bytes(customer: str, tail: bytes | None = None) -> bytes:
    """``new_job_id`` as the escrow's 32 bytes (what ``ledger`` calls and events carry)."""
    return bytes.fromhex(new_job_id(customer, tail)[2:])


def job_id_customer(job_id: str) -> str:
    """The checksummed address a job id (0x + 64 hex digits) is bound to: its first 20 bytes."""
    digits = job_id[2:] if job_id[:2].lower() == "0x" else job_id
    if len(digits) != 64 or not is_hex_address("0x" + digits[:40]) or not all(c in _HEX for c in digits):
        raise GridMintValueError(f"a job id is 32 bytes (0x + 64 hex digits), got {job_id!r}")
    return to_checksum_address("0x" + digits[:40])


def check_job_id(job_id: str, customer: str) -> None:
    """Raise ``JobIdNotYours`` unless ``job_id`` is bound to ``customer`` (case-insensitive address compare)."""
    if job_id_customer(job_id).lower() != customer.lower():
        raise JobIdNotYours(job_id, customer)
