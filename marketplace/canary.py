"""Canaries: planted known-bad segments that catch a verifier who approves without replaying.

A verifier is paid to replay; one that approves everything earns the same for no work, and every cheat it is handed
goes free. So now and then (``Settings.canary_rate`` of the tasks it polls, drawn from the OS's randomness, so it
cannot be predicted) the task a verifier is handed is a *canary*: the very task it was about to get (same id, unit,
provider, spec, segment and start checkpoint), except that the claim for that segment is forged (:func:`forge`): the
segment's start moved the way a neighbouring segment really moved its own (its weights' update; its gradients' share
of the AdamW moments), the step counters the true end's. A replay always exposes it, on its own plan bit for bit,
across plans by a whole update's difference and a segment of gradients from the claim, past the tolerance (a
verifier on another plan that approves one lying within twice its tolerance of the truth is excused: the referee
voids that canary, :func:`marketplace.referee.canary_excuse`). An honest verifier flags it; approved, it proves the
verifier lazy (or broken): it is benched, its stake is slashed, and the checks it passed on units not yet credited go
back to the pool. Either way the real check of that segment is queued again, so the unit is still verified.

What keeps a canary from being told without a replay:
- a task shows only its own segment's claim (``protocol.proof.segment_view``): no Merkle root or neighbour's hash
  to compare across tasks of one unit;
- its end looks like a segment's end: the weights move as far as a segment moves them, and the moments are what the
  start's become under a real segment's gradients, so every exact relation between a segment's start and end moments
  holds (:func:`moment_floor_breaches`: the second moments never fall below ``beta2 ** segment_len`` of the start's).
  The forgery used to be the state two segments on (twice the movement; a check against the spec's lr told it at an
  AUC of 0.96), then the start plus a neighbour's update with another state's own moments, which broke that floor in
  4-5% of the entries of every canary and of no honest end: all told for sure, for nothing (``gridmint bench
  canary``: ``told_by_moment_floor``). What is left are statistical tells (``tell_auc``; stop-28 issue note);
- it is never planted where the verifier was handed a segment that tells it (:func:`plantable`: the segment itself,
  the one starting at the true end, those the forgery is made of), nor twice on one unit for one verifier; a verifier
  holds one task at a time, so it cannot fetch those while holding a canary;
- it is forged when the check is queued (:func:`stock`, ``stock_share`` of the checks), not when it is handed out:
  a hand-out costs the same database work either way, nothing a verifier could time.
Every segment of a unit of three segments or more can be a canary, the last one too, whatever was handed in before.
The last segment of a unit of one or two segments is forged from the final state of another unit of its job and round
handed in before it, when there is one (none for a verifier handed any segment of that unit). What a canary cannot
hide: a verifier comparing notes with another verifier of the same unit could tell; and that last segment of a
round's first unit handed in (or of a round of one unit) is never a canary.

Cost: the operator writes one checkpoint per stocked check (no training); the verifier replays one segment.
"""
from __future__ import annotations

import secrets
from dataclasses import replace
from fractions import Fraction
from typing import Any, Mapping

from eth_utils import keccak
from torch import Tensor

from marketplace.blobs import BlobStore
from node import checkpoint
from node.crosscheck import distance
from node.trainer import ADAMW_BETAS, UnitSpec, checkpoint_metadata, state_hash, update_norm
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


#: The last segment of a unit of at least this many segments borrows the update before it; of fewer (its start's
#: moments a segment back are a fresh optimizer's zeros, a tell), another unit's final state
BACKWARD_MIN_SEGMENTS = 3


def needs_sibling(seg: int, n_segments: int) -> bool:
    """Whether segment ``seg`` of a unit of ``n_segments`` is forged from another unit's final state."""
    return seg == n_segments - 1 and n_segments < BACKWARD_MIN_SEGMENTS


def stock(spec: UnitSpec, proof: TrainingProof, picks: list[int], segment_blobs: list[str], final_blob: str,
          blobs: BlobStore, rate: float | Fraction,
          sibling: tuple[str, list[str], str] | None = None) -> dict[int, dict[str, Any]]:
    """Canaries forged ahead for a share of a unit's sampled segments ``picks`` (each drawn with probability
    :func:`stock_share` of ``rate``): segment -> its decoy (:func:`forge`'s output, plus the ``root`` of the proof it
    was forged from and the ``share`` it was drawn at). ``sibling``: (unit id, segment checkpoints, final checkpoint) of
    another unit of the same job and round, the source of the last segment's forgery in a unit of one or two segments
    (:func:`needs_sibling`; named in its decoy's ``source_unit``: a verifier handed any of that unit's segments gets
    no such canary). Segments :func:`forge` declines have none."""
    share = stock_share(rate)
    out: dict[int, dict[str, Any]] = {}
    for seg in sorted(set(picks)):
        if share > 0 and draw(share):
            other = (sibling if sibling is not None and needs_sibling(seg, len(proof.segments))
                     and len(sibling[1]) > seg else None)
            fake = forge(spec, proof, seg, segment_blobs, final_blob, blobs,
                         (other[1][seg], other[2]) if other else None)
            if fake is not None:
                out[seg] = {**fake, "root": proof.merkle_root, "share": str(share),
                            **({"source_unit": other[0]} if other else {})}
    return out


def plant_odds(rate: float | Fraction, decoy: dict[str, Any]) -> Fraction:
    """The probability that a check with ``decoy`` is planted when handed out: ``rate`` over the share the decoy was
    stocked at (at most 1), so that rate of all the checks handed out are canaries."""
    share = Fraction(decoy.get("share", "1"))
    return min(Fraction(1), Fraction(rate).limit_denominator(1_000_000) / share) if share > 0 else Fraction(0)


def plantable(seg: int, seen: list[tuple[int, bool]], telling: list[int] | None = None) -> bool:
    """Whether a canary of segment ``seg`` may be handed to a verifier that was handed ``seen`` of the same unit
    before: (segment, was it a canary) per hand-out. Not where it had a canary of the unit already, nor where it was
    handed one of ``telling`` (the decoy's, from :func:`forge`): the segment itself (its real claim, should the task
    have come back to it), the one starting at the true end, and those whose checkpoints the forgery is made of
    (with the start it is handed, a verifier holding them could recompute it). A forward forgery's: ``seg`` to
    ``seg`` + 2 (also the rule for decoys stocked before ``telling`` existed); a backward one's: ``seg`` - 2 to
    ``seg``. The other segments before tell nothing: they end where this one starts or before."""
    told = set(telling if telling is not None else (seg, seg + 1, seg + 2))
    return not any(was_canary or s in told for s, was_canary in seen)


def moment_floor_breaches(spec: UnitSpec, start: Mapping[str, Tensor], end: Mapping[str, Tensor]) -> int:
    """How many second-moment entries of ``end`` lie below what ``segment_len`` AdamW steps from ``start`` always
    leave (``beta2 ** segment_len`` of the start's; each step adds a square): a test any verifier holding a task's
    start and claimed end can run without replaying. An honest end has none (up to fp32 rounding, allowed for); a
    forgery with another state's moments had thousands."""
    decay = ADAMW_BETAS[1] ** spec.segment_len
    breaches = 0
    for k, v in start.items():
        if k.endswith(".exp_avg_sq"):
            floor = decay * v.double()
            breaches += int((end[k].double() < floor * (1 - MOMENT_FLOOR_RTOL)).sum())
    return breaches


#: fp32 rounding of ``segment_len`` decays (a relative error of about 1e-7 a step) is not a breach
MOMENT_FLOOR_RTOL = 1e-5


def carried(spec: UnitSpec, start: Mapping[str, Tensor], before: Mapping[str, Tensor],
            after: Mapping[str, Tensor], counters: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``start`` moved the way a real segment moved ``before`` to ``after``, in float64, rounded once: the weights by
    its update; the AdamW moments decayed over ``segment_len`` steps and given that segment's gradients' share
    (``after - beta ** segment_len x before``: what its steps added). So the moments are what ``start`` would hold
    after those gradients: every relation a verifier can check between a segment's start and end moments without
    replaying holds (:func:`moment_floor_breaches`: none). The step counters are ``counters``'."""
    (b1, b2), n = ADAMW_BETAS, spec.segment_len
    out = {}
    for k, v in counters.items():
        if k.endswith(".step"):
            out[k] = v
            continue
        a, b, c = start[k].double(), before[k].double(), after[k].double()
        if k.startswith("model."):
            x = a + c - b
        elif k.endswith(".exp_avg_sq"):
            x = b2 ** n * a + (c - b2 ** n * b).clamp(min=0)  # (a sum of squares: rounding below zero is zero)
        else:
            x = b1 ** n * a + (c - b1 ** n * b)
        out[k] = x.to(v.dtype)
    return out


def forge(spec: UnitSpec, proof: TrainingProof, seg: int, segment_blobs: list[str], final_blob: str,
          blobs: BlobStore, sibling: tuple[str, str] | None = None) -> dict[str, Any] | None:
    """The forged claim for segment ``seg`` of a real unit: its start moved the way another real segment moved its
    own start (:func:`carried`: its weights' update, its gradients' share of the moments), the step counters always
    the true end's:

    * *forward* (every segment but the last): the next segment's move;
    * *backward* (the last segment of a unit of :data:`BACKWARD_MIN_SEGMENTS` or more): the previous segment's;
    * the last segment of a unit of one or two segments: the same segment's move in another unit of the same job and
      round (trained from the same model, on another shard): ``sibling`` (its start checkpoint for that segment,
      its final checkpoint).

    So the weights move as far as a segment moves them, the moments as a segment's gradients move them, and the
    state is new (no checkpoint or hash of any task is it). The moments used to be another state's own (a segment
    further on, or before): then 4-5% of the second-moment entries fell below the floor the start's leave after a
    segment (:func:`moment_floor_breaches`), where an honest end has none: every canary told without a replay. The
    moments must differ from the true end's: with its own, a bf16 forgery lay inside an honest verifier's tolerance
    on another plan (4 of 6 segments of the default job shape approved).

    None for a sibling-forged segment without a sibling, where the borrowed update is this one's (the forgery would
    be the claim), and where the forgery lies less than 1/``CANARY_MIN_UPDATE_SHARE`` of what segment ``seg`` moved
    from the true end (that close to the truth it could pass an honest verifier checking within a tolerance).

    Returns ``proof`` (the unit's proof with segment ``seg`` ending in the forged state), ``end_blob`` (that state,
    labelled like the unit's own checkpoint there, in the providers' file format), ``true_end`` (the hash an honest
    replay ends in) and ``telling`` (the segments whose hand-out tells it: :func:`plantable`)."""
    n = len(proof.segments)
    last = seg == n - 1
    sib = needs_sibling(seg, n)
    if not 0 <= seg < n or len(segment_blobs) != n or (sib and sibling is None):
        return None
    true_end, _ = checkpoint.load(blobs.read(final_blob if last else segment_blobs[seg + 1]))
    start, _ = checkpoint.load(blobs.read(segment_blobs[seg]))
    candidates: list[tuple[Any, Any, list[int]]] = []  # (before, after, telling) of each segment to borrow from
    if sib:
        assert sibling is not None
        before, after = (checkpoint.load(blobs.read(b))[0] for b in sibling)
        if set(before) != set(true_end) or set(after) != set(true_end):
            return None  # (not a state of this model: no unit of the same job is)
        candidates.append((before, after, [seg, seg + 1, seg + 2]))
    else:
        if not last:  # forward: the next segment's move
            after = checkpoint.load(blobs.read(segment_blobs[seg + 2] if seg + 2 < n else final_blob))[0]
            candidates.append((true_end, after, [seg, seg + 1, seg + 2]))
        if seg >= 2:  # backward: the one before's (not the first segment's: a fresh optimizer's moves are larger)
            candidates.append((checkpoint.load(blobs.read(segment_blobs[seg - 1]))[0], start, [seg - 2, seg - 1, seg]))
    own = update_norm(start, true_end)
    best: tuple[float, dict[str, Tensor], list[int]] | None = None
    for before, after, telling in candidates:
        forged = carried(spec, start, before, after, true_end)
        moved = update_norm(true_end, forged)
        # the borrowed update is this one's (or nothing: the "forgery" would be the claim itself, hash and all), or
        # nearly (a provider may shape it so): the forgery could land inside the tolerance of an honest verifier on
        # another plan, whose approval the referee's bit-for-bit replay would then "confirm" (checking.punish_verifier
        # also referees the claim itself, and excuses an approval within the verifier's tolerance). On the default job
        # shape honest neighbours' updates differ by 0.69-1.5x an update, so none are skipped
        if moved == 0.0 or moved * CANARY_MIN_UPDATE_SHARE < own:
            continue
        # of the two, the one farther from the truth (what an honest verifier on another plan must see past its
        # tolerance: the moments' difference decides it, as the weights move by a segment's update either way)
        far = distance(true_end, forged)
        if best is None or far > best[0]:
            best = (far, forged, telling)
    if best is None:
        return None
    _, forged_end, telling = best
    end_hash = state_hash(forged_end)
    end_blob = blobs.put_checkpoint(checkpoint.serialize(forged_end, checkpoint_metadata(spec, None if last else seg + 1)))
    segments = list(proof.segments)
    segments[seg] = replace(segments[seg], end_hash=end_hash)
    if not last:
        segments[seg + 1] = replace(segments[seg + 1], start_hash=end_hash)  # the chain stays unbroken
    claim = make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                       segment_len=proof.segment_len, segments=segments)
    return {"proof": claim.to_dict(), "end_blob": end_blob, "true_end": proof.segments[seg].end_hash,
            "telling": [t for t in telling if 0 <= t < n]}


def evidence(verification_id: int, verifier: str) -> bytes:
    """The on-chain evidence id of "``verifier`` approved canary ``verification_id``" (its stake's slash, once)."""
    return keccak(b"GridMint/canary/v1" + verification_id.to_bytes(32, "big") + bytes.fromhex(verifier[2:]))
