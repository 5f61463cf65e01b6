"""The result body bound the marketplace refuses jobs on: never below what a node can send, and not far above."""
from __future__ import annotations

import json
import random
import struct

import pytest

from protocol.limits import (WIDEST_BUILD, WIDEST_LOSS, WIDEST_PLAN, max_steps_within, result_body_bound,
                             wire_json)
from protocol.proof import MAX_LOSS, SegmentCommit, make_proof, mean_loss_micro
from protocol.schemas import ResultSubmit


def _body(steps: int, segment_len: int, losses: list[float], plan: str = "cpu", build: str = "") -> bytes:
    """A node's result body as node.agent.ProviderAgent.work_once builds it (random hashes: the same width)."""
    rnd = random.Random(steps)
    h = lambda: "0x" + rnd.randbytes(32).hex()  # noqa: E731
    n = steps // segment_len
    segs = [SegmentCommit(i, h(), h(), h(), mean_loss_micro(losses[i * segment_len:(i + 1) * segment_len]))
            for i in range(n)]
    proof = make_proof(unit_id=h(), spec_hash=h(), seed=rnd.randrange(2**63), steps=steps, segment_len=segment_len,
                       segments=segs)
    body = {"unit_id": proof.unit_id, "proof": proof.to_dict(), "proof_signature": "0x" + rnd.randbytes(65).hex(),
            "final_blob": rnd.randbytes(32).hex(), "segment_blobs": [rnd.randbytes(32).hex() for _ in range(n)],
            "losses": losses, "plan": plan, "build": build}
    assert set(body) == set(ResultSubmit.model_fields)  # a field the bound does not count would make it no bound
    ResultSubmit.model_validate(body)
    return wire_json(body)


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@pytest.mark.parametrize("steps, segment_len", [(60, 15), (20, 5), (2048, 1), (3000, 15), (1000, 1000)])
def test_a_real_body_is_within_the_bound_and_close_to_it(steps: int, segment_len: int) -> None:
    rnd = random.Random(1)
    # float32 losses as a trainer reports them, from a few nats down to ten-thousandths (the longest decimals)
    losses = [_float32(rnd.uniform(0.0001, 6) * 10 ** -rnd.randrange(4)) for _ in range(steps)]
    got = len(_body(steps, segment_len, losses, WIDEST_PLAN, WIDEST_BUILD))
    bound = result_body_bound(steps, segment_len)
    assert got <= bound < got * 1.3


@pytest.mark.parametrize("n_segments", [1, 2, 9, 10])
def test_the_widest_body_is_the_bound(n_segments: int) -> None:
    """Every value at its widest (one-digit indices, where the bound is exact): the bound is the body's size."""
    widest = _body(n_segments * 3, 3, [WIDEST_LOSS] * (n_segments * 3), WIDEST_PLAN, WIDEST_BUILD)
    # make_proof's fields are as wide as the bound's except the seed, lossMicro and the root's random digits: redo
    # the proof with the widest seed and loss (lossMicro 10**15, the mean of losses of MAX_LOSS)
    body = json.loads(widest)
    body["proof"]["seed"] = 2**63 - 1
    for s in body["proof"]["segments"]:
        s["lossMicro"] = 10**15
    assert len(wire_json(body)) == result_body_bound(n_segments * 3, 3)
    assert mean_loss_micro([MAX_LOSS]) == 10**15


def test_no_loss_is_written_wider_than_the_widest() -> None:
    rnd = random.Random(2)
    width = len(repr(WIDEST_LOSS))
    samples = [rnd.uniform(0, MAX_LOSS) for _ in range(10_000)] + [rnd.random() * 10.0 ** -rnd.randrange(300)
                                                                    for _ in range(10_000)]
    samples += [_float32(x) for x in samples] + [5e-324, 2.225073858507201e-308, MAX_LOSS, 0.0]
    assert max(len(repr(x)) for x in samples if x <= MAX_LOSS) == width == 23


@pytest.mark.parametrize("segment_len", [1, 5, 15, 1000, 100_000])
def test_max_steps_within_is_the_last_length_that_fits(segment_len: int) -> None:
    limit = 1024 * 1024
    most = max_steps_within(limit, segment_len)
    assert most % segment_len == 0
    if most < 100_000:
        assert result_body_bound(most + segment_len, segment_len) > limit
    if most:
        assert result_body_bound(most, segment_len) <= limit
    assert max_steps_within(100, segment_len) == 0
