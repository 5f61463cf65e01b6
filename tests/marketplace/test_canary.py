"""Planted known-bad segments (marketplace.canary): well-formed claims that only a replay exposes."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import itertools
import math

import pytest
import torch

from marketplace import canary
from marketplace.blobs import BlobStore
from node import checkpoint
from node.model import ModelConfig, init_state
from node.crosscheck import distance
from node.replay import check_segment, claim_problem
from node.trainer import (ADAMW_BETAS, UnitResult, UnitSpec, checkpoint_metadata, start_state_hash, state_hash,
                          train_unit)
from protocol.proof import ZERO_HASH, TrainingProof, check_structure, segment_view

START = init_state(ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32), seed=7)
SPEC = UnitSpec(job_id="job-canary", unit_id="0x" + "c3" * 32, round=0, shard=0, n_shards=2,
                model=ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32), steps=16, segment_len=4, batch_size=4,
                lr=1e-2, seed=42, threads=1)


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> UnitResult:
    return train_unit(SPEC, START, tmp_path_factory.mktemp("unit"))


@pytest.fixture(scope="module")
def store(unit: UnitResult, tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    """The marketplace's blob store holding the unit's uploaded checkpoints."""
    return BlobStore(tmp_path_factory.mktemp("blobs"))


@pytest.fixture
def elementwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Canaries made up elementwise (:func:`marketplace.canary.carried`), as for a job whose segment costs more to
    train again than the operator's budget (``canary.BUDGET``; none then for a true prefix either)."""
    monkeypatch.setattr(canary, "BUDGET", 0)
    assert not canary.retrainable(SPEC)


@pytest.fixture(params=["retrained", "elementwise"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Either way of forging a canary."""
    if request.param == "elementwise":
        monkeypatch.setattr(canary, "BUDGET", 0)
    assert canary.retrainable(SPEC) == (request.param == "retrained")
    return str(request.param)


def _blobs(unit: UnitResult, store: BlobStore) -> tuple[list[str], str]:
    return [store.put_file(p) for p in unit.segment_paths], store.put_file(unit.final_path)


def test_a_canary_is_the_real_task_with_a_forged_claim_that_only_a_replay_rejects(unit: UnitResult, store: BlobStore,
                                                                                  elementwise: None) -> None:
    blobs, final = _blobs(unit, store)
    n = len(unit.proof.segments)
    states = [checkpoint.load(p)[0] for p in unit.segment_paths] + [checkpoint.load(unit.final_path)[0]]
    for seg in range(n - 1):
        fake = canary.forge(SPEC, unit.proof, seg, blobs, final, store, prefix=0)
        assert fake is not None
        proof = TrainingProof.from_dict(fake["proof"])
        # the real unit's claim but for this one segment: well formed (structure, chain, root, data order)
        assert proof.unit_id == SPEC.unit_id and proof.merkle_root != unit.proof.merkle_root
        assert [i for i, (a, b) in enumerate(zip(proof.segments, unit.proof.segments)) if a != b] == [seg, seg + 1]
        check_structure(proof, start_state_hash(START), SPEC.spec_hash())
        assert claim_problem(SPEC, proof, seg) is None
        # the forged end: the start moved as the next segment moved (forward) or, from the third segment on, as
        # the one before did (backward), whichever lands farther from the truth; the step counters of the true end;
        # labelled like the unit's own checkpoint
        end, meta = checkpoint.load(store.path(fake["end_blob"]))
        real_end, real_meta = checkpoint.load(unit.segment_paths[seg + 1])
        start = states[seg]
        assert meta == real_meta == checkpoint_metadata(SPEC, seg + 1)
        ways = {"forward": ((real_end, states[seg + 2]), [seg, seg + 1, seg + 2])}
        if seg >= 2:
            ways["backward"] = ((states[seg - 1], start), [seg - 2, seg - 1, seg])
        way = next(w for w, (_, telling) in ways.items() if fake["telling"] == [s for s in telling if s < n])
        _shares_of(SPEC, start, *ways[way][0], end, real_end)
        # a state no checkpoint of the unit is
        assert state_hash(end) not in {c.start_hash for c in unit.proof.segments} | {unit.proof.final_hash}
        assert state_hash(end) == proof.segments[seg].end_hash != fake["true_end"] == state_hash(real_end)
        # ... and replaying the segment from the real start exposes it
        verdict = check_segment(SPEC, proof, seg, unit.segment_paths[seg])
        assert not verdict.ok and verdict.replayed_end == fake["true_end"], verdict.reason


def _exact_breaches(spec: UnitSpec, seg: int, start: dict, end: dict) -> list[int]:
    """What the exact tests a lazy verifier can run without replaying find (an honest end: none)."""
    return [canary.moment_floor_breaches(spec, start, end), canary.moment_cs_breaches(spec, start, end),
            canary.step_bound_breaches(spec, start, end), canary.idle_row_breaches(spec, seg, start, end)]


def test_a_canary_is_its_segment_trained_again_with_a_sequence_of_each_made_up_step_swapped(
        unit: UnitResult, store: BlobStore, tmp_path: Path) -> None:
    """Where training a segment again is within the operator's budget (the default job shape, this toy) a canary is
    just that: its first k steps the true ones, each step after on its own batch with one sequence swapped for one of
    another batch of the segment. Made of nothing but its start, it is told only by its own segment and the next
    (which starts at the true end): every segment can be one, a unit's last too, with no other unit to borrow from
    (a round of one unit, or its first handed in). The exact tests pass it; a replay exposes it."""
    from node.trainer import segment_batches

    assert canary.retrainable(SPEC) and not canary.retrainable(replace(SPEC, precision="bf16"))
    blobs, final = _blobs(unit, store)
    n, L = len(blobs), SPEC.segment_len
    states = [checkpoint.load(p)[0] for p in unit.segment_paths] + [checkpoint.load(unit.final_path)[0]]
    for seg in range(n):
        own = [b for _, b in segment_batches(SPEC, seg)]
        pool = {o for b in own for o in b}
        for k in (0, 1, L - 1):
            made_up = canary.made_up_batches(SPEC, seg, k)
            assert len(made_up) == L - k
            for b, mine in zip(made_up, own[k:]):  # one sequence of the batch swapped, for one of the segment's
                assert len(b) == len(mine) and sum(x != y for x, y in zip(b, mine)) <= 1 and set(b) <= pool
            assert made_up != own[k:]
        fake = canary.forge(SPEC, unit.proof, seg, blobs, final, store, prefix=1)
        assert fake is not None and fake["prefix"] == 1
        assert fake["telling"] == [t for t in (seg, seg + 1) if t < n]
        proof = TrainingProof.from_dict(fake["proof"])
        end, meta = checkpoint.load(store.path(fake["end_blob"]))
        real_end = states[seg + 1]
        assert meta == checkpoint_metadata(SPEC, seg + 1 if seg + 1 < n else None)
        assert all(t.dtype == real_end[k].dtype and t.shape == real_end[k].shape for k, t in end.items())
        assert all(torch.equal(t, real_end[k]) for k, t in end.items() if k.endswith(".step"))
        assert state_hash(end) == proof.segments[seg].end_hash != fake["true_end"] == state_hash(real_end)
        assert _exact_breaches(SPEC, seg, states[seg], end) == [0, 0, 0, 0], seg
        verdict = check_segment(SPEC, segment_view(proof, seg), seg, unit.segment_paths[seg])
        assert not verdict.ok and verdict.replayed_end == fake["true_end"], verdict.reason
    stocked = canary.stock(SPEC, unit.proof, list(range(n)), blobs, final, store, 1)
    assert sorted(stocked) == list(range(n)) and not any("source_unit" in d for d in stocked.values())
    # a unit of one segment, with no other unit handed in: a canary all the same
    short = replace(SPEC, steps=L, segment_len=L)
    one = train_unit(short, START, tmp_path / "one")
    blobs, final = _blobs(one, store)
    fake = canary.forge(short, one.proof, 0, blobs, final, store)
    assert fake is not None and fake["telling"] == [0]
    verdict = check_segment(short, TrainingProof.from_dict(fake["proof"]), 0, one.segment_paths[0])
    assert not verdict.ok and verdict.replayed_end == one.proof.final_hash, verdict.reason


def test_a_bf16_decoy_carries_a_retrained_variant_for_a_verifier_that_replays_bit_for_bit(tmp_path: Path) -> None:
    """A bf16 job's canary is made up elementwise (a retrained one would lie within the tolerance of a verifier on
    another plan, excused), and a forward pass tells it; so each of its decoys also carries a retrained variant
    (``exact``) for a verifier on the unit's own plan and kernels, which replays it bit for bit and must miss it by
    bits. An fp32 job's decoys are retrained for everyone and carry none."""
    spec = replace(SPEC, precision="bf16")
    unit = train_unit(spec, START, tmp_path / "unit")
    store = BlobStore(tmp_path / "blobs")
    blobs, final = _blobs(unit, store)
    n = len(blobs)
    states = [checkpoint.load(p)[0] for p in unit.segment_paths] + [checkpoint.load(unit.final_path)[0]]
    stocked = canary.stock(spec, unit.proof, list(range(n)), blobs, final, store, 1)
    assert sorted(stocked) == list(range(n))
    for seg, decoy in stocked.items():
        exact = decoy["exact"]
        assert decoy["telling"] != exact["telling"] == [t for t in (seg, seg + 1) if t < n]  # elementwise, retrained
        assert canary.for_verifier(decoy, exact=False) == decoy
        mine = canary.for_verifier(decoy, exact=True)
        assert {k: mine[k] for k in canary.DECOY_CLAIM} == exact and "exact" not in mine
        assert mine["root"] == decoy["root"] and mine["share"] == decoy["share"]
        for claim in (decoy, exact):
            end = checkpoint.load(store.path(claim["end_blob"]))[0]
            assert _exact_breaches(spec, seg, states[seg], end) == [0, 0, 0, 0], seg
            verdict = check_segment(spec, segment_view(TrainingProof.from_dict(claim["proof"]), seg), seg,
                                    unit.segment_paths[seg])
            assert not verdict.ok and verdict.replayed_end == claim["true_end"], verdict.reason
        assert exact["end_blob"] != decoy["end_blob"]
    # a unit of one segment, no other unit to borrow from: no elementwise canary, the retrained one all the same
    short = replace(spec, steps=SPEC.segment_len)
    one = train_unit(short, START, tmp_path / "one")
    (decoy,) = canary.stock(short, one.proof, [0], *_blobs(one, store), store, 1).values()
    assert "proof" not in decoy and canary.for_verifier(decoy, exact=False) is None
    assert canary.for_verifier(decoy, exact=True)["telling"] == [0]
    plain = train_unit(SPEC, START, tmp_path / "fp32")
    fp32 = canary.stock(SPEC, plain.proof, [0], *_blobs(plain, store), store, 1)
    assert list(fp32) == [0] and "exact" not in fp32[0] and canary.for_verifier(fp32[0], exact=True) == fp32[0]


def test_a_forward_pass_on_the_segments_last_batch_tells_an_elementwise_canary_not_a_retrained_one(
        unit: UnitResult, store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lazy verifier's cheapest look: the loss of the claimed end on the segment's last batch against the start's
    (a forward pass each, a few percent of a replay). Honest training lowers it; the weights of an elementwise
    forgery move along no data's gradients and it falls far less, or rises (on the default job shape that told
    every such canary without a true prefix: an AUC of 1.0, stop 30); a retrained one falls as the honest end's."""
    from node import data
    from node.model import build_model
    from node.trainer import model_only, step_batch

    blobs, final = _blobs(unit, store)
    n, L = len(blobs), SPEC.segment_len
    states = [checkpoint.load(p)[0] for p in unit.segment_paths] + [checkpoint.load(unit.final_path)[0]]

    def loss(state: dict, step: int) -> float:
        model = build_model(SPEC.model, model_only(state))
        x, y = data.make_batch(data.train_tokens(), step_batch(SPEC, step), SPEC.model.ctx)
        with torch.no_grad():
            return float(model.loss(x, y))

    def drops() -> list[float]:
        out = []
        for seg in range(n):
            end = checkpoint.load(store.path(canary.forge(SPEC, unit.proof, seg, blobs, final, store,
                                                          prefix=0)["end_blob"]))[0]
            out.append(loss(states[seg], seg * L + L - 1) - loss(end, seg * L + L - 1))
        return out

    honest = [loss(states[seg], seg * L + L - 1) - loss(states[seg + 1], seg * L + L - 1) for seg in range(n)]
    retrained = drops()
    monkeypatch.setattr(canary, "BUDGET", 0)
    elementwise = drops()
    off = [sum(abs(x - h) for x, h in zip(xs, honest)) for xs in (retrained, elementwise)]
    assert off[0] < 0.4 * off[1], (honest, retrained, elementwise)


def _shares_of(spec: UnitSpec, start: dict, before: dict, after: dict, end: dict, true_end: dict) -> None:
    """``end`` is ``start`` trained on gradients with the moment shares the real segment ``before`` -> ``after`` has:
    its moments are the start's decayed plus those shares (the first moments' drift as long as the true segment's),
    its step counters the true end's, its weights moved as
    AdamW can move them from the start's moments (and not as far as the true end is, nor to it)."""
    (b1, b2), L = ADAMW_BETAS, spec.segment_len
    c = canary._least_energy(L)[3]  # noqa: SLF001
    for k, t in end.items():
        assert t.dtype == true_end[k].dtype and t.shape == true_end[k].shape, k
        if k.endswith(".step"):
            assert torch.equal(t, true_end[k]), k
            continue
        if k.endswith(".exp_avg"):  # the share's drift, as long as the true segment's
            drift = b1 ** L * start[k].double() + after[k].double() - b1 ** L * before[k].double() - start[k].double()
            want = start[k].double() + drift * ((true_end[k].double() - start[k].double()).norm() / drift.norm())
        elif k.endswith(".exp_avg_sq"):
            # (at least the true segment's own share: no replay of its first steps finds the second moments short)
            want = b2 ** L * start[k].double() + torch.maximum(
                after[k].double() - b2 ** L * before[k].double(), true_end[k].double() - b2 ** L * start[k].double()
            ).clamp(min=0)
        else:
            continue
        near = torch.isclose(t.double(), want, rtol=1e-5, atol=1e-12)
        if k.endswith(".exp_avg_sq"):  # or raised just as far as the first moment's gain needs (Cauchy-Schwarz)
            rm, ve, vs = end[k[:-3]].double() - b1 ** L * start[k[:-3]].double(), t.double(), b2 ** L * start[k].double()
            near |= (ve > want) & ((rm * rm - c * (ve - vs)).abs() <= 1e-4 * rm * rm + c * 1e-6 * (ve + vs))
        if ".tok." in k:  # an embedding row is the true end's where the bytes read tell (see the test below)
            near = near.all(dim=1) | (t == true_end[k]).all(dim=1)
        assert bool(near.all()), k
    assert canary.moment_floor_breaches(spec, start, end) == canary.step_bound_breaches(spec, start, end) == 0
    assert not torch.equal(end[next(k for k in end if k.startswith("model."))],
                           true_end[next(k for k in end if k.startswith("model."))])


def test_a_task_shows_its_segments_claim_only_so_a_canary_differs_from_the_real_task_in_one_hash(
        unit: UnitResult, store: BlobStore, way: str) -> None:
    """What a verifier is shown of a proof (segment_view): its segment's claim, every other segment blanked. A
    canary's view and the real task's differ only in the claimed end hash (and the root derived from it); the
    views of two segments of one unit share no hash, so comparing tasks tells nothing; a replay still checks it."""
    blobs, final = _blobs(unit, store)
    n = len(unit.proof.segments)
    for seg in range(n - 1):
        forged = TrainingProof.from_dict(canary.forge(SPEC, unit.proof, seg, blobs, final, store)["proof"])
        real, fake = segment_view(unit.proof, seg), segment_view(forged, seg)
        assert real.segments[seg] == unit.proof.segments[seg] and fake.segments[seg] == forged.segments[seg]
        diff = {k for k, v in real.to_dict().items() if fake.to_dict()[k] != v}
        assert diff == {"segments", "merkleRoot", *(["finalHash"] if seg == n - 1 else [])}
        assert [i for i, (a, b) in enumerate(zip(real.segments, fake.segments)) if a != b] == [seg]
        assert real.segments[seg].end_hash != fake.segments[seg].end_hash
        # any task's view shows the two hashes of its own segment and nothing else of the unit
        view = segment_view(unit.proof, seg)
        shown = {h for c in view.segments for h in (c.start_hash, c.end_hash)} | {view.start_hash, view.final_hash}
        assert shown - {ZERO_HASH} == {unit.proof.segments[seg].start_hash, unit.proof.segments[seg].end_hash}
        assert claim_problem(SPEC, fake, seg) is None and claim_problem(SPEC, real, seg) is None
        assert check_segment(SPEC, real, seg, unit.segment_paths[seg]).ok
        assert not check_segment(SPEC, fake, seg, unit.segment_paths[seg]).ok


def test_a_canary_is_not_planted_where_the_verifier_saw_what_tells_it() -> None:
    """Its own segment earlier (the real claim), the next segment (it starts at the true end), the one after (the
    forward forgery is made of its start), or a canary of the unit already: not plantable; a backward forgery (a
    last segment) is told by the two segments before it instead. Earlier segments tell nothing. Decoys stocked
    before they named what tells them keep the forward rule."""
    assert canary.plantable(3, [])
    assert canary.plantable(3, [(0, False), (1, False), (2, False), (6, False)])
    for seen in ([(3, False)], [(4, False)], [(5, False)], [(0, True)], [(1, False), (7, True)]):
        assert not canary.plantable(3, seen), seen
        assert not canary.plantable(3, seen, [3, 4, 5]), seen
    backward = [1, 2, 3]  # segment 3 of 4: made of states 2 and 3
    assert canary.plantable(3, [(0, False)], backward)
    for seen in ([(1, False)], [(2, False)], [(3, False)], [(0, True)]):
        assert not canary.plantable(3, seen, backward), seen


def test_canaries_are_stocked_at_a_multiple_of_the_rate_and_planted_so_the_rate_holds() -> None:
    from fractions import Fraction

    assert canary.stock_share(0) == 0 and canary.stock_share(1) == 1 and canary.stock_share(0.5) == 1
    share = canary.stock_share(Fraction(1, 50))
    assert share == Fraction(canary.STOCK_FACTOR, 50)
    odds = canary.plant_odds(Fraction(1, 50), {"share": str(share)})
    assert share * odds == Fraction(1, 50)  # stocked and then drawn: the rate, however the two split it
    assert canary.plant_odds(1, {"share": str(share)}) == 1 and canary.plant_odds(0, {"share": str(share)}) == 0


def test_a_canary_the_rules_allow_less_often_is_planted_more_often_when_they_do() -> None:
    """A canary of a segment is allowed only if none of the unit's other checks that tell it went out before it (to
    anyone): in a random queue order, 1 in 1 + their number. It is planted that many times likelier when allowed."""
    from fractions import Fraction

    rate = Fraction(1, 50)
    share = canary.stock_share(rate)
    retrained = {"share": str(share), "telling": [1, 2], "checked": [0, 1, 2, 5]}  # told by 2's check too
    assert canary.plant_odds(rate, retrained, 1) == 2 * rate / share
    assert canary.plant_odds(rate, {**retrained, "checked": [1, 5]}, 1) == rate / share  # 2 is not checked
    forward = {"share": str(share), "telling": [3, 4, 5], "checked": [0, 3, 4, 5]}
    assert canary.plant_odds(rate, forward, 3) == 3 * rate / share
    assert canary.plant_odds(rate, {"share": str(share)}, 3) == rate / share  # stocked before ``checked``
    assert canary.plant_odds(Fraction(1, 5), forward, 3) == 1  # (at most sure)
    # the odds that the rules allow it, times the odds it is planted then: the rate, in a random order of the checks
    orders = list(itertools.permutations(forward["checked"]))
    allowed = Fraction(sum(o.index(3) < min(o.index(t) for t in (4, 5)) for o in orders), len(orders))
    assert allowed * share * canary.plant_odds(rate, forward, 3) == rate


def test_a_last_segment_borrows_the_update_before_it(unit: UnitResult, store: BlobStore,
                                                     elementwise: None) -> None:
    """A unit's last segment (nothing further on) is forged backward: the weights of its start moved by the previous
    segment's update again, the moments of the state before its start, the step counters of the true final state;
    labelled as the unit's final checkpoint. No other unit is needed (the first unit of a round handed in, a round
    of one unit), and the two segments before it are what tells it."""
    from node.trainer import update_norm

    blobs, final = _blobs(unit, store)
    n = len(blobs)
    states = [checkpoint.load(p)[0] for p in unit.segment_paths] + [checkpoint.load(unit.final_path)[0]]
    fake = canary.forge(SPEC, unit.proof, n - 1, blobs, final, store, prefix=0)
    assert fake is not None and fake["telling"] == [n - 3, n - 2, n - 1]
    proof = TrainingProof.from_dict(fake["proof"])
    end, meta = checkpoint.load(store.path(fake["end_blob"]))
    assert meta == checkpoint.load(unit.final_path)[1] == checkpoint_metadata(SPEC, None)
    start, before, real_final = states[n - 1], states[n - 2], states[n]
    _shares_of(SPEC, start, before, start, end, real_final)
    assert 0.5 < update_norm(start, end) / update_norm(before, start) < 2
    assert proof.segments[-1].end_hash == proof.final_hash == state_hash(end) != fake["true_end"] == unit.proof.final_hash
    view = segment_view(proof, n - 1)
    assert claim_problem(SPEC, view, n - 1) is None
    verdict = check_segment(SPEC, view, n - 1, unit.segment_paths[n - 1])
    assert not verdict.ok and verdict.replayed_end == fake["true_end"], verdict.reason
    stocked = canary.stock(SPEC, unit.proof, [n - 1], blobs, final, store, 1)
    assert list(stocked) == [n - 1] and "source_unit" not in stocked[n - 1]


@pytest.mark.parametrize("segments", [1, 2])
def test_the_last_segment_of_a_unit_of_one_or_two_is_forged_from_a_sibling_units_final_state(
        store: BlobStore, tmp_path_factory: pytest.TempPathFactory, segments: int, elementwise: None) -> None:
    """With one or two segments a backward forgery's moments would be a fresh optimizer's zeros: the last segment's
    forgery is the final state of another unit of the same job and round (with the true end's step counters), and the
    decoy names that unit (a verifier handed it gets no such canary). Without one: no canary."""
    short = replace(SPEC, steps=4 * segments, segment_len=4)
    unit = train_unit(short, START, tmp_path_factory.mktemp("short"))
    sibling = train_unit(replace(short, unit_id="0x" + "c4" * 32, shard=1), START, tmp_path_factory.mktemp("sib"))
    blobs, final = _blobs(unit, store)
    n, other, their_blobs = len(blobs), store.put_file(sibling.final_path), _blobs(sibling, store)[0]
    assert n == segments
    fake = canary.forge(short, unit.proof, n - 1, blobs, final, store, (their_blobs[n - 1], other), prefix=0)
    assert fake is not None
    proof = TrainingProof.from_dict(fake["proof"])
    end, meta = checkpoint.load(store.path(fake["end_blob"]))
    real_final, real_meta = checkpoint.load(unit.final_path)
    theirs, _ = checkpoint.load(sibling.final_path)
    assert meta == real_meta == checkpoint_metadata(short, None)  # labelled as this unit's final checkpoint
    # the start trained on gradients with the shares of the sibling's same segment (for one segment: from the same
    # start, zero moments, so the first moments are the sibling's final ones, as large as the true end's)
    _shares_of(short, checkpoint.load(unit.segment_paths[n - 1])[0], checkpoint.load(sibling.segment_paths[n - 1])[0],
               theirs, end, real_final)
    if segments == 1:
        assert all(torch.allclose(t, theirs[k] * (real_final[k].norm() / theirs[k].norm()), rtol=1e-5, atol=1e-12)
                   for k, t in end.items() if k.endswith(".exp_avg") and ".tok." not in k)
    assert proof.segments[-1].end_hash == proof.final_hash == state_hash(end) != fake["true_end"] == unit.proof.final_hash
    view = segment_view(proof, n - 1)
    assert claim_problem(short, view, n - 1) is None
    verdict = check_segment(short, view, n - 1, unit.segment_paths[n - 1])
    assert not verdict.ok and verdict.replayed_end == fake["true_end"], verdict.reason
    stocked = canary.stock(short, unit.proof, [n - 1], blobs, final, store, 1, ("0x" + "c4" * 32, their_blobs, other))
    assert stocked[n - 1]["source_unit"] == "0x" + "c4" * 32
    assert canary.stock(short, unit.proof, [n - 1], blobs, final, store, 1) == {}  # no sibling: no canary
    assert canary.forge(short, unit.proof, n - 1, blobs, final, store) is None


def test_every_segment_of_an_idle_segment_cheat_gets_a_canary_a_replay_exposes(store: BlobStore,
                                                                                tmp_path: Path, way: str) -> None:
    """A unit claiming a segment that did not move the model (the idle-segment cheat): the segment before it borrows
    a zero update (its forgery's weights stay at its start), the idle one the next one's. Each is still a forgery a
    replay exposes, not the claim itself."""
    from node.adversary import ADVERSARIES

    cheat = ADVERSARIES["idle-segment"](SPEC, START, tmp_path / "cheat")
    blobs, final = _blobs(cheat, store)
    for seg in range(SPEC.n_segments - 1):
        fake = canary.forge(SPEC, cheat.proof, seg, blobs, final, store)
        assert fake is not None, seg
        forged = TrainingProof.from_dict(fake["proof"])
        assert forged.segments[seg].end_hash != cheat.proof.segments[seg].end_hash
        assert not check_segment(SPEC, forged, seg, cheat.segment_paths[seg]).ok, seg


def test_the_draw_is_never_at_rate_zero_always_at_one_and_about_the_rate_between() -> None:
    assert not any(canary.draw(0) for _ in range(1000))
    assert all(canary.draw(1) for _ in range(1000))
    hits = sum(canary.draw(0.2) for _ in range(20_000))
    assert 3_400 < hits < 4_600  # 20% of 20,000, +-7.5 sigma


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_verifier_on_another_plan_flags_a_canary_far_past_its_tolerance(tmp_path: Path, precision: str,
                                                                           way: str) -> None:
    """Across plans (no bit-for-bit replay) a forgery made up from the segment's start is a segment of other gradients
    away from the replay: flagged, and past what the referee excuses (an approval within twice the tolerance of the
    truth, :func:`marketplace.referee.canary_excuse`), so a lazy verifier on that plan who approves it is caught.
    (One with a long true prefix lies closer. A bf16 job's canaries are elementwise either way: canary.retrainable.)"""
    from marketplace import referee
    from node import crosscheck as cc

    spec = replace(SPEC, precision=precision)
    unit = train_unit(spec, START, tmp_path / "unit")
    plan = cc.Plan.parse("cpu/mb2")
    tol = cc.tolerance_for(spec, plan)
    store = BlobStore(tmp_path / "blobs")
    blobs, final = _blobs(unit, store)
    for seg in range(len(blobs)):  # forward, and backward for the last segment
        fake = canary.forge(spec, unit.proof, seg, blobs, final, store, prefix=0)
        assert fake is not None
        start, end = checkpoint.load(unit.segment_paths[seg])[0], checkpoint.load(store.path(fake["end_blob"]))[0]
        v = cc.check_segment_across(spec, TrainingProof.from_dict(fake["proof"]), seg, start, end, tol,
                                    cc.PlanRunner(spec, start, plan))
        assert not v.ok and v.kind == "state" and referee.CANARY_EXCUSE_FACTOR < v.margin < math.inf, v


def test_a_canary_approval_on_the_units_own_plan_is_inexcusable_only_on_kernels_both_sides_named(
        tmp_path: Path) -> None:
    """A verifier on the unit's own plan replays it bit for bit only on the same, known kernels
    (:func:`node.trainer.same_bits`): its approval of a forgery, however near the truth, is inexcusable there. With
    kernels unsaid ("", an older client's) it makes no bit-for-bit claim and checks within a tolerance, so a
    forgery within twice that of the truth is excused (both unsaid used to count as the same kernels: slashed)."""
    from marketplace import referee
    from node import crosscheck as cc

    unit = train_unit(SPEC, START, tmp_path / "unit")
    plan, end = cc.Plan.parse("cpu/mb2"), unit.final_path  # a forgery at the true end: within any tolerance
    assert referee.canary_excuse(SPEC, plan, "cpu-kernels-a", "cpu/mb2", "cpu-kernels-a", end, end) is None
    for build, verifier_build in (("", ""), ("cpu-kernels-a", ""), ("", None), ("cpu-kernels-a", "cpu-kernels-b")):
        excuse = referee.canary_excuse(SPEC, plan, build, "cpu/mb2", verifier_build, end, end)
        assert excuse is not None and "an honest replay may approve it" in excuse, (build, verifier_build)


def test_a_canary_starts_with_the_segments_true_steps_so_a_partial_replay_must_outrun_them(
        tmp_path: Path, way: str) -> None:
    """A verifier that replays a task's first j steps holds the exact state there and can run the exact tests from
    it over the steps left. A canary whose first k steps are the true ones (replayed by the operator) passes them for
    every j <= k, and is told only past its prefix: laziness saves work in proportion to the canaries it cannot tell.
    With no prefix, one replayed step tells it."""
    spec = replace(SPEC, steps=24, segment_len=6)
    unit = train_unit(spec, START, tmp_path / "unit")
    store = BlobStore(tmp_path / "blobs")
    blobs, final = _blobs(unit, store)
    states = [checkpoint.load(p)[0] for p in unit.segment_paths] + [checkpoint.load(unit.final_path)[0]]
    seg, told = 1, set()
    for k in (0, 3, 5):
        fake = canary.forge(spec, unit.proof, seg, blobs, final, store, prefix=k)
        assert fake is not None and fake["prefix"] == k
        end = checkpoint.load(store.path(fake["end_blob"]))[0]
        for j in range(spec.segment_len):
            after = canary.true_prefix(spec, seg, states[seg], j)
            rest = replace(spec, steps=spec.segment_len - j, segment_len=spec.segment_len - j)
            honest = [f(rest, after, states[seg + 1]) for f in (canary.moment_floor_breaches,
                                                                 canary.moment_cs_breaches, canary.step_bound_breaches)]
            assert honest == [0, 0, 0], (k, j)  # (the tests are exact)
            hits = sum(f(rest, after, end) for f in (canary.moment_floor_breaches, canary.moment_cs_breaches,
                                                     canary.step_bound_breaches))
            if j <= k:
                assert hits == 0, (k, j)  # the replay has not left the truth yet
            elif hits:
                told.add((k, j))
    assert (0, 1) in told, told  # no prefix: one step tells it


def test_no_canary_that_is_the_claim_itself(unit: UnitResult, store: BlobStore, monkeypatch, way: str) -> None:
    """A provider shapes the states canaries are forged from; should what they make be the claim itself (the same
    state, hash and all), there is no forgery at all: none is stocked. (A forgery merely close to the claim is planted:
    a verifier on another plan that approves it within its tolerance is excused by the referee, and every other
    verifier's replay exposes it.)"""
    blobs = [store.put_file(p) for p in unit.segment_paths]
    final = store.put_file(unit.final_path)
    n = len(blobs)
    assert canary.forge(SPEC, unit.proof, 0, blobs, final, store, prefix=0) is not None  # an honest next segment
    # every way of borrowing (or training again) lands on the true end (what a provider's shaping would aim for)
    monkeypatch.setattr(canary, "carried", lambda spec, start, before, after, counters, **_: dict(counters))
    states = [checkpoint.load(p)[0] for p in unit.segment_paths] + [checkpoint.load(unit.final_path)[0]]
    monkeypatch.setattr(canary, "retrained", lambda spec, seg, start, k: (
        dict(states[seg + 1]), torch.ones(spec.model.vocab, dtype=torch.bool)))
    for seg in range(n):  # forward, both ways, backward
        assert canary.forge(SPEC, unit.proof, seg, blobs, final, store, prefix=0) is None, seg


def test_a_forgery_moves_the_weights_as_far_as_a_segment_does(unit: UnitResult, store: BlobStore,
                                                              elementwise: None) -> None:
    """A lazy verifier holds the start and the claimed end: the forged weights moved as far from the start as the
    segment they borrow from moved them (the next one, or the one before), where the state two segments on (the
    forgery before) moved about twice as far, a tell (a check of movement against the spec's lr told it at an AUC of
    0.96 on the default job shape)."""
    from node.trainer import update_norm

    blobs, final = _blobs(unit, store)
    states = [checkpoint.load(p)[0] for p in unit.segment_paths] + [checkpoint.load(unit.final_path)[0]]
    for seg in range(len(blobs)):
        fake = canary.forge(SPEC, unit.proof, seg, blobs, final, store, prefix=0)
        end = checkpoint.load(store.path(fake["end_blob"]))[0]
        lent = fake["telling"][1]  # the segment whose gradients' shares it takes
        ratio = update_norm(states[seg], end) / update_norm(states[lent], states[lent + 1])
        assert 0.5 < ratio < 1.5, (seg, ratio)  # the forgery before: about 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_forgerys_moments_pass_the_check_a_lazy_verifier_can_run_without_replaying(tmp_path: Path,
                                                                                      precision: str, way: str) -> None:
    """Over a segment AdamW decays the second moments by beta2 ** segment_len and adds squares: no entry of an honest
    end lies below that floor of the start's; and no weight moves farther than AdamW's steps from the start's moments
    can move it. Another state's own moments (the forgery before: a segment further on, or before) broke the floor
    in thousands of entries, so every canary was told for sure without a replay; a borrowed update broke the bound
    in some. The start trained on made-up gradients with a real segment's moment shares breaks neither."""
    spec = replace(SPEC, precision=precision)
    unit = train_unit(spec, START, tmp_path / "unit")
    store = BlobStore(tmp_path / "blobs")
    blobs, final = _blobs(unit, store)
    states = [checkpoint.load(p)[0] for p in unit.segment_paths] + [checkpoint.load(unit.final_path)[0]]
    n = len(blobs)
    lent_update = 0
    for seg in range(n):
        checks = (canary.moment_floor_breaches, canary.moment_cs_breaches, canary.step_bound_breaches)
        assert [check(spec, states[seg], states[seg + 1]) for check in checks] == [0, 0, 0], seg  # honest
        end = checkpoint.load(store.path(canary.forge(spec, unit.proof, seg, blobs, final, store)["end_blob"]))[0]
        assert [check(spec, states[seg], end) for check in checks] == [0, 0, 0], seg
        if 1 <= seg < n - 1:  # (segment 0 starts from zero moments: no floor)
            before = {k: v if k.endswith(".step") else states[seg + 2][k] for k, v in states[seg + 1].items()}
            assert canary.moment_floor_breaches(spec, states[seg], before) > 0, seg
            assert canary.moment_cs_breaches(spec, states[seg], before) > 0, seg
            # the start plus the next segment's own update (the weights of the forgery before)
            lent = {k: (states[seg][k].double() + states[seg + 2][k].double() - states[seg + 1][k].double()).float()
                    if k.startswith("model.") else v for k, v in states[seg + 1].items()}
            lent_update += canary.step_bound_breaches(spec, states[seg], lent)
    assert lent_update > 0  # a borrowed update, moved from another segment's moments, broke the bound somewhere


def test_a_forgerys_embedding_rows_show_the_bytes_its_segment_read_and_no_others(tmp_path: Path, way: str) -> None:
    """The data order is public: a verifier knows which bytes a segment's batches hold. A byte absent from them gets
    no gradient, so its embedding row ends exactly where AdamW with zero gradients takes it (as in the true end); a
    byte present gets one. A forgery whose rows follow another segment's bytes told itself in those rows."""
    spec = replace(SPEC, steps=24, segment_len=4)
    unit = train_unit(spec, START, tmp_path / "unit")
    store = BlobStore(tmp_path / "blobs")
    blobs, final = _blobs(unit, store)
    states = [checkpoint.load(p)[0] for p in unit.segment_paths] + [checkpoint.load(unit.final_path)[0]]
    keys = ("model.tok.weight", "optim.tok.weight.exp_avg", "optim.tok.weight.exp_avg_sq")
    told = 0
    for seg in range(len(blobs)):
        seen = canary._bytes_seen(spec, seg)  # noqa: SLF001
        assert 0 < int(seen.sum()) < spec.model.vocab
        end = checkpoint.load(store.path(canary.forge(spec, unit.proof, seg, blobs, final, store)["end_blob"]))[0]
        for k in keys:  # an unread byte's row: exactly the true end's, where AdamW with zero gradients takes it
            assert torch.equal(end[k][~seen], states[seg + 1][k][~seen]), (seg, k)
        assert canary.idle_row_breaches(spec, seg, states[seg], states[seg + 1]) == 0  # (the test is exact)
        assert canary.idle_row_breaches(spec, seg, states[seg], end) == 0
        # a read byte's row: made up with gradients (its second moment grew past the floor's decay), or the true end's
        grew = (end[keys[2]][seen] > ADAMW_BETAS[1] ** spec.segment_len * states[seg][keys[2]][seen] * (1 + 1e-5)).any(dim=1)
        assert bool((grew | (end[keys[2]][seen] == states[seg + 1][keys[2]][seen]).all(dim=1)).all()), seg
        if seg + 2 < len(states):  # the forgery before: the next segment's rows, read bytes or not
            before = {k: v if k.endswith(".step") else states[seg + 2][k] for k, v in states[seg + 1].items()}
            told += int(canary.idle_row_breaches(spec, seg, states[seg], before) > 0)
    assert told > 0
