"""The referee's good-faith test (marketplace.referee.good_faith): when it clears a provider, does the verifier keep
its bond? On a real case: honest micro-batch training (plan cpu/mb2) that a cpu verifier's calibrated tolerance
disputes (job id found by searching the flow test's job shape; honest drift across plans passes the tolerance in a
few percent of segments)."""
from __future__ import annotations

from pathlib import Path

import pytest

from marketplace import referee
from marketplace.service import model_config, unit_id_for
from node import checkpoint
from node import crosscheck as cc
from node.model import init_state
from node.trainer import UnitSpec, fresh_state
from protocol.schemas import JobSpec

#: Honest cpu/mb2 training of this job's only unit lands 4.76x past a cpu verifier's tolerance in segment 0 (past
#: the old bond margin of 4: before, an honest verifier bonded this accusation and lost its bond).
DRIFTING_JOB = "0x5d8934355fb8917e0dcfaa7d160a677cbe102f034c3a03f28081b6c298963a46"
DRIFTING_SPEC = JobSpec(rounds=1, units_per_round=1, steps_per_unit=16, segment_len=8, batch_size=8,
                        max_price=2 * 10**18, verification="full")
MB2, CPU = cc.Plan.parse("cpu/mb2"), cc.Plan.parse("cpu")


def unit_spec(job_id: str = DRIFTING_JOB, spec: JobSpec = DRIFTING_SPEC) -> UnitSpec:
    return UnitSpec(job_id=job_id, unit_id=unit_id_for(job_id, 0, 0), round=0, shard=0, n_shards=1,
                    model=model_config(spec), steps=spec.steps_per_unit, segment_len=spec.segment_len,
                    batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed * 1_000_003, threads=1)


@pytest.fixture(scope="module")
def drifting(tmp_path_factory) -> tuple[UnitSpec, object, list[Path], list[str]]:
    """The unit trained honestly on cpu/mb2: its proof, segment-boundary checkpoints, and the hash a cpu verifier's
    replay of each segment reaches."""
    spec = unit_spec()
    start = init_state(spec.model, DRIFTING_SPEC.seed)
    states, _, proof = cc.record_policy(spec, start, plan=MB2)
    d = tmp_path_factory.mktemp("drift")
    L = spec.segment_len
    paths = [d / f"s{i}.safetensors" for i in range(spec.n_segments + 1)]
    for i, path in enumerate(paths):
        checkpoint.save(path, states[i * L], {})
    tol = cc.tolerance_for(spec, CPU, provider_plan=MB2)
    runner = cc.PlanRunner(spec, fresh_state(start), CPU)
    verdicts = [cc.check_segment_across(spec, proof, s, states[s * L], states[(s + 1) * L], tol, runner)
                for s in range(spec.n_segments)]
    assert not verdicts[0].ok and verdicts[0].kind == "state" and verdicts[0].margin > 4, verdicts[0].reason
    assert verdicts[1].ok, verdicts[1].reason
    return spec, proof, paths, [v.replayed_hash for v in verdicts]


def test_an_honest_accusation_past_the_tolerance_is_in_good_faith(drifting) -> None:
    spec, proof, paths, replayed = drifting
    faith, why = referee.good_faith(spec, proof, 0, MB2, paths[0], paths[1], CPU, replayed[0])
    assert faith, why
    assert "reproduced the verifier's replay" in why


def test_a_made_up_replay_a_replay_within_tolerance_or_another_plan_is_not(drifting) -> None:
    spec, proof, paths, replayed = drifting
    forged = "0x" + "ab" * 32
    faith, why = referee.good_faith(spec, proof, 0, MB2, paths[0], paths[1], CPU, forged)
    assert not faith and "signed a replay ending in 0xababababab" in why
    # segment 1 replays within the tolerance: accusing it was not honest, even with the honest replay's hash
    faith, why = referee.good_faith(spec, proof, 1, MB2, paths[1], paths[2], CPU, replayed[1])
    assert not faith and "within the tolerance" in why
    # a verifier declaring a plan the referee does not run cannot be reproduced
    faith, why = referee.good_faith(spec, proof, 0, MB2, paths[0], paths[1], MB2, replayed[0])
    assert not faith and "cannot reproduce a replay on plan cpu/mb2" in why
    # a provider on the verifier's own plan is checked bit for bit: a cleared dispute there is never in good faith
    faith, why = referee.good_faith(spec, proof, 0, CPU, paths[0], paths[1], CPU, replayed[0])
    assert not faith and "bit for bit" in why


def test_the_referee_convicts_a_claim_wrong_on_its_face_and_bisects_the_rest(drifting) -> None:
    """A segment committed with another data order than the spec's is fraud on its face, whatever its states (before,
    the cross-plan referee replayed and bisected the states only, so it cleared such a claim and the verifier that
    flagged it lost its bond). An honest segment's dispute goes to bisection: the referee asks for the midpoint."""
    from dataclasses import replace

    from protocol.proof import make_proof

    spec, proof, paths, _ = drifting
    segments = [replace(c, batch_digest="0x" + "11" * 32) if c.index == 0 else c for c in proof.segments]
    forged = make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                        segment_len=proof.segment_len, segments=segments)
    ruling = referee.rule(spec, forged, 0, MB2, paths[0], paths[1], {}, lambda step: "")
    assert ruling.fraud is True and "is not the spec's data order" in ruling.reason
    ruling = referee.rule(spec, proof, 0, MB2, paths[0], paths[1], {}, lambda step: "")
    assert ruling.fraud is None and ruling.pending == spec.segment_len // 2
