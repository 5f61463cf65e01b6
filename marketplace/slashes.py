"""Slashes that wait out GridStaking's ``slashDelay`` (a production deployment has one; ``gridmint marketplace deploy
--slash-delay-s``): the stake leaves the account at the verdict, and is paid to the verifier and the treasury only
once the delay has passed, so that the guardian can void a slash sent with a stolen operator key before anyone is
paid. The marketplace notes each slash it sends (:func:`note`) and its sweep pays out those whose delay has passed
(:func:`finalize_due`). Paying out is open to anyone on chain, so a slash this marketplace lost track of is still
paid by whoever sends ``finalizeSlash`` (a verifier waiting for its bounty)."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from marketplace.common import log
from marketplace.db import Slash
from marketplace.runtime import Runtime
from protocol.signing import to_bytes32


def note(rt: Runtime, evidence: bytes) -> bool:
    """Record the slash sent under ``evidence`` if it waits out a delay (nothing with none: it was paid at once).
    Idempotent: a re-run of the step that sent it notes it once. Returns True if one is noted now."""
    pending = rt.contracts.slash_of(evidence)
    if pending.amount == 0:
        return False
    ev = "0x" + to_bytes32(evidence).hex()
    try:
        with rt.sessions.begin() as s:
            if s.get(Slash, ev) is not None:
                return False
            s.add(Slash(evidence=ev, account=pending.account, amount=pending.amount, ready_at=pending.ready_at))
            log(s, "slash_pending", None, evidence=ev, account=pending.account, amount=str(pending.amount),
                verifier=pending.verifier, bounty=str(pending.bounty), ready_at=pending.ready_at)
    except IntegrityError:  # a concurrent run of the same step noted it first
        return False
    return True


def finalize_due(rt: Runtime) -> int:
    """Pay out every noted slash whose delay has passed by the chain's clock (time paused does not count: the
    deadline is re-read from the chain, and one not yet due is left for the next sweep). A slash no longer pending
    on chain (voided by the guardian, or paid by someone else) is closed as "gone". Returns how many it paid."""
    with rt.sessions.begin() as s:
        open_ = list(s.scalars(select(Slash.evidence).where(Slash.done_at.is_(None)).order_by(Slash.ready_at)))
    if not open_:
        return 0
    now = rt.contracts.chain.timestamp()
    paid = 0
    for ev in open_:
        pending = rt.contracts.slash_of(ev)
        if pending.amount > 0 and pending.ready_at > now:
            continue
        outcome = "paid" if pending.amount > 0 and rt.contracts.finalize_slash(ev) else "gone"
        paid += outcome == "paid"
        with rt.sessions.begin() as s:
            row = s.get(Slash, ev)
            if row is None or row.done_at is not None:
                continue
            row.done_at, row.outcome = now, outcome
            log(s, "slash_paid" if outcome == "paid" else "slash_gone", None, evidence=ev, account=row.account,
                amount=str(row.amount))
    return paid
