"""One root error for GridMint, with subclasses that also inherit the matching built-in.

Every error carries the offending values in its message (and as attributes where a caller needs them),
so a 4xx body or a CLI message says exactly what was wrong.
"""
from __future__ import annotations


class GridMintError(Exception):
    """Root of every error GridMint raises on purpose."""


class GridMintValueError(GridMintError, ValueError):
    """Input that is well-formed Python but not acceptable (bad amount, unknown field, wrong size)."""


class SignatureError(GridMintError, ValueError):
    """A signature that does not recover to the claimed signer, or a malformed one."""


class ReplayError(SignatureError):
    """A signed request whose nonce was already used, or whose deadline has passed."""


class ProofError(GridMintError, ValueError):
    """A proof-of-training bundle that is inconsistent (bad Merkle root, broken hash chain, wrong start)."""


class CheckpointError(GridMintError, ValueError):
    """A checkpoint that is not a valid safetensors file, or whose contents do not match what was committed."""


class BlobCorruptError(GridMintError, OSError):
    """A stored blob whose bytes no longer hash to its name (content-addressed by sha256): a disk or shared-storage
    fault. An OSError, like a file that cannot be read (node.checkpoint.load): a fault of this machine, never evidence
    against whoever uploaded the blob, so nothing is decided on it and it is not served."""


class VersionMismatch(GridMintError):
    """This node computes a unit's spec hash otherwise than the marketplace: another GridMint version (training
    recipe, data order or state hash), whose commitments or verdicts would not match the marketplace's."""


class ChainError(GridMintError, RuntimeError):
    """A transaction or call that the chain refused. ``name``/``args`` hold the decoded custom error if known."""

    def __init__(self, message: str, *, error_name: str | None = None, error_args: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.error_name = error_name
        self.error_args = error_args


class ChainUnavailable(ChainError):
    """The chain node could not be reached (connection refused or dropped, timeout). Nothing was decided: retry."""


class InsufficientFundsError(GridMintError, ValueError):
    """Escrow or stake is below what the operation needs."""
