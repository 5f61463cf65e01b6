"""The verifier's core: replay one committed segment and compare hashes.

The verifier trusts only the spec (from the marketplace) and the checkpoint bytes. The batches are derived
from the spec, never taken from the provider; the checkpoint must hash to the committed start of the segment;
then ``segment_len`` steps are re-run and the resulting state hash must equal the committed end.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Mapping

from torch import Tensor
from torch.optim import Optimizer

from node import checkpoint
from node.model import TinyGPT
from node.trainer import (
    PROVIDER_PLAN,
    Plan,
    UnitSpec,
    deterministic,
    expected_batch_digest,
    export_training_state,
    kept_training_state,
    load_training_state,
    place,
    mean_loss_micro,
    run_segment,
    state_hash,
)
from protocol.errors import CheckpointError, GridMintValueError
from protocol.proof import TrainingProof, batch_digest

CheckpointSource = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class ReplayResult:
    start_hash: str
    end_hash: str
    losses: tuple[float, ...]
    batch_digest: str
    loss_micro: int


@dataclass(frozen=True)
class SegmentVerdict:
    """``ok`` False means the provider's claim for segment ``index`` is false (``reason`` says which part)."""

    ok: bool
    index: int
    claimed_end: str
    replayed_end: str | None
    reason: str


def replay_segment(spec: UnitSpec, seg_index: int, checkpoint_path: CheckpointSource) -> ReplayResult:
    """Re-run segment ``seg_index`` from the checkpoint. Raises CheckpointError if it is not a fitting state."""
    if not isinstance(seg_index, int) or not 0 <= seg_index < spec.n_segments:
        raise GridMintValueError(f"segment {seg_index!r} out of range: unit has {spec.n_segments} segments")
    tensors, _meta = checkpoint.load(checkpoint_path)
    return replay_state(spec, seg_index, tensors)


def replay_state(spec: UnitSpec, seg_index: int, tensors: Mapping[str, Tensor],
                 plan: Plan = PROVIDER_PLAN) -> ReplayResult:
    """Re-run segment ``seg_index`` from a training state in memory on ``plan`` (the provider's: bit for bit where
    the plan is :attr:`~node.trainer.Plan.exact`); on CPU, on the model + AdamW kept for its job shape
    (:func:`node.trainer.kept_training_state`). Raises CheckpointError if the state does not fit the spec."""
    with deterministic(spec.threads):
        return _replay_loaded(spec, seg_index, _load(spec, tensors, plan), plan)


@dataclass(frozen=True)
class _Loaded:
    start: str  # the loaded state's hash
    model: TinyGPT
    opt: Optimizer
    end_hash: Callable[[], str]  # the hash of the pair's state when called


def _load(spec: UnitSpec, tensors: Mapping[str, Tensor], plan: Plan, start: str | None = None) -> _Loaded:
    """A challenged state loaded for replay on ``plan``, hashed (off the CPU: ``start``, its hash if the caller has
    it already). Inside :func:`deterministic`."""
    if plan.device == "cpu":  # the pair kept per job shape, its state in the state hash's own layout
        kept = kept_training_state(spec, tensors)
        kept.load(spec, tensors)  # the one copy: hashing it needs no other
        return _Loaded(kept.state_hash(), kept.model, kept.opt, kept.state_hash)
    start = start or state_hash(tensors)
    model, opt = load_training_state(spec, tensors)  # a fresh pair on the plan's device (checks the state fits)
    place(model, opt, plan)
    return _Loaded(start, model, opt, lambda: state_hash(export_training_state(model, opt)))


def _replay_loaded(spec: UnitSpec, seg_index: int, loaded: _Loaded, plan: Plan) -> ReplayResult:
    batches, losses = run_segment(spec, loaded.model, loaded.opt, seg_index, plan=plan)
    return ReplayResult(loaded.start, loaded.end_hash(), tuple(losses), batch_digest(batches),
                        mean_loss_micro(losses))


def check_segment(
    spec: UnitSpec, proof: TrainingProof, seg_index: int, checkpoint_path: CheckpointSource,
    plan: Plan = PROVIDER_PLAN,
) -> SegmentVerdict:
    """Verify the provider's claim about one segment by replaying it.

    Flags (ok=False) a proof for another spec/unit, a checkpoint that is not a valid training state or does
    not hash to the committed start, a batch digest other than the spec's data order, and any replayed end
    hash or mean loss that differs from the commitment. ``plan``: the one the provider trained on, replayed here
    (it must be :attr:`~node.trainer.Plan.exact` for a bit-for-bit verdict to mean anything). ``OSError`` (file
    missing locally) propagates: it is not evidence against the provider.
    """
    wrong = _claim_verdict(spec, proof, seg_index)
    if wrong is not None:
        return wrong
    try:
        tensors, _meta = checkpoint.load(checkpoint_path)
    except CheckpointError as exc:
        return SegmentVerdict(False, seg_index, proof.segments[seg_index].end_hash, None, f"checkpoint rejected: {exc}")
    return _check_loaded(spec, proof, seg_index, tensors, plan)


def check_state(spec: UnitSpec, proof: TrainingProof, seg_index: int, tensors: Mapping[str, Tensor],
                plan: Plan = PROVIDER_PLAN) -> SegmentVerdict:
    """:func:`check_segment` on a start state already in memory."""
    wrong = _claim_verdict(spec, proof, seg_index)
    return wrong if wrong is not None else _check_loaded(spec, proof, seg_index, tensors, plan)


def _claim_verdict(spec: UnitSpec, proof: TrainingProof, seg_index: int) -> SegmentVerdict | None:
    """The verdict on a claim wrong on its face (:func:`claim_problem`), or None; a segment out of range raises."""
    if not isinstance(seg_index, int) or not 0 <= seg_index < spec.n_segments:
        raise GridMintValueError(f"segment {seg_index!r} out of range: unit has {spec.n_segments} segments")
    problem = claim_problem(spec, proof, seg_index)
    if problem is None:
        return None
    claimed = proof.segments[seg_index].end_hash if seg_index < len(proof.segments) else ""
    return SegmentVerdict(False, seg_index, claimed, None, problem)


def _check_loaded(spec: UnitSpec, proof: TrainingProof, seg_index: int,
                  tensors: Mapping[str, Tensor], plan: Plan = PROVIDER_PLAN) -> SegmentVerdict:
    """The replay part of :func:`check_segment`, for a claim without problems of its own."""
    def fail(reason: str, claimed: str = "", replayed: str | None = None) -> SegmentVerdict:
        return SegmentVerdict(False, seg_index, claimed, replayed, reason)

    seg = proof.segments[seg_index]

    def not_start(got: str) -> SegmentVerdict:
        return fail(f"checkpoint hashes to {got}, not the committed start {seg.start_hash}", seg.end_hash)

    with deterministic(spec.threads):
        got_start = None
        if plan.device != "cpu":  # hashed before any device work: a state that is not the start goes nowhere
            got_start = state_hash(tensors)
            if got_start != seg.start_hash:
                return not_start(got_start)
        try:
            loaded = _load(spec, tensors, plan, got_start)
        except CheckpointError as exc:
            got_start = got_start or state_hash(tensors)  # another shape: its hash is what is wrong, if it is
            if got_start != seg.start_hash:
                return not_start(got_start)
            return fail(f"checkpoint is not a training state for this spec: {exc}", seg.end_hash)
        if loaded.start != seg.start_hash:
            return not_start(loaded.start)
        result = _replay_loaded(spec, seg_index, loaded, plan)
    if result.end_hash != seg.end_hash:
        return fail("replayed end state differs from the committed end", seg.end_hash, result.end_hash)
    if result.loss_micro != seg.loss_micro:
        return fail(
            f"committed mean loss {seg.loss_micro} micro-nats, replay gives {result.loss_micro}",
            seg.end_hash, result.end_hash,
        )
    return SegmentVerdict(True, seg_index, seg.end_hash, result.end_hash, "replay matches")


def claim_problem(spec: UnitSpec, proof: TrainingProof, seg_index: int) -> str | None:
    """What is wrong with the provider's claim about segment ``seg_index`` before any replay (None: nothing): a
    proof for another spec or unit, of another shape, a segment out of place, a batch digest other than the spec's
    data order. Any of these is evidence against the provider on its own."""
    if proof.spec_hash != spec.spec_hash() or proof.unit_id != spec.unit_id:
        return f"proof is for spec {proof.spec_hash} / unit {proof.unit_id}, not this unit's {spec.spec_hash()}"
    if (proof.steps, proof.segment_len, len(proof.segments)) != (spec.steps, spec.segment_len, spec.n_segments):
        return f"proof shape {proof.steps}/{proof.segment_len}/{len(proof.segments)} does not match the spec"
    seg = proof.segments[seg_index]
    if seg.index != seg_index:
        return f"segment at position {seg_index} claims index {seg.index}"
    derived = expected_batch_digest(spec, seg_index)
    if seg.batch_digest != derived:
        return f"committed batch digest {seg.batch_digest} is not the spec's data order {derived}"
    return None


def choose_segments(proof: TrainingProof, n: int, rng_seed: int | bytes) -> list[int]:
    """``n`` distinct segment indices (all of them if n >= count), uniformly at random given ``rng_seed``, sorted.

    Each index is ranked by SHA-256(seed, unit id, index): a provider cannot predict the pick before the
    seed (e.g. a block hash drawn after the proof was committed) is known.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise GridMintValueError(f"n must be a positive int, got {n!r}")
    if isinstance(rng_seed, bool) or not isinstance(rng_seed, (int, bytes)):
        raise GridMintValueError(f"rng_seed must be an int or bytes, got {rng_seed!r}")
    if isinstance(rng_seed, int):
        if rng_seed < 0:
            raise GridMintValueError(f"rng_seed must be non-negative, got {rng_seed}")
        seed_bytes = rng_seed.to_bytes(max(1, (rng_seed.bit_length() + 7) // 8), "big")
    else:
        seed_bytes = rng_seed
    prefix = b"GridMint/choose/v1" + len(seed_bytes).to_bytes(4, "big") + seed_bytes + bytes.fromhex(proof.unit_id[2:])
    count = len(proof.segments)
    ranked = sorted(range(count), key=lambda i: hashlib.sha256(prefix + i.to_bytes(8, "big")).digest())
    return sorted(ranked[: min(n, count)])
