"""What a provider's uploads may take: each checkpoint must be a training state of a unit it holds, and is charged to
that unit, whose uploads are bounded by what its work needs (review A8).

A unit's result needs one checkpoint per segment and its final state; a dispute over it, the states the referee has
asked for. A provider's upload past that, plus ``UPLOAD_MARGIN``, is refused (429): an upload is for work, never free
storage. Counted in distinct blobs: a node that sends the same bytes again (it retries an upload after a dropped
link) is not charged twice."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from torch import Tensor

from marketplace import referee
from marketplace.common import revealing, unit_spec
from marketplace.db import Job, Unit, UnitUpload, Verification, now_s
from marketplace.runtime import Runtime
from node.trainer import UnitSpec, check_training_state
from protocol.errors import CheckpointError, GridMintValueError
from protocol.proof import segment_count

#: distinct checkpoints a unit may take beyond what its work needs (a node that trains a unit again after a
#: refused result uploads the same bytes: deterministic training; this covers a state it changed)
UPLOAD_MARGIN = 2


class UploadQuotaExceeded(GridMintValueError):
    """Every unit the uploader holds has taken as many checkpoints as its work needs (HTTP 429)."""


@dataclass(frozen=True)
class Held:
    """A unit ``provider`` may upload for, and how many distinct checkpoints it may take."""

    unit_id: str
    spec: UnitSpec
    allowance: int


def allowance(segments: int, asked: int) -> int:
    """Distinct checkpoints a unit of ``segments`` segments may take: one per segment and its final state, twice (a
    node restarted on another plan or kernels cannot hand in what it kept: it trains the unit again, every checkpoint
    new bytes), ``asked`` states its disputes asked for, and ``UPLOAD_MARGIN``."""
    return 2 * (segments + 1) + asked + UPLOAD_MARGIN


def _asked(bisect: dict[str, Any] | None) -> int:
    """States a bisection has asked for so far: revealed, asked now, and queued after it."""
    b = referee.bisect_view(bisect)
    more = b.get("more") or []
    return len(b.get("reveals") or {}) + (b.get("asked") is not None) + len(more if isinstance(more, list) else [])


def held(s: Session, provider: str) -> list[Held]:
    """The units ``provider`` may upload for: those assigned to it (its result's checkpoints) and those of its
    results in bisection, a dispute's or an audit's (the states the referee asks of it), oldest first."""
    asked: dict[str, int] = {}
    for unit_id, bisect in s.execute(select(Verification.unit_id, Verification.bisect).where(
            Verification.provider == provider, revealing())):
        asked[unit_id] = asked.get(unit_id, 0) + _asked(bisect)
    rows = s.execute(select(Unit, Job).join(Job, Job.id == Unit.job_id).where(
        Unit.provider == provider, (Unit.status == "assigned") | Unit.id.in_(list(asked)))
        .order_by(Unit.assigned_at, Unit.id)).all()
    out = []
    for unit, job in rows:
        spec = unit_spec(job, unit)
        out.append(Held(unit.id, spec, allowance(segment_count(spec.steps, spec.segment_len), asked.get(unit.id, 0))))
    return out


def charge_upload(rt: Runtime, provider: str, sha: str, tensors: Mapping[str, Tensor],
                  metadata: Mapping[str, str]) -> None:
    """Charge checkpoint ``sha`` (parsed: ``tensors``, ``metadata``) to a unit ``provider`` holds, or refuse it before
    it is stored: CheckpointError (422) if it is no training state of any such unit's model (names, shapes, dtypes),
    UploadQuotaExceeded (429) if every unit it fits has taken its allowance. Free if ``sha`` was charged to one of
    them before (a retried upload). Runs after :func:`marketplace.common.check_uploader` let the uploader in.

    The unit its metadata names (a node writes its ``unit_id``: ``node.trainer.checkpoint_metadata``) is charged
    first: a state revealed in a dispute while the node trains another unit of the same model must not take that
    unit's room, which it needs for its own checkpoints (nor the other way round). Metadata is only a hint: a
    checkpoint naming no unit held is charged to the oldest unit it fits with room."""
    with rt.sessions() as s:
        units = held(s, provider)
    named = metadata.get("unit_id")
    units.sort(key=lambda h: h.unit_id != named)  # stable: the rest stay oldest first
    fits, why = [], ""
    for h in units:
        try:
            check_training_state(h.spec, tensors)
            fits.append(h)
        except CheckpointError as exc:
            why = why or str(exc)
    if not fits:
        raise CheckpointError(f"checkpoint {sha} is not a training state of the model of any unit {provider} holds"
                              f"{': ' + why if why else ''}")
    with rt.sessions.begin() as s:
        ids = [h.unit_id for h in fits]
        if s.scalar(select(UnitUpload.id).where(UnitUpload.provider == provider, UnitUpload.sha256 == sha,
                                                UnitUpload.unit_id.in_(ids)).limit(1)) is not None:
            return
        for h in fits:
            # PostgreSQL: uploads for one unit are charged one at a time (the unit's row lock); SQLite: the INSERT
            # takes the database's write lock, and the count after it sees every charge committed before
            s.execute(select(Unit.id).where(Unit.id == h.unit_id).with_for_update())
            row = UnitUpload(unit_id=h.unit_id, provider=provider, sha256=sha, at=now_s())
            s.add(row)
            try:
                s.flush()
            except IntegrityError:  # the same bytes charged by a concurrent upload meanwhile
                s.rollback()
                return
            if s.scalar(select(func.count()).select_from(UnitUpload).where(
                    UnitUpload.unit_id == h.unit_id, UnitUpload.provider == provider)) <= h.allowance:
                return
            s.delete(row)
            s.flush()
    raise UploadQuotaExceeded(
        f"{provider} has uploaded as many checkpoints as its work needs for every unit this one fits "
        f"({', '.join(f'{h.unit_id}: {h.allowance}' for h in fits)}): an upload is for work, never free storage; "
        f"the same bytes again are accepted")
