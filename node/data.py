"""The shipped text corpus, its train/held-out split and the data order of every training step.

The data order is a pure function of (seed, shard, n_shards, step, batch_size, ctx) computed with SHA-256,
so a verifier derives the exact batches a provider should have used without trusting anything the provider
sent, and no random-number-generator state ever needs to be checkpointed.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from protocol.errors import GridMintValueError

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"
CORPUS_SHA256 = "9b6dfb26ebfecbfa27352eb52bb0e52f526280d9ce7e6e8d0ed6a959f998fa90"

#: The corpus is cut into blocks of this many bytes; every HELDOUT_EVERY-th block is held out.
BLOCK_BYTES = 4096
HELDOUT_EVERY = 10
#: Fixed seed of the held-out evaluation batches (evaluation is never part of a proof).
EVAL_SEED = 0x6D696E74

_BATCH_DOMAIN = b"GridMint/batch/v1"


class CorpusError(GridMintValueError):
    """The shipped corpus file is missing or is not the committed text."""


@lru_cache(maxsize=1)
def load_corpus() -> bytes:
    """The corpus bytes, after checking their SHA-256 against :data:`CORPUS_SHA256`."""
    try:
        data = CORPUS_PATH.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read the corpus at {CORPUS_PATH}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise CorpusError(
            f"corpus {CORPUS_PATH} has sha256 {digest} ({len(data)} bytes), expected {CORPUS_SHA256}; "
            "was it modified or were its line endings converted?"
        )
    return data


def split_corpus(data: bytes) -> tuple[bytes, bytes]:
    """(train, held_out): every ``HELDOUT_EVERY``-th block of ``BLOCK_BYTES`` goes to held-out."""
    train: list[bytes] = []
    held: list[bytes] = []
    for i, start in enumerate(range(0, len(data), BLOCK_BYTES)):
        (held if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).append(data[start : start + BLOCK_BYTES])
    return b"".join(train), b"".join(held)


@lru_cache(maxsize=1)
def _splits() -> tuple[Tensor, Tensor]:
    train, held = split_corpus(load_corpus())
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).to(torch.int64)  # noqa: E731
    return as_tensor(train), as_tensor(held)


def train_tokens() -> Tensor:
    """The training split as an int64 tensor of byte values (shared; do not modify)."""
    return _splits()[0]


def heldout_tokens() -> Tensor:
    """The held-out split as an int64 tensor of byte values (shared; do not modify)."""
    return _splits()[1]


def shard_bounds(n_tokens: int, shard: int, n_shards: int, ctx: int) -> tuple[int, int]:
    """[lo, hi) of valid batch start offsets for ``shard``: shards are contiguous, disjoint slices."""
    _check_int("n_shards", n_shards, 1)
    _check_int("shard", shard, 0)
    _check_int("ctx", ctx, 1)
    if shard >= n_shards:
        raise GridMintValueError(f"shard {shard} is out of range for n_shards={n_shards}")
    lo = n_tokens * shard // n_shards
    end = n_tokens * (shard + 1) // n_shards
    hi = end - ctx  # a window needs ctx + 1 bytes: inputs and shifted targets
    if hi <= lo:
        raise GridMintValueError(
            f"shard {shard}/{n_shards} has {end - lo} bytes, too few for ctx={ctx} windows"
        )
    return lo, hi


def batch_indices(seed: int, shard: int, n_shards: int, step: int, batch_size: int, ctx: int) -> list[int]:
    """Start offsets into :func:`train_tokens` of the ``batch_size`` windows used at ``step``.

    A pure function of its arguments (and the fixed corpus): offset i is
    SHA-256(domain, seed, shard, n_shards, step, i) reduced into the shard's range.
    """
    _check_int("seed", seed, 0)
    _check_int("step", step, 0)
    _check_int("batch_size", batch_size, 1)
    lo, hi = shard_bounds(int(train_tokens().numel()), shard, n_shards, ctx)
    prefix = _BATCH_DOMAIN + b"".join(v.to_bytes(8, "big") for v in (seed, shard, n_shards, step))
    out: list[int] = []
    for i in range(batch_size):
        h = hashlib.sha256(prefix + i.to_bytes(8, "big")).digest()
        out.append(lo + int.from_bytes(h, "big") % (hi - lo))
    return out


def make_batch(tokens: Tensor, offsets: list[int], ctx: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each int64 (len(offsets), ctx); targets are inputs shifted by one byte."""
    if not offsets:
        raise GridMintValueError("a batch needs at least one offset")
    n = int(tokens.numel())
    for off in offsets:
        if not 0 <= off <= n - ctx - 1:
            raise GridMintValueError(f"offset {off} leaves no room for a {ctx}+1 byte window in {n} tokens")
    idx = torch.tensor(offsets, dtype=torch.int64).unsqueeze(1) + torch.arange(ctx + 1, dtype=torch.int64)
    window = tokens[idx]
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def train_batch(seed: int, shard: int, n_shards: int, step: int, batch_size: int, ctx: int) -> tuple[list[int], Tensor, Tensor]:
    """(offsets, inputs, targets) of one training step."""
    offsets = batch_indices(seed, shard, n_shards, step, batch_size, ctx)
    x, y = make_batch(train_tokens(), offsets, ctx)
    return offsets, x, y


def eval_batches(n_batches: int, batch_size: int, ctx: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed held-out batches (the same on every machine) for measuring loss."""
    _check_int("n_batches", n_batches, 1)
    _check_int("batch_size", batch_size, 1)
    held = heldout_tokens()
    span = int(held.numel()) - ctx - 1
    if span <= 0:
        raise GridMintValueError(f"held-out split is too small for ctx={ctx}")
    out = []
    for b in range(n_batches):
        offsets = []
        for i in range(batch_size):
            h = hashlib.sha256(b"GridMint/eval/v1" + EVAL_SEED.to_bytes(8, "big") + b.to_bytes(8, "big") + i.to_bytes(8, "big")).digest()
            offsets.append(int.from_bytes(h, "big") % (span + 1))
        out.append(make_batch(held, offsets, ctx))
    return out


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 2**63:
        raise GridMintValueError(f"{name} must be an int in [{minimum}, 2**63), got {value!r}")
