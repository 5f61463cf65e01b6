"""Planted known-bad segments (marketplace.canary): well-formed claims that only a replay exposes."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import math

import pytest
import torch

from marketplace import canary
from marketplace.blobs import BlobStore
from node import checkpoint
from node.model import ModelConfig, init_state
from node.replay import check_segment, claim_problem
from node.trainer import UnitResult, UnitSpec, checkpoint_metadata, start_state_hash, state_hash, train_unit
from protocol.proof import TrainingProof, check_structure

START = init_state(ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32), seed=7)
SPEC = UnitSpec(job_id="job-canary", unit_id="0x" + "c3" * 32, round=0, shard=0, n_shards=2,
                model=ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32), steps=8, segment_len=2, batch_size=4,
                lr=1e-2, seed=42, threads=1)


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> UnitResult:
    return train_unit(SPEC, START, tmp_path_factory.mktemp("unit"))


@pytest.fixture(scope="module")
def store(unit: UnitResult, tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    """The marketplace's blob store holding the unit's uploaded checkpoints."""
    return BlobStore(tmp_path_factory.mktemp("blobs"))


def _forge(unit: UnitResult, store: BlobStore, spec: UnitSpec = SPEC) -> dict:
    blobs = [store.put_file(p) for p in unit.segment_paths]
    fake = canary.forge(spec, unit.proof, blobs, store.put_file(unit.final_path), store)
    assert fake is not None
    return fake


def test_a_canary_is_a_well_formed_claim_that_an_honest_replay_rejects(unit: UnitResult, store: BlobStore) -> None:
    seen = set()
    for _ in range(12):  # the segment is drawn at random: every one of them must work
        fake = _forge(unit, store)
        seg, spec = fake["segment"], UnitSpec.from_json(fake["spec"])
        proof = TrainingProof.from_dict(fake["proof"])
        seen.add(seg)
        # a fresh unit and "provider", the real job's training otherwise
        assert fake["unit_id"] != SPEC.unit_id and spec.unit_id == fake["unit_id"] == proof.unit_id
        assert replace(spec, unit_id=SPEC.unit_id) == SPEC and fake["provider"].startswith("0x")
        # well formed: cheap checks (structure, chain, root, data order) find nothing
        check_structure(proof, start_state_hash(START), spec.spec_hash())
        assert claim_problem(spec, proof, seg) is None
        # the handed checkpoints are the claimed states, labelled for the canary's unit: the start is the real one,
        # the end really trained (one segment further on) with the step counters of the segment's true end
        (start, smeta), (end, emeta) = (checkpoint.load(store.path(fake[k])) for k in ("checkpoint_blob", "end_blob"))
        assert state_hash(start) == proof.segments[seg].start_hash == unit.proof.segments[seg].start_hash
        assert state_hash(end) == proof.segments[seg].end_hash != fake["true_end"]
        assert smeta == checkpoint_metadata(spec, seg) and emeta == checkpoint_metadata(spec, seg + 1)
        true_end = checkpoint.load(unit.segment_paths[seg + 1])[0]
        further = checkpoint.load(unit.segment_paths[seg + 2] if seg + 2 < len(unit.segment_paths)
                                  else unit.final_path)[0]
        for k, t in end.items():
            assert torch.equal(t, true_end[k] if k.endswith(".step") else further[k]), k
        # ... and replaying the segment exposes it
        verdict = check_segment(spec, proof, seg, store.path(fake["checkpoint_blob"]))
        assert not verdict.ok and verdict.replayed_end == fake["true_end"], verdict.reason
    assert seen <= set(range(len(unit.proof.segments) - 1)) and len(seen) > 1


def test_no_canary_from_a_single_segment_unit(unit: UnitResult, store: BlobStore) -> None:
    proof = replace(unit.proof, segments=unit.proof.segments[:1])
    assert canary.forge(SPEC, proof, [store.put_file(unit.segment_paths[0])], store.put_file(unit.final_path),
                        store) is None


def test_the_draw_is_never_at_rate_zero_always_at_one_and_about_the_rate_between() -> None:
    assert not any(canary.draw(0) for _ in range(1000))
    assert all(canary.draw(1) for _ in range(1000))
    hits = sum(canary.draw(0.2) for _ in range(20_000))
    assert 3_400 < hits < 4_600  # 20% of 20,000, +-7.5 sigma


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_verifier_on_another_plan_flags_a_canary_far_past_its_tolerance(tmp_path: Path, precision: str) -> None:
    """Across plans (no bit-for-bit replay) the forged end is one whole segment of updates away from the replay:
    flagged, and far enough past the tolerance that the verifier bonds its accusation (>= its bond margin, 4)."""
    from node import crosscheck as cc

    spec = replace(SPEC, precision=precision)
    unit = train_unit(spec, START, tmp_path / "unit")
    plan = cc.Plan.parse("cpu/mb2")
    tol = cc.tolerance_for(spec, plan)
    store = BlobStore(tmp_path / "blobs")
    for _ in range(4):
        fake = _forge(unit, store, spec)
        cspec, seg = UnitSpec.from_json(fake["spec"]), fake["segment"]
        start, end = (checkpoint.load(store.path(fake[k]))[0] for k in ("checkpoint_blob", "end_blob"))
        v = cc.check_segment_across(cspec, TrainingProof.from_dict(fake["proof"]), seg, start, end, tol,
                                    cc.PlanRunner(cspec, start, plan))
        assert not v.ok and v.kind == "state" and 4 <= v.margin < math.inf, v
