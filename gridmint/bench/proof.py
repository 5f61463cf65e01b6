"""``gridmint bench proof``: does proof-of-training catch cheats cheaply and never slash an honest GPU?

What runs (all real training and real replays on this machine; the trials only re-draw the challenge randomness):

1. For each adversary, a pool of cheating units of ``--steps`` one-step segments is trained, and *every* committed
   segment is re-executed by the live verifier's replay (:func:`node.replay.replay_state`) from the state the cheater reveals for it: that
   gives each segment's real verdict.
2. ``--trials`` trials per adversary: a new provider posts a stake of ``--stake-units`` x the unit price and submits
   cheating units; each unit is checked at the standard level (fresh challenge seed per unit; plus its update
   outliers, measured on the states it would upload, as the marketplace does). A trial counts as
   caught if a challenge hits a failing segment before the provider has been paid for more units than its stake
   covers (pay follows verification, so that is within ``stake_units + 1`` units). The same trials again for a
   trusted host (``trusted``): sampled at half the rate, from the smallest stake at which the marketplace gives it
   that discount on this unit shape (``protocol.verification.sampling_rate``). And again with every check going to
   a verifier colluding with the cheat (``colluding_caught_rate``): it passes them all and tells canaries apart, so
   only the referee's audit of a pass (``AUDIT_RATE`` of them, drawn per pass) catches it, the cheat being its
   plan's only provider (so its verifier's share of its checking is no larger than of the plan's, and the plan's
   checking counts as ``AUDIT_PEERS`` providers').
   ``colluding_by_providers``: the cheat as one of 2, 5 or 10 providers of equal work on its plan, checked by
   ``HONEST_VERIFIERS`` honest verifiers and the ring, which takes the share of the cheat's checks (of
   ``COLLUDING_SHARES``) that suits it best and checks nothing else; honest verifiers check the rest, and the
   ring's passes are audited at the odds the marketplace draws (``protocol.verification.audit_rate``: its share of
   the cheat's verdicts over its share of the plan's). ``colluding_ring_slashed_rate`` (and ``ring_slashed_rate``
   by providers, at the share that suits the ring best for it): of the trials in which the ring passed a faked
   segment, the share in which that cost it its stake (replaying on its friend's own plan and kernels): an audit of
   its pass caught the cheat, or the conviction's audits
   of the passes standing in the cheat's units (``checking._audit_passes``) find one it passed on a faked segment
   among the cheat's last ``CONVICTION_AUDITS`` verdicts; a cheat not caught within the stake horizon leaves its ring
   unscathed too. ``honest_audit_rate``: those odds averaged over the passes
   of an honest market (checks spread at random) of 10 providers on the plan (``honest_audit_rate_by_providers``:
   of 1, 2, 5, 10: a thin market is audited more); ``audit_cost_ratio``: the referee's audit replays over the
   provider's compute (``audit_cost_ratio_by_providers``: the same by providers on the plan).
3. ``--honest-units`` short honest units, trained with 1 or 2 threads and fully replayed with the other count:
   ``false_slash`` counts units with any failing segment.
4. ``verify_cost_ratio``: compute (CPU seconds) of the standard-level verification of an honest unit of a default
   job's shape over the compute the provider needs to train it without commitments, median of interleaved pairs
   (``verify_cost_ratio_wall``: the same in wall time); ``proof_overhead``: throughput with per-step asynchronous
   commitments over throughput without, same loop, interleaved repeats; ``proof_overhead_default_job``: the
   provider's real trainer (hash + checkpoint per segment) against the same steps bare, and ``proof_stall_default_job``
   the share of its wall time its training loop spent on commitments.
5. Planted canaries (the marketplace's own, ``marketplace.canary``): an honest verifier replays forged ones (all must
   be flagged); a lazy verifier that approves everything meets its first one after a number of tasks (reported).
6. ``same_plan``: a verifier on the provider's own exact plan (``cpu/mb2``; on a GPU, the same GPU model) replays
   honest units bit for bit and detects the cheats that hide from a verifier on another plan (:func:`run_same_plan`).
7. ``cross_build``: the same plan on other kernels (a child on ATen's scalar kernels, as another CPU kind): honest
   work never convicted on a bit mismatch, cheats there still convicted (:func:`run_cross_build`).
8. ``--drift-jobs``: honest drift across plans at the demo job's shape (``--drift-shapes`` for more), every dispute
   refereed and judged for good faith, and how near the referee's loss rule came to convicting (:func:`run_drift`).

``--device cuda`` measures ``proof_overhead`` (and an honest same-device replay check) on a GPT-2-small-shaped model
with bf16 autocast and torch.compile, committing every ``--gpu-commit-every`` steps.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable

import torch

from node import adversary, checkpoint
from node import crosscheck as cc
from node.model import ModelConfig, init_state
from node.prover import PlainLoop, StepPolicy, Trace, bad_step_set, honest_step, plain_throughput, train_traced
from node.trainer import (PROVIDER_PLAN, Plan, UnitSpec, check_start, deterministic, fresh_state,
                          kept_training_state, load_training_state, model_only, place, run_segment, state_hash,
                          train_unit, update_norm)
from node.device import kernel_build, local_plan
from node.statehash import Layout
from node.replay import check_segment, check_state, replay_state
from protocol import verification as vp
from protocol.proof import TrainingProof


def _spec(cfg: ModelConfig, steps: int, idx: int, threads: int = 1, batch: int = 4) -> UnitSpec:
    return UnitSpec(job_id="bench-proof", unit_id="0x" + f"{idx:064x}", round=0, shard=idx % 4, n_shards=4, model=cfg,
                    steps=steps, segment_len=1, batch_size=batch, lr=3e-3, seed=1000 + idx, threads=threads)


class _Updates:
    """Each segment's update as the marketplace measures it on the uploaded checkpoints: ``see`` every segment's start
    state in order, then the final state."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self._prev: dict[str, torch.Tensor] | None = None

    def see(self, state: Any) -> None:
        cur = {k: v.detach().clone() for k, v in model_only(state).items()}
        if self._prev is not None:
            self.norms.append(update_norm(self._prev, cur))
        self._prev = cur


def traced_with_verdicts(spec: UnitSpec, start: dict[str, torch.Tensor], policy: StepPolicy,
                         first_state: dict[str, torch.Tensor] | None = None,
                         verify_threads: int | None = None,
                         norms: list[float] | None = None) -> tuple[Trace, list[bool]]:
    """Train under ``policy`` and replay every segment from the state the provider would reveal for it. ``norms``,
    if given, receives each segment's update as the marketplace measures it on the uploaded checkpoints."""
    claimed0 = fresh_state(start)
    vspec = replace(spec, threads=verify_threads) if verify_threads else spec
    seen: list[tuple[str, str, int]] = []
    held: list[dict[str, torch.Tensor]] = []
    updates = _Updates() if norms is not None else None

    def replay(s: int, state: dict[str, torch.Tensor]) -> tuple[str, str, int]:  # the live verifier's replay
        r = replay_state(vspec, s, state)
        return r.start_hash, r.end_hash, r.loss_micro

    def tap(s: int, live: Any) -> None:
        revealed = claimed0 if s == 0 else live  # the state whose hash the cheater committed as segment s's start
        if updates is not None:
            updates.see(revealed)
        if verify_threads:  # replay after training: switching thread counts every step costs more than the step
            held.append({k: v.detach().clone() for k, v in revealed.items()})
        else:
            seen.append(replay(s, revealed))

    trace = train_traced(spec, start, policy, tap=tap, first_state=first_state)
    if updates is not None and norms is not None:
        updates.see(trace.final_state)
        norms.extend(updates.norms)
    for s, state in enumerate(held):
        seen.append(replay(s, state))
    verdicts = [(h, end, loss) == (c.start_hash, c.end_hash, c.loss_micro) for (h, end, loss), c in
                zip(seen, trace.proof.segments)]
    return trace, verdicts


def _adversaries(frac: float) -> dict[str, tuple[Callable[[UnitSpec], StepPolicy], str, bool]]:
    """name -> (policy factory, what it touches, replay-old start swap)."""
    return {
        "skip_steps": (lambda s: adversary.SkipSteps(bad_step_set(s, frac, 1)), f"{frac:.0%} of steps", False),
        "extrapolate": (lambda s: adversary.Extrapolate(bad_step_set(s, frac, 5)), f"{frac:.0%} of steps", False),
        "other_data": (lambda s: adversary.OtherData(bad_step_set(s, frac, 2)), f"{frac:.0%} of steps", False),
        "fake_loss": (lambda s: adversary.FakeLoss(bad_step_set(s, frac, 3)), f"{frac:.0%} of steps", False),
        "low_precision": (lambda s: adversary.LowPrecision(bad_step_set(s, frac, 4)), f"{frac:.0%} of steps", False),
        "random_weights": (lambda s: adversary.RandomWeights(), "all steps", False),
        "copied_weights": (lambda s: adversary.OtherData(frozenset(range(s.steps))), "all steps", False),
        "replay_old": (lambda s: honest_step, "the start (old checkpoint, then honest steps)", True),
    }


def verify_cost(spec: UnitSpec, start: dict[str, torch.Tensor], rate: Any, repeats: int, log: Callable[[str], None],
                what: str, detail: dict[str, Any] | None = None) -> tuple[float, float, int]:
    """(verifier compute for the standard level's challenges of one honest unit / provider compute to train it
    without commitments, the same in wall time, number of challenges). Compute is this process's CPU time, wall time
    is reported beside it; each is the median of ``repeats`` provider/verifier pairs, each pair interleaved: the
    unit's training in as many stretches as there are checks, a check after each (timed apart), so that both are
    measured over the same minutes of a shared machine whose speed drifts (a neighbour's load, its clock). The verifier runs the live verifier's check (:func:`node.replay.
    check_state`: the claim's own checks, the revealed start state's hash, the replay, the end state's hash) on the
    model and optimizer it keeps per job shape; building that pair once (logged) is not charged to every unit.
    ``detail``, if given, gets where a replayed segment's compute goes, in provider steps (the ratio's unit):
    ``verify_segment_steps`` all of it, ``verify_load_steps`` copying the revealed start state into the kept pair
    (whose state lies in the state hash's layout: :class:`node.trainer.KeptTrainingState`), ``verify_digest_steps``
    one digest of that pair's state (a check takes two: the revealed start's and the replayed end's), measured here
    on the same states; and ``state_hash_vs_sha256``, a state hash with its copy against bare SHA-256."""
    updates = _Updates()  # each segment's update, as the marketplace measures it (not timed)
    trace = train_traced(spec, start, tap=lambda s, live: updates.see(live))
    updates.see(trace.final_state)
    picks = vp.choose_challenges(spec.unit_id, [c.loss_micro for c in trace.proof.segments], rate, b"cost",
                                 updates.norms)
    kept: dict[int, dict[str, torch.Tensor]] = {}
    claimed0 = fresh_state(start)

    def keep(s: int, live: Any) -> None:  # the provider re-deriving the challenged states (its cost, not timed)
        if s in picks:
            kept[s] = {k: v.detach().clone() for k, v in (claimed0 if s == 0 else live).items()}

    again = train_traced(spec, start, tap=keep)
    assert again.proof == trace.proof, "honest training is not deterministic"
    cpu_ratios, wall_ratios, oks = [], [], []
    b0 = time.process_time()
    with deterministic(spec.threads):
        kept_training_state(spec, claimed0)  # the verifier's model + optimizer for this job shape, built once
    build_s = time.process_time() - b0
    step_times = []
    for _ in range(repeats):
        # the provider's unit and the verifier's checks interleaved (a stretch of plain training, one check, ...):
        # both timed over the same stretch of time, so a neighbour's load or a clock change weighs on both alike
        loop, times = PlainLoop(spec, start), {"pc": 0.0, "pw": 0.0, "vc": 0.0, "vw": 0.0}
        cuts = [round(spec.steps * (i + 1) / len(picks)) for i in range(len(picks))]
        for s, cut in zip(picks, cuts):
            w0, c0 = time.perf_counter(), time.process_time()
            loop.steps(cut - loop.done)
            w1, c1 = time.perf_counter(), time.process_time()
            oks.append(check_state(spec, trace.proof, s, kept[s]).ok)
            times["pc"] += c1 - c0
            times["pw"] += w1 - w0
            times["vc"] += time.process_time() - c1
            times["vw"] += time.perf_counter() - w1
        assert loop.done == spec.steps
        cpu_ratios.append(times["vc"] / times["pc"])
        wall_ratios.append(times["vw"] / times["pw"])
        step_times.append(times["pc"] / spec.steps)
    ratio, wall = round(statistics.median(cpu_ratios), 4), round(statistics.median(wall_ratios), 4)
    step_s = statistics.median(step_times)  # one provider step, CPU s
    loads, digests, hashes, sha = [], [], [], []
    with deterministic(spec.threads):
        pair = kept_training_state(spec, claimed0)
        for s in picks:  # a check's load and one of its digests, on the states the checks loaded
            c0 = time.process_time()
            pair.load(spec, kept[s])
            c1 = time.process_time()
            pair.state_hash()
            loads.append(c1 - c0)
            digests.append(time.process_time() - c1)
    for s in picks:  # one state hash on its own (its copy included), on the same states; and SHA-256 of the bytes
        c0 = time.process_time()
        state_hash(kept[s])
        hashes.append(time.process_time() - c0)
        layout = Layout.of(kept[s])  # the buffer the state hash hashed, laid out again (untimed)
        packed = torch.zeros(layout.total, dtype=torch.uint8)
        layout.pack(kept[s], packed)
        c0 = time.process_time()
        hashlib.sha256(memoryview(packed.numpy())).digest()
        sha.append(time.process_time() - c0)
    seg_steps = statistics.median(cpu_ratios) * spec.steps / len(picks)
    load_steps, digest_steps = statistics.median(loads) / step_s, statistics.median(digests) / step_s
    log(f"verify cost ({what}): {len(picks)} segments replayed per unit of {spec.steps} steps: compute "
        f"{[round(r, 4) for r in cpu_ratios]} -> {ratio}, wall {[round(r, 4) for r in wall_ratios]} -> {wall} "
        f"(all ok: {all(oks)}; the verifier's model + optimizer for this shape built once in {build_s * 1e3:.0f} ms "
        f"CPU, {build_s / step_s:.2f} provider steps); a replayed segment of "
        f"{spec.segment_len} step(s) costs {seg_steps:.3f} provider steps ({step_s * 1e3:.2f} ms CPU each), of which "
        f"loading the revealed state {load_steps:.3f} ({statistics.median(loads) * 1e3:.2f} ms CPU) and the two "
        f"digests of the loaded and the replayed state {2 * digest_steps:.3f} ({statistics.median(digests) * 1e3:.2f} "
        f"ms CPU each)")
    log(f"the state hash (BLAKE3, with its copy into the layout) {statistics.median(hashes) * 1e3:.2f} ms CPU; "
        f"bare SHA-256 of the same bytes {statistics.median(sha) * 1e3:.2f} ms")
    if detail is not None:
        detail.update({"verify_segment_steps": round(seg_steps, 3), "verify_load_steps": round(load_steps, 3),
                       "verify_digest_steps": round(digest_steps, 3),
                       # > 1: the state hash costs less than SHA-256 alone would, before any copy (v2's hash)
                       "state_hash_vs_sha256": round(statistics.median(sha) / statistics.median(hashes), 2)})
    assert all(oks), "an honest unit failed verification"
    return ratio, wall, len(picks)


def _bare_unit(spec: UnitSpec, start: dict[str, torch.Tensor], plan: Plan = PROVIDER_PLAN) -> None:
    """:func:`node.trainer.train_unit` without its commitments: the same model build, placement, batches and steps,
    no state hashes and no checkpoints (the baseline of ``proof_overhead_default_job``)."""
    check_start(spec, start)
    with deterministic(spec.threads):
        model, opt = load_training_state(spec, fresh_state(start))
        place(model, opt, plan)
        for s in range(spec.n_segments):
            run_segment(spec, model, opt, s, None, plan)


def trainer_overhead(steps: int, repeats: int, plan: Plan, log: Callable[[str], None],
                     cfg: ModelConfig | None = None) -> dict[str, Any]:
    """What a provider runs on a default job (``cfg``, default ``ModelConfig()``; batch 16; a commitment +
    checkpoint every 15 steps) on ``plan``: :func:`node.trainer.train_unit` against the same steps with no
    commitments and no checkpoints, in ABBA order (this machine's speed drifts); and the trainer's own stall: the
    wall time its loop spent on commitments."""
    cfg = cfg or ModelConfig()
    jspec = replace(_spec(cfg, steps - steps % 15 or 15, 999_997, batch=16), segment_len=15)
    jstart = init_state(cfg, 7)
    jratios, stalls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            times = {}
            for which in (("bare", "proof") if r % 2 == 0 else ("proof", "bare")):
                t0 = time.perf_counter()
                if which == "bare":
                    _bare_unit(jspec, jstart, plan)
                else:
                    res = train_unit(jspec, jstart, Path(tmp) / str(r), plan=plan)
                times[which] = time.perf_counter() - t0
            jratios.append(times["bare"] / times["proof"])
            stalls.append(res.commit_s / times["proof"])
    out = {"proof_overhead_default_job": round(statistics.median(jratios), 4),
           "proof_overhead_default_job_runs": [round(r, 4) for r in jratios],
           "proof_stall_default_job": round(statistics.median(stalls), 5),
           "default_job_plan": plan.label, "default_job_steps": jspec.steps}
    log(f"proof overhead on a default job on {plan.label} (train_unit: hash + checkpoint every 15 steps, "
        f"{jspec.steps} steps): {out['proof_overhead_default_job_runs']} -> {out['proof_overhead_default_job']}; the "
        f"training loop spent {out['proof_stall_default_job']:.2%} of its wall time on commitments (median)")
    return out


TOY = ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32)  # the adversary and honest units' model
#: colluding_by_providers: the cheat as one of this many providers of equal work on its plan, checked by this many
#: honest verifiers and the ring, at the best of these shares of its checks for the ring
COLLUDING_PROVIDERS = (2, 5, 10)
HONEST_VERIFIERS = 10
COLLUDING_SHARES = (0.25, 0.5, 0.75, 1.0)
#: honest_audit_rate_by_providers: an honest market of this many providers of equal work on one plan
HONEST_PROVIDERS = (1, 2, 5, 10)


def honest_audit_rate(checks: int = 20_000, providers: int = 10, seed: str = "honest audits") -> dict[str, float]:
    """The mean audit odds (``protocol.verification.audit_rate``) of one provider's passes in an honest market of
    ``providers`` providers of equal work on one plan, each of its ``checks`` checks going to one of ``n``
    verifiers at random (for ``n`` in 2, 5, 10): the rate an honest market pays for the audits, above
    ``AUDIT_RATE`` where a verifier's share of the provider's checking is over its share of the plan's by chance.
    (The marketplace spreads a unit's checks over its verifiers, so its shares are nearer each other than at
    random.)"""
    out = {}
    for n in (2, 5, 10):
        draw, total, passes = random.Random(f"{seed}/{n}"), 0.0, 0
        window: deque[tuple[int, int]] = deque()  # the provider's recent checks: (position in the market, verifier)
        market: deque[int] = deque()  # the verifiers of the market's checks since the oldest of the window
        given, plan_given = [0] * n, [0] * n
        for i in range(checks * providers):
            v = draw.randrange(n)
            market.append(v)
            plan_given[v] += 1
            if draw.randrange(providers):
                continue  # another provider's check
            window.append((i, v))
            given[v] += 1
            if len(window) > vp.AUDIT_WINDOW:
                given[window.popleft()[1]] -= 1
            while len(market) > i - window[0][0] + 1:
                plan_given[market.popleft()] -= 1
            passes += 1
            total += vp.audit_rate(float(vp.AUDIT_RATE), given[v], len(window), plan_given[v], len(market),
                                   sum(1 for c in plan_given if c), providers)
        out[str(n)] = round(total / passes, 4)
    return out


def run_adversaries(a: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Sections 1-2: every adversary's pool of cheating units, fully replayed; the standard-level trials, and the
    trusted-host trials."""
    cfg = TOY
    start = init_state(cfg, 7)
    rate = vp.level_rate("standard")
    horizon = a.stake_units + 1
    out: dict[str, Any] = {"steps_per_unit": a.steps, "segment_len": 1, "standard_rate": float(rate),
                           "challenges_per_unit": vp.challenge_budget(a.steps, rate), "stake_units": a.stake_units,
                           "trials": a.trials, "cheat_fraction": a.fraction, "adversaries": {}}
    # a trusted host (TRUST_AFTER_UNITS units verified in a row) is sampled at half the rate only with enough stake
    # (vp.sampling_rate): the smallest stake, in unit prices, at which it gets the discount on this unit shape, and
    # how often each adversary is caught there at the halved rate
    trusted_units = next(s for s in range(a.stake_units, 100 * a.stake_units)
                         if vp.sampling_rate("standard", consecutive_verified=vp.TRUST_AFTER_UNITS, n_segments=a.steps,
                                             unit_price=1, stake=s)[1])
    trusted_rate = vp.level_rate("standard", vp.TRUST_AFTER_UNITS)
    out["trusted"] = {"stake_units": trusted_units, "rate": float(trusted_rate),
                      "challenges_per_unit": vp.challenge_budget(a.steps, trusted_rate)}
    idx = 1
    for name, (factory, touches, swap) in _adversaries(a.fraction).items():
        pool = a.pool if "steps" in touches and "all" not in touches else 1
        units = []
        t0 = time.perf_counter()
        for _ in range(pool):
            spec = _spec(cfg, a.steps, idx)
            idx += 1
            first = fresh_state(init_state(cfg, 99)) if swap else None
            norms: list[float] = []
            trace, verdicts = traced_with_verdicts(spec, start, factory(spec), first_state=first, norms=norms)
            units.append((spec, [c.loss_micro for c in trace.proof.segments], verdicts, norms))
        failing = [sum(not v for v in u[2]) for u in units]

        def trials(r: Any, h: int, tag: str) -> tuple[float, float]:
            caught_trials, units_checked, units_caught = 0, 0, 0
            for t in range(a.trials):
                for u in range(h):
                    spec, losses, verdicts, norms = units[(t + u) % len(units)]
                    picks = vp.choose_challenges(spec.unit_id, losses, r, f"{name}/{tag}{t}/{u}".encode(), norms)
                    units_checked += 1
                    if any(not verdicts[i] for i in picks):
                        units_caught += 1
                        caught_trials += 1
                        break
            return caught_trials / a.trials, round(units_caught / units_checked, 4)

        def collude_draw(t: int, u: int) -> list[int]:
            spec, losses, _, norms = units[(t + u) % len(units)]
            return vp.choose_challenges(spec.unit_id, losses, rate, f"{name}/collude{t}/{u}".encode(), norms)

        # every trial's challenges of the colluding runs, drawn once (each run re-draws only who gets them)
        collude_picks = [[collude_draw(t, u) for u in range(horizon)] for t in range(a.trials)]

        def colluding(providers: int, share: float) -> tuple[float, float, float]:
            # a verifier colluding with the cheat (it passes all it gets, and tells the canaries apart: the provider
            # knows every true state) gets ``share`` of its checks, honest verifiers the rest; the cheat is one of
            # ``providers`` providers of equal work on its plan, whose checks honest verifiers do. An honest
            # verifier's check of a faked segment catches it; the ring's pass only where the referee audits it, at
            # the odds the marketplace draws (audit_odds: the ring's share of the cheat's last AUDIT_WINDOW
            # verdicts over its share of the plan's in the same time, where it gave only its friend's). The ring
            # loses its stake (replaying on its friend's own plan and kernels) where an audit of its pass catches
            # the cheat, or where the cheat is caught otherwise after the ring passed one of its faked segments
            # among its last CONVICTION_AUDITS verdicts (in an earlier unit, or in the unit it is caught on before the
            # catch): the conviction's audit of each pass standing in its units finds it (checking._audit_passes).
            # Returns the caught rate, the unit catch rate and the ring's slashed rate: over the trials in which it
            # passed a faked segment, the share in which that cost it its stake.
            verifiers = 1 + (HONEST_VERIFIERS if providers > 1 or share < 1 else 0)
            caught_trials, units_checked, units_caught, ring_slashed, ring_faked = 0, 0, 0, 0, 0
            for t in range(a.trials):
                draw = random.Random(f"{name}/collude/{t}/{providers}/{share}")
                window: deque[bool] = deque()  # who gave each of the provider's recent verdicts (True: the ring)
                mine, given, faked_at = 0, 0, None  # verdicts given; the last one the ring passed on a fake
                for u in range(horizon):
                    verdicts = units[(t + u) % len(units)][2]
                    units_checked += 1
                    hit = audited = False
                    for i in collude_picks[t][u]:
                        ring = draw.random() < share
                        window.append(ring)
                        given += 1
                        mine += ring - (window.popleft() if len(window) > vp.AUDIT_WINDOW else 0)
                        if verdicts[i]:
                            continue
                        if not ring:
                            hit = True
                        elif draw.random() < vp.audit_rate(float(vp.AUDIT_RATE), mine, len(window), mine,
                                                           providers * len(window), verifiers, providers):
                            hit = audited = True
                        elif not hit:  # (one after the catch is not in yet: the unit goes back without it)
                            faked_at = given
                    if hit:
                        units_caught += 1
                        caught_trials += 1
                        ring_slashed += audited or (faked_at is not None and given - faked_at < vp.CONVICTION_AUDITS)
                        break
                ring_faked += audited or faked_at is not None
            return (caught_trials / a.trials, round(units_caught / units_checked, 4),
                    round(ring_slashed / ring_faked, 4) if ring_faked else 1.0)

        caught, unit_catch = trials(rate, horizon, "")
        trusted_caught, _ = trials(trusted_rate, trusted_units + 1, "trusted/")
        # the cheat alone on its plan (one of the ring's own naming), the ring its only verifier: its shares are the
        # same, and the plan counts as AUDIT_PEERS providers' work (every pass of the ring audited once it has a few)
        collude_caught, collude_unit, collude_ring = colluding(1, 1.0)
        # the cheat one of several providers on its plan, the ring at the share of its checks that suits it best
        # (taking them all raises its audit odds; taking fewer leaves more to honest verifiers); and the ring's
        # slashed rate at the share that suits it best for that
        by_providers: dict[str, Any] = {}
        for m in COLLUDING_PROVIDERS:
            runs = [colluding(m, q) + (q,) for q in COLLUDING_SHARES]
            worst = min(runs, key=lambda x: (x[0], x[1]))
            safest = min(runs, key=lambda x: x[2])
            by_providers[str(m)] = {"caught_rate": worst[0], "unit_catch_rate": worst[1], "ring_share": worst[3],
                                    "ring_slashed_rate": safest[2], "ring_slashed_share": safest[3]}
        res = {"touches": touches, "pool_units": pool, "failing_segments_per_unit": failing,
               "caught_rate": caught, "unit_catch_rate": unit_catch, "trusted_caught_rate": trusted_caught,
               "colluding_caught_rate": collude_caught, "colluding_unit_catch_rate": collude_unit,
               "colluding_ring_slashed_rate": collude_ring,
               "colluding_by_providers": by_providers, "build_s": round(time.perf_counter() - t0, 1)}
        out["adversaries"][name] = res
        log(f"{name:15s} touches {touches:45s} failing segments {failing}  caught {res['caught_rate']:.3f}  "
            f"unit catch {res['unit_catch_rate']:.3f}  trusted host caught {trusted_caught:.3f}  with a colluding "
            f"verifier (audits only) {collude_caught:.3f}, as one of 2/5/10 providers on its plan (the ring at its "
            f"best share) {'/'.join(format(v['caught_rate'], '.3f') for v in by_providers.values())}; the ring "
            f"slashed {collude_ring:.3f}, "
            f"{'/'.join(format(v['ring_slashed_rate'], '.3f') for v in by_providers.values())}  ({res['build_s']} s)")
    out["min_caught_rate"] = min(r["caught_rate"] for r in out["adversaries"].values())
    out["audit_rate"] = float(vp.AUDIT_RATE)
    out["colluding_min_caught_rate"] = min(r["colluding_caught_rate"] for r in out["adversaries"].values())
    out["colluding_min_caught_rate_by_providers"] = {
        str(m): min(r["colluding_by_providers"][str(m)]["caught_rate"] for r in out["adversaries"].values())
        for m in COLLUDING_PROVIDERS}
    out["colluding_min_ring_slashed_rate"] = min(r["colluding_ring_slashed_rate"] for r in out["adversaries"].values())
    out["colluding_min_ring_slashed_rate_by_providers"] = {
        str(m): min(r["colluding_by_providers"][str(m)]["ring_slashed_rate"] for r in out["adversaries"].values())
        for m in COLLUDING_PROVIDERS}
    out["trusted"]["min_caught_rate"] = min(r["trusted_caught_rate"] for r in out["adversaries"].values())
    log(f"trusted hosts: sampled at {float(trusted_rate):g} from {trusted_units}x the unit price staked; lowest "
        f"caught rate there {out['trusted']['min_caught_rate']:.3f}")
    return out


def run_cpu(a: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    cfg = TOY
    start = init_state(cfg, 7)
    rate = vp.level_rate("standard")
    out = run_adversaries(a, log)

    # honest units: false slashes, across thread counts (trained with t threads, replayed with the other count)
    t0 = time.perf_counter()
    false_units = outliers = 0
    for i in range(a.honest_units):
        threads = 1 + i % 2
        spec = _spec(cfg, a.honest_steps, 100_000 + i, threads=threads)
        norms: list[float] = []
        _, verdicts = traced_with_verdicts(spec, start, honest_step, verify_threads=3 - threads, norms=norms)
        false_units += not all(verdicts)
        outliers += len(vp.update_outliers(norms))  # honest segments replayed beyond the budget: cost, not risk
    out["false_slash"] = false_units
    out["honest_units"] = a.honest_units
    out["honest_segments_replayed"] = a.honest_units * a.honest_steps
    out["honest_update_outliers"] = outliers
    log(f"honest: {a.honest_units} units x {a.honest_steps} steps, every segment replayed with the other thread "
        f"count: {false_units} false slashes; {outliers} update outliers ({time.perf_counter() - t0:.0f} s)")

    # verification cost at the standard level, against the provider's plain training time for the same unit: on the
    # toy shape above, and on the shape of a default job (what a customer buys: ModelConfig(), batch 16)
    spec = _spec(cfg, a.steps, 999_999)
    out["verify_cost_ratio_toy"], _, _ = verify_cost(spec, start, rate, 3, log, "toy shape")
    dspec = _spec(ModelConfig(), a.cost_steps, 999_998, batch=16)
    out["verify_cost_ratio"], out["verify_cost_ratio_wall"], picks = verify_cost(
        dspec, init_state(ModelConfig(), 7), rate, a.cost_repeats, log, "default job shape", detail=out)
    out["verify_challenges"] = picks
    out["verify_cost_shape"] = {"model": ModelConfig().to_dict(), "batch_size": 16, "steps": a.cost_steps}

    # commitment overhead on the trainer: per-step async hashing vs none, interleaved
    ospec = replace(spec, steps=a.overhead_steps)
    ratios = []
    for _ in range(a.repeats):
        base = plain_throughput(ospec, start, commit_every=None)
        withp = plain_throughput(ospec, start, commit_every=1)
        ratios.append(withp / base)
    out["proof_overhead"] = round(statistics.median(ratios), 4)
    out["proof_overhead_runs"] = [round(r, 4) for r in ratios]
    log(f"proof overhead (commit every step, async hashing): {out['proof_overhead_runs']} -> {out['proof_overhead']}")
    out.update(trainer_overhead(a.job_steps, a.job_repeats, PROVIDER_PLAN, log))

    # lazy verifier vs planted canaries: the marketplace's own canaries (marketplace.canary.forge) cut from an honest
    # unit and really replayed by an honest verifier (every one must be flagged); a lazy verifier approves every
    # task, so its first canary (drawn at CANARY_RATE per task) exposes it
    from marketplace import canary
    from marketplace.blobs import BlobStore

    approved, planted, declined = 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        store = BlobStore(Path(tmp) / "blobs")
        for u in range(a.canary_units):  # every segment of each unit, forged and really replayed
            cspec = replace(_spec(cfg, 32, 777_000 + u), segment_len=4)
            cunit = train_unit(cspec, start, Path(tmp) / str(u))
            blobs, final = [store.put_file(p) for p in cunit.segment_paths], store.put_file(cunit.final_path)
            for seg in range(cspec.n_segments):
                fake = canary.forge(cspec, cunit.proof, seg, blobs, final, store)
                if fake is None:  # (the forgery would be the claim itself)
                    declined += 1
                    continue
                planted += 1
                approved += check_segment(cspec, TrainingProof.from_dict(fake["proof"]), seg,
                                          store.path(blobs[seg])).ok
    window = a.lazy_window
    firsts = []
    for t in range(a.trials):
        plan = vp.plant_canaries(window, f"canary/{t}".encode())
        firsts.append(plan.index(True) + 1 if any(plan) else None)
    caught = [f for f in firsts if f is not None]
    if a.cross_units:
        out["cross_plan"] = run_cross(a, log, [cc.Plan("cpu", 1), cc.Plan("cpu", 4)], cc.Plan("cpu", 2),
                                      [cc.Plan("cpu", 1), cc.Plan("cpu", 4)], cc.Plan("cpu", 2))
        out["false_slash"] += out["cross_plan"]["false_slash"]
        out["same_plan"] = run_same_plan(a, log, cc.Plan("cpu", 2))
        out["false_slash"] += out["same_plan"]["false_disputes"]  # on its own plan, a mismatch is a conviction
    if a.build_units:  # the same plan on other kernels (another CPU kind): never convicted on a bit mismatch
        out["cross_build"] = run_cross_build(a, log)
        out["false_slash"] += out["cross_build"]["false_slash"]
    out["canary_rate"] = float(vp.CANARY_RATE)
    out["lazy_verifier_window"] = window
    out["lazy_verifier_caught_rate"] = len(caught) / a.trials
    out["lazy_verifier_tasks_to_catch_median"] = statistics.median(caught) if caught else None
    out["lazy_verifier_tasks_to_catch_max"] = max(caught) if caught else None
    out["honest_verifier_canaries"] = planted
    out["honest_verifier_canary_errors"] = approved
    out["canaries_declined"] = declined  # segments marketplace.canary.forge stocks no canary for (none but the claim)
    # canaries are segments of real jobs' shape, one replay each, r/(1-r) of them per real task handed out
    out["verify_cost_ratio_with_canaries"] = round(out["verify_cost_ratio"] / (1 - float(vp.CANARY_RATE)), 4)
    # the referee's audits: one replay of a segment per audited pass, on the operator's machines
    # (at the audit rate drawn in an honest market, raised a little by chance shares over the fair one)
    # (and where the plan has fewer than AUDIT_PEERS providers, at the rate of a thin market)
    out["honest_audit_rate_by_providers"] = {str(m): honest_audit_rate(providers=m) for m in HONEST_PROVIDERS}
    out["audit_cost_ratio_by_providers"] = {m: round(out["verify_cost_ratio"] * max(r.values()), 4)
                                            for m, r in out["honest_audit_rate_by_providers"].items()}
    # the headline figures: a plan of 10 providers (HONEST_PROVIDERS' last)
    out["honest_audit_rate"] = out["honest_audit_rate_by_providers"][str(HONEST_PROVIDERS[-1])]
    out["audit_cost_ratio"] = out["audit_cost_ratio_by_providers"][str(HONEST_PROVIDERS[-1])]
    log(f"lazy verifier caught within {window} tasks in {len(caught)}/{a.trials} trials (tasks to its first canary: "
        f"median {out['lazy_verifier_tasks_to_catch_median']}, max {out['lazy_verifier_tasks_to_catch_max']}); "
        f"honest verifier approved {approved} of {planted} forged canaries it replayed ({declined} declined); "
        f"verify cost with "
        f"canaries {out['verify_cost_ratio_with_canaries']}")
    return out


def _cross_spec(cfg: ModelConfig, a: argparse.Namespace, idx: int) -> UnitSpec:
    return UnitSpec(job_id="bench-cross", unit_id="0x" + f"{idx:064x}", round=0, shard=idx % 4, n_shards=4, model=cfg,
                    steps=a.cross_steps, segment_len=a.cross_seg, batch_size=4, lr=3e-3, seed=5000 + idx,
                    threads=1 + idx % 2, precision=a.cross_precision)


def _seg(losses: list[float], spec: UnitSpec, s: int) -> list[float]:
    """Segment ``s``'s per-step losses (what a provider submits with its proof; a loss scan judges each step by)."""
    return losses[s * spec.segment_len:(s + 1) * spec.segment_len]


def run_cross(a: argparse.Namespace, log: Callable[[str], None], provider_plans: list[cc.Plan],
              verifier: cc.Plan, referees: list[cc.Plan], cheat_verifier: cc.Plan) -> dict[str, Any]:
    """Verification across hardware (execution plans that do not agree bit for bit): calibrate a tolerance on
    honest units, then (a) honest units, trained on each provider plan, every segment replayed on the verifier's
    plan; a disagreement goes to bisection and the referee (a plan other than the provider's); one segment per unit
    is also disputed on purpose, so the referee's one-step margin on honest work is measured; (b) each adversary's
    units (provider on the CPU, verifier on ``cheat_verifier``): every faked segment must fail, its bisection must
    end on the faked step and the referee must slash."""
    cfg = ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32)
    start = init_state(cfg, 7)
    t0 = time.perf_counter()
    metric, factor = cc.REFEREE_RULE[a.cross_precision]
    cal = cc.calibrate([(_cross_spec(cfg, a, 900_000 + i), fresh_state(start)) for i in range(a.cal_units)],
                       [verifier, *[r for r in referees if r != verifier]], provider_plan=provider_plans[0],
                       referee_metric=metric, referee_factor=factor)
    tol = cal.tolerance
    out: dict[str, Any] = {"steps_per_unit": a.cross_steps, "segment_len": a.cross_seg, "precision": a.cross_precision,
                           "provider_plans": [p.label for p in provider_plans], "verifier_plan": verifier.label,
                           "referee_plans": [p.label for p in referees], "calibration_units": a.cal_units,
                           "honest_drift_max": {str(k): float(f"{v:.3g}") for k, v in cal.honest_max.items()},
                           "tolerance": {str(k): float(f"{v:.3g}") for k, v in tol.state},
                           "loss_tolerance_micro": tol.loss_micro, "referee_threshold": float(f"{tol.referee:.3g}"),
                           "referee_metric": tol.referee_metric,
                           "referee_honest_one_step_max": float(f"{cal.referee_honest_max:.3g}"),
                           "one_step_loss_drift_max_micro": cal.step_loss_max_micro,
                           "scan_threshold_micro": cc.scan_line(cal.step_loss_max_micro),
                           "calibrate_s": round(time.perf_counter() - t0, 1)}
    log(f"cross-plan tolerance ({tol.note}): honest drift {out['honest_drift_max']} -> tolerance {out['tolerance']}, "
        f"loss {tol.loss_micro} micro-nats (one step from the same state: {cal.step_loss_max_micro}), referee one-step "
        f"{tol.referee:.3g} ({out['calibrate_s']} s)")
    # (a) honest
    t0 = time.perf_counter()
    bit_identical = disputes = slashed = 0
    worst_seg, worst_ref, worst_scan = 0.0, 0.0, 0.0
    for i in range(a.cross_units):
        spec = _cross_spec(cfg, a, i)
        plan = provider_plans[i % len(provider_plans)]
        referee = next(r for r in referees if r != plan)
        states, losses, proof = cc.record_policy(spec, start, plan=plan)
        ver = cc.PlanRunner(spec, fresh_state(start), verifier)
        ref = cc.PlanRunner(spec, fresh_state(start), referee)
        revealer = cc.Revealer(spec, cc.PlanRunner(spec, fresh_state(start), plan),
                               {s: states[s * spec.segment_len] for s in range(spec.n_segments)})
        for s in range(spec.n_segments):
            end = states[(s + 1) * spec.segment_len]
            v = cc.check_segment_across(spec, proof, s, states[s * spec.segment_len], end, tol, ver)
            worst_seg = max(worst_seg, v.distance / v.threshold)
            bit_identical += v.distance == 0.0
            forced = s == i % spec.n_segments
            if not v.ok or forced:
                disputes += not v.ok
                never = replace(tol, state=tuple((k, 1e-300) for k, _ in tol.state))  # disputes everything
                d = cc.bisect_segment(spec, proof, s, revealer, tol if not v.ok else never, ver)
                r = cc.referee_step(spec, d, revealer, tol, ref)
                worst_ref = max(worst_ref, r.distance / r.threshold)
                slashed += r.fraud
                # and the loss scan (a loss dispute's referee): every step from the provider's own state
                sc = cc.scan_segment(spec, proof, s, revealer, tol, ref, step_losses=_seg(losses, spec, s))
                worst_scan = max(worst_scan, sc.distance / sc.threshold)
                slashed += sc.fraud
    segs = a.cross_units * (a.cross_steps // a.cross_seg)
    out.update({"honest_units": a.cross_units, "honest_segments": segs, "bit_identical_segments": bit_identical,
                "false_disputes": disputes, "false_slash": slashed,
                "honest_worst_over_tolerance": round(worst_seg, 4),
                "referee_honest_worst_over_tolerance": round(worst_ref, 4),
                "scan_honest_worst_over_threshold": round(worst_scan, 4),
                "honest_s": round(time.perf_counter() - t0, 1)})
    log(f"cross-plan honest: {a.cross_units} units / {segs} segments (bit-identical {bit_identical}), worst drift "
        f"{worst_seg:.3f} x tolerance, {disputes} disputes, referee worst {worst_ref:.3g} x its threshold, "
        f"loss scan worst {worst_scan:.3g} x its threshold, {slashed} false slashes ({out['honest_s']} s)")
    # (b) cheats
    adv: dict[str, Any] = {}
    frac = 1 / a.cross_steps  # one faked step per unit
    worst_margin = math.inf
    for name, (factory, touches, swap) in _adversaries(frac).items():
        faked = detected = exact = fraud = bisect_steps = by_loss = by_scan = 0
        margin = loss_margin = dispute = math.inf
        for j in range(a.cross_cheat_units):
            spec = replace(_cross_spec(cfg, a, 10_000 + 100 * len(adv) + j), threads=1)
            policy = factory(spec)
            bad = sorted(getattr(policy, "bad", ())) or None
            first = fresh_state(init_state(cfg, 99)) if swap else None
            states, losses, proof = cc.record_policy(spec, start, policy, first_state=first)
            reveal = cc.RecordedReveal(states, lie={0: fresh_state(start)})
            ver = cc.PlanRunner(spec, fresh_state(start), cheat_verifier)
            ref = cc.PlanRunner(spec, fresh_state(start), referees[0])
            segs_faked = sorted({b // spec.segment_len for b in bad}) if bad else [0]
            for s in segs_faked:
                faked += 1
                v = cc.check_segment_across(spec, proof, s, reveal(s * spec.segment_len),
                                            states[(s + 1) * spec.segment_len], tol, ver)
                if v.ok:
                    continue
                detected += 1
                dispute = min(dispute, v.margin)  # how far past its tolerance the verifier saw it (vs its bond margin)
                if v.kind == "loss":  # as the marketplace's referee: the loss rule, else a step-by-step scan
                    r = cc.referee_loss(spec, proof, s, reveal(s * spec.segment_len), tol, ref)
                    if not r.fraud:
                        r = cc.scan_segment(spec, proof, s, reveal, tol, ref, step_losses=_seg(losses, spec, s))
                        by_scan += 1
                    exact += 1
                    by_loss += 1
                    loss_margin = min(loss_margin, r.distance / r.threshold)
                else:
                    d = cc.bisect_segment(spec, proof, s, reveal, tol, ver)
                    bisect_steps += d.verifier_steps
                    exact += (d.step in bad) if bad else d.step == s * spec.segment_len
                    r = cc.referee_step(spec, d, reveal, tol, ref)
                    margin = min(margin, r.distance / r.threshold)
                fraud += r.fraud
        adv[name] = {"touches": "one step" if frac < 1 and "%" in touches else touches, "faked_segments": faked,
                     "detected_rate": detected / faked, "bisected_to_faked_step": exact / faked,
                     "slashed_rate": fraud / faked, "caught_by_loss_only": by_loss, "loss_scans": by_scan,
                     "referee_margin_min": float(f"{margin:.3g}"), "loss_margin_min": float(f"{loss_margin:.3g}"),
                     "dispute_margin_min": float(f"{dispute:.3g}"),
                     "dispute_verifier_steps_mean": round(bisect_steps / max(1, detected), 1)}
        worst_margin = min(worst_margin, margin)
        log(f"cross-plan {name:15s} faked segments {faked}: detected {detected} ({by_loss} by the loss alone, "
            f"{by_scan} scanned), "
            f"localized {exact}, slashed {fraud}; verifier disputed at >= {dispute:.3g} x its tolerance; referee: one "
            f"step >= {margin:.3g} x its threshold, loss >= {loss_margin:.3g} x the line it convicts past")
    out["adversaries"] = adv
    if adv:
        out["min_slashed_rate"] = min(r["slashed_rate"] for r in adv.values())
        out["referee_margin_min"] = float(f"{worst_margin:.3g}")
    return out


#: The adversaries whose one faked step a verifier on another plan can miss (inside honest drift, or the loss alone):
#: replayed on their own plan bit for bit instead (:func:`run_same_plan`).
SAME_PLAN_ADVERSARIES = ("low_precision", "fake_loss", "skip_steps")


def run_same_plan(a: argparse.Namespace, log: Callable[[str], None], plan: cc.Plan) -> dict[str, Any]:
    """A verifier (or referee) on the provider's own exact plan (``cpu/mb2`` here; a named GPU plan on a GPU) replays
    its segments bit for bit (:func:`node.replay.replay_state` on ``plan``): ``--cross-units`` honest units trained
    on ``plan``, every segment replayed there (``bit_identical`` must be every one: a false dispute otherwise), and
    ``--cross-cheat-units`` units of each of :data:`SAME_PLAN_ADVERSARIES` trained on ``plan`` with one faked step,
    each faked segment replayed there (``detected_rate``: its replayed end state or mean loss differs). Each detected
    segment then goes, as a dispute, to a referee that does *not* replay ``plan`` (the default marketplace's, on the
    CPU: :func:`marketplace.referee.rule` with every state revealed): ``slashed_by_other_plan_referee`` counts the
    convictions it reaches on its own (the loss scan, the bisection); the rest need a referee on ``plan``
    (GRIDMINT_REFEREE_PLANS), which convicts on the exact replay."""
    from marketplace import referee

    cfg = ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32)
    start = init_state(cfg, 7)
    t0 = time.perf_counter()

    def mismatch(spec: UnitSpec, proof: TrainingProof, states: list[Any], s: int) -> str:
        """The live verifier's check on ``plan``: "" if it passes, else whether the end state or the loss is off."""
        v = check_state(spec, proof, s, states[s * spec.segment_len], plan)
        return "" if v.ok else "state" if v.replayed_end != v.claimed_end else "loss"

    same = segs = 0
    for i in range(a.cross_units):
        spec = _cross_spec(cfg, a, 20_000 + i)
        states, _, proof = cc.record_policy(spec, start, plan=plan)
        for s in range(spec.n_segments):
            segs += 1
            same += not mismatch(spec, proof, states, s)
    out: dict[str, Any] = {"plan": plan.label, "precision": a.cross_precision, "honest_units": a.cross_units,
                           "honest_segments": segs, "bit_identical": same, "false_disputes": segs - same}
    adv: dict[str, Any] = {}
    frac = 1 / a.cross_steps
    for name in SAME_PLAN_ADVERSARIES:
        factory = _adversaries(frac)[name][0]
        faked = detected = other = 0
        how: dict[str, int] = {}
        ways: dict[str, int] = {}
        for j in range(a.cross_cheat_units):
            spec = replace(_cross_spec(cfg, a, 30_000 + 100 * len(adv) + j), threads=1)
            policy = factory(spec)
            policy.plan = plan  # its honest steps on the plan it declares, its faked one its own
            states, losses, proof = cc.record_policy(spec, start, policy, plan=plan)
            for s in sorted({b // spec.segment_len for b in policy.bad}):
                faked += 1
                kind = mismatch(spec, proof, states, s)
                detected += bool(kind)
                if not kind:
                    continue
                how[kind] = how.get(kind, 0) + 1
                L = spec.segment_len
                with tempfile.TemporaryDirectory() as tmp:
                    paths = {}
                    for k in range(s * L, (s + 1) * L + 1):
                        paths[k] = Path(tmp) / f"{k}.safetensors"
                        checkpoint.save(paths[k], states[k], {})
                    r = referee.rule(spec, proof, s, plan, paths[s * L], paths[(s + 1) * L], paths,
                                     lambda step: "", losses)
                other += bool(r.fraud)
                way = ("scan" if "scanned" in r.reason else "bisection" if "bisected" in r.reason
                       else "cleared" if r.fraud is False else "other")
                ways[way] = ways.get(way, 0) + 1
        adv[name] = {"faked_segments": faked, "detected": detected, "detected_rate": detected / max(1, faked),
                     "by": how, "slashed_by_other_plan_referee": other, "other_plan_referee": ways}
    out["adversaries"] = adv
    out["min_detected_rate"] = min((r["detected_rate"] for r in adv.values()), default=None)
    out["same_plan_s"] = round(time.perf_counter() - t0, 1)
    log(f"same plan ({plan.label}, {a.cross_precision}): {segs} honest segments, {same} replayed bit for bit; "
        + ", ".join(f"{n} detected {r['detected']} of {r['faked_segments']} {r['by']}, a referee on another plan "
                    f"convicts {r['slashed_by_other_plan_referee']} {r['other_plan_referee']}" for n, r in adv.items())
        + f" ({out['same_plan_s']} s)")
    return out


#: Cheats trained on other kernels for the ``cross_build`` section (node.adversary names).
BUILD_ADVERSARIES = ("fake-loss", "skip-last-update", "low-precision")


def run_cross_build(a: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """The same plan (``cpu``) on other kernels: ``--build-units`` honest units trained in a child process on ATen's
    scalar kernels and MKL's compatible path (:mod:`node.foreign`, as a machine with another CPU kind would), checked
    here by a ``cpu`` verifier and refereed by :func:`marketplace.referee.rule` with the provider's kernels known.
    ``bit_identical``: segments whose replay here reproduces the claim bit for bit (each other one is a false
    conviction for a referee that takes the same plan for the same bits); ``disputes``: segments past the verifier's
    tolerance (calibrated against other kernels: ``tolerance_for(..., foreign=True)``); ``false_slash``: honest
    segments the referee convicts (every segment refereed, every state revealed); ``one_step_line_used``: the worst
    honest one-step drift over the referee's one-step line (1.0 would convict). Then ``--build-cheat-units`` units of
    each of :data:`BUILD_ADVERSARIES` on those kernels: cheated segments the verifier disputes and the referee
    convicts. ``referee_pool``: the same work judged by a referee pool on the provider's kernels
    (GRIDMINT_REFEREE_POOLS) and a verifier there: every segment replayed bit for bit in another child on those
    kernels (honest segments reproduced, honest ones convicted, cheated ones convicted)."""
    from marketplace import referee
    from node import foreign

    cfg = ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32)
    plan = cc.Plan("cpu")
    t0 = time.perf_counter()
    out: dict[str, Any] = {"plan": plan.label, "precision": a.cross_precision, "here": kernel_build("cpu")}

    def checker(spec: UnitSpec) -> tuple[cc.Tolerance, cc.PlanRunner]:
        """A ``cpu`` verifier's tolerance for work on other kernels (calibrated once per shape) and its replayer."""
        return (cc.tolerance_for(spec, plan, provider_plan=plan, foreign=True),
                cc.PlanRunner(spec, fresh_state(init_state(cfg, 7)), plan))

    def judge(spec: UnitSpec, result: Any, states: list[Any], build: str, tmp: Path,
              check: tuple[cc.Tolerance, cc.PlanRunner]) -> list[tuple[Any, Any]]:
        """Per segment: the verifier's check (on other kernels' tolerance) and the referee's ruling."""
        tol, runner = check
        L = spec.segment_len
        paths = {}
        for k, st in enumerate(states):
            paths[k] = tmp / f"{spec.unit_id[-8:]}-{k}.safetensors"
            checkpoint.save(paths[k], st, {})
        got = []
        for s in range(spec.n_segments):
            v = cc.check_segment_across(spec, result.proof, s, states[s * L], states[(s + 1) * L], tol, runner)
            r = referee.rule(spec, result.proof, s, plan, result.segment_paths[s],
                             (result.segment_paths[1:] + [result.final_path])[s], paths, lambda step: "",
                             result.losses, build=build)
            got.append((v, r))
        return got

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        specs = [(_cross_spec(cfg, a, 40_000 + i), 7) for i in range(a.build_units)]
        units, build = foreign.train_units(specs, tmp / "honest", plan)
        out["other_kernels"] = build
        same = disputes = slashed = segs = 0
        worst_line = worst_margin = 0.0
        metric, _ = cc.REFEREE_RULE[a.cross_precision]
        for (spec, _), (result, states) in zip(specs, units):
            tol, runner = check = checker(spec)
            for t in range(spec.steps):  # one step from the provider's own state: what the referee's line judges
                mine, _ = runner.replay(states[t], t, 1)
                worst_line = max(worst_line, cc.step_distance(metric, states[t], mine, states[t + 1]) / tol.referee)
            for s, (v, r) in enumerate(judge(spec, result, states, build, tmp, check)):
                segs += 1
                same += v.replayed_hash == result.proof.segments[s].end_hash  # its replay here, bit for bit?
                disputes += not v.ok
                worst_margin = max(worst_margin, v.margin if math.isfinite(v.margin) else 0.0)
                slashed += bool(r.fraud)
        trained = {}
        for k, name in enumerate(BUILD_ADVERSARIES):
            cspecs = [(_cross_spec(cfg, a, 50_000 + 100 * k + j), 7) for j in range(a.build_cheat_units)]
            trained[name] = cspecs, foreign.train_units(cspecs, tmp / name, plan, trainer=name)[0]
        # a referee pool on those kernels (GRIDMINT_REFEREE_POOLS), and a verifier there: every segment, honest and
        # cheated, replayed bit for bit in another child on the provider's kernels (one child for all)
        dirs = [(spec, tmp / "honest" / f"unit-{i}") for i, (spec, _) in enumerate(specs)]
        for name, (cspecs, _) in trained.items():
            dirs += [(spec, tmp / name / f"unit-{j}") for j, (spec, _) in enumerate(cspecs)]
        exact = iter(foreign.replay_units(dirs, plan, build))
        pool_ok = sum(r["ok"] for _ in specs for r in next(exact))
        out.update({"honest_units": a.build_units, "honest_segments": segs, "bit_identical": same,
                    "disputes": disputes, "false_slash": slashed, "worst_dispute_margin": round(worst_margin, 3),
                    "one_step_line_used": round(worst_line, 4)})
        pool: dict[str, Any] = {"honest_bit_identical": pool_ok, "false_slash": segs - pool_ok, "adversaries": {}}
        adv: dict[str, Any] = {}
        for name, (cspecs, cheats) in trained.items():
            faked = disputed = convicted = pool_convicted = 0
            for (spec, _), (result, states), replays in zip(cspecs, cheats, exact):
                for s, (v, r) in enumerate(judge(spec, result, states, build, tmp, checker(spec))):
                    # cheated: every segment (a skipped update, a float8 step in each), or fake-loss's middle one
                    bad = name != "fake-loss" or s == spec.n_segments // 2
                    if not bad:
                        slashed += bool(r.fraud)  # an honest segment of a cheat's unit convicted: counted as false
                        pool["false_slash"] += not replays[s]["ok"]
                        continue
                    faked += 1
                    disputed += not v.ok
                    convicted += bool(r.fraud)
                    pool_convicted += not replays[s]["ok"]
            adv[name] = {"cheated_segments": faked, "disputed": disputed, "convicted": convicted,
                         "convicted_rate": convicted / max(1, faked)}
            pool["adversaries"][name] = {"convicted": pool_convicted, "convicted_rate": pool_convicted / max(1, faked)}
        out["false_slash"] = slashed
        out["adversaries"] = adv
        out["referee_pool"] = pool
    out["cross_build_s"] = round(time.perf_counter() - t0, 1)
    log(f"other kernels ({a.cross_precision}, {out['other_kernels']} vs {out['here']}): {segs} honest segments, "
        f"{same} bit for bit, {disputes} disputed (worst {out['worst_dispute_margin']}x), {out['false_slash']} "
        f"slashed, one-step line used {out['one_step_line_used']}; "
        + ", ".join(f"{n} convicted {r['convicted']}/{r['cheated_segments']} (disputed {r['disputed']})"
                    for n, r in adv.items()) + f" ({out['cross_build_s']} s)")
    log(f"  with a referee pool on those kernels (bit for bit): {pool['honest_bit_identical']}/{segs} honest "
        f"segments reproduced, {pool['false_slash']} slashed; "
        + ", ".join(f"{n} convicted {r['convicted']}/{adv[n]['cheated_segments']}"
                    for n, r in pool["adversaries"].items()))
    return out


def run_drift(a: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Honest cross-plan drift at the demo job's shape (or each of ``--drift-shapes``), as the running marketplace
    sees it: ``--drift-jobs`` jobs per shape (random ids, so random data orders) of 3 units (by default 60 steps in
    segments of 15, batch 16; the default model), trained
    on micro-batches (``cpu/mb2``) for ``--drift-rounds`` DiLoCo rounds (each round from the average of the last),
    every segment checked by a ``cpu`` verifier with the tolerance it calibrates (``tolerance_for``). Each dispute
    is refereed as ``marketplace.referee.rule`` does (loss rule, then a step-by-step loss scan or a bisection on
    honest reveals and a one-step replay; one segment per unit is scanned whatever its verdict) and
    judged as ``marketplace.referee.judge_accusation`` does, from the referee's own first look (a fresh replay on
    the verifier's plan must reach the verifier's signed state, past the tolerance): an honest verifier's bond is
    released and it is never benched (``drift_verifiers_benched``), no provider is slashed."""
    from marketplace.common import unit_id_for
    from node.trainer import average_states

    prov, ver = cc.Plan.parse("cpu/mb2"), cc.Plan.parse("cpu")
    cfg = ModelConfig()  # the JobSpec default
    units = 3
    margins: list[float] = []
    disputes = slashed = faith = benched = old_margin_bonds = scans = 0
    ref_worst = loss_worst = scan_worst = 0.0
    by_shape: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for shape in a.drift_shapes.split(","):
        steps, seg_len, batch = (int(x) for x in shape.split("x"))
        mine: list[float] = []
        mine_loss = 0.0
        mine_disputes = 0
        for j in range(a.drift_jobs):
            job = "0x" + os.urandom(32).hex()
            start = init_state(cfg, 0)
            for r in range(a.drift_rounds):
                ends = []
                for u in range(units):
                    spec = UnitSpec(job_id=job, unit_id=unit_id_for(job, r, u), round=r, shard=u, n_shards=units,
                                    model=cfg, steps=steps, segment_len=seg_len, batch_size=batch, lr=3e-3, seed=r,
                                    threads=1, precision=a.cross_precision)
                    tol = cc.tolerance_for(spec, ver, provider_plan=prov)
                    states, losses, proof = cc.record_policy(spec, start, plan=prov)
                    runner = cc.PlanRunner(spec, fresh_state(start), ver)
                    for s in range(spec.n_segments):
                        a0, a1 = states[s * seg_len], states[(s + 1) * seg_len]
                        v = cc.check_segment_across(spec, proof, s, a0, a1, tol, runner)
                        mine.append(v.distance / v.threshold)
                        # the loss rule on every honest segment (disputed or not): how near it came to convicting
                        lv = cc.loss_ruling(spec, s, tol, v.loss_delta_micro, v.state_over)
                        mine_loss = max(mine_loss, lv.distance / lv.threshold)
                        sc = None  # one segment per unit is scanned whatever its verdict (reused if it is disputed)
                        if s == u % spec.n_segments:
                            sc = cc.scan_segment(spec, proof, s, cc.RecordedReveal(states), tol, runner,
                                                 step_losses=_seg(losses, spec, s))
                            scan_worst = max(scan_worst, sc.distance / sc.threshold)
                        if v.ok:
                            slashed += sc is not None and sc.fraud
                            continue
                        mine_disputes += 1
                        old_margin_bonds += v.margin >= 4.0  # the old default bond margin: bonded, and the bond lost
                        reveal = cc.RecordedReveal(states)
                        if v.kind == "loss":  # the states agree: the referee scans the steps (as marketplace.referee)
                            rv = sc or cc.scan_segment(spec, proof, s, reveal, tol, runner,
                                                       step_losses=_seg(losses, spec, s))
                            scans += 1
                        else:
                            d = cc.bisect_segment(spec, proof, s, reveal, tol, runner)
                            rv = cc.referee_step(spec, d, reveal, tol, runner)
                        ref_worst = max(ref_worst, rv.distance / rv.threshold)
                        slashed += lv.fraud or rv.fraud or (sc is not None and sc.fraud)  # once per segment
                        again = cc.check_segment_across(spec, proof, s, a0, a1, tol, cc.PlanRunner(spec, a0, ver))
                        faith += (not again.ok) and again.replayed_hash == v.replayed_hash
                        benched += again.ok or again.replayed_hash != v.replayed_hash  # proven false: never, if honest
                    ends.append(model_only(states[-1]))
                start = average_states(ends)
            log(f"drift {shape}: job {j + 1}/{a.drift_jobs}, {len(mine)} segments, {mine_disputes} disputed, worst "
                f"{max(mine):.3g} x tolerance, loss rule at {mine_loss:.3g} of its line ({time.perf_counter() - t0:.0f} s)")
        by_shape[shape] = {"segments": len(mine), "disputes": mine_disputes,
                           "worst_over_tolerance": float(f"{max(mine):.3g}") if mine else 0.0,
                           "loss_rule_worst": float(f"{mine_loss:.3g}")}
        margins += mine
        disputes += mine_disputes
        loss_worst = max(loss_worst, mine_loss)
    ordered = sorted(margins)
    out = {"drift_jobs": a.drift_jobs, "drift_rounds": a.drift_rounds, "drift_precision": a.cross_precision,
           "drift_segments": len(margins),
           "drift_disputes": disputes, "drift_dispute_rate": round(disputes / max(1, len(margins)), 4),
           "drift_worst_over_tolerance": float(f"{ordered[-1]:.3g}") if ordered else 0.0,
           "drift_p99_over_tolerance": float(f"{ordered[int(0.99 * (len(ordered) - 1))]:.3g}") if ordered else 0.0,
           "drift_bonds_lost_at_margin_4": old_margin_bonds, "drift_good_faith": faith,
           "drift_verifiers_benched": benched,
           "drift_false_slash": slashed, "drift_referee_worst": float(f"{ref_worst:.3g}"), "drift_loss_scans": scans,
           "drift_scan_worst": float(f"{scan_worst:.3g}"),
           "drift_loss_rule_worst": float(f"{loss_worst:.3g}"), "drift_by_shape": by_shape,
           "drift_s": round(time.perf_counter() - t0, 1)}
    log(f"drift: {disputes} of {len(margins)} honest segments disputed ({out['drift_dispute_rate']}), worst "
        f"{out['drift_worst_over_tolerance']} x tolerance; {faith} of {disputes} reproduced in good faith (bond "
        f"released; at the old bond margin 4, {old_margin_bonds} bonds lost); {slashed} slashed, referee worst "
        f"{out['drift_referee_worst']} x its threshold; the loss rule at worst {out['drift_loss_rule_worst']} of the "
        f"line past which it convicts, the loss scan at worst {out['drift_scan_worst']} of its line")
    return out


def run_gpu(a: argparse.Namespace, log: Callable[[str], None], device: str = "cuda",
            model: ModelConfig | None = None) -> dict[str, Any]:
    """``--device cuda``: the commitment overhead of a GPT-2-small-shaped trainer with torch.compile
    (:func:`node.gpu_bench.gpu_overhead`), the provider's own trainer on the device, and verification across
    devices. ``device="cpu"`` (with a small ``model``) runs the same code in CI, so a GPU session's few minutes are
    not lost to a typo."""
    import traceback

    from node.gpu_bench import GPT2_SMALL_BYTES, gpu_overhead

    figures: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def section(name: str, fn: Callable[[], Any]) -> None:  # one section failing keeps the others' figures
        try:
            got = fn()
            if name.startswith("+"):  # its figures at the top level
                figures.update(got)
            else:
                figures[name] = got
        except Exception as exc:
            log(f"section {name.lstrip('+')} failed:\n{traceback.format_exc()}")
            errors[name.lstrip("+")] = f"{type(exc).__name__}: {exc}"[:500]
        # the GPU run is cut off at its time limit: each section's figures are on record as soon as they exist
        log(f"figures so far: {json.dumps({**figures, **({'errors': errors} if errors else {})})}")

    section("+gpu_overhead", lambda: gpu_overhead(steps=a.gpu_steps, commit_every=a.gpu_commit_every,
                                                  compile_model=not a.no_compile, log=log, device=device,
                                                  cfg=model or GPT2_SMALL_BYTES, repeats=a.repeats))
    dev = cc.Plan(device)
    section("+trainer_overhead", lambda: trainer_overhead(a.job_steps, a.job_repeats, dev, log))
    if a.cross_units:  # honest device providers checked on the CPU; CPU-trained cheats checked on the device
        cpu = cc.Plan("cpu")
        section("cross_device", lambda: run_cross(a, log, [dev], cpu, [cpu, cc.Plan("cpu", 2)], dev))
        if a.cross_precision == "fp32":  # and a bf16 job, a GPU's fast path, refereed on the CPU
            b = argparse.Namespace(**{**vars(a), "cross_precision": "bf16"})
            section("cross_device_bf16", lambda: run_cross(b, log, [dev], cpu, [cpu, cc.Plan("cpu", 2)], dev))
        # a verifier on the provider's own GPU model replays it bit for bit: catches what hides in the drift above
        named = local_plan(dev)
        for prec in ("fp32", "bf16"):
            p = argparse.Namespace(**{**vars(a), "cross_precision": prec})
            section(f"same_device_{prec}", lambda p=p: run_same_plan(p, log, named))
    if errors:
        figures["errors"] = errors
    return figures


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridmint bench proof", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=2048, help="one-step segments per cheating unit")
    p.add_argument("--fraction", type=float, default=0.01, help="share of steps a sparse cheater fakes")
    p.add_argument("--pool", type=int, default=2, help="real units per sparse adversary")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--stake-units", type=int, default=vp.STAKE_UNITS,
                   help="stake as a multiple of the unit price (the least the marketplace matches: STAKE_UNITS)")
    p.add_argument("--honest-units", type=int, default=1000)
    p.add_argument("--honest-steps", type=int, default=16)
    p.add_argument("--overhead-steps", type=int, default=512)
    p.add_argument("--job-steps", type=int, default=120, help="steps of the default-job overhead run (x 15 per segment)")
    p.add_argument("--job-repeats", type=int, default=6, help="bare/proof pairs of the default-job overhead run")
    p.add_argument("--cost-steps", type=int, default=1000, help="unit length for the default-job verify cost")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cost-repeats", type=int, default=5,
                   help="provider/verifier pairs of the default-job verify cost (median: runs spread +-15%%)")
    p.add_argument("--canary-units", type=int, default=4, help="units whose segments are forged into canaries")
    p.add_argument("--lazy-window", type=int, default=500, help="tasks a lazy verifier gets before it counts as free")
    p.add_argument("--gpu-steps", type=int, default=300)
    p.add_argument("--gpu-commit-every", type=int, default=50)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cross-units", type=int, default=200, help="honest units verified on another plan (0: skip)")
    p.add_argument("--cross-cheat-units", type=int, default=10, help="units per adversary verified on another plan")
    p.add_argument("--cross-steps", type=int, default=64)
    p.add_argument("--cross-seg", type=int, default=16)
    p.add_argument("--cal-units", type=int, default=4, help="honest units the cross-plan tolerance is calibrated on")
    p.add_argument("--cross-precision", default="fp32", choices=["fp32", "bf16"],
                   help="the arithmetic of the cross-plan and drift sections' units")
    p.add_argument("--only-cross", action="store_true", help="run only the cross-plan section (CPU plans)")
    p.add_argument("--build-units", type=int, default=10,
                   help="honest units trained on other kernels for the cross_build section (0: skip)")
    p.add_argument("--build-cheat-units", type=int, default=3, help="units per adversary trained on other kernels")
    p.add_argument("--only-builds", action="store_true",
                   help="run only the cross_build section (the same plan on other kernels), in fp32 and bf16")
    p.add_argument("--drift-jobs", type=int, default=0, help="demo-shaped jobs for the honest-drift section (0: skip)")
    p.add_argument("--drift-rounds", type=int, default=1, help="DiLoCo rounds per drift job")
    p.add_argument("--drift-shapes", default="60x15x16",
                   help="comma-separated unit shapes STEPSxSEGMENTxBATCH for the drift section (each gets --drift-jobs)")
    p.add_argument("--only-drift", action="store_true", help="run only the honest-drift section")
    p.add_argument("--only-adversaries", action="store_true", help="run only the adversary trials (sections 1-2)")
    a = p.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {a.device}")
    t0 = time.perf_counter()
    if a.only_drift:
        figures = {"drift": run_drift(a, log)}
    elif a.only_adversaries:
        figures = run_adversaries(a, log)
    elif a.only_builds:
        figures = {f"cross_build_{prec}": run_cross_build(argparse.Namespace(**{**vars(a), "cross_precision": prec}),
                                                          log) for prec in ("fp32", "bf16")}
        figures["false_slash"] = sum(f["false_slash"] for f in figures.values())
    elif a.only_cross:
        figures = {"cross_plan": run_cross(a, log, [cc.Plan("cpu", 1), cc.Plan("cpu", 4)], cc.Plan("cpu", 2),
                                           [cc.Plan("cpu", 1), cc.Plan("cpu", 4)], cc.Plan("cpu", 2)),
                   "same_plan": run_same_plan(a, log, cc.Plan("cpu", 2))}
    else:
        figures = run_gpu(a, log) if a.device == "cuda" else run_cpu(a, log)
        if a.drift_jobs > 0:
            figures["drift"] = run_drift(a, log)
    figures["bench_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))
    return 1 if figures.get("errors") else 0
