"""Canaries: planted known-bad segments that catch a verifier who approves without replaying.

A verifier is paid to replay; one that approves everything earns the same for no work, and every cheat it is handed
goes free. So now and then (``Settings.canary_rate`` of the tasks it polls, drawn from the OS's randomness, so it
cannot be predicted) the task a verifier is handed is a *canary*: the very task it was about to get (same id, unit,
provider, spec, segment and start checkpoint), except that the claim for that segment is forged: its weights are the
segment's start moved by the *next* segment's real update, its optimizer moments those of the state one segment
further on, its step counters the true end's. A replay always exposes it, on any execution plan (the replay ends a
whole update's difference and a segment of moments from the claim, far past any cross-plan tolerance). The weights
move as far as a segment moves them: the state one segment further on itself (the forgery before) moved twice as far
from the start, which a check of movement against the spec's lr told at an AUC of 0.96 on the default job shape. An honest verifier flags it; approved, it proves the
verifier lazy (or broken): it is benched, its stake is slashed, and the checks it passed on units not yet credited
go back to the pool. Either way the real check of that segment is queued again, so the unit is still verified.

What keeps a canary from being told without a replay:
- a task shows only its own segment's claim (``protocol.proof.segment_view``): no Merkle root or neighbour's hash
  to compare across tasks of one unit;
- it is never planted where the verifier was handed the segment after it or the one after that (their start or end
  checkpoints are the truth, or the state the forgery copies), nor twice on one unit for one verifier
  (:func:`plantable`); a verifier holds one task at a time, so it cannot fetch those while holding a canary;
- it is forged when the check is queued (:func:`stock`, ``stock_share`` of the checks), not when it is handed out:
  a hand-out costs the same database work either way, nothing a verifier could time.
A unit's last segment (nothing further on) is forged from the final state of another unit of its job and round
handed in before it, when there is one: a verifier handed any segment of that unit gets no such canary. What a
canary cannot hide: a verifier comparing notes with another verifier of the same unit could tell; and the last
segment of a round's first unit handed in (or of a round of one unit) is never a canary.

Cost: the operator writes one checkpoint per stocked check (no training); the verifier replays one segment.
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


#: The share of checks a canary is forged for when they are queued is this many times the canary rate (at most all):
#: a check handed out is planted with probability rate / share when it has one, so the rate holds while the rate set
#: later stays within this factor of the one the stock was drawn at
STOCK_FACTOR = 4


def stock_share(rate: float | Fraction) -> Fraction:
    """The share of checks to forge a canary for ahead (:data:`STOCK_FACTOR` x ``rate``, at most 1)."""
    r = Fraction(rate).limit_denominator(1_000_000)
    return min(Fraction(1), max(Fraction(0), r * STOCK_FACTOR))


def stock(spec: UnitSpec, proof: TrainingProof, picks: list[int], segment_blobs: list[str], final_blob: str,
          blobs: BlobStore, rate: float | Fraction,
          sibling: tuple[str, str] | None = None) -> dict[int, dict[str, Any]]:
    """Canaries forged ahead for a share of a unit's sampled segments ``picks`` (each drawn with probability
    :func:`stock_share` of ``rate``): segment -> its decoy (:func:`forge`'s output, plus the ``root`` of the proof it
    was forged from and the ``share`` it was drawn at). ``sibling``: (unit id, final checkpoint) of another unit of
    the same job and round, the source of a last segment's forgery (named in its decoy's ``source_unit``: a
    verifier handed any of that unit's segments gets no such canary). Segments :func:`forge` declines have none."""
    share = stock_share(rate)
    out: dict[int, dict[str, Any]] = {}
    for seg in sorted(set(picks)):
        if share > 0 and draw(share):
            last = seg == len(proof.segments) - 1
            fake = forge(spec, proof, seg, segment_blobs, final_blob, blobs,
                         sibling[1] if last and sibling else None)
            if fake is not None:
                out[seg] = {**fake, "root": proof.merkle_root, "share": str(share),
                            **({"source_unit": sibling[0]} if last and sibling else {})}
    return out


def plant_odds(rate: float | Fraction, decoy: dict[str, Any]) -> Fraction:
    """The probability that a check with ``decoy`` is planted when handed out: ``rate`` over the share the decoy was
    stocked at (at most 1), so that rate of all the checks handed out are canaries."""
    share = Fraction(decoy.get("share", "1"))
    return min(Fraction(1), Fraction(rate).limit_denominator(1_000_000) / share) if share > 0 else Fraction(0)


def plantable(seg: int, seen: list[tuple[int, bool]]) -> bool:
    """Whether a canary of segment ``seg`` may be handed to a verifier that was handed ``seen`` of the same unit
    before: (segment, was it a canary) per hand-out. Not where it had a canary of the unit already, nor where it was
    handed segment ``seg`` itself (its real claim, should the task have come back to it), ``seg`` + 1 (whose start
    checkpoint is the true end, and its end the state the forgery copies) or ``seg`` + 2 (which starts from the
    state the forgery copies). The segments before tell nothing: they end where this one starts."""
    return not any(was_canary or s in (seg, seg + 1, seg + 2) for s, was_canary in seen)


def forge(spec: UnitSpec, proof: TrainingProof, seg: int, segment_blobs: list[str], final_blob: str,
          blobs: BlobStore, sibling_final: str | None = None) -> dict[str, Any] | None:
    """The forged claim for segment ``seg`` of a real unit: the segment's start moved by the next segment's update
    (the state further on minus the true end, in float64, rounded once), with the moments of the state further on
    and the true end's step counters; or, for the unit's last segment (nothing further on), ``sibling_final``: the
    final state of another unit of the same job and round (trained as long from the same model, on another shard).
    None for a last segment without one, where the next segment's update is this one's (the forgery would be the
    claim), and where the forgery lies less than 1/``CANARY_MIN_UPDATE_SHARE`` of what segment ``seg`` moved from
    the true end (that close to the truth it could pass an honest verifier checking within a tolerance). The
    moments must differ from the true end's too: with the true end's moments, a bf16 forgery lay inside an honest
    verifier's tolerance on another plan (4 of 6 segments of the default job shape approved; with these, margins of
    4-19 x the tolerance, as before).

    Returns ``proof`` (the unit's proof with segment ``seg`` ending in the forged state), ``end_blob`` (that state,
    labelled like the unit's own checkpoint there, in the providers' file format) and ``true_end`` (the hash an
    honest replay ends in)."""
    n = len(proof.segments)
    last = seg == n - 1
    if not 0 <= seg < n or len(segment_blobs) != n or (last and sibling_final is None):
        return None
    true_end, _ = checkpoint.load(blobs.read(final_blob if last else segment_blobs[seg + 1]))
    source = sibling_final if last else segment_blobs[seg + 2] if seg + 2 < n else final_blob
    assert source is not None
    further, _ = checkpoint.load(blobs.read(source))
    if set(further) != set(true_end):
        return None  # (not a state of this model: no unit of the same job is)
    start, _ = checkpoint.load(blobs.read(segment_blobs[seg]))
    if last:
        forged_end = {k: v if k.endswith(".step") else further[k] for k, v in true_end.items()}
    else:  # the weights: this start moved by the next segment's update (in float64, rounded once)
        forged_end = {k: v if k.endswith(".step") else further[k] if not k.startswith("model.")
                      else (start[k].double() + further[k].double() - true_end[k].double()).to(v.dtype)
                      for k, v in true_end.items()}
    moved = update_norm(true_end, forged_end)
    if moved == 0.0:  # (a forgery equal to the claim, hash and all, is one of these)
        return None  # the next segment's update is this one's (or nothing): the "forgery" is the claim itself
    if moved * CANARY_MIN_UPDATE_SHARE < update_norm(start, true_end):
        # the next segment's update is nearly this one's (a provider may shape it so): the forgery could land inside
        # the tolerance of an honest verifier on another plan, whose approval the referee's bit-for-bit replay would
        # then "confirm" and slash (checking.punish_verifier also referees the claim itself). On the default job
        # shape honest neighbours' updates differ by 0.69-1.5x an update, so none are skipped
        return None
    end_hash = state_hash(forged_end)
    end_blob = blobs.put_checkpoint(checkpoint.serialize(forged_end, checkpoint_metadata(spec, None if last else seg + 1)))
    segments = list(proof.segments)
    segments[seg] = replace(segments[seg], end_hash=end_hash)
    if not last:
        segments[seg + 1] = replace(segments[seg + 1], start_hash=end_hash)  # the chain stays unbroken
    forged = make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                        segment_len=proof.segment_len, segments=segments)
    return {"proof": forged.to_dict(), "end_blob": end_blob, "true_end": proof.segments[seg].end_hash}


def evidence(verification_id: int, verifier: str) -> bytes:
    """The on-chain evidence id of "``verifier`` approved canary ``verification_id``" (its stake's slash, once)."""
    return keccak(b"GridMint/canary/v1" + verification_id.to_bytes(32, "big") + bytes.fromhex(verifier[2:]))
