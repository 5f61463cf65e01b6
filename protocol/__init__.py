"""What every side of GridMint shares: errors, money, signed messages, proof-of-training commitments."""
from protocol import fastkeccak

KECCAK_BACKEND = fastkeccak.install()
