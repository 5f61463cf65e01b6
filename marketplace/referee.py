"""The referee's replay of a disputed segment (the marketplace runs it, in a Celery task).

A segment trained on the referee's own execution plan (the CPU default) with the referee's own kernels
(:func:`node.device.kernel_build`: the torch build, the CPU kind) is replayed bit for bit
(:func:`node.replay.check_segment`). A segment trained on another plan (a GPU, micro-batches), or on the same plan
with other kernels (a provider on another CPU computes other bits, honestly: a bit mismatch there is no evidence),
cannot be: the referee first replays it whole and repeats the verifier's check on its own plan (a dispute its replay does not back is
cleared there and then: the provider is never asked for anything on a false accusation), compares the committed
mean loss (convicting on it alone only far past the calibrated loss tolerance). A dispute over the loss alone (the
states agree) is **scanned**: the provider reveals its state before every step of the segment (every power-of-two
chunk of a segment longer than 16 steps: at most 15 reveals) and the referee replays each step from it
(:func:`node.crosscheck.scan_segment`), so the losses differ by one forward pass's arithmetic, not by drift carried
in, and each is judged against the per-step loss the provider submitted with its proof (a chunk's mean against the
mean of those submitted for it): a loss faked on one step stands out in bf16 too, by its full size (1/chunk of it). Otherwise the referee **bisects**
it down to one optimizer step (:func:`node.crosscheck.bisect_segment`), asking the provider to reveal its state at
each midpoint (going on into the half that lands further past its tolerance), and replays that one step from the
provider's own revealed state (:func:`node.crosscheck.referee_step`). In fp32, honest one-step drift is ~1e-7 of the
state and the threshold is 64x the worst seen, so an honest provider is never slashed, while a skipped, faked or
low-precision step lands far beyond it; in bf16 the step is judged against its own update (honest drift up to ~3e-2
of it, threshold 8x the worst seen, a skipped step 1.0).

The bisection is resumable: each run starts over from the segment's committed ends and the reveals stored so far
(every replay is deterministic on the referee's plan), and stops at the first state the provider has not revealed
yet (:class:`node.crosscheck.RevealPending`); a scan asks for every state it lacks at once, in turn, and is ruled on
once they are all in. A provider that lets the deadline pass loses (a reveal that does not
hash to what it signed is refused when it is posted, so it counts as no answer). Cost: one segment replay for the loss, about one more for the bisection per reveal round.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from node import checkpoint, crosscheck
from node.crosscheck import PROVIDER_PLAN, Plan, RevealPending, State
from node.replay import check_segment
from node.device import gpu_name, kernel_build
from node.trainer import UnitSpec, gpu_slug, same_bits
from protocol.errors import GridMintValueError
from protocol.proof import TrainingProof

#: The plan the marketplace replays on: the provider trainer's default (deterministic CPU float32).
REFEREE_PLAN = PROVIDER_PLAN


def exact_plans(labels: str, here: bool = True) -> frozenset[Plan]:
    """The plans this referee replays bit for bit (``GRIDMINT_REFEREE_PLANS``, comma-separated labels), always
    :data:`REFEREE_PLAN` among them. Each must be :attr:`~node.trainer.Plan.exact` and run here: a named GPU plan
    needs that GPU model in this machine. A segment trained on one of them is judged by an exact replay on its own
    plan, so a cheat that hides inside the honest drift between plans (float8 steps on a GPU checked on a CPU) is
    convicted; a verifier on that plan bonds its disputes (the referee reproduces its replay). ``here=False`` only
    reads the labels (an API process telling verifiers what the referee's workers replay, on other machines)."""
    out = {REFEREE_PLAN}
    for label in filter(None, (x.strip() for x in labels.split(","))):
        plan = Plan.parse(label)
        if not plan.exact:
            raise GridMintValueError(f"referee plan {label!r} is not replayed bit for bit by another machine: "
                                     f"a cuda plan must name its GPU model (e.g. cuda:h200)")
        if plan.device == "cuda" and here:
            name = gpu_name()
            gpu = gpu_slug(name) if name is not None else None
            if gpu != plan.gpu:
                raise GridMintValueError(f"referee plan {label!r} needs a {plan.gpu} GPU here, this machine has "
                                         f"{gpu or 'no CUDA device'}")
        out.add(plan)
    return frozenset(out)


def refereeable(plan: Plan) -> bool:
    """Whether this referee can judge segments trained on ``plan``: it calibrates the tolerance by running that plan
    itself, so the plan's device must be here."""
    return plan.device == "cpu" or torch.cuda.is_available()


def build_here(plan: Plan) -> str | None:
    """The kernels this machine runs ``plan`` with (:func:`node.device.kernel_build`), None without its device."""
    return kernel_build(plan.device) if plan.device == "cpu" or torch.cuda.is_available() else None


def native(plan: Plan, build: str | None) -> bool:
    """Whether work on ``plan`` computed with ``build`` replays bit for bit here (``build`` None: computed on this
    machine's own kernels, as in tests and benchmarks; "" or any other build: not)."""
    here = build_here(plan)
    return here is not None and same_bits(plan, here if build is None else build, plan, here)


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
    pending_more: tuple[int, ...] = ()  # states to ask for after ``pending``, each in turn (a loss scan's batch)
    step: int | None = None  # the single step a bisection ended on
    # the referee's first look at a segment trained on another plan: its whole-segment replay on REFEREE_PLAN (the
    # state it ends in, whether that lies within the tolerance, and why): what a verifier on that plan signed
    look_hash: str = ""
    look_ok: bool | None = None
    look_reason: str = ""
    # fraud on the provider's silence alone: it let a reveal deadline pass, so the referee replayed nothing against
    # the claim past that point (the provider loses; a verifier's replay of the segment is not shown wrong by it)
    unbacked: bool = False


#: A canary's approval is excused (:func:`canary_excuse`) while the forgery lies within this many times the approving
#: verifier's tolerance of the true end: its replay drifts from the truth by up to its tolerance, so an honest one may
#: land within its tolerance of a forgery up to twice that far
CANARY_EXCUSE_FACTOR = 2.0


def canary_excuse(spec: UnitSpec, plan: Plan, build: str | None, verifier_plan: str, verifier_build: str | None,
                  true_end: Path, forged_end: Path) -> str | None:
    """Why a verifier's approval of a canary (forged end ``forged_end``, truth ``true_end``, of a unit trained on
    ``plan`` with kernels ``build``) may be an honest verifier's, or None if it cannot be: the verifier, on
    ``verifier_plan`` with ``verifier_build``, checks across plans or kernels within a calibrated tolerance, and the
    forgery lies within :data:`CANARY_EXCUSE_FACTOR` times that tolerance of the truth. A verifier on the unit's own
    plan and kernels replays bit for bit: any forgery is a mismatch it cannot miss.

    The tolerance is the verifier's own calibration (as its agent computes it) where it can be run here, else (a GPU
    verifier's, on a machine without that GPU) the referee's own between the unit's plan and this machine's."""
    from node.verifier_agent import calibration_plans

    vplan = Plan.parse(verifier_plan)
    if same_bits(plan, build or "", vplan, verifier_build or ""):  # (kernels unsaid are never the same)
        return None
    cal_plan, cal_provider, foreign = calibration_plans(plan, build, vplan, verifier_build or "", verifier_build or "")
    if "cuda" in (cal_plan.device, cal_provider.device) and not torch.cuda.is_available():
        cal_plan, cal_provider, foreign = REFEREE_PLAN, plan, plan.device == "cpu" and not native(plan, build)
    tol = crosscheck.tolerance_for(spec, cal_plan, provider_plan=cal_provider, foreign=foreign)
    thr = tol.for_steps(spec.segment_len)
    d = crosscheck.distance(checkpoint.load(true_end)[0], checkpoint.load(forged_end)[0])
    if d <= CANARY_EXCUSE_FACTOR * thr:
        return (f"the forgery lies {d:.3g} from the true end, within {CANARY_EXCUSE_FACTOR:g} x the tolerance "
                f"({thr:.3g}) of a verifier on {vplan.label} checking {plan.label} work: an honest replay may approve it")
    return None


def rule(spec: UnitSpec, proof: TrainingProof, seg: int, plan: Plan, start: Path, end: Path,
         reveals: Mapping[int, Path], overdue: Callable[[int], str],
         losses: Sequence[float] | None = None, exact: frozenset[Plan] = frozenset({REFEREE_PLAN}),
         build: str | None = None) -> Ruling:
    """Judge segment ``seg``: ``start``/``end`` are its committed checkpoints, ``reveals`` the provider's revealed
    states so far (step -> checkpoint), ``overdue(step)`` a reason if the provider was asked for ``step`` and let
    the deadline pass (else ""), ``losses`` the unit's per-step losses it submitted with its proof (checked against
    its commitments on submission): a loss scan judges each step against them. ``exact``: the plans this referee
    replays bit for bit (:func:`exact_plans`); a segment trained on one is judged by that replay alone, when the
    provider's kernel ``build`` is this machine's (None: it is; "": unknown). On other kernels the plan is judged
    like another plan, on a tolerance calibrated against other kernels (:mod:`node.foreign`)."""
    ours = native(plan, build)
    bitwise = ours and (plan == REFEREE_PLAN or plan in exact)
    if plan == REFEREE_PLAN and bitwise:
        v = check_segment(spec, proof, seg, start)
        return Ruling(not v.ok, v.reason, v.claimed_end, v.replayed_end or "", look_hash=v.replayed_end or "",
                      look_ok=v.ok, look_reason=v.reason)
    if bitwise:
        v = check_segment(spec, proof, seg, start, plan)
        where = f"[{plan.label}] replayed bit for bit on the provider's own plan: {v.reason}"
        if not v.ok:
            return Ruling(True, where, v.claimed_end, v.replayed_end or "", look_hash=v.replayed_end or "",
                          look_ok=False, look_reason=v.reason)
    claimed = proof.segments[seg].end_hash
    # the same device on other kernels drifts even on the same plan: calibrated against other kernels (a GPU
    # plan's tolerance is calibrated across devices already, wider than a version difference on one device)
    foreign = plan.device == "cpu" and not ours
    tol = crosscheck.tolerance_for(spec, REFEREE_PLAN, provider_plan=plan, foreign=foreign)
    label = f"{plan.label} on other kernels" if foreign else plan.label
    s0, _ = checkpoint.load(start)
    s1, _ = checkpoint.load(end)
    runner = crosscheck.PlanRunner(spec, s0, REFEREE_PLAN)
    # first the verifier's own check, on the referee's plan: a dispute the referee's replay does not back is cleared
    # at once, so a false accusation never asks an honest provider for anything (nor runs it into a reveal deadline)
    look = crosscheck.check_segment_across(spec, proof, seg, s0, s1, tol, runner)
    seen = {"look_hash": look.replayed_hash or "", "look_ok": look.ok, "look_reason": look.reason}
    if bitwise:  # the claim is reproduced bit for bit: cleared; the look judges a verifier on REFEREE_PLAN
        return Ruling(False, where, claimed, v.replayed_end or "", **seen)
    if look.ok:
        return Ruling(False, f"[{label}] the referee's replay agrees: {look.reason}; the provider was not asked "
                             f"for anything", claimed, look.replayed_hash or "", **seen)
    if look.kind == "claim":  # wrong on its face (e.g. not the spec's data order): evidence on its own
        return Ruling(True, f"[{label}] {look.reason}", claimed, **seen)
    lv = crosscheck.loss_ruling(spec, seg, tol, look.loss_delta_micro, look.state_over)
    if lv.fraud:
        return Ruling(True, f"[{label}] {lv.reason}", claimed, look.replayed_hash or "", **seen)
    first, last = seg * spec.segment_len, (seg + 1) * spec.segment_len
    silent: list[int] = []  # a state asked of the provider past its deadline (the search stops at the first)

    def reveal(step: int) -> State:
        if step == first:
            return s0
        if step == last:
            return s1
        if step in reveals:
            return checkpoint.load(reveals[step])[0]
        why = overdue(step)
        if why:
            silent.append(step)
            raise TimeoutError(why)
        raise RevealPending(step)

    if look.kind == "loss" and crosscheck.can_scan(spec, tol):
        # the states agree and the mean loss does not: a bisection over states would find nothing; replay every
        # step from the provider's own state instead, where a loss drifts by one forward pass's arithmetic alone
        try:
            mine = list(losses[first:last]) if losses is not None and len(losses) == spec.steps else None
            sv = crosscheck.scan_segment(spec, proof, seg, reveal, tol, runner, step_losses=mine)
        except RevealPending as p:
            return Ruling(None, str(p), claimed, pending=p.step, pending_more=p.more, **seen)
        return Ruling(sv.fraud, f"[{label}] scanned the segment's {spec.segment_len} steps: {sv.reason}", claimed,
                      step=sv.step, unbacked=sv.fraud and bool(silent), **seen)
    try:
        dispute = crosscheck.bisect_segment(spec, proof, seg, reveal, tol, runner)
        v = crosscheck.referee_step(spec, dispute, reveal, tol, runner)
    except RevealPending as p:
        return Ruling(None, str(p), claimed, pending=p.step, **seen)
    where = f"[{label}] bisected to step {v.step} in {len(dispute.rounds)} reveal(s): {v.reason}"
    return Ruling(v.fraud, where, claimed, step=v.step, unbacked=v.fraud and bool(silent), **seen)


@dataclass(frozen=True)
class Faith:
    """How an accusation the referee cleared was made. ``good``: in good faith (the bond is released). ``proven_false``:
    the referee showed, on the verifier's own declared plan, that the verifier's signed verdict is not what that plan
    computes (or contradicts its own replay): no honest verifier signs it, so the verifier is benched."""

    good: bool
    proven_false: bool
    reason: str


def _hex0x(h: str) -> str:
    """A hash written either way (with or without 0x, any case) as lowercase 0x-hex, to compare."""
    h = h.lower()
    return h if h.startswith("0x") else "0x" + h


def judge_accusation(ruling: Ruling, plan: Plan, verifier_plan: Plan, replayed_hash: str,
                     exact: frozenset[Plan] = frozenset({REFEREE_PLAN}), build: str | None = None,
                     verifier_build: str | None = None) -> Faith:
    """Judge the accusation behind a dispute ``ruling`` cleared (``ruling.fraud`` is False), from the referee's own
    replay in that ruling: no segment is replayed again.

    Honest training drifts apart across hardware without bound in chaotic stretches (an honest segment of the demo's
    job shape has been seen ~50x past its calibrated tolerance), so no bond margin makes an honest verifier safe;
    this does. A verifier on the referee's plan is judged exactly: the referee's first look *is* its replay (same
    plan, same tolerance, bit for bit). If the referee got the very state the verifier signed it reached and that
    state lies past the tolerance, the accusation was honest. If the verifier signed another state, or one within
    the tolerance (its own check passed, yet it said fraud), or disputed a provider on its own plan whose claim the
    referee reproduced bit for bit, the accusation is proven false; so is a dispute by a verifier on the provider's
    own plan where that plan is one the referee replays bit for bit (``exact``). A verifier on another plan the
    referee does not replay on (micro-batches, a GPU) cannot be judged either way: not in good faith (its bond, if
    any, is forfeit), not proven false. All of this holds only on the referee's own kernels (``build``: the
    provider's, ``verifier_build``: the verifier's, :func:`node.device.kernel_build`; None: this machine's): a
    verifier on other kernels computes other bits, so the referee can neither reproduce nor refute its replay."""
    assert ruling.fraud is False, ruling
    want = _hex0x(replayed_hash)
    if plan == verifier_plan and plan in exact | {REFEREE_PLAN} and native(plan, build) \
            and native(plan, verifier_build):
        return Faith(False, True, f"checked bit for bit on plan {plan.label}: the referee's replay matches the "
                                  f"provider's claim, and the verifier signed a replay ending in {want[:12]}")
    if verifier_plan != REFEREE_PLAN:
        return Faith(False, False, f"the referee cannot reproduce a replay on plan {verifier_plan.label}")
    if not native(verifier_plan, verifier_build):
        return Faith(False, False, f"the referee cannot reproduce a replay on other kernels than its own "
                                   f"({verifier_build or 'unknown'})")
    got = _hex0x(ruling.look_hash)
    if got != want:
        return Faith(False, True, f"the verifier signed a replay ending in {want[:12]}, the referee's on "
                                  f"{verifier_plan.label} ends in {got[:12]}")
    if ruling.look_ok:
        return Faith(False, True, f"the verifier's own replay is within the tolerance: {ruling.look_reason}")
    return Faith(True, False, f"the referee reproduced the verifier's replay on {verifier_plan.label} bit for bit: "
                              f"{ruling.look_reason}")


def unanswered(bisect: dict[str, Any] | None) -> bool:
    """Whether a bisection record has a state asked of the provider that it has not revealed yet."""
    b = bisect or {}
    return b.get("asked") is not None and str(b["asked"]) not in (b.get("reveals") or {})


#: How long past its deadline a state asked of a provider is not yet taken for silence while a reveal of it that
#: reached the marketplace by the deadline is being checked (read, hashed, loaded: seconds for the largest state).
RECEIVING_GRACE_S = 300


def overdue(bisect: dict[str, Any] | None, now: int) -> bool:
    """Whether the state asked of the provider is unanswered past its deadline: its silence loses the ruling. Not
    while a reveal of it that arrived by the deadline (``receiving``, :func:`marketplace.checking.record_reveal`) is
    being checked, for :data:`RECEIVING_GRACE_S` (a review found an honest provider convicted for silence while its
    reveal, sent in time, was being checked)."""
    b = bisect or {}
    if not unanswered(b) or now <= int(b["deadline"]):
        return False
    got = b.get("receiving") or {}
    on_time = got.get("step") == b.get("asked") and int(got.get("at", now)) <= int(b["deadline"])
    return not (on_time and now <= int(b["deadline"]) + RECEIVING_GRACE_S)


def bisect_view(bisect: dict[str, Any] | None) -> dict[str, Any]:
    """A fresh copy of a verification's bisection record (never mutate the loaded JSON in place)."""
    b = dict(bisect or {})
    b["reveals"] = dict(b.get("reveals") or {})
    return b
