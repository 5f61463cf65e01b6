"""Collecting checkpoints nothing needs any more: without it the blob store only grows (every unit's every segment
checkpoint, each a full training state, kept for ever) until the disk is full.

Kept: every job's global model (what ``GET /jobs/{id}/weights`` serves); every checkpoint of a job still running, or
ended (settled, cancelled, failed) less than ``Settings.blob_retention_s`` ago (a week: its units' checks, disputes
and downloads); everything a ruling still open needs, however old its job (a dispute's unit and its revealed states,
a canary the referee has yet to confirm). Deleted: the rest, and uploads nobody names (a result never submitted,
junk), once older than ``Settings.blob_orphan_s`` (a day) and than every unit in flight (a long unit's checkpoints
wait for its result however long it trains). Age is the last write or upload of the same bytes: a blob handed in
again is young again. The upload charges of a unit whose checkpoints go (``unit_uploads``, marketplace.uploads) go
with them: nothing can be uploaded for it any more.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, delete, func, or_, select
from sqlalchemy.orm import Session

from marketplace import canary
from marketplace.common import log
from marketplace.db import Job, Unit, UnitUpload, Verification, now_s
from marketplace.runtime import Runtime

#: check statuses whose ruling may still read the unit's checkpoints (and the canary's forged end, the reveals)
OPEN_RULINGS = ("disputed", "bisecting", "auditing")


def kept_units(now: int, retention_s: int) -> Select[tuple[str]]:
    """The units whose checkpoints are kept: of a job running or ended less than ``retention_s`` ago, or with a
    ruling still open."""
    ruling = select(Verification.unit_id).where(or_(
        Verification.status.in_(OPEN_RULINGS),
        and_(Verification.status == "canary_missed", Verification.slash_tx.is_(None))))
    live = select(Job.id).where(or_(Job.settled_at.is_(None), Job.settled_at > now - retention_s))
    return select(Unit.id).where(or_(Unit.job_id.in_(live), Unit.id.in_(ruling)))


def referenced(s: Session, now: int, retention_s: int) -> set[str]:
    """Every blob something kept still names (see the module's docstring)."""
    keep = set(s.scalars(select(Job.global_blob)))
    units = kept_units(now, retention_s)
    for segments, final in s.execute(select(Unit.segment_blobs, Unit.final_blob).where(Unit.id.in_(units))):
        keep.update(segments or [])
        if final:
            keep.add(final)
    for planted, decoy, bisect in s.execute(select(Verification.canary, Verification.decoy, Verification.bisect)
                                            .where(Verification.unit_id.in_(units))):
        for forged in (planted, decoy):
            keep.update(canary.decoy_blobs(forged))
        keep.update(r["blob"] for r in ((bisect or {}).get("reveals") or {}).values() if r.get("blob"))
    return keep


def collect(rt: Runtime, now: int | None = None) -> dict[str, Any]:
    """Delete the blobs nothing needs (module docstring); logs and returns what went (files, bytes)."""
    now = now_s() if now is None else now
    with rt.sessions() as s:
        # (what is in flight first: a result submitted between the two reads is then either still in flight, its
        # uploads kept by their age, or named by its unit, kept by name; read the other way round, neither)
        in_flight = s.scalar(select(func.min(Unit.assigned_at)).where(Unit.status == "assigned"))
        keep = referenced(s, now, rt.settings.blob_retention_s)
    older_than = now - rt.settings.blob_orphan_s
    if in_flight is not None:
        older_than = min(older_than, in_flight - 60)  # (an upload for a unit in flight came after its assignment)
    files, size = rt.blobs.collect(keep, older_than)
    with rt.sessions.begin() as s:  # an ended unit's upload charges: its provider can upload nothing more for it
        charges = s.execute(delete(UnitUpload).where(
            UnitUpload.unit_id.not_in(kept_units(now, rt.settings.blob_retention_s)))).rowcount
    out = {"deleted": files, "bytes": size, "kept": len(keep), "upload_charges": charges}
    if files or charges:
        with rt.sessions.begin() as s:
            log(s, "blobs_collected", **out)
    return out
