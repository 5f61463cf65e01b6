"""A unit stopped partway (a kill, a reboot, Ctrl-C) goes on from its last kept segment, and what it hands in is
byte for byte what an uninterrupted run hands in: a verifier replays each segment from its start state, which is
all a resumed run starts from. A journal that does not vouch for what is on disk is not trusted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import Tensor

from node.trainer import PROGRESS_FILE, UnitResult, UnitSpec, segment_path, train_unit

BUILD = "test-build"


class Killed(BaseException):
    pass


def kill_at(step: int, seen: list[int]):  # type: ignore[no-untyped-def]
    def on_step(s: int, _loss: float) -> None:
        seen.append(s)
        if s == step:
            raise Killed

    return on_step


def interrupted(spec: UnitSpec, start: dict[str, Tensor], workdir: Path, step: int) -> None:
    with pytest.raises(Killed):
        train_unit(spec, start, workdir, on_step=kill_at(step, []), resume_as=BUILD)


def same_result(a: UnitResult, b: UnitResult) -> None:
    assert a.proof == b.proof and a.losses == b.losses
    for x, y in zip([*a.segment_paths, a.final_path], [*b.segment_paths, b.final_path], strict=True):
        assert x.read_bytes() == y.read_bytes(), x.name


def test_a_unit_killed_partway_resumes_from_its_last_kept_segment_and_hands_in_the_same_proof(
        make_spec, global_state, tmp_path: Path) -> None:
    spec = make_spec(steps=12, segment_len=2)  # 6 segments
    whole = train_unit(spec, global_state, tmp_path / "whole")
    for kill in (5, 9, 11):  # inside segments 2, 4 and the last
        wd = tmp_path / f"killed-{kill}"
        interrupted(spec, global_state, wd, kill)
        journal = json.loads((wd / PROGRESS_FILE).read_text())
        seen: list[int] = []
        again = train_unit(spec, global_state, wd, on_step=kill_at(-1, seen), resume_as=BUILD)
        same_result(again, whole)
        # stopped by an exception: every segment trained before it is kept, only the one it was in is trained again
        # (a kill runs no handler: it loses the segment it lands in, see the next test)
        kept = len(journal["hashes"]) - 1
        assert kept == kill // 2 and seen == list(range(2 * kept, 12)), (kill, kept, seen)
        assert seen[0] > 0  # before the fix: every unit started over at step 0


def test_a_unit_killed_outright_loses_only_the_segment_it_was_killed_in(make_spec, global_state, tmp_path: Path,
                                                                       ) -> None:
    """A kill (an OOM kill, a power cut) runs no handler: what resumes is the journal as it was on disk. It used to be
    rewritten only at segment boundaries, before the state a segment ended in was hashed (off the training thread),
    so it named one state fewer and a kill cost the segment before as well. It is rewritten once that hash is in."""
    import time

    spec = make_spec(steps=12, segment_len=3)  # 4 segments; segment 2 is steps 6-8
    whole = train_unit(spec, global_state, tmp_path / "whole")
    wd = tmp_path / "unit"
    on_disk: list[str] = []

    def kill(step: int, _loss: float) -> None:
        if step == 6:
            time.sleep(1.0)  # segment 2's start state is hashed meanwhile (milliseconds at this size)
        if step == 7:
            on_disk.append((wd / PROGRESS_FILE).read_text())  # the journal as the kill finds it
            raise Killed

    with pytest.raises(Killed):
        train_unit(spec, global_state, wd, on_step=kill, resume_as=BUILD)
    (wd / PROGRESS_FILE).write_text(on_disk[0])  # (the stop's own rewrite undone: a kill runs none)
    assert len(json.loads(on_disk[0])["hashes"]) == 3  # states 0, 1 and 2 (before the fix: 0 and 1)
    seen: list[int] = []
    same_result(train_unit(spec, global_state, wd, on_step=kill_at(-1, seen), resume_as=BUILD), whole)
    assert seen == list(range(6, 12))  # segment 2 again, not segment 1


def test_a_damaged_or_foreign_progress_is_not_trusted(make_spec, global_state, tmp_path: Path) -> None:
    """A checkpoint changed on disk ends the resumable prefix before it (it would be committed to and uploaded: a
    proof no replay agrees with); a journal of another build, or of another start, is not used at all."""
    spec = make_spec(steps=12, segment_len=2)
    whole = train_unit(spec, global_state, tmp_path / "whole")
    wd = tmp_path / "unit"
    interrupted(spec, global_state, wd, 11)
    assert len(json.loads((wd / PROGRESS_FILE).read_text())["hashes"]) >= 5
    seg = segment_path(wd, 3)
    seg.write_bytes(seg.read_bytes()[:-1] + bytes([seg.read_bytes()[-1] ^ 1]))
    seen: list[int] = []
    same_result(train_unit(spec, global_state, wd, on_step=kill_at(-1, seen), resume_as=BUILD), whole)
    assert seen[0] == 4  # from segment 2's start, the last one before the damaged file

    for other in ({"resume_as": "another-build"}, {"start": {k: v + 1 for k, v in global_state.items()}}):
        interrupted(spec, global_state, wd, 11)
        seen = []
        start = other.get("start", global_state)
        result = train_unit(spec, start, wd, on_step=kill_at(-1, seen),  # type: ignore[arg-type]
                            resume_as=str(other.get("resume_as", BUILD)))
        assert seen[0] == 0, other
        if start is global_state:
            same_result(result, whole)

    (wd / PROGRESS_FILE).write_text("{not json")
    seen = []
    same_result(train_unit(spec, global_state, wd, on_step=kill_at(-1, seen), resume_as=BUILD), whole)
    assert seen[0] == 0


def test_without_resume_as_no_journal_is_kept_or_read(spec, global_state, honest, tmp_path: Path) -> None:
    wd = tmp_path / "unit"
    interrupted(spec, global_state, wd, 5)
    seen: list[int] = []
    same_result(train_unit(spec, global_state, wd, on_step=kill_at(-1, seen)), honest)
    assert seen[0] == 0
    plain = tmp_path / "plain"
    train_unit(spec, global_state, plain)
    assert not (plain / PROGRESS_FILE).exists()
