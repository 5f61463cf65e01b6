"""How many bytes a unit's result takes on the wire, at most: a job whose result cannot fit the marketplace's body
limit must be refused when it is quoted, not after every provider has trained it (marketplace.sizing).

Pure functions over the wire schema; no I/O.
"""
from __future__ import annotations

import json
from typing import Any

from protocol.errors import GridMintValueError
from protocol.proof import MAX_LOSS, MAX_U63, SegmentCommit, TrainingProof, loss_to_micro
from protocol.schemas import MAX_SEGMENTS_PER_UNIT, MAX_STEPS_PER_UNIT

#: The widest a step loss is written: ``repr`` of a finite float in [0, MAX_LOSS] has at most 17 significant digits,
#: a point and, below 1e-4, an exponent down to ``e-308`` (23 characters; a sign never, losses are non-negative).
WIDEST_LOSS = 2.2250738585072014e-308
#: The widest values the schema allows for the fields whose width is not fixed (hashes and signatures are).
WIDEST_PLAN = "cuda:" + "a" * 24 + "/mb64"  # protocol.schemas.PlanLabel
WIDEST_BUILD = "a" * 160  # protocol.schemas.KernelBuild
_HASH = "0x" + "f" * 64


def wire_json(payload: Any) -> bytes:
    """The bytes a node sends for a JSON body (node.client.MarketClient.signed_json): ``json.dumps`` with its default
    separators (a space after each comma and colon; compact JSON from another client is only smaller)."""
    return json.dumps(payload).encode()


def _result_body(steps: int, segment_len: int, index: int, n_segments: int, n_losses: int) -> bytes:
    """A ``ResultSubmit`` body as a node sends it, every field at its widest, with ``n_segments`` segments all
    numbered ``index`` and ``n_losses`` losses."""
    segment = SegmentCommit(index, _HASH, _HASH, _HASH, loss_to_micro(MAX_LOSS))
    proof = TrainingProof(unit_id=_HASH, spec_hash=_HASH, seed=MAX_U63 - 1, steps=steps, segment_len=segment_len,
                          start_hash=_HASH, final_hash=_HASH, segments=(segment,) * n_segments, merkle_root=_HASH)
    body = {"unit_id": _HASH, "proof": proof.to_dict(), "proof_signature": "0x" + "f" * 130, "final_blob": "f" * 64,
            "segment_blobs": ["f" * 64] * n_segments, "losses": [WIDEST_LOSS] * n_losses, "plan": WIDEST_PLAN,
            "build": WIDEST_BUILD}
    return wire_json(body)


def result_body_bound(steps: int, segment_len: int) -> int:
    """The most bytes a node's ``POST /units/{id}/result`` body can take for a unit of ``steps`` steps committed in
    segments of ``segment_len``: every value at the widest the schema and the proof allow (each segment numbered
    as the last one is, so it is an upper bound by at most a few bytes per segment). Constant time: the body grows
    by the same bytes with each further segment and each further loss, so three small bodies give it."""
    if steps < 1 or segment_len < 1 or steps % segment_len:
        raise GridMintValueError(f"steps {steps} must be a positive multiple of segment_len {segment_len}")
    n = steps // segment_len
    one = len(_result_body(steps, segment_len, n - 1, 1, 1))
    per_segment = len(_result_body(steps, segment_len, n - 1, 2, 1)) - one
    per_loss = len(_result_body(steps, segment_len, n - 1, 1, 2)) - one
    return one + (n - 1) * per_segment + (steps - 1) * per_loss


def max_steps_within(limit: int, segment_len: int) -> int:
    """The most steps a unit may have (a multiple of ``segment_len``, within ``MAX_STEPS_PER_UNIT`` and
    ``MAX_SEGMENTS_PER_UNIT`` segments) for its result body bound to fit ``limit`` bytes; 0 if not even one segment
    does."""
    lo, hi = 0, min(MAX_SEGMENTS_PER_UNIT, MAX_STEPS_PER_UNIT // segment_len)  # in segments
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if result_body_bound(mid * segment_len, segment_len) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo * segment_len
