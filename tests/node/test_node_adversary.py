"""Every cheat passes the cheap structural check where a real cheater could make it pass, and replay catches it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from node import checkpoint
from node.adversary import ADVERSARIES
from node.replay import check_segment
from node.trainer import UnitResult, start_state_hash, train_unit
from protocol.errors import ProofError
from protocol.proof import SegmentCommit, check_structure, make_proof


@pytest.fixture(scope="module", params=sorted(ADVERSARIES))
def cheat(request, spec, global_state, tmp_path_factory) -> tuple[str, UnitResult]:
    name = request.param
    return name, ADVERSARIES[name](spec, global_state, tmp_path_factory.mktemp(name))


def test_registry_has_the_required_cheats() -> None:
    assert {"skip-steps", "random-weights", "replay-old"} <= set(ADVERSARIES)


def test_structure_check(cheat, spec, global_state) -> None:
    name, result = cheat
    if name == "replay-old-verbatim":
        with pytest.raises(ProofError, match="spec"):
            check_structure(result.proof, start_state_hash(global_state), spec.spec_hash())
    else:  # only a replay can expose these
        check_structure(result.proof, start_state_hash(global_state), spec.spec_hash())


def test_uploaded_checkpoints_match_their_commitments(cheat) -> None:
    from node.trainer import state_hash

    name, result = cheat
    for seg, path in zip(result.proof.segments, result.segment_paths):
        assert state_hash(checkpoint.load(path)[0]) == seg.start_hash, name


def test_every_segment_is_flagged_by_replay(cheat, spec) -> None:
    name, result = cheat
    verdicts = [check_segment(spec, result.proof, i, p) for i, p in enumerate(result.segment_paths)]
    if name in ("idle-segment", "fake-loss"):  # one bad segment; the others are real work from where it left off
        assert [not v.ok for v in verdicts] == [i == spec.n_segments // 2 for i in range(spec.n_segments)], verdicts
        if name == "fake-loss":  # honest states, a lie in the committed mean loss alone
            bad = verdicts[spec.n_segments // 2]
            assert bad.replayed_end == bad.claimed_end and "committed mean loss" in bad.reason, bad
        return
    assert not any(v.ok for v in verdicts), (name, verdicts)
    if name in ("skip-steps", "random-weights", "replay-old", "skip-last-update", "low-precision"):
        assert all(v.reason.startswith("replayed end state differs") for v in verdicts), verdicts
        assert all(v.replayed_end != v.claimed_end for v in verdicts)


def test_skip_last_update_commits_the_honest_losses_so_only_its_states_betray_it(spec, global_state,
                                                                               tmp_path: Path) -> None:
    cheat = ADVERSARIES["skip-last-update"](spec, global_state, tmp_path / "cheat")
    honest = train_unit(spec, global_state, tmp_path / "honest")
    assert [c.loss_micro for c in cheat.proof.segments[:1]] == [c.loss_micro for c in honest.proof.segments[:1]]
    assert cheat.losses[:spec.segment_len] == honest.losses[:spec.segment_len]
    assert cheat.proof.segments[0].end_hash != honest.proof.segments[0].end_hash
    cs, hs = checkpoint.load(cheat.segment_paths[1])[0], checkpoint.load(honest.segment_paths[1])[0]
    assert all(torch.equal(cs[k], hs[k]) for k in cs if k.endswith(".step"))  # its step counters do not give it away


def test_replay_old_is_real_work_for_another_shard(spec, global_state, tmp_path: Path) -> None:
    result = ADVERSARIES["replay-old"](spec, global_state, tmp_path)
    assert result.proof.unit_id == spec.unit_id
    assert result.proof.segments[0].start_hash == start_state_hash(global_state)


# --- a provider that trained honestly but uploads something else, or claims other batches


def test_checkpoint_not_matching_its_commitment_is_flagged(spec, honest) -> None:
    v = check_segment(spec, honest.proof, 2, honest.segment_paths[1])
    assert not v.ok and "not the committed start" in v.reason and v.replayed_end is None


@pytest.mark.parametrize("blob", [b"garbage", b"PK\x03\x04zipzip"])
def test_invalid_checkpoint_is_flagged(spec, honest, blob: bytes) -> None:
    v = check_segment(spec, honest.proof, 0, blob)
    assert not v.ok and v.reason.startswith("checkpoint rejected")


def test_checkpoint_of_wrong_shape_is_flagged(spec, honest, global_state) -> None:
    blob = st_save({k: v.contiguous() for k, v in global_state.items()})  # model only, no optimizer
    proof = honest.proof
    from dataclasses import replace

    from node.trainer import state_hash

    segs = list(proof.segments)
    segs[0] = replace(segs[0], start_hash=state_hash(checkpoint.load(blob)[0]))
    forged = make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                        segment_len=proof.segment_len, segments=segs)
    v = check_segment(spec, forged, 0, blob)
    assert not v.ok and "not a training state" in v.reason


def test_claimed_batches_other_than_the_specs_are_flagged(spec, honest) -> None:
    from dataclasses import replace

    segs = list(honest.proof.segments)
    segs[1] = replace(segs[1], batch_digest="0x" + "11" * 32)
    p = honest.proof
    forged = make_proof(unit_id=p.unit_id, spec_hash=p.spec_hash, seed=p.seed, steps=p.steps,
                        segment_len=p.segment_len, segments=segs)
    v = check_segment(spec, forged, 1, honest.segment_paths[1])
    assert not v.ok and "batch digest" in v.reason


def test_lying_about_the_loss_is_flagged(spec, honest) -> None:
    from dataclasses import replace

    segs = list(honest.proof.segments)
    segs[0] = replace(segs[0], loss_micro=segs[0].loss_micro - 500_000)
    p = honest.proof
    forged = make_proof(unit_id=p.unit_id, spec_hash=p.spec_hash, seed=p.seed, steps=p.steps,
                        segment_len=p.segment_len, segments=segs)
    v = check_segment(spec, forged, 0, honest.segment_paths[0])
    assert not v.ok and "loss" in v.reason


def test_proof_for_another_spec_is_flagged_by_check_segment(make_spec, honest) -> None:
    other = make_spec(shard=1)
    v = check_segment(other, honest.proof, 0, honest.segment_paths[0])
    assert not v.ok and "proof is for spec" in v.reason
