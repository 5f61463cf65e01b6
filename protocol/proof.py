"""Proof-of-training commitments: what a provider signs about a training unit, and the checks that need no replay.

A unit of ``steps`` optimizer steps is cut into segments of ``segment_len`` steps. For each segment the provider
commits the hash of the full training state (model + optimizer) at its start and end, a digest of the batch
offsets it trained on, and its mean loss. Each segment becomes a Merkle leaf that also binds the unit id, the
spec hash and the data seed, so a proof cannot be re-used for another unit or another data order; the Merkle
root is what gets signed (EIP-712, see :func:`TrainingProof.signable_fields`).

:func:`check_structure` is the cheap first pass every verifier runs. It cannot tell an honest chain of hashes
from a self-consistent lie; only a replay of a segment (``node.replay``) can.

Everything hashed is an int or a hex string: floats never enter a hash. Hashes are ``0x`` + 64 lowercase hex.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

from protocol.errors import ProofError

HASH_RE = re.compile(r"^0x[0-9a-f]{64}$")
LEAF_DOMAIN = b"\x00GridMint/segment/v1"
NODE_PREFIX = b"\x01"
BATCH_DOMAIN = b"GridMint/batches/v1"
PROOF_VERSION = 1
MAX_U63 = 2**63
#: The largest loss (nats) a step or a segment may report: anything above is no training worth committing.
MAX_LOSS = 1e9


# --------------------------------------------------------------------------- Merkle tree


@dataclass(frozen=True)
class MerkleStep:
    """One level of a Merkle path: the sibling hash and which side of the running hash it sits on."""

    sibling: bytes
    sibling_on_left: bool


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _check_leaves(leaves: Sequence[bytes]) -> None:
    if len(leaves) == 0:
        raise ProofError("a Merkle tree needs at least one leaf")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, bytes) or len(leaf) != 32:
            raise ProofError(f"Merkle leaf {i} must be 32 bytes, got {leaf!r}")


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """All levels bottom-up. An odd node at the end of a level is carried up unchanged."""
    _check_leaves(leaves)
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = [_node(cur[i], cur[i + 1]) for i in range(0, len(cur) - 1, 2)]
        if len(cur) % 2:
            nxt.append(cur[-1])
        levels.append(nxt)
    return levels


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """SHA-256 Merkle root of 32-byte leaf hashes (internal nodes are ``sha256(0x01 || left || right)``)."""
    return _levels(leaves)[-1][0]


def merkle_proof(leaves: Sequence[bytes], index: int) -> tuple[MerkleStep, ...]:
    """The path from leaf ``index`` to the root."""
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(leaves):
        raise ProofError(f"leaf index {index!r} out of range for {len(leaves)} leaves")
    path: list[MerkleStep] = []
    i = index
    for level in _levels(leaves)[:-1]:
        sib = i ^ 1
        if sib < len(level):
            path.append(MerkleStep(level[sib], sibling_on_left=sib < i))
        i //= 2
    return tuple(path)


def verify_merkle(leaf: bytes, proof: Sequence[MerkleStep], root: bytes) -> bool:
    """True iff ``proof`` leads from ``leaf`` to ``root``."""
    h = leaf
    for step in proof:
        h = _node(step.sibling, h) if step.sibling_on_left else _node(h, step.sibling)
    return h == root


# --------------------------------------------------------------------------- leaves and digests


def _hex32(name: str, value: object) -> bytes:
    if not isinstance(value, str) or not HASH_RE.match(value):
        raise ProofError(f"{name} must be 0x + 64 lowercase hex digits, got {value!r}")
    return bytes.fromhex(value[2:])


def _uint(name: str, value: object, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < MAX_U63:
        raise ProofError(f"{name} must be an int in [{minimum}, 2**63), got {value!r}")
    return value


def leaf_hash(
    *,
    unit_id: str,
    spec_hash: str,
    seed: int,
    index: int,
    start_hash: str,
    end_hash: str,
    batch_digest: str,
    loss_micro: int,
) -> bytes:
    """The Merkle leaf of one segment: SHA-256 over a domain tag and fixed-width fields."""
    return hashlib.sha256(
        LEAF_DOMAIN
        + _hex32("unit_id", unit_id)
        + _hex32("spec_hash", spec_hash)
        + _uint("seed", seed).to_bytes(8, "big")
        + _uint("index", index).to_bytes(8, "big")
        + _hex32("start_hash", start_hash)
        + _hex32("end_hash", end_hash)
        + _hex32("batch_digest", batch_digest)
        + _uint("loss_micro", loss_micro).to_bytes(8, "big")
    ).digest()


def batch_digest(steps: Iterable[tuple[int, Sequence[int]]]) -> str:
    """``0x`` + SHA-256 of the (step number, batch start offsets) of every step in a segment, in order."""
    h = hashlib.sha256(BATCH_DOMAIN)
    for step, offsets in steps:
        h.update(_uint("step", step).to_bytes(8, "big") + len(offsets).to_bytes(4, "big"))
        for off in offsets:
            h.update(_uint("batch offset", off).to_bytes(8, "big"))
    return "0x" + h.hexdigest()


def loss_to_micro(mean_loss: float) -> int:
    """A mean loss in nats as integer micro-nats (the only form a loss takes inside a hash)."""
    if not mean_loss == mean_loss or mean_loss < 0 or mean_loss > MAX_LOSS:
        raise ProofError(f"loss must be a finite non-negative number, got {mean_loss!r}")
    return int(round(mean_loss * 1_000_000))


def mean_loss_micro(losses: Sequence[float]) -> int:
    """The mean of a segment's per-step losses as committed: :func:`loss_to_micro` of their exact (fsum) mean."""
    return loss_to_micro(math.fsum(losses) / len(losses))


def segment_count(steps: int, segment_len: int) -> int:
    _uint("steps", steps, 1)
    _uint("segment_len", segment_len, 1)
    if steps % segment_len:
        raise ProofError(f"steps ({steps}) must be a multiple of segment_len ({segment_len})")
    return steps // segment_len


# --------------------------------------------------------------------------- commitments


@dataclass(frozen=True)
class SegmentCommit:
    """What a provider claims about segment ``index`` (steps ``index*segment_len`` .. ``(index+1)*segment_len-1``)."""

    index: int
    start_hash: str
    end_hash: str
    batch_digest: str
    loss_micro: int

    def __post_init__(self) -> None:
        _uint("segment index", self.index)
        _hex32("segment start_hash", self.start_hash)
        _hex32("segment end_hash", self.end_hash)
        _hex32("segment batch_digest", self.batch_digest)
        _uint("segment loss_micro", self.loss_micro)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "startHash": self.start_hash,
            "endHash": self.end_hash,
            "batchDigest": self.batch_digest,
            "lossMicro": self.loss_micro,
        }

    @classmethod
    def from_dict(cls, data: object) -> SegmentCommit:
        d = _exact_fields("segment", data, {"index", "startHash", "endHash", "batchDigest", "lossMicro"})
        return cls(d["index"], d["startHash"], d["endHash"], d["batchDigest"], d["lossMicro"])


@dataclass(frozen=True)
class TrainingProof:
    """A provider's full commitment for one unit. Construct with :func:`make_proof` to get the root right."""

    unit_id: str
    spec_hash: str
    seed: int
    steps: int
    segment_len: int
    start_hash: str
    final_hash: str
    segments: tuple[SegmentCommit, ...]
    merkle_root: str

    def __post_init__(self) -> None:
        _hex32("unit_id", self.unit_id)
        _hex32("spec_hash", self.spec_hash)
        _uint("seed", self.seed)
        _uint("steps", self.steps, 1)
        _uint("segment_len", self.segment_len, 1)
        _hex32("start_hash", self.start_hash)
        _hex32("final_hash", self.final_hash)
        _hex32("merkle_root", self.merkle_root)
        if not isinstance(self.segments, tuple) or not all(isinstance(s, SegmentCommit) for s in self.segments):
            raise ProofError(f"segments must be a tuple of SegmentCommit, got {type(self.segments).__name__}")
        if not self.segments:
            raise ProofError("a proof needs at least one segment")

    def leaves(self) -> list[bytes]:
        return [
            leaf_hash(
                unit_id=self.unit_id,
                spec_hash=self.spec_hash,
                seed=self.seed,
                index=s.index,
                start_hash=s.start_hash,
                end_hash=s.end_hash,
                batch_digest=s.batch_digest,
                loss_micro=s.loss_micro,
            )
            for s in self.segments
        ]

    def segment_proof(self, index: int) -> tuple[MerkleStep, ...]:
        """Merkle path of segment ``index`` (for posting one segment's verdict to a referee)."""
        return merkle_proof(self.leaves(), index)

    def signable_fields(self) -> dict[str, Any]:
        """The fields of the EIP-712 ``TrainingProof`` struct (bytes32 values as 0x hex)."""
        return {
            "unitId": self.unit_id,
            "merkleRoot": self.merkle_root,
            "startHash": self.start_hash,
            "finalHash": self.final_hash,
            "steps": self.steps,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PROOF_VERSION,
            "unitId": self.unit_id,
            "specHash": self.spec_hash,
            "seed": self.seed,
            "steps": self.steps,
            "segmentLen": self.segment_len,
            "startHash": self.start_hash,
            "finalHash": self.final_hash,
            "segments": [s.to_dict() for s in self.segments],
            "merkleRoot": self.merkle_root,
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal proofs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: object) -> TrainingProof:
        d = _exact_fields(
            "proof",
            data,
            {"version", "unitId", "specHash", "seed", "steps", "segmentLen", "startHash", "finalHash", "segments", "merkleRoot"},
        )
        if d["version"] != PROOF_VERSION or isinstance(d["version"], bool):
            raise ProofError(f"unsupported proof version {d['version']!r}, expected {PROOF_VERSION}")
        if not isinstance(d["segments"], list):
            raise ProofError(f"proof segments must be a list, got {type(d['segments']).__name__}")
        return cls(
            unit_id=d["unitId"],
            spec_hash=d["specHash"],
            seed=d["seed"],
            steps=d["steps"],
            segment_len=d["segmentLen"],
            start_hash=d["startHash"],
            final_hash=d["finalHash"],
            segments=tuple(SegmentCommit.from_dict(s) for s in d["segments"]),
            merkle_root=d["merkleRoot"],
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainingProof:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_no_floats, parse_constant=_no_floats)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ProofError):
                raise
            raise ProofError(f"proof is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def make_proof(
    *, unit_id: str, spec_hash: str, seed: int, steps: int, segment_len: int, segments: Sequence[SegmentCommit]
) -> TrainingProof:
    """A proof whose start/final hashes and Merkle root are derived from ``segments``."""
    if not segments:
        raise ProofError("a proof needs at least one segment")
    draft = TrainingProof(
        unit_id=unit_id,
        spec_hash=spec_hash,
        seed=seed,
        steps=steps,
        segment_len=segment_len,
        start_hash=segments[0].start_hash,
        final_hash=segments[-1].end_hash,
        segments=tuple(segments),
        merkle_root="0x" + "00" * 32,
    )
    return replace(draft, merkle_root="0x" + merkle_root(draft.leaves()).hex())


ZERO_HASH = "0x" + "00" * 32


def segment_view(proof: TrainingProof, index: int) -> TrainingProof:
    """What a verifier of segment ``index`` is shown of ``proof``: that segment's claim (its start and end hashes,
    batch digest and loss) in a proof of the unit's shape, every other segment's hashes and loss blanked (zero),
    the header's start/final hash and Merkle root derived from that. A replay needs nothing more, and a verifier
    handed several segments of one unit learns nothing from one task about another's claim: a planted canary
    (a forged claim for one segment, :mod:`marketplace.canary`) differs from the real task only in the one hash a
    replay checks, not in a root or a neighbour's hash it could compare across tasks. Not the provider's signed
    proof (its root differs): the marketplace keeps that, and judges disputes on it."""
    if not 0 <= index < len(proof.segments):
        raise ProofError(f"segment {index} out of range for {len(proof.segments)} segments")
    shown = [s if s.index == index else replace(s, start_hash=ZERO_HASH, end_hash=ZERO_HASH, loss_micro=0)
             for s in proof.segments]
    return make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                      segment_len=proof.segment_len, segments=shown)


def check_step_losses(proof: TrainingProof, losses: Sequence[float]) -> None:
    """Raise :class:`ProofError` unless ``losses`` (the per-step loss curve a provider submits with its proof, under
    its request signature) has one finite non-negative loss per step and each segment's mean is the loss the proof
    commits for it (to the micro-nat, give or take the rounding of a sum). A referee's loss scan then judges every
    step against the loss the provider put its name to, not only the segment's mean."""
    if not isinstance(losses, Sequence) or len(losses) != proof.steps:
        raise ProofError(f"{proof.steps} steps need {proof.steps} step losses, got "
                         f"{len(losses) if isinstance(losses, Sequence) else type(losses).__name__}")
    for i, x in enumerate(losses):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ProofError(f"step {i}'s loss must be a number, got {x!r}")
        loss_to_micro(float(x))  # finite, non-negative
    for seg in proof.segments:
        lo = seg.index * proof.segment_len
        got = mean_loss_micro([float(x) for x in losses[lo:lo + proof.segment_len]])
        if abs(got - seg.loss_micro) > 1:
            raise ProofError(f"segment {seg.index}'s step losses average {got} micro-nats, its commitment says "
                             f"{seg.loss_micro}")


def check_structure(proof: TrainingProof, expected_start_hash: str, expected_spec_hash: str) -> None:
    """Raise :class:`ProofError` unless the proof is internally consistent and about the expected unit.

    Checks: spec hash, segment count for steps/segment_len, indices 0..n-1 in order, first start == the
    expected start (the global checkpoint with fresh optimizer state), contiguous hash chain, last end ==
    final hash, and the Merkle root over the leaves. Passing this says nothing about whether training
    happened; only a replay does.
    """
    if not isinstance(proof, TrainingProof):
        raise ProofError(f"expected a TrainingProof, got {type(proof).__name__}")
    _hex32("expected_start_hash", expected_start_hash)
    _hex32("expected_spec_hash", expected_spec_hash)
    if proof.spec_hash != expected_spec_hash:
        raise ProofError(f"proof is for spec {proof.spec_hash}, expected {expected_spec_hash}")
    n = segment_count(proof.steps, proof.segment_len)
    if len(proof.segments) != n:
        raise ProofError(
            f"{proof.steps} steps in segments of {proof.segment_len} need {n} segments, proof has {len(proof.segments)}"
        )
    for i, seg in enumerate(proof.segments):
        if seg.index != i:
            raise ProofError(f"segment at position {i} has index {seg.index}")
    if proof.start_hash != expected_start_hash or proof.segments[0].start_hash != expected_start_hash:
        raise ProofError(
            f"proof starts from {proof.segments[0].start_hash} (header {proof.start_hash}), "
            f"expected the job's start state {expected_start_hash}"
        )
    for a, b in zip(proof.segments, proof.segments[1:]):
        if a.end_hash != b.start_hash:
            raise ProofError(f"hash chain broken: segment {a.index} ends at {a.end_hash}, segment {b.index} starts at {b.start_hash}")
    if proof.segments[-1].end_hash != proof.final_hash:
        raise ProofError(f"last segment ends at {proof.segments[-1].end_hash}, proof claims final {proof.final_hash}")
    root = "0x" + merkle_root(proof.leaves()).hex()
    if root != proof.merkle_root:
        raise ProofError(f"Merkle root {proof.merkle_root} does not match the segments (recomputed {root})")


# --------------------------------------------------------------------------- strict JSON helpers


def _exact_fields(what: str, data: object, fields: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ProofError(f"{what} must be a JSON object, got {type(data).__name__}")
    if set(data) != fields:
        missing = sorted(fields - set(data))
        extra = sorted(set(data) - fields)
        raise ProofError(f"{what} fields wrong: missing {missing}, unexpected {extra}")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ProofError(f"duplicate key {k!r} in proof JSON")
        out[k] = v
    return out


def _no_floats(text: str) -> Any:
    raise ProofError(f"floats are not allowed in a proof (got {text})")
