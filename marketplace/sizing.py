"""Whether a job's units can be handed in at all: each checkpoint a node uploads must fit ``max_upload_bytes`` and its
result body the JSON limit. A job over either would be trained in full by every provider it is matched to, refused,
and trained again until the deadline made each one a dropout, while the customer's job never finished: it is refused
(422) when quoted and when submitted instead.
"""
from __future__ import annotations

import functools
import math

from node import checkpoint
from node.model import ModelConfig, param_shapes
from node.trainer import UnitSpec, checkpoint_size
from protocol.errors import GridMintValueError
from protocol.limits import max_steps_within, result_body_bound
from protocol.schemas import MAX_SEGMENTS_PER_UNIT, JobSpec

#: The most bytes a JSON request body may have (results, heartbeats, verdicts, quotes...).
JSON_LIMIT = 1024 * 1024


class UnitTooLarge(GridMintValueError):
    """A job whose units could be trained but never handed in: ``what`` ("checkpoint", "result body", "segments")
    would be ``size`` (bytes, or segments), over ``limit``."""

    def __init__(self, message: str, *, what: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.what, self.size, self.limit = what, size, limit


@functools.lru_cache(maxsize=256)
def checkpoint_bytes(model: ModelConfig, n_segments: int, precision: str = "fp32") -> int:
    """The largest checkpoint a unit of ``n_segments`` segments of ``model`` makes, exactly: every one holds the same
    training state, told apart only by its metadata's segment label ("final", or the index) and its unit's ids,
    which are of fixed width. ``node.trainer.checkpoint_size`` of a stand-in unit of that shape."""
    probe = UnitSpec(job_id="size", unit_id="0x" + "00" * 32, round=0, shard=0, n_shards=1, model=model,
                     steps=n_segments, segment_len=1, batch_size=1, lr=1e-3, seed=0, precision=precision)
    return max(checkpoint_size(probe, seg) for seg in (None, n_segments - 1))


def check_unit_fits(spec: JobSpec, *, max_upload_bytes: int, json_limit: int = JSON_LIMIT) -> None:
    """Raise :class:`UnitTooLarge` (a 422) unless every unit of ``spec`` can be handed in: at most
    ``MAX_SEGMENTS_PER_UNIT`` segments, a result body (``protocol.limits.result_body_bound``) within ``json_limit``
    and checkpoints within ``max_upload_bytes`` (and what ``node.checkpoint`` loads). The message says which limit,
    and what to stay under."""
    steps, seg_len = spec.steps_per_unit, spec.segment_len
    n = steps // seg_len
    if n > MAX_SEGMENTS_PER_UNIT:
        raise UnitTooLarge(
            f"steps_per_unit {steps} in segments of {seg_len} is {n} segments per unit; a result commits at most "
            f"{MAX_SEGMENTS_PER_UNIT}: use segment_len {-(-steps // MAX_SEGMENTS_PER_UNIT)} or more",
            what="segments", size=n, limit=MAX_SEGMENTS_PER_UNIT)
    body = result_body_bound(steps, seg_len)
    if body > json_limit:
        raise UnitTooLarge(
            f"a unit of {steps} steps in segments of {seg_len} has a result of up to {body} bytes (one loss per step, "
            f"one commitment per segment), over the {json_limit}-byte limit of POST /units/{{id}}/result: use at most "
            f"{max_steps_within(json_limit, seg_len)} steps_per_unit at this segment_len (longer segments allow more)",
            what="result body", size=body, limit=json_limit)
    limit = min(max_upload_bytes, checkpoint.MAX_FILE_BYTES)
    cfg = ModelConfig(**spec.model.model_dump())
    size = checkpoint_bytes(cfg, n, spec.precision)
    if size > limit:
        params = sum(math.prod(shape) for shape in param_shapes(cfg).values())
        raise UnitTooLarge(
            f"the model ({spec.model.d_model} wide, {spec.model.n_layer} layers, context {spec.model.ctx}) has {params} "
            f"parameters, and every checkpoint of its training state (weights and two AdamW moments, float32) is "
            f"{size} bytes, over this marketplace's {limit}-byte upload limit (max_upload_bytes): use a model of at "
            f"most about {params * limit // size} parameters",
            what="checkpoint", size=size, limit=limit)

