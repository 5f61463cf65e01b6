"""Honest training: determinism, proof structure, replay with zero false flags, DiLoCo averaging."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from node import checkpoint
from node.model import init_state
from node.replay import check_segment, choose_segments, replay_segment
from node.trainer import (
    UnitSpec,
    average_states,
    checkpoint_size,
    evaluate,
    fresh_state,
    model_only,
    start_state_hash,
    state_hash,
    train_unit,
)
from protocol.errors import GridMintValueError
from protocol.proof import check_structure, make_proof


def test_two_runs_give_identical_hashes(spec, global_state, honest, workdir: Path) -> None:
    again = train_unit(spec, global_state, workdir)
    assert again.proof == honest.proof
    assert again.losses == honest.losses
    for a, b in zip(again.segment_paths, honest.segment_paths):
        assert a.read_bytes() == b.read_bytes()


def test_ambient_thread_count_does_not_matter(spec, global_state, honest, workdir: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train_unit(spec, global_state, workdir)
        assert torch.get_num_threads() == 2  # restored after the unit
    finally:
        torch.set_num_threads(before)
    assert result.proof.final_hash == honest.proof.final_hash


def test_two_thread_spec_is_reproducible(make_spec, global_state, tmp_path: Path) -> None:
    spec2 = make_spec(threads=2, steps=4)
    a = train_unit(spec2, global_state, tmp_path / "a")
    b = train_unit(spec2, global_state, tmp_path / "b")
    assert a.proof == b.proof


def test_honest_proof_is_well_formed(spec, global_state, honest) -> None:
    p = honest.proof
    check_structure(p, start_state_hash(global_state), spec.spec_hash())
    assert len(p.segments) == len(honest.segment_paths) == spec.n_segments
    assert len(honest.losses) == spec.steps and all(math.isfinite(x) for x in honest.losses)
    tensors, meta = checkpoint.load(honest.final_path)
    assert state_hash(tensors) == p.final_hash and meta["unit_id"] == spec.unit_id
    assert all(torch.equal(model_only(tensors)[k], v) for k, v in honest.final_model.items())
    for seg, path in zip(p.segments, honest.segment_paths):
        assert state_hash(checkpoint.load(path)[0]) == seg.start_hash


def test_every_honest_segment_replays_exactly(spec, honest) -> None:
    for i, path in enumerate(honest.segment_paths):
        verdict = check_segment(spec, honest.proof, i, path)
        assert verdict.ok, verdict
        assert verdict.replayed_end == verdict.claimed_end == honest.proof.segments[i].end_hash


def test_replays_on_the_kept_model_match_fresh_ones_across_units_shapes_and_evictions(
        make_spec, tiny_cfg, global_state, tmp_path: Path) -> None:
    """A verifier keeps one model + optimizer per job shape (node.trainer.kept_training_state) and copies each
    challenged state into it: replays interleaved over two units of a shape, three shapes (more than the kept
    slots, so pairs are evicted and rebuilt) and a state of another model in between still match every commitment
    bit for bit."""
    from node import trainer

    specs = [make_spec(unit_id="0x" + "b1" * 32), make_spec(unit_id="0x" + "b2" * 32, seed=43),
             make_spec(unit_id="0x" + "b3" * 32, lr=3e-3), make_spec(unit_id="0x" + "b4" * 32, precision="bf16")]
    units = [train_unit(s, global_state, tmp_path / str(i)) for i, s in enumerate(specs)]
    assert len({(s.model, s.lr, s.precision) for s in specs}) == 3 > trainer.REUSE_SLOTS
    # a claim whose committed start is a state of another model: refused as such, the kept pair left intact
    misfit = fresh_state(init_state(replace(tiny_cfg, d_model=16), seed=1))
    wrong = tmp_path / "misfit.safetensors"
    checkpoint.save(wrong, misfit, {})
    segs = list(units[0].proof.segments)
    segs[1] = replace(segs[1], start_hash=state_hash(misfit))
    lying = make_proof(unit_id=specs[0].unit_id, spec_hash=specs[0].spec_hash(), seed=specs[0].seed,
                       steps=specs[0].steps, segment_len=specs[0].segment_len, segments=segs)
    order = [(u, seg) for seg in range(specs[0].n_segments) for u in (3, 0, 2, 1)] + [(0, 0), (2, 3), (3, 1)]
    for k, (u, seg) in enumerate(order):
        verdict = check_segment(specs[u], units[u].proof, seg, units[u].segment_paths[seg])
        assert verdict.ok, (k, u, seg, verdict)
        if k % 5 == 0:
            bad = check_segment(specs[0], lying, 1, wrong)
            assert not bad.ok and "not a training state" in bad.reason, bad
    assert len(trainer._REUSED) == trainer.REUSE_SLOTS


def test_the_kept_pair_lives_in_the_state_hash_layout(spec, global_state, honest) -> None:
    """The kept model + AdamW (node.trainer.KeptTrainingState) hold their state in one buffer laid out as the state
    hash lays it out: its digest is the state hash of the pair's state after a load and after training steps (the
    weights and moments the optimizer updates in place are the buffer's), and a state that does not fit is refused
    before anything is copied."""
    from node import trainer
    from protocol.errors import CheckpointError

    tensors, _ = checkpoint.load(honest.segment_paths[1])
    with trainer.deterministic(spec.threads):
        kept = trainer.kept_training_state(spec, tensors)
        kept.load(spec, tensors)
        assert kept.state_hash() == state_hash(tensors) == honest.proof.segments[1].start_hash
        trainer.run_segment(spec, kept.model, kept.opt, 1)
        live = trainer.export_training_state(kept.model, kept.opt)
        assert kept.state_hash() == state_hash(live) == honest.proof.segments[1].end_hash
        misfit = dict(tensors)
        misfit.pop(next(iter(misfit)))
        with pytest.raises(CheckpointError, match="does not fit"):
            kept.load(spec, misfit)
        assert kept.state_hash() == honest.proof.segments[1].end_hash  # nothing copied


def test_a_state_held_in_memory_with_other_strides_replays_bit_for_bit(spec, honest) -> None:
    """A revealed state whose 2-D tensors are laid out transposed in memory (same values, other strides) replays to
    the commitment, and so does the next segment on the kept pair built from it (before the kept pair held its
    state in the hash's layout, a pair built from such a state kept its strides and replayed every later segment
    of the shape wrong; found by a review)."""
    from node import trainer
    from node.replay import check_state

    trainer._REUSED.clear()
    tensors, _ = checkpoint.load(honest.segment_paths[1])
    odd = {n: (t.t().contiguous().t() if t.dim() == 2 else t) for n, t in tensors.items()}
    assert any(not t.is_contiguous() for t in odd.values())
    assert check_state(spec, honest.proof, 1, odd).ok
    assert check_segment(spec, honest.proof, 2, honest.segment_paths[2]).ok


def test_a_gpu_plans_check_refuses_a_wrong_start_before_any_device_work(spec, honest, monkeypatch) -> None:
    """On a plan off the CPU the revealed state is hashed before anything is moved to the device: a state that is
    not the committed start gets its verdict even on a machine whose device would refuse it (found by a review)."""
    from node.replay import check_state
    from node.trainer import Plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any device work would raise
    tensors, _ = checkpoint.load(honest.segment_paths[1])
    wrong = {n: t.clone() for n, t in tensors.items()}
    wrong["model.tok.weight"].view(-1)[0] += 1
    verdict = check_state(spec, honest.proof, 1, wrong, Plan("cuda", 1, "h100"))
    assert not verdict.ok and "not the committed start" in verdict.reason


def test_replay_under_other_ambient_threads_still_matches(spec, honest) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = replay_segment(spec, 1, honest.segment_paths[1])
    finally:
        torch.set_num_threads(before)
    assert result.end_hash == honest.proof.segments[1].end_hash
    assert list(result.losses) == honest.losses[spec.segment_len : 2 * spec.segment_len]


def test_on_step_sees_every_step(spec, global_state, honest, workdir: Path) -> None:
    seen: list[tuple[int, float]] = []
    train_unit(spec, global_state, workdir, on_step=lambda s, loss: seen.append((s, loss)))
    assert [s for s, _ in seen] == list(range(spec.steps))
    assert [loss for _, loss in seen] == honest.losses


def test_choose_segments_is_uniform_deterministic_and_distinct(honest) -> None:
    p = honest.proof
    picks = choose_segments(p, 2, 1234)
    assert picks == choose_segments(p, 2, 1234)
    assert len(set(picks)) == 2 and all(0 <= i < len(p.segments) for i in picks)
    assert choose_segments(p, 99, 1) == list(range(len(p.segments)))
    counts = [0] * len(p.segments)
    for seed in range(800):
        for i in choose_segments(p, 1, seed):
            counts[i] += 1
    assert min(counts) > 150  # 200 expected each
    with pytest.raises(GridMintValueError):
        choose_segments(p, 0, 1)


def test_spec_json_round_trip_and_hash(spec: UnitSpec) -> None:
    assert UnitSpec.from_json(spec.to_json()) == spec
    assert spec.spec_hash() == UnitSpec.from_json(spec.to_json()).spec_hash()
    assert "precision" not in spec.to_dict()  # fp32 units keep the hash they always had
    bf16 = replace(spec, precision="bf16")
    assert UnitSpec.from_json(bf16.to_json()) == bf16 and bf16.to_dict()["precision"] == "bf16"
    for change in ({"unit_id": "0x" + "b2" * 32}, {"shard": 1}, {"lr": 0.02}, {"threads": 2}, {"round": 1},
                   {"precision": "bf16"}):
        assert replace(spec, **change).spec_hash() != spec.spec_hash(), change


@pytest.mark.parametrize(
    "change",
    [{"steps": 7}, {"shard": 2}, {"unit_id": "job"}, {"lr": float("nan")}, {"seed": -1}, {"threads": 0}, {"job_id": ""},
     {"precision": "fp16"}],
)
def test_spec_validation(make_spec, change) -> None:
    with pytest.raises(GridMintValueError):
        make_spec(**change)


def test_a_bf16_unit_trains_reproducibly_in_its_own_arithmetic_and_replays_exactly(make_spec, global_state, honest,
                                                                                  tmp_path: Path) -> None:
    """bf16 autocast (matmuls in bfloat16, weights, moments and loss in float32) is another computation than fp32,
    bit-for-bit reproducible on one plan; a replay runs the unit's precision, so honest work passes and a cheat
    does not."""
    from node.adversary import skip_steps

    spec = make_spec(precision="bf16")
    a = train_unit(spec, global_state, tmp_path / "a")
    b = train_unit(spec, global_state, tmp_path / "b")
    assert a.proof == b.proof
    assert a.proof.final_hash != honest.proof.final_hash  # not the fp32 computation
    assert all(v.dtype == torch.float32 for v in checkpoint.load(a.final_path)[0].values() if v.is_floating_point())
    assert all(check_segment(spec, a.proof, i, p).ok for i, p in enumerate(a.segment_paths))
    cheat = skip_steps(spec, global_state, tmp_path / "cheat")
    assert not any(check_segment(spec, cheat.proof, i, p).ok for i, p in enumerate(cheat.segment_paths))


def test_start_must_fit_the_model(spec, global_state, workdir: Path) -> None:
    with pytest.raises(GridMintValueError):
        train_unit(spec, {k: v for k, v in global_state.items() if k != "tok.weight"}, workdir)


def test_average_is_the_mean_and_order_independent(tiny_cfg) -> None:
    states = [init_state(tiny_cfg, s) for s in range(4)]
    avg = average_states(states)
    assert all(torch.equal(avg[k], average_states(states[::-1])[k]) for k in avg)
    assert all(torch.equal(avg[k], average_states([states[2], states[0], states[3], states[1]])[k]) for k in avg)
    k = "tok.weight"
    expected = (torch.stack([s[k].double() for s in states]).mean(0)).float()
    assert torch.allclose(avg[k], expected, atol=1e-7) and avg[k].dtype == torch.float32
    with pytest.raises(GridMintValueError):
        average_states([states[0], {k: v for k, v in states[1].items() if k != "head.bias"}])


def test_loss_goes_down_over_rounds_of_train_and_average(make_spec, tiny_cfg, tmp_path: Path) -> None:
    state = init_state(tiny_cfg, 0)
    history = [evaluate(tiny_cfg, state)]
    assert abs(history[0] - math.log(256)) < 0.1
    for rnd in range(3):
        results = [
            train_unit(make_spec(round=rnd, shard=s, unit_id="0x" + f"{rnd:02x}{s:02x}" * 16), state, tmp_path / f"{rnd}-{s}")
            for s in range(2)
        ]
        state = average_states([r.final_model for r in results])
        history.append(evaluate(tiny_cfg, state))
    assert all(b < a for a, b in zip(history, history[1:])), history
    assert history[-1] < history[0] - 1.0, history


def test_commitments_run_off_the_training_loop_and_a_failed_checkpoint_write_stops_the_unit(
    make_spec, global_state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every checkpoint the trainer wrote in the background holds the state its commitment names, the stall it
    reports is part of the run, and a write that fails (a full disk) raises instead of handing in a unit whose
    segment checkpoints are missing."""
    import time

    spec = make_spec(steps=8)
    t0 = time.perf_counter()
    result = train_unit(spec, global_state, tmp_path / "ok")
    assert 0 < result.commit_s < time.perf_counter() - t0
    for i, path in enumerate(result.segment_paths):
        assert state_hash(checkpoint.load(path)[0]) == result.proof.segments[i].start_hash

    real_save, calls = checkpoint.save, []

    def failing_save(path, tensors, metadata):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train_unit(spec, global_state, tmp_path / "full")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpoint_size_is_the_size_of_every_checkpoint_a_unit_writes(make_spec, global_state, tmp_path: Path,
                                                                       precision: str) -> None:
    """What the marketplace refuses a job on (a checkpoint over its upload limit) must be the exact size of what a node
    uploads: every segment's checkpoint (one- and two-digit labels) and the final one, in either precision."""
    spec = make_spec(steps=22, segment_len=2, precision=precision)
    result = train_unit(spec, global_state, tmp_path)
    sizes = [p.stat().st_size for p in result.segment_paths]
    assert sizes == [checkpoint_size(spec, s) for s in range(spec.n_segments)]
    assert result.final_path.stat().st_size == checkpoint_size(spec, None) >= max(sizes)  # "final": the widest label
