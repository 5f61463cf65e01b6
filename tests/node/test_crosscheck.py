"""Verification across hardware: honest work replayed on another execution plan is not bit-identical but always
passes the calibrated tolerance; every cheat fails it, a bisection narrows each dispute to the faked step, and the
referee's one-step replay slashes the cheat and never the honest provider (also against a verifier who disputes
everything, a provider who will not reveal, and an adaptive liar)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from node import adversary
from node import crosscheck as cc
from node.model import init_state
from node.prover import honest_step, train_traced
from node.trainer import UnitSpec, fit_micro_batches, fresh_state
from protocol.errors import GridMintValueError
from protocol.proof import make_proof
from tests.node.conftest import TINY

STEPS, SEG = 32, 8
START = init_state(TINY, 3)
VERIFIER, REFEREE = cc.Plan(micro_batches=2), cc.Plan(micro_batches=4)


def _spec(i: int) -> UnitSpec:
    return UnitSpec(job_id="job-cross", unit_id="0x" + f"{i:064x}", round=0, shard=i % 4, n_shards=4, model=TINY,
                    steps=STEPS, segment_len=SEG, batch_size=4, lr=3e-3, seed=i)


@pytest.fixture(scope="module")
def tol() -> cc.Tolerance:
    cal = cc.calibrate([(_spec(i), fresh_state(START)) for i in range(3)], [VERIFIER, REFEREE])
    assert cal.honest_max[1] > 0, "the plans must really differ in the last bits, or this tests nothing"
    assert sorted(cal.honest_max) == [1, 2, 4, 8]
    return cal.tolerance


def _runners(spec: UnitSpec) -> tuple[cc.PlanRunner, cc.PlanRunner]:
    return cc.PlanRunner(spec, fresh_state(START), VERIFIER), cc.PlanRunner(spec, fresh_state(START), REFEREE)


def _verdicts(spec, states, proof, tol, ver):  # type: ignore[no-untyped-def]
    return [cc.check_segment_across(spec, proof, s, states[s * SEG], states[(s + 1) * SEG], tol, ver)
            for s in range(spec.n_segments)]


def test_the_provider_plan_is_the_trainer_bit_for_bit_and_other_plans_are_not() -> None:
    spec = _spec(10)
    states, _, proof = cc.record_policy(spec, START, honest_step)
    assert proof == train_traced(spec, START).proof  # record_policy commits exactly what the trainer commits
    ver, _ = _runners(spec)
    got, _ = ver.replay(states[0], 0, SEG)
    assert cc.state_hash(got) != proof.segments[0].end_hash  # an exact check would call this honest work fraud
    assert 0 < cc.distance(got, states[SEG]) < 1e-4


def test_honest_units_pass_across_plans_and_a_forced_dispute_is_lost_by_the_verifier(tol: cc.Tolerance) -> None:
    for i in (20, 21, 22):
        spec = _spec(i)
        states, _, proof = cc.record_policy(spec, START, honest_step)
        ver, ref = _runners(spec)
        verdicts = _verdicts(spec, states, proof, tol, ver)
        assert all(v.ok for v in verdicts), [v.reason for v in verdicts]
        assert max(v.distance for v in verdicts) < tol.for_steps(SEG) / 2
        # a verifier that disputes anyway (malicious, or faulty): the honest provider re-derives its states on its
        # own plan from the segment checkpoints it kept, and the referee's one-step replay clears it
        revealer = cc.Revealer(spec, cc.PlanRunner(spec, fresh_state(START)), {s: states[s * SEG] for s in range(4)})
        for seg in range(spec.n_segments):
            liar = cc.PlanRunner(spec, fresh_state(START), VERIFIER)
            liar_tol = replace(tol, state=tuple((k, 1e-30) for k, _ in tol.state))  # disagrees with everything
            d = cc.bisect_segment(spec, proof, seg, revealer, liar_tol, liar)
            assert not d.provider_failed and seg * SEG <= d.step < (seg + 1) * SEG  # wherever honest drift peaks
            r = cc.referee_step(spec, d, revealer, tol, ref)
            assert not r.fraud, r.reason
            assert r.distance < tol.referee / 4


SPARSE = {
    "skip_steps": (adversary.SkipSteps, "state"),
    "other_data": (adversary.OtherData, "state"),
    "low_precision": (adversary.LowPrecision, "state"),
    "fake_loss": (adversary.FakeLoss, "loss"),
}


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_a_sparse_cheat_fails_its_segment_and_the_bisection_finds_the_faked_step(name: str, tol: cc.Tolerance) -> None:
    make, kind = SPARSE[name]
    spec = _spec(30)
    bad = 13  # inside segment 1, not on its edge
    states, _, proof = cc.record_policy(spec, START, make(frozenset({bad})))
    ver, ref = _runners(spec)
    verdicts = _verdicts(spec, states, proof, tol, ver)
    assert [v.ok for v in verdicts] == [True, False, True, True], [v.reason for v in verdicts]
    v = verdicts[1]
    assert v.kind == kind
    if kind == "state":
        assert v.distance > tol.for_steps(SEG)
        d = cc.bisect_segment(spec, proof, 1, cc.RecordedReveal(states), tol, ver)
        assert d.step == bad and len(d.rounds) == 3 and d.verifier_steps <= 2 * SEG
        r = cc.referee_step(spec, d, cc.RecordedReveal(states), tol, ref)
        assert r.fraud and r.distance > 4 * tol.referee, r.reason
    else:
        r = cc.referee_loss(spec, proof, 1, states[SEG], tol, ref)
        assert r.fraud and r.distance > tol.loss_micro
        honest = cc.referee_loss(spec, proof, 0, states[0], tol, ref)
        assert not honest.fraud
        scanned = cc.scan_segment(spec, proof, 1, cc.RecordedReveal(states), tol, ref)
        assert scanned.fraud and scanned.distance > 10 * scanned.threshold, scanned.reason
        assert not cc.scan_segment(spec, proof, 0, cc.RecordedReveal(states), tol, ref).fraud


def test_whole_unit_cheats_fail_from_the_first_segment_and_lose_at_the_referee(tol: cc.Tolerance) -> None:
    spec = _spec(40)
    honest0 = fresh_state(START)
    cases = {
        "random_weights": (adversary.RandomWeights(), None),
        "copied_weights": (adversary.OtherData(frozenset(range(STEPS))), None),
        "replay_old": (honest_step, fresh_state(init_state(TINY, 99))),
    }
    for name, (policy, first) in cases.items():
        states, _, proof = cc.record_policy(spec, START, policy, first_state=first)
        ver, ref = _runners(spec)
        # the cheat reveals the honest start (it must match the committed start), then what it really computed
        reveal = cc.RecordedReveal(states, lie={0: honest0})
        v = cc.check_segment_across(spec, proof, 0, honest0, states[SEG], tol, ver)
        assert not v.ok and v.kind == "state", (name, v.reason)
        d = cc.bisect_segment(spec, proof, 0, reveal, tol, ver)
        assert d.step == 0, name
        r = cc.referee_step(spec, d, reveal, tol, ref)
        assert r.fraud, (name, r.reason)


def test_honest_drift_past_the_tolerance_does_not_lead_the_bisection_away_from_the_faked_step(
        tol: cc.Tolerance) -> None:
    """With a tolerance 1000x too tight, honest cross-plan drift fails every window, the first half of the segment
    included; the bisection still follows the larger disagreement into the second half, to the skipped step."""
    tight = replace(tol, state=tuple((k, v / 1000) for k, v in tol.state))
    spec = _spec(60)
    bad = SEG + SEG // 2 + 1  # in the second half of segment 1
    states, _, proof = cc.record_policy(spec, START, adversary.SkipSteps(frozenset({bad})))
    ver, ref = _runners(spec)
    assert cc.distance(ver.replay(states[SEG], SEG, SEG // 2)[0], states[SEG + SEG // 2]) > tight.for_steps(SEG // 2)
    d = cc.bisect_segment(spec, proof, 1, cc.RecordedReveal(states), tight, ver)
    assert d.step == bad
    assert cc.referee_step(spec, d, cc.RecordedReveal(states), tol, ref).fraud


def test_a_calibration_that_saw_no_drift_does_not_put_the_referee_under_honest_drift() -> None:
    """Plans that agree bit for bit measure no one-step drift; the referee's line (64 x that) must still not fall
    under the ~1 ulp an honest run on plans that round differently drifts by, or it slashes it."""
    cal = cc.calibrate([(_spec(i), fresh_state(START)) for i in range(2)], [cc.PROVIDER_PLAN])
    assert cal.referee_honest_max == 0 and cal.honest_max[1] == 0, "the plans must agree bit for bit here"
    tol = cal.tolerance
    assert tol.referee == 64 * cc.REFEREE_DRIFT_FLOOR["state"]
    spec = _spec(70)
    honest, _, _ = cc.record_policy(spec, START, honest_step)
    _, ref = _runners(spec)
    verdicts = [cc.referee_step(spec, cc.Dispute(spec.unit_id, t // SEG, t, cc.state_hash(honest[t]),
                                                 cc.state_hash(honest[t + 1]), (), 0), cc.RecordedReveal(honest), tol,
                                ref) for t in range(0, STEPS, 5)]
    worst = max(v.distance for v in verdicts)
    assert worst > 64 * 1e-9, f"an honest step drifted only {worst:.3g}: the old line would not have slashed it"
    assert not any(v.fraud for v in verdicts), [v.reason for v in verdicts if v.fraud]
    # and a faked step still lies far past it
    bad = 13
    cheat, _, _ = cc.record_policy(spec, START, adversary.SkipSteps(frozenset({bad})))
    d = cc.Dispute(spec.unit_id, 1, bad, cc.state_hash(cheat[bad]), cc.state_hash(cheat[bad + 1]), (), 0)
    v = cc.referee_step(spec, d, cc.RecordedReveal(cheat), tol, ref)
    assert v.fraud and v.distance > 10 * tol.referee


def test_an_adaptive_liar_is_cornered_at_its_last_step(tol: cc.Tolerance) -> None:
    spec = _spec(50)
    cheat, _, proof = cc.record_policy(spec, START, adversary.SkipSteps(frozenset({9})))
    honest, _, _ = cc.record_policy(spec, START, honest_step)
    # it answers every midpoint with the honest state (which the verifier agrees with), but its committed end is
    # the cheat's: the bisection walks to the segment's last step, whose replay does not reach that end
    reveal = cc.RecordedReveal(cheat, lie={t: honest[t] for t in range(SEG + 1, 2 * SEG)})
    ver, ref = _runners(spec)
    d = cc.bisect_segment(spec, proof, 1, reveal, tol, ver)
    assert d.step == 2 * SEG - 1 and all(agreed for _, _, agreed in d.rounds)
    assert cc.referee_step(spec, d, reveal, tol, ref).fraud


def test_a_provider_that_cannot_back_its_claims_loses(tol: cc.Tolerance) -> None:
    spec = _spec(60)
    states, _, proof = cc.record_policy(spec, START, adversary.SkipSteps(frozenset({20})))
    ver, ref = _runners(spec)

    def refuses(step: int):  # type: ignore[no-untyped-def]
        if step == 20:
            raise OSError("checkpoint lost")
        return states[step]

    d = cc.bisect_segment(spec, proof, 2, refuses, tol, ver)
    assert "could not reveal" in d.provider_failed
    assert cc.referee_step(spec, d, refuses, tol, ref).fraud
    # revealing an end state that is not the committed one
    wrong = cc.RecordedReveal(states, lie={24: states[23]})
    d = cc.bisect_segment(spec, proof, 2, wrong, tol, ver)
    assert "revealed end hashes" in d.provider_failed
    # swapping a state between the bisection and the referee's call
    d = cc.bisect_segment(spec, proof, 2, cc.RecordedReveal(states), tol, ver)
    swapped = cc.RecordedReveal(states, lie={d.step + 1: states[d.step + 2]})
    r = cc.referee_step(spec, d, swapped, tol, ref)
    assert r.fraud and "do not match" in r.reason
    # and the claim checks need no replay at all
    v = cc.check_segment_across(spec, proof, 2, states[17], states[24], tol, ver)
    assert not v.ok and v.kind == "claim"


def test_distance_tolerance_and_plan_reject_bad_input() -> None:
    a = fresh_state(START)
    assert cc.distance(a, a) == 0.0
    b = dict(a)
    name = next(k for k in a if k.endswith(".step"))
    b[name] = a[name] + 1
    assert cc.distance(b, a) == math.inf  # step counters are compared exactly
    assert cc.distance({k: v for k, v in a.items() if k != name}, a) == math.inf
    nan = dict(a)
    w = next(k for k in a if k.startswith("model."))
    nan[w] = torch.full_like(a[w], float("nan"))
    assert not cc.distance(nan, a) <= 1.0  # a NaN state never passes a tolerance
    tol = cc.Tolerance(((1, 1e-5), (4, 1e-4)), 5, 1e-3)
    assert cc.Tolerance.from_dict(tol.to_dict()) == tol
    assert tol.for_steps(3) == 1e-4
    with pytest.raises(GridMintValueError, match="calibrated up to 4"):
        tol.for_steps(8)
    ok = {"state": {"1": 1e-5}, "loss_micro": 1, "referee": 1e-4}
    for bad in ({**ok, "state": {"2": 1e-5}}, {**ok, "state": {"1": -1.0}}, {"loss_micro": 1, "referee": 1e-4},
                {**ok, "loss_micro": -1}, {**ok, "state": "x"}, {**ok, "referee": 0.0}, {**ok, "referee": "inf"},
                {k: v for k, v in ok.items() if k != "referee"}):
        with pytest.raises(GridMintValueError):
            cc.Tolerance.from_dict(bad)
    assert cc.Plan.parse("cpu/mb4") == cc.Plan("cpu", 4) and cc.Plan.parse("cuda").device == "cuda"
    for text in ("tpu", "cpu/4", "cpu/mb0", "cpu/mbx", "cpu:h200", "cuda:", "cuda:H200", "cuda:-x", "cuda:a/b",
                 "cuda:" + "x" * 25):
        with pytest.raises(GridMintValueError):
            cc.Plan.parse(text)
    # a plan whose micro-batches do not split the batch runs on those every machine fits to it (it raised, and
    # stopped every node and verifier on it at a customer's batch of 15): the same bits as the fitted plan's
    spec = replace(_spec(1), batch_size=3)
    fitted, three = (cc.PlanRunner(spec, fresh_state(START), cc.Plan(micro_batches=m)) for m in (2, 3))
    assert fitted.run(0, 2) == three.run(0, 2) and cc.state_hash(fitted.snapshot()) == cc.state_hash(three.snapshot())
    assert [fit_micro_batches(m, b) for m, b in ((2, 16), (2, 15), (2, 3), (4, 6), (2, 67), (2, 1), (64, 1024))] \
        == [2, 3, 3, 6, 1, 1, 64]


def test_training_on_a_plan_is_the_trainer_on_the_provider_plan_and_re_derivable_on_another(tmp_path) -> None:
    """A provider training on its own plan commits what its checkpoints hold; on the default plan that is the
    unit a separate loop (the prover's traced trainer) commits, and on another plan its Revealer re-derives every
    committed state exactly."""
    from node import checkpoint
    from node.prover import train_traced
    from node.trainer import train_unit

    spec = _spec(40)
    ref = train_unit(spec, START, tmp_path / "ref", plan=cc.PROVIDER_PLAN)
    traced = train_traced(spec, START)
    assert traced.proof == ref.proof and traced.losses == ref.losses
    other = train_unit(spec, START, tmp_path / "other", plan=VERIFIER)
    assert other.proof.segments[0].start_hash == ref.proof.segments[0].start_hash
    assert other.proof.final_hash != ref.proof.final_hash  # really another plan
    starts = {i: checkpoint.load(p)[0] for i, p in enumerate(other.segment_paths)}
    for i, p in enumerate(other.segment_paths):
        assert cc.state_hash(starts[i]) == other.proof.segments[i].start_hash
    revealer = cc.Revealer(spec, cc.PlanRunner(spec, fresh_state(START), VERIFIER), starts)
    mid = revealer(SEG + 3)  # re-derived from segment 1's checkpoint, then 5 more steps land on its commitment
    end, _ = cc.PlanRunner(spec, fresh_state(START), VERIFIER).replay(mid, SEG + 3, SEG - 3)
    assert cc.state_hash(end) == other.proof.segments[1].end_hash
    assert cc.state_hash(checkpoint.load(other.final_path)[0]) == other.proof.final_hash


def test_a_verdict_says_how_far_past_its_tolerance_it_is(tol: cc.Tolerance) -> None:
    """The margin a verifier bonds on: honest work stays under 1, a skipped step lands far past, a wrong claim is inf."""
    spec = _spec(50)
    states, _, proof = cc.record_policy(spec, START, plan=REFEREE)
    ver, _ = _runners(spec)
    honest = _verdicts(spec, states, proof, tol, ver)
    assert all(v.ok and 0 < v.margin <= 1 for v in honest)
    cheat_spec = _spec(51)
    states, _, proof = cc.record_policy(cheat_spec, START, adversary.SkipSteps(frozenset({9})))
    ver, _ = _runners(cheat_spec)
    v = _verdicts(cheat_spec, states, proof, tol, ver)[1]
    assert not v.ok and v.kind == "state" and v.margin > 100
    wrong_end = cc.check_segment_across(cheat_spec, proof, 1, states[SEG], states[SEG + 1], tol, ver)
    assert wrong_end.kind == "claim" and wrong_end.margin == math.inf


def test_a_bf16_step_is_judged_against_its_own_update() -> None:
    """In bf16 the referee's yardstick is the replayed step's update: honest drift across plans is a few percent of
    it, a skipped update is all of it (1.0), a claim with other step counters is infinitely far."""
    spec = replace(_spec(70), precision="bf16")
    states, _, _ = cc.record_policy(spec, START, plan=VERIFIER)  # the provider on micro-batches
    ref = cc.PlanRunner(spec, fresh_state(START))  # the referee on the default plan
    metric, factor = cc.REFEREE_RULE["bf16"]
    assert metric == "update"
    worst = 0.0
    for t in range(0, STEPS, 3):
        got, _ = ref.replay(states[t], t, 1)
        worst = max(worst, cc.update_distance(states[t], got, states[t + 1]))
        skipped = {k: (v + 1 if k.endswith(".step") else v) for k, v in states[t].items()}
        assert cc.update_distance(states[t], got, skipped) == pytest.approx(1.0)
        assert cc.update_distance(states[t], got, states[t]) == math.inf  # counters not advanced
    assert 0 < worst < 0.1 and worst * factor < 1.0  # a skipped update stays beyond the threshold


def test_a_bf16_loss_across_plans_is_never_slashed_on_alone() -> None:
    """Seen in CI: an honest bf16 provider on micro-batches was disputed on its mean loss at 2x a tolerance
    calibrated on two units, and the referee's loss check slashed it. A bf16 loss across plans is not evidence: the
    referee goes on to the states (which clear it)."""
    spec = replace(_spec(80), precision="bf16")
    states, _, proof = cc.record_policy(spec, START, plan=VERIFIER)
    ref = cc.PlanRunner(spec, fresh_state(START))
    tight = cc.Tolerance(((1, 1.0),), 1, 1.0, referee_metric="update")  # any loss difference is past it
    r = cc.referee_loss(spec, proof, 1, states[SEG], tight, ref)
    assert r.distance > tight.loss_micro and not r.fraud and "not evidence" in r.reason
    # fp32: a loss convicts on its own only past REFEREE_LOSS_FACTOR x the tolerance (honest drift has a tail)
    fp32, spec32 = replace(tight, referee_metric="state"), replace(spec, precision="fp32")
    near = cc.referee_loss(spec32, proof, 1, states[SEG], fp32, ref)
    assert fp32.loss_micro < near.distance <= cc.REFEREE_LOSS_FACTOR and not near.fraud, near
    segs = list(proof.segments)
    segs[1] = replace(segs[1], loss_micro=segs[1].loss_micro + 10_000)  # a faked loss
    faked = make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                       segment_len=proof.segment_len, segments=segs)
    assert cc.referee_loss(spec32, faked, 1, states[SEG], fp32, ref).fraud


def test_an_honest_fp32_loss_a_little_past_its_tolerance_is_not_slashed_on() -> None:
    """Seen in the demo's fresh-clone CI: an honest fp32 provider on micro-batches, 5 micro-nats off a loss
    tolerance of 4 calibrated on two units, was slashed by the referee's loss check. Honest drift past a tolerance
    this thin is not evidence: below REFEREE_LOSS_FACTOR x it the referee bisects the states, which clear it."""
    zero = cc.Tolerance(((1, 1.0),), 0, 1.0)  # a calibration that saw no loss drift at all
    drifted = []
    # units whose honest loss drifts across these plans: which ones depends on the CPU's kernels (most units drift
    # by 0 micro-nats; on AVX2 unit 85 did, on AVX-512 a quarter of units 60-160 do), so look for three
    for i in range(80, 480):
        spec = _spec(i)
        states, _, proof = cc.record_policy(spec, START, plan=VERIFIER)
        ref = cc.PlanRunner(spec, fresh_state(START))
        drifts = [cc.referee_loss(spec, proof, s, states[s * SEG], zero, ref) for s in range(spec.n_segments)]
        if any(r.distance > zero.loss_micro for r in drifts):  # the old rule (past the tolerance) convicted these
            drifted.append(i)
            assert not any(r.fraud for r in drifts), (i, [r.reason for r in drifts])
            if len(drifted) == 3:
                break
    assert len(drifted) == 3, f"only units {drifted} of 80-479 drift in their loss on this machine"


def test_a_bf16_loss_faked_on_one_step_is_scanned_and_slashed_honest_losses_never_are() -> None:
    """A bf16 loss is never convicted on its segment mean across plans (honest drift is too wide): a faked loss on one
    step went unpunished. Replayed step by step from the provider's own states, a loss drifts only by one forward
    pass's arithmetic, so the scan convicts the fake far past its threshold and clears every honest segment."""
    def bf16(i: int) -> UnitSpec:
        return replace(_spec(i), precision="bf16", threads=1)

    metric, factor = cc.REFEREE_RULE["bf16"]
    cal = cc.calibrate([(bf16(90 + i), fresh_state(START)) for i in range(2)], [VERIFIER], referee_metric=metric,
                       referee_factor=factor)
    tol = cal.tolerance
    assert tol.step_loss_micro == cal.step_loss_max_micro and tol.step_loss_micro is not None
    assert tol.step_loss_micro * 10 < cal.loss_max_micro, cal  # what the scan buys: no drift carried in
    assert cc.Tolerance.from_dict(tol.to_dict()) == tol
    spec = bf16(95)
    ver = cc.PlanRunner(spec, fresh_state(START), VERIFIER)
    honest, _, hproof = cc.record_policy(spec, START)
    for s in range(spec.n_segments):
        r = cc.scan_segment(spec, hproof, s, cc.RecordedReveal(honest), tol, ver)
        assert not r.fraud and r.distance < r.threshold / 4, r.reason
    bad = SEG + 3
    states, _, proof = cc.record_policy(spec, START, adversary.FakeLoss(frozenset({bad})))
    v = cc.check_segment_across(spec, proof, 1, states[SEG], states[2 * SEG], tol, ver)
    assert not v.ok and v.kind == "loss", v.reason
    assert not cc.loss_ruling(spec, 1, tol, v.loss_delta_micro, v.state_over).fraud  # the mean alone: no evidence
    d = cc.bisect_segment(spec, proof, 1, cc.RecordedReveal(states), tol, ver)
    assert not cc.referee_step(spec, d, cc.RecordedReveal(states), tol, ver).fraud  # the states are honest
    r = cc.scan_segment(spec, proof, 1, cc.RecordedReveal(states), tol, ver)
    assert r.fraud and r.distance > 10 * r.threshold and "mean loss" in r.reason, r.reason
    # a provider that backs its loss with a made-up state mid-segment loses on that step; one that cannot reveal
    # loses; the first state it has not revealed yet is asked for
    lie = cc.scan_segment(spec, proof, 1, cc.RecordedReveal(states, lie={bad: states[bad - 1]}), tol, ver)
    assert lie.fraud and lie.step == bad - 1 and lie.distance == math.inf, lie.reason

    def silent(step: int) -> cc.State:
        if step > bad:
            raise TimeoutError(f"no state before step {step}")
        return states[step]

    mute = cc.scan_segment(spec, proof, 1, silent, tol, ver)
    assert mute.fraud and mute.step == bad + 1 and "no state" in mute.reason

    def pending(step: int) -> cc.State:
        if step in (SEG + 2, SEG + 5):
            raise cc.RevealPending(step)
        return states[step]

    with pytest.raises(cc.RevealPending) as waiting:
        cc.scan_segment(spec, proof, 1, pending, tol, ver)
    assert waiting.value.step == SEG + 2 and waiting.value.more == (SEG + 5,)  # every missing state, asked at once
    with pytest.raises(GridMintValueError, match="calibrated loss drift"):
        cc.scan_segment(spec, proof, 1, cc.RecordedReveal(states), replace(tol, loss_windows=()), ver)


def test_a_loss_scan_convicts_where_one_steps_loss_drifts_as_wide_as_between_a_gpu_and_the_cpu() -> None:
    """On an H200 a bf16 step's loss, replayed on the CPU from the provider's own state, drifted up to 238
    micro-nats (1-2 between CPU plans): 64x that let a loss faked by 3% on one step through. The mean of a scan's
    per-step differences is bounded by its worst step's, so the line is 8x the one-step drift (floored at 64): with
    the GPU's drift the fake is still convicted and every honest segment cleared. Judged step by step against the
    per-step losses the provider submitted, the fake stands out 16x further (all of it, not 1/16) and is named."""
    assert [cc.scan_line(d) for d in (0, 1, 8, 66, 238)] == [64.0, 64.0, 64.0, 528.0, 1904.0]

    def bf16(i: int) -> UnitSpec:
        return replace(_spec(i), precision="bf16", threads=1, segment_len=16)

    metric, factor = cc.REFEREE_RULE["bf16"]
    cal = cc.calibrate([(bf16(190), fresh_state(START))], [VERIFIER], referee_metric=metric, referee_factor=factor)
    gpu_wide = replace(cal.tolerance, loss_windows=((1, max(238, cal.tolerance.step_loss_micro or 0)),))
    spec = bf16(195)
    ver = cc.PlanRunner(spec, fresh_state(START), VERIFIER)
    honest, hlosses, hproof = cc.record_policy(spec, START)
    for s in range(spec.n_segments):
        r = cc.scan_segment(spec, hproof, s, cc.RecordedReveal(honest), gpu_wide, ver)
        assert not r.fraud and r.threshold == 1904.0 and r.distance < r.threshold / 16, r.reason
        mine = hlosses[16 * s:16 * (s + 1)]  # judged step by step against the losses it submitted: cleared too
        r = cc.scan_segment(spec, hproof, s, cc.RecordedReveal(honest), gpu_wide, ver, step_losses=mine)
        assert not r.fraud and r.distance < r.threshold / 16, r.reason
    bad = 16 + 5
    states, losses, proof = cc.record_policy(spec, START, adversary.FakeLoss(frozenset({bad})))
    r = cc.scan_segment(spec, proof, 1, cc.RecordedReveal(states), gpu_wide, ver)
    assert r.fraud and r.distance > 2 * r.threshold and "mean loss" in r.reason, r.reason
    # with its signed per-step losses the fake stands out by its full size, not 1/16 of it, and is named
    r1 = cc.scan_segment(spec, proof, 1, cc.RecordedReveal(states), gpu_wide, ver, step_losses=losses[16:32])
    assert r1.fraud and r1.step == bad and r1.distance > 12 * r.distance, r1.reason
    assert f"step {bad}'s loss is" in r1.reason
    with pytest.raises(GridMintValueError, match="16 steps, got 15"):
        cc.scan_segment(spec, proof, 1, cc.RecordedReveal(states), gpu_wide, ver, step_losses=losses[16:31])


def test_a_long_segment_is_scanned_in_chunks_asking_at_most_fifteen_states() -> None:
    """A loss scan asks the provider for one state per step only up to 16 steps; a longer segment is replayed in
    power-of-two chunks from the provider's state at each chunk's start, judged against the calibrated drift of a
    chunk's mean loss: the honest provider reveals 15 states of a 32-step segment and is cleared, a loss faked on one
    step is still convicted, and with the per-step losses it submitted, in the chunk that holds it."""
    assert [cc.scan_chunk(n) for n in (1, 15, 16, 17, 32, 33, 100, 1000)] == [1, 1, 1, 2, 2, 4, 8, 64]
    spec = UnitSpec(job_id="job-scan-chunks", unit_id="0x" + f"{77:064x}", round=0, shard=0, n_shards=1, model=TINY,
                    steps=64, segment_len=32, batch_size=4, lr=3e-3, seed=7, threads=1)
    cal = cc.calibrate([(replace(spec, unit_id="0x" + f"{78:064x}", seed=8), fresh_state(START))], [VERIFIER])
    tol = cal.tolerance
    assert [k for k, _ in tol.loss_windows] == [1, 2, 4, 8, 16, 32] and tol.scan_loss_micro(2) is not None
    assert cc.Tolerance.from_dict(tol.to_dict()) == tol and cc.can_scan(spec, tol)
    ver = cc.PlanRunner(spec, fresh_state(START), VERIFIER)
    states, losses, proof = cc.record_policy(spec, START)
    asked: list[int] = []

    def reveal(step: int) -> cc.State:
        asked.append(step)
        return states[step]

    honest = cc.scan_segment(spec, proof, 1, reveal, tol, ver)
    assert not honest.fraud and "2 steps at a time" in honest.reason, honest.reason
    assert asked == list(range(32, 65, 2))  # the two committed ends and 15 states between them
    lie, lied = adversary.fake_step_loss(proof, losses, 32 + 9)
    r = cc.scan_segment(spec, lie, 1, cc.RecordedReveal(states), tol, ver)
    assert r.fraud and r.distance > 4 * r.threshold and "mean loss" in r.reason, r.reason
    # judged window by window against the per-step losses it submitted: the honest one cleared, and the fake stands
    # out by half its size (a 2-step window) instead of 1/32 of it, and the window is named
    ok = cc.scan_segment(spec, proof, 1, cc.RecordedReveal(states), tol, ver, step_losses=losses[32:])
    assert not ok.fraud and "each 2-step window's within" in ok.reason, ok.reason
    r2 = cc.scan_segment(spec, lie, 1, cc.RecordedReveal(states), tol, ver, step_losses=lied[32:])
    assert r2.fraud and r2.step == 40 and r2.distance > 12 * r.distance, r2.reason
    assert "steps 40-41's mean loss is" in r2.reason and "off the mean of those it submitted" in r2.reason
    assert not cc.can_scan(spec, replace(tol, loss_windows=((1, 0),)))  # calibrated for single steps only


def test_a_gpu_plan_names_its_model_and_only_then_replays_bit_for_bit_elsewhere() -> None:
    """Deterministic kernels give the same bits on the same GPU model only: a CUDA plan is exact when it names the
    model (what a verifier on that plan, or a referee with that GPU, replays bit for bit); every CPU plan is."""
    from node.device import local_plan
    from node.trainer import gpu_slug

    for label in ("cpu", "cpu/mb2", "cuda", "cuda:h200", "cuda:geforce-rtx-4090/mb64"):
        assert cc.Plan.parse(label).label == label
    assert cc.Plan.parse("cuda:h100/mb2") == cc.Plan("cuda", 2, "h100") != cc.Plan("cuda", 2)
    assert [cc.Plan.parse(x).exact for x in ("cpu", "cpu/mb4", "cuda", "cuda/mb2", "cuda:h200")] == \
        [True, True, False, False, True]
    assert gpu_slug("NVIDIA H200") == "h200" and gpu_slug("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"
    assert gpu_slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb" and len(gpu_slug("x" * 99)) == 24
    # an agent's plan as its machine runs it: a CUDA plan gets the GPU's model, a wrong one is refused
    assert local_plan(cc.Plan.parse("cuda/mb2"), "NVIDIA H200") == cc.Plan.parse("cuda:h200/mb2")
    assert local_plan(cc.Plan.parse("cuda:h200"), "NVIDIA H200").label == "cuda:h200"
    assert local_plan(cc.Plan.parse("cpu/mb2"), "NVIDIA H200") == cc.Plan("cpu", 2)
    with pytest.raises(GridMintValueError, match="names a h100 GPU, this machine has NVIDIA H200"):
        local_plan(cc.Plan.parse("cuda:h100"), "NVIDIA H200")


def test_the_same_bits_need_the_same_exact_plan_on_the_same_known_kernels() -> None:
    """A kernel build names what decides the bits besides the plan (torch build, CPU kind, ATen's kernel set); a
    child on other kernels (node.foreign) names other ones, and the schema takes both."""
    import re
    import subprocess
    import sys

    from node.device import kernel_build, plan_build
    from node.foreign import foreign_env
    from node.trainer import same_bits
    from protocol.schemas import KERNEL_BUILD

    here = kernel_build("cpu")
    assert plan_build(cc.Plan("cpu", 2)) == here and here.startswith("torch-") and "/aten-" in here
    child = subprocess.run([sys.executable, "-c", "from node.device import kernel_build; print(kernel_build())"],
                           env=foreign_env(), capture_output=True, text=True, check=True).stdout.strip()
    assert child != here and "aten-default" in child and child.endswith("mkl-compatible")
    for build in (here, child):
        assert re.fullmatch(KERNEL_BUILD, build)
    cpu, mb2, cuda = cc.Plan("cpu"), cc.Plan("cpu", 2), cc.Plan("cuda")
    assert same_bits(cpu, here, cpu, here) and same_bits(mb2, child, mb2, child)
    assert not same_bits(cpu, here, cpu, child)  # the same plan on other kernels
    assert not same_bits(cpu, "", cpu, "")  # kernels unsaid: never taken for the same
    assert not same_bits(cpu, here, mb2, here)  # another plan
    assert not same_bits(cuda, "x", cuda, "x")  # a GPU plan without its model is not exact
    assert same_bits(cc.Plan("cuda", 1, "h200"), "x", cc.Plan("cuda", 1, "h200"), "x")


def test_a_verifier_calibrates_against_what_its_machine_can_stand_in_for() -> None:
    """A verifier's tolerance is calibrated by running the provider's side here: a CPU plan on other kernels is run
    on other kernels (a child), and a GPU plan of another model or other GPU kernels cannot be run here at all (this
    GPU would compute this verifier's own bits, a zero drift): it is calibrated between this GPU and the CPU."""
    from node.verifier_agent import calibration_plans

    cpu, mb2 = cc.Plan("cpu"), cc.Plan("cpu", 2)
    h200, a100, h200mb2 = cc.Plan("cuda", 1, "h200"), cc.Plan("cuda", 1, "a100"), cc.Plan("cuda", 2, "h200")
    assert calibration_plans(mb2, "ours", cpu, "ours", "ours") == (cpu, mb2, False)
    assert calibration_plans(mb2, "theirs", cpu, "ours", "ours") == (cpu, mb2, True)
    assert calibration_plans(cpu, None, cpu, "ours", "ours") == (cpu, cpu, False)  # None: this machine's
    assert calibration_plans(cpu, "", h200, "gpu", "ours") == (h200, cpu, True)  # unsaid: taken as other
    assert calibration_plans(h200mb2, "gpu", h200, "gpu", "ours") == (h200, h200mb2, False)  # a real plan difference
    assert calibration_plans(a100, "gpu", h200, "gpu", "ours") == (cpu, cc.Plan("cuda"), False)  # another model
    assert calibration_plans(h200mb2, "old-torch", h200, "gpu", "ours") == (cpu, cc.Plan("cuda", 2), False)
    assert calibration_plans(cc.Plan("cuda"), "gpu", h200, "gpu", "ours") == (cpu, cc.Plan("cuda"), False)


def _crafted(spec: UnitSpec, honest: cc.State, a: int, n: int, target_micro: int) -> dict[str, torch.Tensor]:
    """What a cheat reveals before step ``a`` to back a loss it faked: its honest state with the weights moved towards
    ones fitted to the next ``n`` batches, just far enough that an ``n``-step replay on the referee's (public) plan
    averages ``target_micro`` (all of it public: the spec's data order, the referee's plan; a review's attack)."""
    from node import data
    from node.trainer import PROVIDER_PLAN, deterministic, load_training_state, mean_loss_micro, step_batch

    model, _ = load_training_state(spec, honest)
    batches = [data.make_batch(data.train_tokens(), step_batch(spec, t), spec.model.ctx) for t in range(a, a + n)]
    runner = cc.PlanRunner(spec, honest, PROVIDER_PLAN)
    names = [f"model.{k}" for k, _ in model.named_parameters()]

    def at(target: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        return {k: (v + alpha * (target[k] - v) if k in target else v).clone() for k, v in honest.items()}

    def off(st: cc.State) -> int:
        return mean_loss_micro(runner.replay(st, a, n)[1]) - target_micro

    sign = 1 if off(honest) > 0 else -1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with deterministic(spec.threads):
        for it in range(400):
            opt.zero_grad()
            (sign * sum(model.loss(x, y) for x, y in batches) / n).backward()
            opt.step()
            if it % 10 == 9:
                fitted = {k: p.detach().clone() for k, (_, p) in zip(names, model.named_parameters())}
                if sign * off(at(fitted, 1.0)) < 0:
                    break
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sign * off(at(fitted, mid)) > 0 else (lo, mid)
    return at(fitted, hi)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_states_made_up_to_back_a_faked_loss_in_a_chunked_scan_are_bisected_and_convicted(precision: str) -> None:
    """A segment of 32 steps is scanned 2 steps at a time from the states its provider reveals, which commit to
    nothing. A provider on cpu/mb2 faked a loss on step 41 and reveals, before step 40, a state made up so that the
    chunk replays to the faked losses: the chunks before and after it no longer land on the next state revealed, the
    worst is bisected to one step, and the one-step rule convicts (a review showed such states clearing the fake).
    Its true states are convicted on the loss, as before; an honest provider's chain never asks for more."""
    from node.trainer import PROVIDER_PLAN, mean_loss_micro

    mb2 = cc.Plan.parse("cpu/mb2")
    spec = UnitSpec(job_id="job-made-up", unit_id="0x" + f"{4401:064x}", round=0, shard=0, n_shards=1, model=TINY,
                    steps=64, segment_len=32, batch_size=4, lr=3e-3, seed=7, threads=1, precision=precision)
    tol = cc.tolerance_for(spec, PROVIDER_PLAN, provider_plan=mb2)
    states, losses, proof = cc.record_policy(spec, init_state(TINY, 3), plan=mb2)
    ref = cc.PlanRunner(spec, states[32], PROVIDER_PLAN)
    honest = cc.scan_segment(spec, proof, 1, lambda t: states[t], tol, ref, step_losses=losses[32:])
    assert not honest.fraud, honest.reason
    factor = 0.97 if precision == "bf16" else 1 - 16 * tol.loss_micro * 32 / 1e6 / losses[41]
    lie, lied = adversary.fake_step_loss(proof, losses, 41, factor)
    made_up = _crafted(spec, states[40], 40, 2, mean_loss_micro([float(x) for x in lied[40:42]]))
    asked: list[int] = []

    def reveal(t: int) -> cc.State:
        asked.append(t)
        return made_up if t == 40 else states[t]

    r = cc.scan_segment(spec, lie, 1, reveal, tol, ref, step_losses=lied[32:])
    assert r.fraud and "bisected" in r.reason and "replays" in r.reason, r.reason
    assert set(asked) - set(range(32, 65, 2)), asked  # states inside a chunk were asked for
    true = cc.scan_segment(spec, lie, 1, lambda t: states[t], tol, ref, step_losses=lied[32:])
    assert true.fraud and "mean loss" in true.reason, true.reason
