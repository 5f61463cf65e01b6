"""Verification across hardware: replay on another machine's kernels, compare within a calibrated tolerance, and
settle a disagreement by bisection down to one optimizer step that a referee replays.

Bit-for-bit replay (:mod:`node.replay`) needs the verifier to run the provider's exact kernels. Across hardware it
does not hold: another GPU, a CPU, or the same math cut into micro-batches (a verifier with less memory) sums in
another order, and float32 rounding differs in the last bits, which training then amplifies. Here:

* an **execution plan** (:class:`Plan`) is *how* a machine runs a spec: device and micro-batches (gradient
  accumulation). It never changes *what* is computed: a plan with one micro-batch on the CPU is the provider's
  trainer bit for bit;
* :func:`distance` compares two training states group by group (weights, first moments, second moments): relative
  L2 distance in float64, the worst group counts; step counters must be equal;
* a :class:`Tolerance` says how far honest runs on different plans drift apart after ``k`` steps. It is
  *calibrated* (:func:`calibrate`) on honest units replayed across plans, times a safety factor;
* :func:`check_segment_across` is the verifier's check of one committed segment: the revealed start and end states
  must hash to the commitments (exact), the replay of the segment from the start on the verifier's plan must land
  within the tolerance of the end, and the replayed mean loss within the loss tolerance of the committed one;
* on a disagreement, :func:`bisect_segment` narrows it: the provider reveals its state at the midpoint (on its own
  machine, deterministic, so it can re-derive any step from the segment's start checkpoint), the verifier replays
  the first half on its plan and agrees or not, and so on down to one step ``t``. The referee
  (:func:`referee_step`) replays that single step from the provider's own revealed state and compares it with the
  provider's revealed next state. One step from identical inputs drifts ~1e-7 honestly, while a skipped, faked,
  low-precision or wrong-data step moves the state by ~1e-4 to 1e-1: that margin, not the multi-step tolerance,
  decides a slash. A verifier who disputes honest work loses the single-step replay at the referee.

A provider that does not reveal a state, or reveals one that does not hash to its commitment, loses the dispute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from node import data
from node.trainer import (  # Plan and PROVIDER_PLAN live with the trainer; they are this module's vocabulary too
    PROVIDER_PLAN,
    Plan,
    UnitSpec,
    deterministic,
    export_training_state,
    fresh_state,
    load_training_state,
    mean_loss_micro,
    place,
    plan_step,
    state_hash,
    step_batch,
)
from node.replay import claim_problem
from protocol.errors import GridMintValueError
from protocol.proof import SegmentCommit, TrainingProof, batch_digest, make_proof

State = Mapping[str, Tensor]
#: The provider's side of a dispute: its full training state *before* optimizer step ``step`` (absolute, 0-based).
RevealFn = Callable[[int], State]


class RevealPending(Exception):
    """Raised by a reveal function whose provider has been asked for the state before ``step`` but has not answered
    yet (a live dispute waits for it). Unlike any other failure to reveal, it does not count against the provider."""

    def __init__(self, step: int, more: Sequence[int] = ()) -> None:
        later = f" (then {len(more)} more: {', '.join(map(str, more))})" if more else ""
        super().__init__(f"waiting for the provider's state before step {step}{later}")
        self.step = step
        self.more = tuple(more)  # further states the referee needs, asked in turn once this one is in

GROUPS = ("model", "exp_avg", "exp_avg_sq")


def _group(name: str) -> str | None:
    if name.startswith("model."):
        return "model"
    if name.endswith(".exp_avg"):
        return "exp_avg"
    if name.endswith(".exp_avg_sq"):
        return "exp_avg_sq"
    return None  # step counters: compared exactly


# --------------------------------------------------------------------------- plans (:class:`node.trainer.Plan`)


class PlanRunner:
    """One model + AdamW for a spec on one plan, into which any training state is loaded; runs steps by index."""

    def __init__(self, spec: UnitSpec, template: State, plan: Plan = PROVIDER_PLAN) -> None:
        self.spec, self.plan = spec, plan
        with deterministic(spec.threads):
            self.model, self.opt = load_training_state(spec, template)
            place(self.model, self.opt, plan)
        self.live = export_training_state(self.model, self.opt)
        self.tokens = data.train_tokens()
        self.steps_run = 0

    def load(self, state: State) -> None:
        if set(state) != set(self.live):
            raise GridMintValueError(f"state does not fit the unit: {sorted(set(state) ^ set(self.live))}")
        with torch.no_grad():
            for name, t in self.live.items():
                t.copy_(state[name])

    def run(self, first: int, n: int) -> list[float]:
        """Train steps ``first .. first + n - 1`` in place; returns their losses."""
        losses = []
        with deterministic(self.spec.threads):
            for step in range(first, first + n):
                x, y = data.make_batch(self.tokens, step_batch(self.spec, step), self.spec.model.ctx)
                if self.plan.device != "cpu":
                    x, y = x.to(self.plan.device), y.to(self.plan.device)
                losses.append(plan_step(self.model, self.opt, x, y, self.plan))
        self.steps_run += n
        return losses

    def snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.live.items()}

    def replay(self, state: State, first: int, n: int) -> tuple[dict[str, Tensor], list[float]]:
        self.load(state)
        losses = self.run(first, n)
        return self.snapshot(), losses


# --------------------------------------------------------------------------- distance and tolerance


def distance(replayed: State, claimed: State) -> float:
    """Worst group's ``||replayed - claimed|| / ||claimed||`` (float64) over weights, first and second moments;
    ``inf`` if the states do not have the same tensors or their step counters differ."""
    return _relative(replayed, claimed, None)


def update_distance(before: State, replayed: State, claimed: State) -> float:
    """Worst group's ``||replayed - claimed|| / ||replayed - before||`` (float64): how far a claimed one-step result
    is from a replay of that step, relative to the step's own update (the referee's replay, not the claim, so a
    provider cannot widen the yardstick by claiming a bigger jump); ``inf`` if tensors or step counters differ.

    For reduced-precision jobs: bf16 matmuls on two machines disagree by ~1e-2 of an *update* (a few 1e-3 of the
    state), so a threshold relative to the state would have to sit near a skipped update; relative to the update
    a skipped step is 1.0, another batch ~0.5 or more, and honest drift stays ~30x below."""
    if set(before) != set(claimed):
        return math.inf
    return _relative(replayed, claimed, before)


def step_distance(metric: str, before: State, replayed: State, claimed: State) -> float:
    """How far a claimed one-step result is from the referee's replay of that step, by the referee ``metric``
    (:data:`REFEREE_METRICS`): :func:`distance` ("state") or :func:`update_distance` ("update")."""
    return distance(replayed, claimed) if metric == "state" else update_distance(before, replayed, claimed)


def _against(metric: str) -> str:
    """How a one-step verdict words its yardstick."""
    return ", relative to its update" if metric == "update" else ""


def _relative(replayed: State, claimed: State, before: State | None) -> float:
    """Worst group's ``||replayed - claimed||`` over ``||claimed||`` (``before`` None) or ``||replayed - before||``."""
    if set(replayed) != set(claimed):
        return math.inf
    num = dict.fromkeys(GROUPS, 0.0)
    den = dict.fromkeys(GROUPS, 0.0)
    for name, c in claimed.items():
        r = replayed[name]
        if r.shape != c.shape or (before is not None and before[name].shape != c.shape):
            return math.inf
        g = _group(name)
        if g is None:
            if not torch.equal(r.cpu(), c.cpu()):
                return math.inf
            continue
        c64, r64 = c.detach().cpu().double(), r.detach().cpu().double()
        num[g] += float((r64 - c64).pow(2).sum())
        den[g] += float((c64 if before is None else r64 - before[name].detach().cpu().double()).pow(2).sum())
    worst = 0.0
    for g in GROUPS:
        if not (math.isfinite(num[g]) and math.isfinite(den[g])):
            return math.inf
        if den[g] == 0.0:
            worst = max(worst, 0.0 if num[g] == 0.0 else math.inf)
        else:
            worst = max(worst, math.sqrt(num[g] / den[g]))
    return worst


#: How the referee measures a disputed step: ``state`` (:func:`distance`, relative to the state) or ``update``
#: (:func:`update_distance`, relative to the step's update; for bf16 jobs).
REFEREE_METRICS = ("state", "update")


@dataclass(frozen=True)
class Tolerance:
    """How far honest runs may drift apart. ``state`` maps a step count (powers of two) to the largest
    :func:`distance` a verifier accepts after that many steps (beyond it, it disputes); ``loss_micro`` bounds the
    difference of a segment's mean loss; ``referee`` is the one-step distance beyond which the referee slashes,
    measured by ``referee_metric`` (see :data:`REFEREE_METRICS`).

    The two sides are set apart on purpose: a dispute costs only replay time (and a wrong verifier its bond), so
    the verifier's table sits a few times above honest drift, tight enough to flag one low-precision step in a
    segment; a slash is irreversible, so the referee's threshold sits tens of times above honest one-step drift,
    still far below what any faked step moves the state."""

    state: tuple[tuple[int, float], ...]
    loss_micro: int
    referee: float
    factor: float = 1.0
    note: str = ""
    referee_metric: str = "state"
    #: (window length k, worst honest drift of a k-step window's mean loss in micro-nats, replayed from the
    #: provider's own state at its start): k = 1 carries no state drift in, only the forward pass's arithmetic.
    #: Empty: not calibrated (no loss scan; the referee bisects the states instead)
    loss_windows: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.referee_metric not in REFEREE_METRICS:
            raise GridMintValueError(f"referee metric must be one of {REFEREE_METRICS}, got {self.referee_metric!r}")
        steps = [k for k, _ in self.state]
        if not steps or steps != sorted(set(steps)) or steps[0] != 1:
            raise GridMintValueError(f"tolerance table needs ascending distinct step counts from 1, got {steps}")
        if any(not (math.isfinite(v) and v > 0) for _, v in self.state):
            raise GridMintValueError("tolerance values must be finite and positive")
        if not isinstance(self.loss_micro, int) or self.loss_micro < 0:
            raise GridMintValueError(f"loss_micro must be a non-negative int, got {self.loss_micro!r}")
        if not (isinstance(self.referee, float) and math.isfinite(self.referee) and self.referee > 0):
            raise GridMintValueError(f"referee threshold must be a finite positive float, got {self.referee!r}")
        ks = [k for k, _ in self.loss_windows]
        if ks and (ks != sorted(set(ks)) or ks[0] != 1 or any(not isinstance(v, int) or v < 0
                                                             for _, v in self.loss_windows)):
            raise GridMintValueError(f"loss windows need ascending distinct lengths from 1 and non-negative int "
                                     f"drifts, got {self.loss_windows!r}")

    @property
    def step_loss_micro(self) -> int | None:
        """Worst honest drift of one step's loss replayed from the provider's own state (None: not calibrated)."""
        return dict(self.loss_windows).get(1)

    def scan_loss_micro(self, chunk: int) -> int | None:
        """Worst honest drift of the mean loss of a window of at most ``chunk`` steps replayed from the provider's
        state at its start (the largest calibrated up to the first length >= ``chunk``); None if not calibrated
        that far."""
        worst = None
        for k, v in self.loss_windows:
            worst = v if worst is None else max(worst, v)
            if k >= chunk:
                return worst
        return None

    def for_steps(self, k: int) -> float:
        """Threshold after ``k`` steps: the entry of the smallest calibrated count >= k."""
        for steps, tol in self.state:
            if steps >= k:
                return tol
        raise GridMintValueError(f"tolerance calibrated up to {self.state[-1][0]} steps, not {k}")

    def to_dict(self) -> dict[str, Any]:
        return {"state": {str(k): v for k, v in self.state}, "loss_micro": self.loss_micro, "referee": self.referee,
                "factor": self.factor, "note": self.note, "referee_metric": self.referee_metric,
                "loss_windows": {str(k): v for k, v in self.loss_windows}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tolerance:
        try:
            table = tuple(sorted((int(k), float(v)) for k, v in d["state"].items()))
            windows = tuple(sorted((int(k), int(v)) for k, v in (d.get("loss_windows") or {}).items()))
            return cls(table, int(d["loss_micro"]), float(d["referee"]), float(d.get("factor", 1.0)),
                       str(d.get("note", "")), str(d.get("referee_metric", "state")), windows)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GridMintValueError(f"not a tolerance: {exc}") from exc


#: The least one-step drift the referee's line is drawn over, per metric: a calibration whose plans happened to
#: agree bit for bit (or nearly) measures ~0, and its line (factor x 0) would sit under the honest drift of runs
#: that differ at all: fp32 runs that round differently disagree by ~1 ulp of the state (2^-23 relative; ~1e-7
#: seen, :data:`REFEREE_RULE`), bf16 ones by ~1 ulp of an update (2^-8). The floors keep the line >= 64 x 2^-23
#: (7.6e-6 of the state) and >= 8 x 2^-8 (3.1e-2 of an update), still far under any faked step (>= 1e-4 of the
#: state; >= 0.5 of an update).
REFEREE_DRIFT_FLOOR = {"state": 2.0 ** -23, "update": 2.0 ** -8}


def _lengths(up_to: int) -> list[int]:
    out = [1]
    while out[-1] < up_to:
        out.append(out[-1] * 2)
    return out


@dataclass
class Calibration:
    """Raw honest drift (max over the calibration windows) per step count, and the tolerance made from it."""

    honest_max: dict[int, float]
    loss_max_micro: int
    windows: int
    tolerance: Tolerance
    referee_honest_max: float = 0.0  # worst honest one-step drift by the tolerance's referee metric
    #: worst honest drift of a window's mean loss from the provider's own state, per window length
    loss_windows: dict[int, int] = field(default_factory=dict)

    @property
    def step_loss_max_micro(self) -> int:
        """Worst honest one-step loss drift from the provider's own state."""
        return self.loss_windows.get(1, 0)


def trajectory(runner: PlanRunner, state: State, first: int, n: int) -> tuple[list[dict[str, Tensor]], list[float]]:
    """States before steps ``first .. first + n`` (n + 1 of them) and the n losses, run on ``runner``'s plan."""
    runner.load(state)
    states, losses = [runner.snapshot()], []
    for step in range(first, first + n):
        losses += runner.run(step, 1)
        states.append(runner.snapshot())
    return states, losses


def calibrate(units: Iterable[tuple[UnitSpec, State]], verifier_plans: Sequence[Plan], *,
              provider_plan: Plan = PROVIDER_PLAN, factor: float = 3.0, referee_factor: float = 64.0,
              loss_floor_micro: int = 4, referee_metric: str = "state",
              provider_runs: Sequence[tuple[Sequence[State], Sequence[float]]] | None = None,
              provider_note: str = "") -> Calibration:
    """Measure honest drift: each ``(spec, full start state)`` is trained on ``provider_plan``; then, for every
    power-of-two length ``k`` up to the segment length, every aligned window of ``k`` steps is replayed from the
    provider's state on each verifier plan and compared with where the provider got. Dispute tolerance =
    ``factor`` x the worst drift seen (per length, made non-decreasing in ``k``); loss tolerance likewise (at least
    the floor); referee threshold = ``referee_factor`` x the worst one-step drift by ``referee_metric`` (at least
    :data:`REFEREE_DRIFT_FLOOR`'s: plans that agree bit for bit measure none).
    ``provider_runs``: the provider's trajectories (states before every step, losses), one per unit, trained
    elsewhere (on other kernels: :mod:`node.foreign`) instead of here; ``provider_note`` says where."""
    if referee_metric not in REFEREE_METRICS:
        raise GridMintValueError(f"referee metric must be one of {REFEREE_METRICS}, got {referee_metric!r}")
    honest: dict[int, float] = {}
    one_step = 0.0
    loss_max, windows = 0, 0
    loss_k: dict[int, int] = {}
    units = list(units)
    if provider_runs is not None and len(provider_runs) != len(units):
        raise GridMintValueError(f"{len(provider_runs)} provider runs for {len(units)} calibration units")
    for i, (spec, start) in enumerate(units):
        if provider_runs is None:
            states, losses = trajectory(PlanRunner(spec, start, provider_plan), start, 0, spec.steps)
        else:
            states, losses = list(provider_runs[i][0]), list(provider_runs[i][1])
            if len(states) != spec.steps + 1 or len(losses) != spec.steps:
                raise GridMintValueError(f"provider run {i} has {len(states)} states and {len(losses)} losses for "
                                         f"{spec.steps} steps")
        for plan in verifier_plans:
            ver = PlanRunner(spec, start, plan)
            for k in _lengths(spec.segment_len):
                for a in range(0, spec.steps - k + 1, k):
                    got, vl = ver.replay(states[a], a, k)
                    honest[k] = max(honest.get(k, 0.0), distance(got, states[a + k]))
                    if k == 1:
                        one_step = max(one_step, step_distance(referee_metric, states[a], got, states[a + 1]))
                    dl = abs(mean_loss_micro(vl) - mean_loss_micro(losses[a:a + k]))
                    loss_max = max(loss_max, dl)
                    loss_k[k] = max(loss_k.get(k, 0), dl)
                    windows += 1
    if not honest:
        raise GridMintValueError("calibration needs at least one unit and one verifier plan")
    table, running = [], 0.0
    floor = 1e-9  # bit-identical plans measure 0: keep the table positive
    for k in sorted(honest):
        running = max(running, honest[k])
        table.append((k, factor * max(running, floor)))
    plans = ", ".join(p.label for p in verifier_plans)
    tol = Tolerance(tuple(table), max(loss_floor_micro, math.ceil(factor * loss_max)),
                    referee_factor * max(one_step, REFEREE_DRIFT_FLOOR[referee_metric]), factor,
                    f"provider {provider_plan.label}{provider_note} vs {plans}; {windows} windows; referee {referee_metric} "
                    f"x{referee_factor:g}", referee_metric, tuple(sorted(loss_k.items())))
    return Calibration(honest, loss_max, windows, tol, one_step, loss_k)


# --------------------------------------------------------------------------- the verifier's check


@dataclass(frozen=True)
class CrossVerdict:
    """``ok`` False: the replay disagrees beyond tolerance (``kind`` "state" or "loss": go to bisection / referee)
    or the claim is wrong on its face (``kind`` "claim": hashes or data order; no replay needed)."""

    ok: bool
    index: int
    kind: str
    distance: float
    threshold: float
    loss_delta_micro: int
    reason: str
    replayed_hash: str | None = None  # hash of the state the replay reached (never equal to the claim across plans)
    # how far past its tolerance the disagreement is (state distance / its tolerance, or loss delta / the loss
    # tolerance; inf for a claim wrong on its face): a verifier bonds an accusation only when it is far past
    margin: float = math.nan

    @property
    def state_over(self) -> float:
        """How many times its tolerance the replayed state landed off the committed end."""
        return _times(self.distance, self.threshold)


def _times(x: float, tol: float) -> float:
    """``x`` in units of ``tol`` (a zero tolerance: 0 for nothing, inf for anything)."""
    return x / tol if tol > 0 else (0.0 if x == 0 else math.inf)


def check_segment_across(spec: UnitSpec, proof: TrainingProof, seg_index: int, start: State, end: State,
                         tol: Tolerance, runner: PlanRunner) -> CrossVerdict:
    """Replay committed segment ``seg_index`` on ``runner``'s plan from the revealed ``start`` and compare with the
    revealed ``end`` (both must hash to the commitments)."""
    if not isinstance(seg_index, int) or not 0 <= seg_index < spec.n_segments:
        raise GridMintValueError(f"segment {seg_index!r} out of range: unit has {spec.n_segments} segments")
    thr = tol.for_steps(spec.segment_len)

    def verdict(ok: bool, kind: str, reason: str, d: float = math.nan, dl: int = 0,
                replayed: str | None = None) -> CrossVerdict:
        over_state, over_loss = _times(d, thr), _times(dl, tol.loss_micro)
        margin = {"claim": math.inf, "state": over_state, "loss": over_loss}.get(kind, max(over_state, over_loss))
        return CrossVerdict(ok, seg_index, kind, d, thr, dl, reason, replayed, margin)

    problem = claim_problem(spec, proof, seg_index)
    if problem is not None:
        return verdict(False, "claim", problem)
    seg = proof.segments[seg_index]
    for what, st, want in (("start", start, seg.start_hash), ("end", end, seg.end_hash)):
        got = state_hash(st)
        if got != want:
            return verdict(False, "claim", f"revealed {what} state hashes to {got}, committed {want}")
    got, losses = runner.replay(start, seg_index * spec.segment_len, spec.segment_len)
    d = distance(got, end)
    dl = abs(mean_loss_micro(losses) - seg.loss_micro)
    h = state_hash(got)
    if not d <= thr:
        return verdict(False, "state", f"replay lands {d:.3g} from the committed end (tolerance {thr:.3g})", d, dl, h)
    if dl > tol.loss_micro:
        return verdict(False, "loss", f"committed mean loss off by {dl} micro-nats (tolerance {tol.loss_micro})",
                       d, dl, h)
    return verdict(True, "ok", f"replay within tolerance ({d:.3g} <= {thr:.3g})", d, dl, h)


_CALIBRATED: dict[tuple[Any, ...], Tolerance] = {}


#: The referee's one-step test per job precision: (metric, factor over the worst honest one-step drift). fp32 drifts
#: ~3e-7 of the state per step across plans and any faked step moves it >= 1e-4: 64x. bf16 drifts up to ~3e-2 of an
#: update (``bench proof --only-cross --cross-precision bf16``) while a skipped step is 1.0 of one and another batch
#: >= 0.5: 8x leaves room on both sides. What it cannot see: a step in float8 moves ~1-5e-2 of an update, inside
#: honest bf16 drift, so a bf16 job's arithmetic is checked exactly only on the default plan. (A faked bf16 loss is
#: caught by the step-by-step scan, :func:`scan_segment`, not by this rule.)
REFEREE_RULE = {"fp32": ("state", 64.0), "bf16": ("update", 8.0)}
#: An fp32 segment's committed mean loss convicts on its own only this far past the loss tolerance (floored at one
#: micro-nat). The tolerance is calibrated on a few units and honest drift has a tail: the demo's fresh-clone CI saw
#: an honest micro-batch provider 5 micro-nats off a tolerance of 4 (and its state 10x past the state tolerance),
#: and the referee slashed it on the loss. A faked loss sits >= 1,380x past it (bench), and a loss within this
#: factor with honest states gains a cheat nothing: the states are bisected instead. The factor also grows with how
#: far the replayed *states* drifted (:func:`loss_ruling`): a chaotic stretch drifts in both (seen: an honest 40-step
#: segment 162x past the state tolerance and 60x past the loss tolerance, and one slashed on its loss in a flow
#: test), while a faked loss over honest states shows on the loss alone.
REFEREE_LOSS_FACTOR = 64.0


#: Other kernels are calibrated on at least this many units, and an fp32 job with this many times the cross-plan
#: dispute factor (3): at the cross-plan settings (2 units, 3x) a cpu verifier disputed 27 of 80 honest fp32 segments
#: trained on other kernels (worst 5.9x; ``bench proof --only-builds --build-units 20``), 3-6 of 24 still with 4 or
#: 8 units (worst 1.65x); at 3x3 on 4 units, 2 of 80 (worst 1.15x), every cheat still disputed and convicted. A bf16
#: job keeps the cross-plan factor: it disputed 2 of 80 there already, and 3x wider let 3 of 20 skipped updates and
#: every float8 step pass. Only the verifier's dispute (and the referee's first look) widens: a slash is still the
#: one-step line's.
FOREIGN_UNITS, FOREIGN_FACTOR = 4, {"fp32": 3.0, "bf16": 1.0}


def tolerance_for(spec: UnitSpec, plan: Plan, *, units: int = 2, provider_plan: Plan = PROVIDER_PLAN,
                  foreign: bool = False) -> Tolerance:
    """A verifier's tolerance for units shaped like ``spec`` (model, segment length, batch, lr, threads), calibrated
    once per process on ``units`` honest units of two segments each from fresh weights, provider plan vs ``plan``.
    The verifier's tolerance only decides whether to dispute; a slash is decided by the referee's one-step replay.
    ``foreign``: the provider runs other kernels than this machine (another CPU kind or torch build, see
    :func:`node.device.kernel_build`), so even the same plan drifts: its side of the calibration is trained on other
    kernels (:mod:`node.foreign`; a CPU ``provider_plan`` only), on :data:`FOREIGN_UNITS` units at least, its
    dispute factor :data:`FOREIGN_FACTOR` times wider (per precision)."""
    if foreign:
        units = max(units, FOREIGN_UNITS)
    key = (spec.model, spec.segment_len, spec.batch_size, spec.lr, spec.threads, spec.precision, plan, provider_plan,
           units, foreign)
    if key not in _CALIBRATED:
        from dataclasses import replace

        from node.model import init_state

        steps = 2 * spec.segment_len
        cal = [(replace(spec, job_id="gridmint-calibration", unit_id="0x" + f"{0xca11b + i:064x}", round=0,
                        shard=i % spec.n_shards, steps=steps, seed=i), 1000 + i) for i in range(units)]
        runs, note = None, ""
        if foreign:
            from node import foreign as other

            runs, build = other.trajectories(cal, provider_plan)
            note = f" on other kernels ({build})"
        metric, factor = REFEREE_RULE[spec.precision]
        _CALIBRATED[key] = calibrate([(s, fresh_state(init_state(s.model, seed))) for s, seed in cal], [plan],
                                     provider_plan=provider_plan, referee_metric=metric, referee_factor=factor,
                                     provider_runs=runs, provider_note=note,
                                     factor=3.0 * (FOREIGN_FACTOR[spec.precision] if foreign else 1.0)).tolerance
    return _CALIBRATED[key]


# --------------------------------------------------------------------------- disputes


@dataclass(frozen=True)
class Dispute:
    """Where a bisection ended: the provider claims its state goes from ``before_hash`` (before step ``step``) to
    ``after_hash`` (after it). ``provider_failed`` is set when the provider could not back its own claims."""

    unit_id: str
    segment: int
    step: int
    before_hash: str
    after_hash: str
    rounds: tuple[tuple[int, str, bool], ...]  # (step revealed, its hash, went on into the second half)
    verifier_steps: int
    provider_failed: str = ""


@dataclass(frozen=True)
class RefereeVerdict:
    fraud: bool
    step: int
    distance: float
    threshold: float
    reason: str


def _reveal(reveal: RevealFn, step: int) -> tuple[State | None, str]:
    try:
        st = reveal(step)
    except RevealPending:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to produce its own state counts against the provider
        return None, f"provider could not reveal its state before step {step}: {exc}"
    return st, ""


def bisect_segment(spec: UnitSpec, proof: TrainingProof, seg_index: int, reveal: RevealFn, tol: Tolerance,
                   runner: PlanRunner) -> Dispute:
    """Narrow a disagreement over segment ``seg_index`` to one step. ``reveal`` is the provider's answer; the
    segment's ends must hash to its commitments. Each round the provider reveals the state at the midpoint; both
    halves are replayed (on ``runner``'s plan) from their revealed starts, and the bisection goes on into the half
    that lands further past its tolerance (the first half on a tie). Following the larger disagreement, not the
    first one past the tolerance, keeps honest drift that happens to graze the tolerance in the half before a faked
    step from leading the search away from it. log2(segment_len) rounds, about 2 x ``segment_len`` replayed steps."""
    seg = proof.segments[seg_index]
    lo = seg_index * spec.segment_len
    hi = lo + spec.segment_len
    spent0 = runner.steps_run
    s_lo, why = _reveal(reveal, lo)
    s_hi, why_hi = _reveal(reveal, hi) if s_lo is not None else (None, "")
    h_lo = state_hash(s_lo) if s_lo is not None else ""
    h_hi = state_hash(s_hi) if s_hi is not None else ""
    fail = why or why_hi
    if not fail and h_lo != seg.start_hash:
        fail = f"revealed start hashes to {h_lo}, committed {seg.start_hash}"
    if not fail and h_hi != seg.end_hash:
        fail = f"revealed end hashes to {h_hi}, committed {seg.end_hash}"
    rounds: list[tuple[int, str, bool]] = []
    if not fail:
        lo, _, _, _, _, fail = _narrow(reveal, tol, runner, lo, s_lo, hi, s_hi, rounds)
        # (the ends it narrowed to: the last midpoint it went right of, and left of, hashed in their rounds)
        h_lo = next((h for _, h, right in reversed(rounds) if right), h_lo)
        h_hi = next((h for _, h, right in reversed(rounds) if not right), h_hi)
    return Dispute(spec.unit_id, seg_index, lo, h_lo, h_hi, tuple(rounds), runner.steps_run - spent0, fail)


def _narrow(reveal: RevealFn, tol: Tolerance, runner: PlanRunner, lo: int, s_lo: State, hi: int, s_hi: State,
            rounds: list[tuple[int, str, bool]] | None = None) -> tuple[int, State, int, State, int, str]:
    """Bisect the steps ``lo``..``hi`` between two of the provider's states down to one: each round the provider
    reveals the midpoint, both halves are replayed from their starts, and the search goes on into the half further
    past its tolerance (the first on a tie). Returns (lo, its state, hi, its state, the step the provider could not
    reveal, why; "" if it revealed every one). ``rounds`` gets (midpoint, its hash, whether the search went right)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s_mid, why = _reveal(reveal, mid)
        if s_mid is None:
            return lo, s_lo, hi, s_hi, mid, why
        left, _ = runner.replay(s_lo, lo, mid - lo)
        right, _ = runner.replay(s_mid, mid, hi - mid)
        go_right = distance(right, s_hi) / tol.for_steps(hi - mid) > distance(left, s_mid) / tol.for_steps(mid - lo)
        if rounds is not None:
            rounds.append((mid, state_hash(s_mid), go_right))  # True: the first half agreed better than the second
        if go_right:
            lo, s_lo = mid, s_mid
        else:
            hi, s_hi = mid, s_mid
    return lo, s_lo, hi, s_hi, lo, ""


def _one_step(tol: Tolerance, runner: PlanRunner, t: int, before: State, after: State, claim: str) -> RefereeVerdict:
    """The referee's one-step rule: step ``t`` replayed from the provider's ``before`` lands within ``tol.referee``
    of its ``after`` (``claim``: how the verdict names that state), or it is fraud."""
    got, _ = runner.replay(before, t, 1)
    d = step_distance(tol.referee_metric, before, got, after)
    if d > tol.referee:
        return RefereeVerdict(True, t, d, tol.referee, f"step {t} replays {d:.3g} away from {claim} (> "
                                                       f"{tol.referee:.3g}{_against(tol.referee_metric)})")
    return RefereeVerdict(False, t, d, tol.referee, f"step {t} replays within {d:.3g} <= {tol.referee:.3g}")


def referee_step(spec: UnitSpec, dispute: Dispute, reveal: RevealFn, tol: Tolerance, runner: PlanRunner) -> RefereeVerdict:
    """Replay the single disputed step from the provider's own revealed state and compare with its revealed next
    state (both must hash to what it said during the bisection). Fraud when it cannot back its claim or the step
    lands beyond the referee's one-step threshold."""
    t = dispute.step
    thr = tol.referee
    if dispute.provider_failed:
        return RefereeVerdict(True, t, math.inf, thr, dispute.provider_failed)
    before, why = _reveal(reveal, t)
    after, why2 = _reveal(reveal, t + 1) if before is not None else (None, "")
    if before is None or after is None:
        return RefereeVerdict(True, t, math.inf, thr, why or why2)
    if state_hash(before) != dispute.before_hash or state_hash(after) != dispute.after_hash:
        return RefereeVerdict(True, t, math.inf, thr, "revealed states do not match the hashes of the bisection")
    v = _one_step(tol, runner, t, before, after, "the provider's claim")
    return v if v.fraud else replace(v, reason=f"{v.reason}: the dispute was wrong")


def referee_loss(spec: UnitSpec, proof: TrainingProof, seg_index: int, start: State, tol: Tolerance,
                 runner: PlanRunner) -> RefereeVerdict:
    """A dispute over a committed mean loss (states agree): the referee replays the segment and compares."""
    seg = proof.segments[seg_index]
    if state_hash(start) != seg.start_hash:
        return RefereeVerdict(True, seg_index * spec.segment_len, math.inf, REFEREE_LOSS_FACTOR * max(1, tol.loss_micro),
                              "revealed start is not the committed one")
    _, losses = runner.replay(start, seg_index * spec.segment_len, spec.segment_len)
    return loss_ruling(spec, seg_index, tol, abs(mean_loss_micro(losses) - seg.loss_micro))


def loss_ruling(spec: UnitSpec, seg_index: int, tol: Tolerance, dl: int, state_over: float = 0.0) -> RefereeVerdict:
    """The referee's rule on a segment whose replayed mean loss is ``dl`` micro-nats off the committed one, its
    replayed end state ``state_over`` times its state tolerance off the committed one: the loss convicts on its own
    only past ``REFEREE_LOSS_FACTOR`` x the loss tolerance x ``max(1, state_over)`` (honest chaotic drift moves the
    loss with the states; a bad state is left to the bisection)."""
    scale = max(1.0, state_over) if math.isfinite(state_over) else math.inf
    thr = REFEREE_LOSS_FACTOR * max(1, tol.loss_micro) * scale
    if tol.referee_metric != "state":
        # bf16 losses drift across plans by hundreds to thousands of micro-nats with a heavy tail (a provider was
        # disputed at 2x a tolerance calibrated on two units): not evidence to slash on; the states decide
        return RefereeVerdict(False, seg_index * spec.segment_len, float(dl), thr,
                              f"committed mean loss off by {dl} micro-nats: a {spec.precision} loss across plans is "
                              f"not evidence on its own: the steps are scanned, or the states bisected")
    if dl > thr:
        return RefereeVerdict(True, seg_index * spec.segment_len, float(dl), thr,
                              f"committed mean loss off by {dl} micro-nats (tolerance {tol.loss_micro}, the referee "
                              f"convicts past {thr:g})")
    return RefereeVerdict(False, seg_index * spec.segment_len, float(dl), thr,
                          f"committed mean loss off by {dl} micro-nats, within the referee's {thr:g}: the states are "
                          f"bisected")


#: A loss dispute the states do not settle (they agree within the tolerance; the committed mean loss does not, and
#: not far enough for :func:`loss_ruling`) is settled step by step (:func:`scan_segment`): each step is replayed from
#: the provider's own revealed state before it, so a replayed loss differs from an honest one only by one forward
#: pass's arithmetic across plans, no drift carried in (measured: 1 micro-nat in fp32 and in bf16 between cpu and
#: cpu/mb2 on the default model, whose bf16 segment means drift ~95; 66 in fp32 and 238 in bf16 between an H200 and
#: the CPU on the cross-plan bench's model). The mean of a scan's per-step differences is at most its worst step's
#: difference (plus rounding), so the mean convicts past this factor x the worst one-step (one-chunk) loss drift seen
#: in calibration, and never below ``REFEREE_SCAN_FLOOR_MICRO`` (integer rounding; a calibration that saw no drift).
#: A bf16 loss faked by 3% on one step of 16 moved the mean ~6,000 micro-nats on the H200: 3.2x this line, when 64x
#: the drift (the line before) let it through at 0.39x; honest scans there came within 23 micro-nats.
REFEREE_SCAN_FACTOR = 8.0
REFEREE_SCAN_FLOOR_MICRO = 64
#: A chunked scan's window of several steps, judged on its own against the losses submitted for it, convicts only past
#: this many times the line: after its first step it carries drift of its own (honest bf16 2-step windows, cpu/mb2
#: against cpu, reached 1.7x the worst seen in calibration over 120 scans; the segment's mean, which averages them,
#: stays further inside). A one-step fake still lands far past it (a 3% fake on a ~5-nat loss: ~75,000 micro-nats
#: in a 2-step window).
REFEREE_SCAN_WINDOW_MARGIN = 2.0


def scan_line(drift: int) -> float:
    """The micro-nats off the committed mean loss past which a loss scan convicts, given the worst honest drift of
    a scanned window's mean loss calibrated for its length (``Tolerance.scan_loss_micro``)."""
    return max(float(REFEREE_SCAN_FLOOR_MICRO), REFEREE_SCAN_FACTOR * drift)


#: At most this many states are asked of a provider for one loss scan: a segment longer than that is scanned in
#: chunks of a power-of-two length, each replayed from the provider's state at its start (``scan_chunk``).
MAX_SCAN_REVEALS = 15


def scan_chunk(segment_len: int) -> int:
    """The steps replayed per revealed state in a loss scan of a ``segment_len``-step segment: 1 (every step from
    the provider's own state) up to ``MAX_SCAN_REVEALS + 1`` steps, else the smallest power of two that keeps the
    reveals within ``MAX_SCAN_REVEALS``."""
    c = 1
    while -(-segment_len // c) - 1 > MAX_SCAN_REVEALS:
        c *= 2
    return c


def can_scan(spec: UnitSpec, tol: Tolerance) -> bool:
    """Whether ``tol`` was calibrated for a loss scan of ``spec``'s segments."""
    return tol.scan_loss_micro(scan_chunk(spec.segment_len)) is not None


def scan_segment(spec: UnitSpec, proof: TrainingProof, seg_index: int, reveal: RevealFn, tol: Tolerance,
                 runner: PlanRunner, step_losses: Sequence[float] | None = None) -> RefereeVerdict:
    """Settle a dispute over segment ``seg_index``'s committed mean loss step by step: the provider reveals its state
    before every step of the segment (before every ``scan_chunk`` steps of a long one; its ends must hash to the
    commitments), the referee replays each step (chunk) from the provider's own state on ``runner``'s plan and
    averages the losses it got; one step at a time it also checks each step lands where the provider's next state
    is (the referee's one-step rule, as after a bisection). Fraud when the provider cannot back a state, a step lands
    past the one-step threshold, or the mean is further off the committed one than :func:`scan_line` of the
    calibrated drift of a chunk's mean loss. Given ``step_losses`` (the segment's per-step losses the provider
    submitted and signed with its proof, checked against its commitments by
    :func:`protocol.proof.check_step_losses`), the scan is also judged one step (chunk) at a time, each window's
    replayed mean loss against the mean of the losses submitted for it: a loss faked on one step then stands out by
    its full size (1/chunk of it in a chunked scan) instead of 1/L of it in the segment's mean. Costs at most
    ``MAX_SCAN_REVEALS`` reveals and one replay of the segment; while states are missing it raises
    :class:`RevealPending` for all of them (the marketplace's resumable flow asks for them in turn and rules once
    they are all in)."""
    chunk = scan_chunk(spec.segment_len)
    drift = tol.scan_loss_micro(chunk)
    if drift is None:
        raise GridMintValueError(f"this tolerance has no calibrated loss drift for {chunk}-step windows: a loss scan "
                                 f"needs one")
    seg = proof.segments[seg_index]
    lo, hi = seg_index * spec.segment_len, (seg_index + 1) * spec.segment_len
    points = list(range(lo, hi, chunk)) + [hi]
    thr = scan_line(drift)
    if step_losses is not None and len(step_losses) != hi - lo:
        raise GridMintValueError(f"segment {seg_index} has {hi - lo} steps, got {len(step_losses)} step losses")
    states: list[State] = []
    missing: list[int] = []
    for t in points:
        try:
            st, why = _reveal(reveal, t)
        except RevealPending:
            missing.append(t)  # every state still missing is asked for at once: one ruling when all are in
            continue
        if st is None:
            return RefereeVerdict(True, t, math.inf, thr, why)
        states.append(st)
    if missing:
        raise RevealPending(missing[0], missing[1:])
    for at, st, want in ((lo, states[0], seg.start_hash), (hi, states[-1], seg.end_hash)):
        if state_hash(st) != want:
            return RefereeVerdict(True, at, math.inf, thr, f"the revealed state before step {at} is not the committed one")
    losses: list[float] = []
    worst_step, worst_rel = 0, 0.0  # the largest window's loss difference judged (step_losses), and as a distance
    adrift: list[tuple[float, int]] = []  # chunks whose replay lands past the tolerance from the next state revealed
    for i, (a, b) in enumerate(zip(points, points[1:])):
        got, chunk_losses = runner.replay(states[i], a, b - a)
        if chunk > 1 and (over := distance(got, states[i + 1]) / tol.for_steps(b - a)) > 1.0:
            adrift.append((over, i))
        if chunk == 1:
            d = step_distance(tol.referee_metric, states[i], got, states[i + 1])
            if d > tol.referee:
                return RefereeVerdict(True, a, d, tol.referee, f"step {a} replays {d:.3g} away from the provider's "
                                                               f"revealed next state (> {tol.referee:.3g}"
                                                               f"{_against(tol.referee_metric)})")
        if step_losses is not None:  # each window (step, or chunk) against the losses the provider submitted for it
            dl = abs(mean_loss_micro(chunk_losses) - mean_loss_micro([float(x) for x in step_losses[a - lo:b - lo]]))
            line = thr if b - a == 1 else REFEREE_SCAN_WINDOW_MARGIN * thr
            worst_step, worst_rel = max(worst_step, dl), max(worst_rel, dl * thr / line)  # against ``thr``
            if dl > line:
                what = f"step {a}'s loss is" if b - a == 1 else f"steps {a}-{b - 1}'s mean loss is"
                return RefereeVerdict(True, a, float(dl), line,
                                      f"replayed from the provider's own state, {what} {dl} micro-nats off the "
                                      f"{'one' if b - a == 1 else 'mean of those'} it submitted (honest drift <= "
                                      f"{drift}; the referee convicts past {line:g})")
        losses += chunk_losses
    dl = abs(mean_loss_micro(losses) - seg.loss_micro)
    how = "step by step" if chunk == 1 else f"{chunk} steps at a time"
    if dl > thr:
        return RefereeVerdict(True, lo, float(dl), thr,
                              f"replayed {how} from the provider's own states, segment {seg_index}'s mean loss is "
                              f"{dl} micro-nats off the committed one (honest drift <= {drift}; the referee convicts "
                              f"past {thr:g})")
    # The states revealed inside the segment commit to nothing: a chunk replayed from one must land where the next
    # one is (the last, on the committed end), or the provider made them up, say to back losses it faked (a review
    # showed crafted states clearing a faked loss in every chunked scan). A chunk past its multi-step tolerance is
    # not evidence on its own (honest chaotic drift): it is bisected to one step, judged by the one-step rule.
    for over, i in sorted(adrift, reverse=True):
        sv = _bisect_chunk(reveal, tol, runner, points[i], states[i], points[i + 1], states[i + 1])
        if sv.fraud:
            return replace(sv, reason=f"chunk {points[i]}-{points[i + 1] - 1} replayed {over:.3g}x its tolerance "
                                      f"away from the provider's next revealed state; bisected: {sv.reason}")
    each = ("" if step_losses is None else f", each step's within {worst_step}" if chunk == 1
            else f", each {chunk}-step window's within {worst_step} (the line {REFEREE_SCAN_WINDOW_MARGIN * thr:g})")
    return RefereeVerdict(False, lo, float(max(dl, worst_rel)), thr,
                          f"replayed {how} from the provider's own states, segment {seg_index}'s mean loss is within "
                          f"{dl}{each} <= {thr:g} micro-nats of the committed one")


def _bisect_chunk(reveal: RevealFn, tol: Tolerance, runner: PlanRunner, lo: int, s_lo: State, hi: int,
                  s_hi: State) -> RefereeVerdict:
    """Narrow the steps ``lo``..``hi`` between two states the provider revealed to one step, as
    :func:`bisect_segment` narrows a segment (into the half further past its tolerance), asking the provider for the
    states in between (:class:`RevealPending` while missing), and judge that step by the referee's one-step rule:
    fraud if it lands past ``tol.referee`` from the provider's own next state, or the provider cannot reveal one."""
    lo, s_lo, _, s_hi, missing, why = _narrow(reveal, tol, runner, lo, s_lo, hi, s_hi)
    if why:
        return RefereeVerdict(True, missing, math.inf, tol.referee, why)
    return _one_step(tol, runner, lo, s_lo, s_hi, "the provider's revealed next state")


# --------------------------------------------------------------------------- the provider's side


@dataclass
class Revealer:
    """An honest provider's answer in a dispute: re-derives its state before any step of a segment by re-running
    its own plan (deterministic on its machine) from the segment-start checkpoint it kept. Caches what it ran."""

    spec: UnitSpec
    runner: PlanRunner
    seg_starts: Mapping[int, State]  # segment index -> full training state at its start (the checkpoints it kept)
    cache: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    def __call__(self, step: int) -> State:
        if not isinstance(step, int) or not 0 <= step <= self.spec.steps:
            raise GridMintValueError(f"step {step!r} out of range")
        if step in self.cache:
            return self.cache[step]
        seg = min(step // self.spec.segment_len, self.spec.n_segments - 1)
        first = seg * self.spec.segment_len
        base = max((s for s in self.cache if first <= s <= step), default=None)
        state = self.cache[base] if base is not None else self.seg_starts[seg]
        got, _ = self.runner.replay(state, base if base is not None else first, step - (base if base is not None else first))
        self.cache[step] = got
        return got


class RecordedReveal:
    """A provider that answers from a recorded trajectory (``states[i]`` = its state before step i): how a cheat
    answers when it sticks to what it really computed; ``lie`` overrides chosen steps (an adaptive liar)."""

    def __init__(self, states: Sequence[State], lie: Mapping[int, State] | None = None) -> None:
        self.states, self.lie = states, dict(lie or {})

    def __call__(self, step: int) -> State:
        return self.lie.get(step, self.states[step])


def record_policy(spec: UnitSpec, start: State, policy: Callable[..., float] | None = None, *,
                  first_state: State | None = None, plan: Plan = PROVIDER_PLAN,
                  ) -> tuple[list[dict[str, Tensor]], list[float], TrainingProof]:
    """Run ``policy`` (a :data:`node.prover.StepPolicy`: honest or a cheat; None: honest steps on ``plan``) over
    the unit, keeping the state before every step (small models only: tests and benchmarks) and the proof it would
    commit: the states it really holds, except that segment 0 claims the honest start (``first_state`` is where a
    cheat that replays an old result really began). A cheat policy gets the batch on the plan's device (the
    plan's micro-batches are the honest steps' business: a cheat's steps are its own)."""
    runner = PlanRunner(spec, fresh_state(start), plan)
    claimed0 = fresh_state(start)
    if first_state is not None:
        runner.load(first_state)
    states, losses = [runner.snapshot()], []
    with deterministic(spec.threads):
        for step in range(spec.steps):
            x, y = data.make_batch(runner.tokens, step_batch(spec, step), spec.model.ctx)
            x, y = x.to(plan.device), y.to(plan.device)
            if policy is None:
                losses.append(plan_step(runner.model, runner.opt, x, y, plan))
            else:
                losses.append(policy(spec, step, runner.model, runner.opt, x, y))
            states.append(runner.snapshot())
    hashes = [state_hash(claimed0)] + [state_hash(states[(s + 1) * spec.segment_len]) for s in range(spec.n_segments)]
    commits = []
    for s in range(spec.n_segments):
        a = s * spec.segment_len
        batches = [(t, step_batch(spec, t)) for t in range(a, a + spec.segment_len)]
        commits.append(SegmentCommit(s, hashes[s], hashes[s + 1], batch_digest(batches),
                                     mean_loss_micro(losses[a:a + spec.segment_len])))
    proof = make_proof(unit_id=spec.unit_id, spec_hash=spec.spec_hash(), seed=spec.seed, steps=spec.steps,
                       segment_len=spec.segment_len, segments=commits)
    return states, losses, proof
