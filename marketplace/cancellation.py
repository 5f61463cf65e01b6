"""A customer's cancel on chain (``JobEscrow.cancel``), as the marketplace follows it.

After a cancel the escrow still pays verified units for a grace period (``closableAt``: the cancel's time + the grace,
pushed back by any time the escrow spends paused); from then on nothing more can be released, and the rest is the
customer's refund when it closes. So the marketplace:

1. takes no new job on an escrow whose cancel is pending (``service.create_job``: 409);
2. stops a running job as soon as it sees the cancel: the periodic sweep reads every running job's escrow, and so
   does ``service.advance`` before it opens a new round. The rule is the simplest honest one: **units verified by
   then are paid; every other unit is cancelled**. A provider training one is told at its next heartbeat (409) and
   stops; a submitted unit's pending checks are void (no verifier replays work nobody will pay for), and the
   checks that already passed on it earn their verifiers' fees (they did what the customer asked); a dispute
   already open is still ruled on, and so is a pass the referee was to audit (a cheat is slashed whether or not it
   would be paid; a pass whose audit holds earns nothing, the job settled without it). The job is ``cancelling``;
3. settles it at once, through the same idempotent path as a finished job (``settlement.settle_job``): the verified
   units' pay and the checks' fees go to the payout pool in one batch, the escrow stays open for the customer's close (which refunds
   the rest), and the job ends ``cancelled``;
4. when it is too late (the marketplace was away longer than the grace, or the customer closed the escrow), the
   escrow refuses the release for good: the job ends ``cancelled`` all the same, and a ``cancel_unpaid`` event
   records the verified entries left unpaid; nothing retries them.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ledger.escrow_ops import JobState
from marketplace.common import OPEN_CHECKS, check_fee_entry, log
from marketplace.db import Job, LedgerEntry, Unit, Verification, Verifier, check_fee_key
from marketplace.runtime import Runtime
from protocol.errors import ChainError

logger = logging.getLogger(__name__)

#: Unit states a stop cancels (everything but ``verified``); a cancelled unit's open checks (common.OPEN_CHECKS) are
#: voided, except a pass the referee is auditing: a ruling, as an open dispute is (else a stop would spare the cheat
#: whose friend passed its work)
STOPPED_UNITS = ("pending", "assigned", "submitted")
VOIDED_CHECKS = tuple(c for c in OPEN_CHECKS if c != "auditing")


def escrow_stop(escrow: JobState) -> str | None:
    """Why a job whose escrow is in this state must not go on; None if it may. An escrow nobody funded (customer
    0x0) is no reason: ``create_job`` checks the funding."""
    if int(escrow.customer, 16) == 0:
        return None
    return stop_reason(escrow.closed, escrow.closable_at)


def stop_reason(closed: bool, closable_at: int) -> str | None:
    """:func:`escrow_stop` from the two fields that decide it (an escrow nobody funded has neither set)."""
    if closable_at:
        return f"the customer cancelled its escrow on chain (it releases pay until {closable_at})"
    if closed:
        return "its escrow was closed on chain"
    return None


def stop_in(s: Session, job_id: str, why: str, closable_at: int) -> bool:
    """Inside the caller's transaction: stop running job ``job_id`` (see the module doc). False, changing nothing,
    if the job is not running (already stopped, done or settled).

    Every transition is a conditional UPDATE, so a verdict verifying a unit concurrently either lands first (the unit
    stays verified and is paid) or finds the unit cancelled (``checking.maybe_verified`` credits nothing)."""
    # synchronize "fetch": objects the caller's session holds follow what the database did
    fetch = {"synchronize_session": "fetch"}
    if s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(status="cancelling"),
                 execution_options=fetch).rowcount != 1:
        return False
    stopped: dict[str, list[tuple[str, str | None]]] = {}
    for status in STOPPED_UNITS:
        stopped[status] = [(u, p) for u, p in s.execute(
            update(Unit).where(Unit.job_id == job_id, Unit.status == status).values(status="cancelled")
            .returning(Unit.id, Unit.provider), execution_options=fetch).all()]
    cancelled = [u for rows in stopped.values() for u, _ in rows]
    voided = 0
    if cancelled:
        voided = s.execute(update(Verification).where(Verification.unit_id.in_(cancelled),
                                                      Verification.canary.is_(None),
                                                      Verification.status.in_(VOIDED_CHECKS))
                           .values(status="void"), execution_options=fetch).rowcount
    fees = _credit_done_checks(s, job_id, [u for u, _ in stopped["submitted"]])
    verified = s.scalar(select(func.count()).select_from(Unit).where(Unit.job_id == job_id, Unit.status == "verified"))
    log(s, "job_cancelled", job_id, reason=why, closable_at=closable_at, verified_units=verified,
        cancelled_units=len(cancelled), stopped_training={u: p for u, p in stopped["assigned"]},
        unchecked={u: p for u, p in stopped["submitted"]}, checks_voided=voided, check_fees=fees)
    return True


def _credit_done_checks(s: Session, job_id: str, units: list[str]) -> dict[str, str]:
    """The fee of every real check that already passed on a submitted unit the stop cancelled (the verifier did the
    replay the customer's level asked for; only the unit's other checks were left), credited as a verified unit's
    are (``checking.maybe_verified``: once, keyed by the check) and paid with the cancel's settlement. Not to a
    verifier benched meanwhile: a canary caught it approving without replaying, and its passes are worth nothing.
    Nor again: a convicted provider's unit, held ``submitted`` for the referee's audits of its passes, had them
    credited when it was verified, and kept those fees where its job had room for its redo
    (``checking._forfeit_unsettled``); those it lost for want of room are credited here (the stop frees the room)."""
    if not units:
        return {}
    out: dict[str, str] = {}
    owed = set(s.scalars(select(LedgerEntry.unit_id).where(LedgerEntry.job_id == job_id)))
    rows = s.execute(select(Verification, Unit).join(Unit, Unit.id == Verification.unit_id)
                     .join(Verifier, Verifier.address == Verification.verifier)
                     .where(Verification.unit_id.in_(units), Verification.canary.is_(None),
                            Verification.status == "passed", Verification.provider == Unit.provider,
                            Verifier.status == "active")).all()
    for check, unit in rows:
        if check_fee_key(check.id) in owed:
            continue
        entry = check_fee_entry(unit, check)
        s.add(entry)
        out[str(check.id)] = str(entry.amount)
    return out


def stop_job(rt: Runtime, job_id: str, why: str, closable_at: int) -> bool:
    """Stop running job ``job_id`` (:func:`stop_in`) and queue its settlement. Idempotent: False if it was not
    running."""
    with rt.sessions.begin() as s:
        stopped = stop_in(s, job_id, why, closable_at)
    if stopped:
        rt.enqueue("gridmint.settle", [job_id])
    return stopped


def stop_cancelled(rt: Runtime) -> list[str]:
    """The periodic sweep's look at every running job's escrow (a thousand jobs per chain call through GridLens;
    one call per job on a deployment without it): every job cancelled or closed on chain is stopped. Returns the
    jobs stopped. A chain error ends the look (logged): the next sweep looks again, long inside a grace (an hour by
    default)."""
    with rt.sessions() as s:
        running = list(s.scalars(select(Job.id).where(Job.status == "running").order_by(Job.created_at)))
    if not running:
        return []
    try:
        states = rt.contracts.escrow_states(running)
    except ChainError as exc:
        logger.warning("sweep: could not read the escrows of %d running jobs (%s); trying again at the next sweep",
                       len(running), exc)
        return []
    stopped: list[str] = []
    for job_id in running:
        closed, closable_at = states[job_id]
        why = stop_reason(closed, closable_at)
        if why is not None and stop_job(rt, job_id, why, closable_at):
            stopped.append(job_id)
    return stopped


def unpaid_entries(entries: list[Any]) -> list[dict[str, str]]:
    """Ledger entries as a ``cancel_unpaid`` event lists them."""
    return [{"unit": e.unit_id, "provider": e.provider, "amount": str(e.amount)} for e in entries]
