"""The referee's replay of a disputed segment (the marketplace runs it, in a Celery task).

A segment trained on the referee's own execution plan (the CPU default) is replayed bit for bit
(:func:`node.replay.check_segment`). A segment trained on another plan (a GPU, micro-batches) cannot be: the referee
first replays it whole and repeats the verifier's check on its own plan (a dispute its replay does not back is
cleared there and then: the provider is never asked for anything on a false accusation), compares the committed
mean loss (convicting on it alone only far past the calibrated loss tolerance), then **bisects**
it down to one optimizer step (:func:`node.crosscheck.bisect_segment`), asking the provider to reveal its state at
each midpoint (going on into the half that lands further past its tolerance), and replays that one step from the
provider's own revealed state (:func:`node.crosscheck.referee_step`). In fp32, honest one-step drift is ~1e-7 of the
state and the threshold is 64x the worst seen, so an honest provider is never slashed, while a skipped, faked or
low-precision step lands far beyond it; in bf16 the step is judged against its own update (honest drift up to ~3e-2
of it, threshold 8x the worst seen, a skipped step 1.0).

The bisection is resumable: each run starts over from the segment's committed ends and the reveals stored so far
(every replay is deterministic on the referee's plan), and stops at the first state the provider has not revealed
yet (:class:`node.crosscheck.RevealPending`). A provider that lets the deadline pass loses (a reveal that does not
hash to what it signed is refused when it is posted, so it counts as no answer). Cost: one segment replay for the loss, about one more for the bisection per reveal round.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from node import checkpoint, crosscheck
from node.crosscheck import PROVIDER_PLAN, Plan, RevealPending, State
from node.replay import check_segment
from node.trainer import UnitSpec
from protocol.proof import TrainingProof

#: The plan the marketplace replays on: the provider trainer's default (deterministic CPU float32).
REFEREE_PLAN = PROVIDER_PLAN


def refereeable(plan: Plan) -> bool:
    """Whether this referee can judge segments trained on ``plan``: it calibrates the tolerance by running that plan
    itself, so the plan's device must be here."""
    return plan.device == "cpu" or torch.cuda.is_available()


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@dataclass(frozen=True)
class Ruling:
    """``fraud`` is None while the bisection waits for the provider to reveal the state before ``pending``."""

    fraud: bool | None
    reason: str
    claimed: str = ""
    replayed: str = ""
    pending: int | None = None
    step: int | None = None  # the single step a bisection ended on


def rule(spec: UnitSpec, proof: TrainingProof, seg: int, plan: Plan, start: Path, end: Path,
         reveals: Mapping[int, Path], overdue: Callable[[int], str]) -> Ruling:
    """Judge segment ``seg``: ``start``/``end`` are its committed checkpoints, ``reveals`` the provider's revealed
    states so far (step -> checkpoint), ``overdue(step)`` a reason if the provider was asked for ``step`` and let
    the deadline pass (else "")."""
    if plan == REFEREE_PLAN:
        v = check_segment(spec, proof, seg, start)
        return Ruling(not v.ok, v.reason, v.claimed_end, v.replayed_end or "")
    claimed = proof.segments[seg].end_hash
    tol = crosscheck.tolerance_for(spec, REFEREE_PLAN, provider_plan=plan)
    s0, _ = checkpoint.load(start)
    s1, _ = checkpoint.load(end)
    runner = crosscheck.PlanRunner(spec, s0, REFEREE_PLAN)
    # first the verifier's own check, on the referee's plan: a dispute the referee's replay does not back is cleared
    # at once, so a false accusation never asks an honest provider for anything (nor runs it into a reveal deadline)
    look = crosscheck.check_segment_across(spec, proof, seg, s0, s1, tol, runner)
    if look.ok:
        return Ruling(False, f"[{plan.label}] the referee's replay agrees: {look.reason}; the provider was not asked "
                             f"for anything", claimed, look.replayed_hash or "")
    if look.kind == "claim":  # wrong on its face (e.g. not the spec's data order): evidence on its own
        return Ruling(True, f"[{plan.label}] {look.reason}", claimed)
    lv = crosscheck.loss_ruling(spec, seg, tol, look.loss_delta_micro)
    if lv.fraud:
        return Ruling(True, f"[{plan.label}] {lv.reason}", claimed, look.replayed_hash or "")
    first, last = seg * spec.segment_len, (seg + 1) * spec.segment_len

    def reveal(step: int) -> State:
        if step == first:
            return s0
        if step == last:
            return s1
        if step in reveals:
            return checkpoint.load(reveals[step])[0]
        why = overdue(step)
        if why:
            raise TimeoutError(why)
        raise RevealPending(step)

    try:
        dispute = crosscheck.bisect_segment(spec, proof, seg, reveal, tol, runner)
        v = crosscheck.referee_step(spec, dispute, reveal, tol, runner)
    except RevealPending as p:
        return Ruling(None, str(p), claimed, pending=p.step)
    where = f"[{plan.label}] bisected to step {v.step} in {len(dispute.rounds)} reveal(s): {v.reason}"
    return Ruling(v.fraud, where, claimed, step=v.step)


def good_faith(spec: UnitSpec, proof: TrainingProof, seg: int, plan: Plan, start: Path, end: Path,
               verifier_plan: Plan, replayed_hash: str) -> tuple[bool, str]:
    """Whether an accusation the referee has cleared was nonetheless made in good faith, so the verifier keeps its
    bond: the referee replays segment ``seg`` on the verifier's declared plan, gets the very state the verifier
    signed it reached (``replayed_hash``, bit for bit), and that state disagrees with the provider's committed end
    past the tolerance the protocol gives the verifier's plan against the provider's. Honest training drifts apart
    across hardware without bound in chaotic stretches (an honest segment of the demo's job shape has been seen
    ~50x past its calibrated tolerance), so no bond margin makes an honest verifier safe; this does. A verifier whose
    replay the referee cannot run (its plan's device is not here), cannot reproduce, or finds within the tolerance,
    or one that disputed a provider on its own plan (checked bit for bit: a cleared dispute there means its replay
    was not the honest one), was not in good faith."""
    if verifier_plan != REFEREE_PLAN:
        return False, f"the referee cannot reproduce a replay on plan {verifier_plan.label}"
    if plan == verifier_plan:
        return False, f"checked bit for bit on plan {plan.label}, and the referee's replay matches the provider's claim"
    tol = crosscheck.tolerance_for(spec, verifier_plan, provider_plan=plan)
    s0, _ = checkpoint.load(start)
    s1, _ = checkpoint.load(end)
    runner = crosscheck.PlanRunner(spec, s0, verifier_plan)
    v = crosscheck.check_segment_across(spec, proof, seg, s0, s1, tol, runner)
    want = replayed_hash.lower() if replayed_hash.startswith("0x") else "0x" + replayed_hash.lower()
    if v.replayed_hash != want:
        return False, f"the verifier signed a replay ending in {want[:12]}, the referee's on {verifier_plan.label} " \
                      f"ends in {(v.replayed_hash or '?')[:12]}"
    if v.ok:
        return False, f"the verifier's own replay is within the tolerance: {v.reason}"
    return True, f"the referee reproduced the verifier's replay on {verifier_plan.label} bit for bit: {v.reason}"


def bisect_view(bisect: dict[str, Any] | None) -> dict[str, Any]:
    """A fresh copy of a verification's bisection record (never mutate the loaded JSON in place)."""
    b = dict(bisect or {})
    b["reveals"] = dict(b.get("reveals") or {})
    return b
