"""Canaries: planted known-bad segments that catch a verifier who approves without replaying.

A verifier is paid to replay; one that approves everything earns the same for no work, and every cheat it is handed
goes free. So now and then (``Settings.canary_rate`` of the tasks it polls, drawn from the OS's randomness, so it
cannot be predicted) the marketplace hands a verifier a *canary* in place of a real task: a copy of a real submitted
unit's claim, under a fresh unit id and provider address, in which one segment claims to end in the state one
segment further on. That state is real training (the unit's own next checkpoint's weights and moments, with the
step counters the segment's true end has), so nothing short of replaying the segment tells it from an honest claim,
and replaying it always does, on any execution plan: the replay ends one whole segment of updates away from the claim
(far past any cross-plan tolerance). A canary is flagged by an honest verifier; approved, it proves the verifier lazy (or broken): it is
benched, its stake is slashed, and the checks it passed on units not yet credited go back to the pool.

A canary costs the operator no training (it re-labels checkpoints already stored: two checkpoint writes) and the
verifier one segment replay. It is built from the unit of the real task the verifier was about to get, so it has that task's shape and plan.
"""
from __future__ import annotations

import secrets
from dataclasses import replace
from fractions import Fraction
from typing import Any

from eth_utils import to_checksum_address

from marketplace.blobs import BlobStore
from node import checkpoint
from node.trainer import UnitSpec, checkpoint_metadata, state_hash
from protocol.proof import TrainingProof, make_proof


def draw(rate: float | Fraction) -> bool:
    """Whether the next task handed out is a canary: true with probability ``rate``, from the OS's randomness."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    r = Fraction(rate).limit_denominator(1_000_000)
    return secrets.randbelow(r.denominator) < r.numerator


def forge(spec: UnitSpec, proof: TrainingProof, segment_blobs: list[str], final_blob: str,
          blobs: BlobStore) -> dict[str, Any] | None:
    """A known-bad task cut from a real unit's claim (None if the unit has a single segment: nothing further on).

    The claimed end of the drawn segment is the unit's state one segment further on (weights and moments) with the
    optimizer's step counters of the true end, so its counters are right and only a replay shows it is not what
    the segment makes. Both handed checkpoints are written anew, labelled for the canary's unit (a checkpoint's
    metadata names its unit), in the providers' file format. Returns what the verifier is handed (``spec``,
    ``proof``, ``segment``, ``checkpoint_blob``, ``end_blob``, ``provider``) plus ``unit_id`` and ``true_end`` (the
    hash an honest replay ends in, for the record)."""
    n = len(proof.segments)
    if n < 2 or len(segment_blobs) != n:
        return None
    seg = secrets.randbelow(n - 1)
    unit_id = "0x" + secrets.token_bytes(32).hex()
    provider = to_checksum_address(secrets.token_bytes(20))
    cspec = replace(spec, unit_id=unit_id)
    start, _ = checkpoint.load(blobs.path(segment_blobs[seg]))
    true_end, _ = checkpoint.load(blobs.path(segment_blobs[seg + 1]))
    further, _ = checkpoint.load(blobs.path(segment_blobs[seg + 2] if seg + 2 < n else final_blob))
    forged_end = {k: v if k.endswith(".step") else further[k] for k, v in true_end.items()}
    end_hash = state_hash(forged_end)
    start_blob = blobs.put_checkpoint(checkpoint.serialize(start, checkpoint_metadata(cspec, seg)))
    end_blob = blobs.put_checkpoint(checkpoint.serialize(forged_end, checkpoint_metadata(cspec, seg + 1)))
    segments = list(proof.segments)
    segments[seg] = replace(segments[seg], end_hash=end_hash)
    segments[seg + 1] = replace(segments[seg + 1], start_hash=end_hash)  # the chain stays unbroken
    forged = make_proof(unit_id=unit_id, spec_hash=cspec.spec_hash(), seed=proof.seed, steps=proof.steps,
                        segment_len=proof.segment_len, segments=segments)
    return {"unit_id": unit_id, "provider": provider, "segment": seg, "spec": cspec.to_json(),
            "proof": forged.to_dict(), "checkpoint_blob": start_blob, "end_blob": end_blob,
            "true_end": proof.segments[seg].end_hash}
