"""Planted known-bad segments (marketplace.canary): well-formed claims that only a replay exposes."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from marketplace import canary
from node import checkpoint
from node.model import ModelConfig, init_state
from node.replay import check_segment, claim_problem
from node.trainer import UnitResult, UnitSpec, start_state_hash, state_hash, train_unit
from protocol.proof import TrainingProof, check_structure

START = init_state(ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32), seed=7)
SPEC = UnitSpec(job_id="job-canary", unit_id="0x" + "c3" * 32, round=0, shard=0, n_shards=2,
                model=ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32), steps=8, segment_len=2, batch_size=4,
                lr=1e-2, seed=42, threads=1)


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> UnitResult:
    return train_unit(SPEC, START, tmp_path_factory.mktemp("unit"))


def _forge(unit: UnitResult) -> dict:
    fake = canary.forge(SPEC, unit.proof, [str(p) for p in unit.segment_paths], str(unit.final_path))
    assert fake is not None
    return fake


def test_a_canary_is_a_well_formed_claim_that_an_honest_replay_rejects(unit: UnitResult) -> None:
    seen = set()
    for _ in range(12):  # the segment is drawn at random: every one of them must work
        fake = _forge(unit)
        seg, spec = fake["segment"], UnitSpec.from_json(fake["spec"])
        proof = TrainingProof.from_dict(fake["proof"])
        seen.add(seg)
        # a fresh unit and "provider", the real job's training otherwise
        assert fake["unit_id"] != SPEC.unit_id and spec.unit_id == fake["unit_id"] == proof.unit_id
        assert replace(spec, unit_id=SPEC.unit_id) == SPEC and fake["provider"].startswith("0x")
        # well formed: cheap checks (structure, chain, root, data order) find nothing
        check_structure(proof, start_state_hash(START), spec.spec_hash())
        assert claim_problem(spec, proof, seg) is None
        # the handed checkpoints are the claimed states: the start is real, the end really trained, one segment on
        assert state_hash(checkpoint.load(Path(fake["checkpoint_blob"]))[0]) == proof.segments[seg].start_hash
        assert state_hash(checkpoint.load(Path(fake["end_blob"]))[0]) == proof.segments[seg].end_hash
        assert proof.segments[seg].end_hash == unit.proof.segments[seg + 1].end_hash != fake["true_end"]
        # ... and replaying the segment exposes it
        verdict = check_segment(spec, proof, seg, Path(fake["checkpoint_blob"]))
        assert not verdict.ok and verdict.replayed_end == fake["true_end"], verdict.reason
    assert seen <= set(range(len(unit.proof.segments) - 1)) and len(seen) > 1


def test_no_canary_from_a_single_segment_unit(unit: UnitResult) -> None:
    one = unit.proof.segments[:1]
    proof = replace(unit.proof, segments=one)
    assert canary.forge(SPEC, proof, [str(unit.segment_paths[0])], str(unit.final_path)) is None


def test_the_draw_is_never_at_rate_zero_always_at_one_and_about_the_rate_between() -> None:
    assert not any(canary.draw(0) for _ in range(1000))
    assert all(canary.draw(1) for _ in range(1000))
    hits = sum(canary.draw(0.2) for _ in range(20_000))
    assert 3_400 < hits < 4_600  # 20% of 20,000, +-7.5 sigma
