"""Work computed on other kernels (another CPU kind or torch build: node.device.kernel_build) than the referee's.

Deterministic training is reproducible bit for bit only on the same kernels. Here the provider really runs other
kernels: it trains in a child process on ATen's scalar kernels and MKL's compatible path (node.foreign), as a
machine with another vector ISA would. Taken for the referee's own kernels, its honest work does not replay bit for
bit and would be convicted; with its kernels known, the referee judges it like another plan, within a tolerance
calibrated against other kernels, and clears it, while a cheat on those kernels is still convicted."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from marketplace import referee
from node import checkpoint, foreign
from node import crosscheck as cc
from node.device import kernel_build
from node.trainer import UnitSpec
from tests.marketplace.test_referee import unit_spec

CPU = cc.Plan.parse("cpu")


def _spec(precision: str) -> UnitSpec:
    """The referee tests' unit, on the bench's small model (``bench proof`` cross_build): other kernels are ATen's
    scalar ones, several times slower, and the tolerance is calibrated on 4 units trained there."""
    from dataclasses import replace

    from node.model import ModelConfig

    return replace(unit_spec(), precision=precision, model=ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32))


def _judge(spec: UnitSpec, result: Any, states: list[dict[str, Any]], seg: int, build: str | None,
           d: Path) -> referee.Ruling:
    """The referee's ruling on segment ``seg``, the provider answering every reveal from the states it re-derives on
    its own kernels (as the live marketplace asks for them, one round at a time)."""
    ends = result.segment_paths[1:] + [result.final_path]
    reveals: dict[int, Path] = {}
    for _ in range(4 * spec.segment_len):
        ruling = referee.rule(spec, result.proof, seg, CPU, result.segment_paths[seg], ends[seg], reveals,
                              lambda step: "", result.losses, build=build)
        if ruling.fraud is not None:
            return ruling
        for step in (ruling.pending, *ruling.pending_more):
            assert step is not None
            reveals[step] = d / f"reveal-{seg}-{step}.safetensors"
            checkpoint.save(reveals[step], states[step], {})
    raise AssertionError(f"segment {seg}: no ruling after {4 * spec.segment_len} rounds")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_honest_work_on_other_kernels_is_cleared_and_would_have_been_slashed_as_ours(precision: str,
                                                                                   tmp_path: Path) -> None:
    spec = _spec(precision)
    result, states, build = foreign.train_unit(spec, 7, tmp_path / "unit", CPU)
    assert build != kernel_build("cpu") and "aten-default" in build
    for seg in range(spec.n_segments):
        # the same plan, other bits: a bit-for-bit referee (what it was for every "cpu" unit) convicts honest work
        mistaken = referee.rule(spec, result.proof, seg, CPU, result.segment_paths[seg],
                                (result.segment_paths[1:] + [result.final_path])[seg], {}, lambda step: "",
                                result.losses)
        assert mistaken.fraud is True and "end state differs" in mistaken.reason, mistaken
        ruling = _judge(spec, result, states, seg, build, tmp_path)
        assert ruling.fraud is False, ruling
        assert "on other kernels" in ruling.reason
        # and so is a provider whose kernels are unknown ("": an old client): never exact, never a bit-mismatch slash
        assert _judge(spec, result, states, seg, "", tmp_path).fraud is False


@pytest.mark.parametrize("cheat", ["fake-loss", "skip-last-update"])
def test_a_cheat_on_other_kernels_is_convicted_all_the_same(cheat: str, tmp_path: Path) -> None:
    """bf16, the wider drift where a cheat would hide: one step's loss 3% low (the middle segment), or one update
    skipped per segment with its step counters bumped; each cheated segment convicted, the honest ones cleared."""
    spec = _spec("bf16")
    result, states, build = foreign.train_unit(spec, 7, tmp_path / "unit", CPU, trainer=cheat)
    cheated = {spec.n_segments // 2} if cheat == "fake-loss" else set(range(spec.n_segments))
    for seg in range(spec.n_segments):
        ruling = _judge(spec, result, states, seg, build, tmp_path)
        assert ruling.fraud is (seg in cheated), (seg, ruling)


def test_only_a_verifier_on_the_referees_own_kernels_is_judged_by_its_replay() -> None:
    ours = kernel_build("cpu")
    backed = referee.Ruling(False, "cleared on the bisection", look_hash="0x" + "ab" * 32, look_ok=False,
                            look_reason="replay lands past the tolerance")
    assert referee.judge_accusation(backed, CPU, CPU, "0x" + "ab" * 32, build="other", verifier_build=ours).good
    faith = referee.judge_accusation(backed, CPU, CPU, "0x" + "ab" * 32, build="other", verifier_build="other")
    assert not faith.good and not faith.proven_false and "other kernels" in faith.reason
    # a bit-for-bit replay that matches the claim proves a same-plan accusation false only on the same kernels
    exact = referee.Ruling(False, "the replay reproduces the claim", look_hash="0x" + "cd" * 32, look_ok=True)
    assert referee.judge_accusation(exact, CPU, CPU, "0x" + "ab" * 32, build=ours, verifier_build=ours).proven_false
    faith = referee.judge_accusation(exact, CPU, CPU, "0x" + "ab" * 32, build="other", verifier_build="other")
    assert not faith.proven_false


def test_a_replay_on_the_providers_kernels_is_refused_when_the_child_runs_others() -> None:
    """bench proof's referee_pool replays work in a child on the provider's kernels: a child that computes with
    other ones (the simulation drifted from what the units were trained with) would measure nothing; it says so."""
    from protocol.errors import GridMintValueError

    with pytest.raises(GridMintValueError, match="the replaying child computed with .*aten-default.*, the units "
                                                 "with torch-2.13.0.example/x86_64.genuineintel.avx512"):
        foreign.replay_units([], CPU, "torch-2.13.0.example/x86_64.genuineintel.avx512/aten-avx512")
