"""protocol.proof: Merkle tree, leaf binding, strict JSON and the structural checks."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProofError
from protocol.proof import (
    MerkleStep,
    SegmentCommit,
    TrainingProof,
    batch_digest,
    check_step_losses,
    check_structure,
    leaf_hash,
    make_proof,
    merkle_proof,
    merkle_root,
    verify_merkle,
)

leaves_st = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=40)


def h(tag: str) -> str:
    return "0x" + hashlib.sha256(tag.encode()).hexdigest()


def chain_proof(n: int = 4, seg_len: int = 3) -> TrainingProof:
    states = [h(f"state{i}") for i in range(n + 1)]
    segs = [SegmentCommit(i, states[i], states[i + 1], h(f"batch{i}"), 5_000_000 - i) for i in range(n)]
    return make_proof(unit_id=h("unit"), spec_hash=h("spec"), seed=9, steps=n * seg_len, segment_len=seg_len, segments=segs)


@settings(max_examples=150, deadline=None)
@given(leaves_st, st.data())
def test_every_merkle_proof_verifies_and_tampering_does_not(leaves: list[bytes], data: st.DataObject) -> None:
    root = merkle_root(leaves)
    i = data.draw(st.integers(0, len(leaves) - 1))
    path = merkle_proof(leaves, i)
    assert verify_merkle(leaves[i], path, root)
    bad_leaf = data.draw(st.binary(min_size=32, max_size=32).filter(lambda b: b != leaves[i]))
    assert not verify_merkle(bad_leaf, path, root)
    assert merkle_root([*leaves[:i], bad_leaf, *leaves[i + 1 :]]) != root
    if path:
        j = data.draw(st.integers(0, len(path) - 1))
        flipped = bytes([path[j].sibling[0] ^ 1]) + path[j].sibling[1:]
        tampered = (*path[:j], MerkleStep(flipped, path[j].sibling_on_left), *path[j + 1 :])
        assert not verify_merkle(leaves[i], tampered, root)


@settings(max_examples=50, deadline=None)
@given(leaves_st)
def test_leaf_order_matters(leaves: list[bytes]) -> None:
    if len(set(leaves)) > 1:
        assert merkle_root(leaves) != merkle_root(list(reversed(leaves))) or leaves == leaves[::-1]


def test_single_leaf_root_is_the_leaf_and_empty_is_refused() -> None:
    leaf = hashlib.sha256(b"x").digest()
    assert merkle_root([leaf]) == leaf and merkle_proof([leaf], 0) == ()
    with pytest.raises(ProofError):
        merkle_root([])
    with pytest.raises(ProofError):
        merkle_root([b"short"])
    with pytest.raises(ProofError):
        merkle_proof([leaf], 1)


def test_leaf_binds_every_field() -> None:
    base = dict(unit_id=h("u"), spec_hash=h("s"), seed=1, index=0, start_hash=h("a"), end_hash=h("b"),
                batch_digest=h("d"), loss_micro=5)
    ref = leaf_hash(**base)
    changes = {"unit_id": h("u2"), "spec_hash": h("s2"), "seed": 2, "index": 1, "start_hash": h("a2"),
               "end_hash": h("b2"), "batch_digest": h("d2"), "loss_micro": 6}
    for k, v in changes.items():
        assert leaf_hash(**{**base, k: v}) != ref, k


def test_batch_digest_binds_steps_and_offsets() -> None:
    d = batch_digest([(0, [1, 2]), (1, [3, 4])])
    assert d != batch_digest([(0, [1, 2]), (1, [4, 3])])
    assert d != batch_digest([(1, [1, 2]), (2, [3, 4])])
    assert d != batch_digest([(0, [1, 2, 3, 4])])


def test_json_round_trip_is_canonical() -> None:
    p = chain_proof()
    text = p.to_json()
    assert TrainingProof.from_json(text) == p
    assert TrainingProof.from_json(text).to_json() == text
    assert " " not in text and "." not in text  # no floats anywhere


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(extra=1),
        lambda d: d.pop("seed"),
        lambda d: d.update(seed=True),
        lambda d: d.update(seed=-1),
        lambda d: d.update(steps="12"),
        lambda d: d.update(version=2),
        lambda d: d.update(unitId="0x" + "AB" * 32),
        lambda d: d.update(merkleRoot="0x1234"),
        lambda d: d.update(segments={}),
        lambda d: d.update(segments=[]),
        lambda d: d["segments"][0].update(lossMicro=4.5),
        lambda d: d["segments"][0].pop("batchDigest"),
    ],
)
def test_from_json_is_strict(mutate) -> None:
    d = json.loads(chain_proof().to_json())
    mutate(d)
    with pytest.raises(ProofError):
        TrainingProof.from_json(json.dumps(d))


@pytest.mark.parametrize("text", ["", "[]", "{", '{"a":1,"a":2}', "NaN"])
def test_from_json_refuses_non_objects(text: str) -> None:
    with pytest.raises(ProofError):
        TrainingProof.from_json(text)


def test_check_structure_accepts_a_consistent_chain() -> None:
    p = chain_proof()
    check_structure(p, h("state0"), h("spec"))
    assert p.signable_fields() == {"unitId": h("unit"), "merkleRoot": p.merkle_root, "startHash": h("state0"),
                                   "finalHash": h("state4"), "steps": 12}
    leaves = p.leaves()
    for i in range(len(leaves)):
        assert verify_merkle(leaves[i], p.segment_proof(i), bytes.fromhex(p.merkle_root[2:]))


def _resealed(p: TrainingProof, segments: list[SegmentCommit], **kw) -> TrainingProof:
    fields = dict(unit_id=p.unit_id, spec_hash=p.spec_hash, seed=p.seed, steps=p.steps, segment_len=p.segment_len)
    fields.update(kw)
    return make_proof(segments=segments, **fields)


def test_check_structure_catches_each_inconsistency() -> None:
    p = chain_proof()
    segs = list(p.segments)
    start, spec = h("state0"), h("spec")
    cases = {
        "spec": (p, start, h("other-spec")),
        "start": (p, h("other-start"), spec),
        "root": (replace(p, merkle_root=h("root")), start, spec),
        "tampered leaf": (replace(p, segments=(replace(segs[0], loss_micro=1), *segs[1:])), start, spec),
        "chain": (_resealed(p, [segs[0], replace(segs[1], start_hash=h("x")), *segs[2:]]), start, spec),
        "final": (replace(p, final_hash=h("x")), start, spec),
        "count": (_resealed(p, segs[:3]), start, spec),
        "steps": (_resealed(p, segs, steps=13), start, spec),
        "order": (_resealed(p, [segs[1], segs[0], *segs[2:]]), start, spec),
        "rebound to other unit": (replace(p, unit_id=h("other-unit")), start, spec),
        "rebound to other seed": (replace(p, seed=10), start, spec),
    }
    for name, (proof, s, sp) in cases.items():
        with pytest.raises(ProofError):
            check_structure(proof, s, sp)
            pytest.fail(f"{name} not caught")


def test_segment_commit_validates_fields() -> None:
    with pytest.raises(ProofError):
        SegmentCommit(0, "0x" + "00" * 31, h("b"), h("c"), 1)
    with pytest.raises(ProofError):
        SegmentCommit(-1, h("a"), h("b"), h("c"), 1)


def test_the_submitted_step_losses_must_average_to_each_segments_committed_loss() -> None:
    """The per-step loss curve a provider submits (and signs) with its proof is what a loss scan judges each step
    against: it must have one finite loss per step, and each segment's mean must be the committed ``loss_micro``."""
    p = chain_proof(n=4, seg_len=3)
    honest = [5.0 - s * 1e-6 + d for s in range(4) for d in (-0.25, 0.5, -0.25)]  # means 5.0 - s micro-nats apart
    check_step_losses(p, honest)
    check_step_losses(p, [*honest[:-1], honest[-1] + 1.4e-6])  # the rounding of a sum: within one micro-nat
    one_step_lower = list(honest)
    one_step_lower[4] -= 0.15  # a loss faked on one step, the committed mean left as it was
    cases = {"one step faked": (one_step_lower, "segment 1's step losses average 4949999 micro-nats"),
             "one short": (honest[:-1], "12 steps need 12 step losses, got 11"),
             "not a list": ({"0": 1.0}, "12 steps need 12 step losses, got dict"),
             "nan": ([*honest[:5], float("nan"), *honest[6:]], "finite non-negative"),
             "negative": ([*honest[:5], -1.0, *honest[6:]], "finite non-negative"),
             "infinite": ([*honest[:5], float("inf"), *honest[6:]], "finite non-negative"),
             "a string": ([*honest[:5], "5.0", *honest[6:]], "step 5's loss must be a number"),
             "a bool": ([*honest[:5], True, *honest[6:]], "step 5's loss must be a number")}
    for name, (losses, why) in cases.items():
        with pytest.raises(ProofError, match=why):
            check_step_losses(p, losses)  # type: ignore[arg-type]
