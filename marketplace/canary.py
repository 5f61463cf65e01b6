"""Canaries: planted known-bad segments that catch a verifier who approves without replaying.

A verifier is paid to replay; one that approves everything earns the same for no work, and every cheat it is handed
goes free. So now and then (``Settings.canary_rate`` of the tasks it polls, drawn from the OS's randomness, so it
cannot be predicted) the task a verifier is handed is a *canary*: the very task it was about to get (same id, unit,
provider, spec, segment and start checkpoint), except that the claim for that segment is forged: it ends in the
unit's state one segment further on (real training: that checkpoint's weights and moments, with the step counters
the segment's true end has), the chain and Merkle root re-derived. Nothing short of replaying the segment tells it
from an honest claim: the task's ids, its provider's stake, the public job listing all look like any task's. A
replay always exposes it, on any execution plan (the replay ends one whole segment of updates from the claim, far
past any cross-plan tolerance). An honest verifier flags it; approved, it proves the verifier lazy (or broken): it
is benched, its stake is slashed, and the checks it passed on units not yet credited go back to the pool. Either
way the real check of that segment is queued again, so the unit is still verified.

Cost: the operator writes one checkpoint per canary (no training); the verifier replays one segment. What a canary
cannot hide: its Merkle root differs from the one the provider committed, so a verifier comparing notes with
another verifier of the same unit could tell, and so could a verifier handed a canary and later a real task of
one unit (it gets those last); and a unit's last segment is never a canary (nothing further on).
"""
from __future__ import annotations

import secrets
from dataclasses import replace
from fractions import Fraction
from typing import Any

from eth_utils import keccak

from marketplace.blobs import BlobStore
from node import checkpoint
from node.trainer import UnitSpec, checkpoint_metadata, state_hash, update_norm
from protocol.proof import TrainingProof, make_proof


def draw(rate: float | Fraction) -> bool:
    """Whether the next task handed out is a canary: true with probability ``rate``, from the OS's randomness."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    r = Fraction(rate).limit_denominator(1_000_000)
    return secrets.randbelow(r.denominator) < r.numerator


#: A canary is forged from the next segment's state only where that segment moved the model at least 1/this of what
#: the forged segment did: the forgery then lies a segment's worth of training from the truth, far outside any
#: verifier's tolerance across plans (honest drift: ~1e-7 of the state per step in fp32, ~3e-2 of an update in bf16)
CANARY_MIN_UPDATE_SHARE = 4


def forge(spec: UnitSpec, proof: TrainingProof, seg: int, segment_blobs: list[str], final_blob: str,
          blobs: BlobStore) -> dict[str, Any] | None:
    """The forged claim for segment ``seg`` of a real unit; None for its last segment (nothing further on), where
    the unit claims the next segment did not move the model (the state further on is the claimed end: no forgery),
    and where it moved it less than 1/``CANARY_MIN_UPDATE_SHARE`` of what segment ``seg`` did (a forgery that close
    to the truth could pass an honest verifier checking within a tolerance).

    Returns ``proof`` (the unit's proof with segment ``seg`` ending in the forged state), ``end_blob`` (that state,
    labelled like the unit's own checkpoint there, in the providers' file format) and ``true_end`` (the hash an
    honest replay ends in)."""
    n = len(proof.segments)
    if not 0 <= seg < n - 1 or len(segment_blobs) != n:
        return None
    true_end, _ = checkpoint.load(blobs.read(segment_blobs[seg + 1]))
    further, _ = checkpoint.load(blobs.read(segment_blobs[seg + 2] if seg + 2 < n else final_blob))
    forged_end = {k: v if k.endswith(".step") else further[k] for k, v in true_end.items()}
    moved = update_norm(true_end, forged_end)
    if moved == 0.0:  # (a forgery equal to the claim, hash and all, is one of these)
        return None  # the next segment did not move the model (claimed idle): the "forgery" is the claim itself
    start, _ = checkpoint.load(blobs.read(segment_blobs[seg]))
    if moved * CANARY_MIN_UPDATE_SHARE < update_norm(start, true_end):
        # the next segment barely moved the model (a provider may shape it so): the forgery could land inside the
        # tolerance of an honest verifier on another plan, whose approval the referee's bit-for-bit replay would then
        # "confirm" and slash. Honest segments move alike (0.8-2.6x their neighbours' median), so few are skipped
        return None
    end_hash = state_hash(forged_end)
    end_blob = blobs.put_checkpoint(checkpoint.serialize(forged_end, checkpoint_metadata(spec, seg + 1)))
    segments = list(proof.segments)
    segments[seg] = replace(segments[seg], end_hash=end_hash)
    segments[seg + 1] = replace(segments[seg + 1], start_hash=end_hash)  # the chain stays unbroken
    forged = make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                        segment_len=proof.segment_len, segments=segments)
    return {"proof": forged.to_dict(), "end_blob": end_blob, "true_end": proof.segments[seg].end_hash}


def evidence(verification_id: int, verifier: str) -> bytes:
    """The on-chain evidence id of "``verifier`` approved canary ``verification_id``" (its stake's slash, once)."""
    return keccak(b"GridMint/canary/v1" + verification_id.to_bytes(32, "big") + bytes.fromhex(verifier[2:]))
