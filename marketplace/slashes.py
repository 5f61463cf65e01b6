"""Slashes that wait out GridStaking's ``slashDelay`` (a production deployment has one; ``gridmint marketplace deploy
--slash-delay-s``): the stake leaves the account at the verdict, and is paid to the verifier and the treasury only
once the delay has passed, so that the guardian can void a slash sent with a stolen operator key before anyone is
paid. The marketplace notes each slash it sends (:func:`note`) and its sweep pays out those whose delay has passed
(:func:`sweep`). Paying out is open to anyone on chain, so a slash this marketplace lost track of is still paid by
whoever sends ``finalizeSlash`` (a verifier waiting for its bounty).

A slash that finds an account's stake held by the account's own pending slashes (a thief's, say, sent with the
operator key before the guardian paused) takes only what is left. If the guardian voids those, the stake comes back
to the account: a cheat convicted meanwhile would keep it. So such a slash is noted as a redo (:func:`hold_over`):
once none of the slashes that held the stake can be voided any more, what their voids gave back that no slash since
took (:func:`given_back`: never stake the account added later) is slashed again under an evidence derived from the
first (:func:`redo_evidence`), its bounty to the same party; nothing if the guardian voided the first slash (and if
it voids it after the redo went out, GridStaking's ``voidSlash`` voids the redo with it). The redo is noted before the
first slash is sent and armed once it is (:func:`before_slash`, :func:`hold_over`): a run that stops between the two
leaves it for its re-run, which would otherwise find nothing pending any more if the guardian voided the holding
slashes meanwhile. A slash that lands
between the note and the send is found where the first slash took its stake on chain, by the redo (it waits for it)
or, where none was noted, by the re-run's :func:`hold_over` (pending there, voided since or not)."""
from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ledger.staking_ops import SlashEvent, redo_evidence
from marketplace import leases
from marketplace.common import log
from marketplace.db import Slash
from marketplace.runtime import Runtime
from protocol.errors import ChainError
from protocol.signing import to_bytes32

logger = logging.getLogger(__name__)

#: the lease under which a sweep sends redos (marketplace.leases), and how long one take of it lasts: longer than a
#: redo (a few reads and one send, whose receipt the chain client waits 120 s for at most)
REDO_LEASE = "slash-redos"
REDO_LEASE_S = 600


def _hex(evidence: bytes | str) -> str:
    return "0x" + to_bytes32(evidence).hex()


def _insert(rt: Runtime, row: Slash, **event: object) -> bool:
    """Add ``row`` unless its evidence is noted already (a re-run, or a concurrent run of the same step)."""
    try:
        with rt.sessions.begin() as s:
            if s.get(Slash, row.evidence) is not None:
                return False
            s.add(row)
            log(s, f"slash_{'pending' if row.kind == 'payout' else 'held_over'}", None, evidence=row.evidence,
                account=row.account, **event)
    except IntegrityError:
        return False
    return True


def note(rt: Runtime, evidence: bytes | str) -> bool:
    """Record the slash sent under ``evidence`` if it waits out a delay (nothing with none: it was paid at once).
    Idempotent: a re-run of the step that sent it notes it once. Returns True if one is noted now."""
    pending = rt.contracts.slash_of(evidence)
    if pending.amount == 0:
        return False
    return _insert(rt, Slash(evidence=_hex(evidence), kind="payout", account=pending.account, amount=pending.amount,
                             ready_at=pending.ready_at),
                   amount=str(pending.amount), verifier=pending.verifier, bounty=str(pending.bounty),
                   ready_at=pending.ready_at)


def before_slash(rt: Runtime, account: str, beneficiary: str, evidence: bytes | str, *, bond: bool = False) -> bool:
    """Before a slash of ``account``'s whole stake (or a false verdict on its bond: ``bond``) is sent under
    ``evidence``: if the account's own pending slashes hold stake of it, note the redo now, unarmed (:func:`_redo`
    leaves it be until :func:`hold_over`, after the send, arms it). A run that stops between the send and that call
    so leaves the redo for its re-run to arm: the re-run would find nothing pending (the guardian may have voided
    it meanwhile) and note none. A redo a run before noted and never sent (its evidence unused) is noted again:
    what holds the stake now, from now on. Returns True if one is noted now."""
    noted, unarmed = _noted(rt, evidence)
    if (noted and not unarmed) or rt.contracts.evidence_used(evidence):
        return False  # (armed or closed; or sent by a run before: the call after the send arms it, or notes it)
    if not noted:
        return _note_redo(rt, account, beneficiary, evidence, armed=False, bond=bond)
    # (a run before stopped short of the send: the stake it saw held may be back)
    held = {ev: str(a) for ev, a in _held_of(rt, account, evidence).items()}
    _update_unarmed(rt, evidence, {"held": held}, int(rt.contracts.chain.w3.eth.block_number))
    return False


def _noted(rt: Runtime, evidence: bytes | str) -> tuple[bool, bool]:
    """(whether a redo of the slash under ``evidence`` is noted, whether it is open and not yet armed)."""
    with rt.sessions() as s:
        row = s.get(Slash, _hex(redo_evidence(evidence)))
        return row is not None, row is not None and row.done_at is None and not _armed(row)


def _update_unarmed(rt: Runtime, evidence: bytes | str, basis: dict[str, object],
                    since_block: int | None = None) -> None:
    """Merge ``basis`` into the redo of the slash under ``evidence`` (and set ``since_block``) if it is still open
    and unarmed."""
    with rt.sessions.begin() as s:
        row = s.get(Slash, _hex(redo_evidence(evidence)))
        if row is not None and row.done_at is None and not _armed(row):
            row.basis = {**(row.basis or {}), **basis}
            row.since_block = row.since_block if since_block is None else since_block


def after_slash(rt: Runtime, account: str, beneficiary: str, evidence: bytes | str) -> None:
    """What follows a slash of ``account``'s whole stake under ``evidence``, its bounty to ``beneficiary`` (sent, or
    found sent by a run before): :func:`note` it, and :func:`hold_over` what the account's own pending slashes held."""
    note(rt, evidence)
    hold_over(rt, account, beneficiary, evidence)


def hold_over_bond(rt: Runtime, verifier: str, evidence: bytes | str) -> bool:
    """After a false accusation's verdict under ``evidence``: :func:`hold_over` the part of ``verifier``'s bond its
    own pending slashes held, for the treasury (how much: the bond less what the verdict took, read from the chain's
    events when the redo is sent)."""
    return hold_over(rt, verifier, rt.contracts.deployment.treasury, evidence, bond=True)


def _held_by_others(rt: Runtime, account: str, evidence: bytes | str) -> bool:
    """Whether ``account``'s pending slashes other than the one under ``evidence`` hold stake of it."""
    return rt.contracts.pending_slashes_of(account) - rt.contracts.slash_of(evidence).amount > 0


def _held_of(rt: Runtime, account: str, evidence: bytes | str, at: tuple[int, int] | None = None) -> dict[str, int]:
    """``account``'s slashes but the one under ``evidence`` pending now, or (``at``: the slash's own place on chain)
    pending when it took its stake (one sent after it held nothing it wanted; one voided since did): evidence ->
    amount."""
    own = _hex(evidence)
    listed = (rt.contracts.pending_slashes_listed(account) if at is None
              else rt.contracts.slashes_pending_at(account, at))
    return {ev: amount for ev, amount in listed.items() if ev != own}


def _armed(row: Slash) -> bool:
    return bool((row.basis or {}).get("armed", True))  # (rows noted before unarmed redos were: noted after the send)


def hold_over(rt: Runtime, account: str, beneficiary: str, evidence: bytes | str, *, bond: bool = False) -> bool:
    """After a slash or verdict against ``account`` under ``evidence`` (sent, or found sent): arm the redo
    :func:`before_slash` noted; with none noted, note one (armed) if the account's own pending slashes, other than
    this one, hold stake of it, for what their voids give back, its bounty to ``beneficiary``. Returns True if one is
    noted now."""
    noted, unarmed = _noted(rt, evidence)
    if not noted:
        return _note_redo(rt, account, beneficiary, evidence, armed=True, bond=bond)
    if unarmed:
        _update_unarmed(rt, evidence, {"armed": True})
    return False


def _note_redo(rt: Runtime, account: str, beneficiary: str, evidence: bytes | str, *, armed: bool,
               bond: bool) -> bool:
    """Note the redo of the slash under ``evidence`` if ``account``'s own slashes, other than it, held stake of it
    (and none is noted yet): once it is sent (``armed``), those pending where it took its stake, voided since or not
    (a run that stopped after the send, before noting anything, may run again after the void); else those pending
    now. ``since_block``: the latest block now (:func:`_redo` counts from the slash's own place once sent)."""
    at = rt.contracts.slash_position(evidence) if armed else None
    if at is None and not _held_by_others(rt, account, evidence):
        return False
    redo = redo_evidence(evidence)
    if rt.contracts.evidence_used(redo):
        return False
    held = _held_of(rt, account, evidence, at)
    if not held:
        return False
    block = int(rt.contracts.chain.w3.eth.block_number)
    basis: dict[str, object] = {"after": _hex(evidence), "held": {ev: str(a) for ev, a in held.items()},
                                "armed": armed}
    if bond:
        basis["bond"] = True
    return _insert(rt, Slash(evidence=_hex(redo), kind="redo", account=account, amount=0, ready_at=0,
                             beneficiary=beneficiary, since_block=block, basis=basis),
                   after=_hex(evidence), held=str(sum(held.values())), armed=armed)


def given_back(events: Iterable[SlashEvent], held: Collection[str], skip: Collection[str] = ()) -> int:
    """What the guardian's voids of the ``held`` slashes gave an account back that no slash of it since took:
    ``events``, its slashes and voids after the slash a redo redoes, in chain order (those under ``skip`` aside).
    Each slash takes what was given back before any stake the account added (so the redo never takes added stake
    where another slash took the given-back part), and a void of one gives back what it took of it."""
    back, took = 0, {}
    for e in events:
        if e.evidence in skip:
            continue
        if e.kind == "voided":
            back += e.amount if e.evidence in held else took.pop(e.evidence, 0)
        elif e.evidence not in held:
            took[e.evidence] = min(e.amount, back)
            back -= took[e.evidence]
    return back


def sweep(rt: Runtime) -> int:
    """The sweep's part: send the redos none of whose holding slashes can be voided any more (one sweep at a time:
    :func:`_redos`), then pay out every noted slash whose delay has passed by the chain's clock (time paused does
    not count: the deadline is re-read from the chain; one not yet due is left for the next sweep). A slash no
    longer pending on chain (voided by the guardian, or paid by someone else) is closed as "gone". A chain error on
    one slash (the guardian paused staking, a node away) is logged and that slash left for the next sweep (so is any
    other error, with its traceback): the rest of the sweep goes on. Returns how many it paid out."""
    with rt.sessions.begin() as s:
        open_ = list(s.execute(select(Slash.evidence, Slash.kind).where(Slash.done_at.is_(None))
                               .order_by(Slash.kind.desc(), Slash.ready_at)))  # the redos first
    redos = [ev for ev, kind in open_ if kind == "redo"]
    if redos:
        _redos(rt, redos)
    paid = 0
    for ev in (ev for ev, kind in open_ if kind != "redo"):
        with _left_on_error("slash", ev):
            paid += _pay(rt, ev)
    return paid


@contextmanager
def _left_on_error(what: str, ev: str) -> Iterator[None]:
    """One slash's step in the sweep: an error leaves that slash for the next sweep, and the sweep goes on."""
    try:
        yield
    except ChainError as exc:  # the guardian paused staking, a node away
        logger.warning("%s %s left for the next sweep: %s", what, ev, exc)
    except Exception:  # noqa: BLE001 - one slash's failure must not hold back the others' payouts
        logger.exception("%s %s failed; left for the next sweep", what, ev)


def _redos(rt: Runtime, redos: list[str]) -> None:
    """:func:`_redo` each of ``redos`` under the lease :data:`REDO_LEASE`, taken again before each: two sweeps at
    once (a slow chain holds one past the next beat) would each read what a void gave back before the other's redo
    of the account lands, and both take it, the second from stake the account added since. A sweep that finds the
    lease held leaves the redos to its holder (or, if that dies, to a sweep after the lease lapses)."""
    me = leases.holder()
    if not leases.take(rt, REDO_LEASE, me, REDO_LEASE_S):
        logger.info("another sweep sends the slash redos: %d left to it", len(redos))
        return
    try:
        for i, ev in enumerate(redos):
            if i and not leases.take(rt, REDO_LEASE, me, REDO_LEASE_S):  # (again: held past its lapse, it is gone)
                logger.warning("the slash redos' lease lapsed: %d left to the next sweep", len(redos) - i)
                return
            with _left_on_error("slash redo", ev):
                _redo(rt, ev)
    finally:
        leases.give_back(rt, REDO_LEASE, me)


def _pay(rt: Runtime, ev: str) -> int:
    pending = rt.contracts.slash_of(ev)
    now = rt.contracts.chain.timestamp()
    if pending.amount > 0 and pending.ready_at > now:
        return 0
    paid = pending.amount > 0 and rt.contracts.finalize_slash(ev)
    with rt.sessions.begin() as s:
        row = s.get(Slash, ev)
        # (a concurrent sweep may have closed it first: as "gone" if it saw this one's payment land; "paid" wins)
        if row is None or (row.done_at is not None and not paid):
            return int(paid)
        row.done_at, row.outcome = now, "paid" if paid else "gone"
        log(s, f"slash_{row.outcome}", None, evidence=ev, account=row.account, amount=str(row.amount))
    return int(paid)


def _redo(rt: Runtime, ev: str) -> int:
    """Send the redo ``ev`` once none of the slashes that held its account's stake can be voided any more: what their
    voids gave back and no slash since took (:func:`given_back`: never stake the account added since; a slash since
    still pending counts as taken), at most ``want``; nothing if the guardian voided the slash it redoes (overturned;
    voided after the redo went out, GridStaking voids the redo's slash with it: the row then closes as "gone"). The
    row then waits as the payout of the slash it sent (its evidence is the slash's)."""
    with rt.sessions() as s:
        row = s.get(Slash, ev)
        assert row is not None
        if row.done_at is not None or row.kind != "redo":
            return 0  # (closed, or sent, by a sweep that ran after this one listed it)
        account, beneficiary, want, since = row.account, row.beneficiary, row.want, row.since_block or 0
        basis = dict(row.basis or {})
        if not _armed(row):
            return 0  # its slash not (yet) sent: the step that sends it arms it
    held = {h: int(a) for h, a in (basis.get("held") or {}).items()}
    amount, back = 0, 0
    if not rt.contracts.evidence_used(ev):  # (used: a run before sent it and stopped short of this row)
        # where the first slash took its stake (all there was: those voided before, it took back with it), and
        # which slashes held it then (one sent between the note and the send too); nothing sent (nothing was
        # there): after the block the redo was noted in. Voids and other slashes count from there on (a redo noted
        # late, by a re-run, counts a slash that took the void's stake before its note)
        after = basis.get("after", "")
        at = rt.contracts.slash_position(after) if after else None
        if at is None:
            at = (since, 1 << 62)
        else:  # (what was noted before the send, less any that ended before it, plus any sent in between)
            held = _held_of(rt, account, after, at)
        now = rt.contracts.chain.timestamp()
        if any(p.amount > 0 and p.ready_at > now for p in map(rt.contracts.slash_of, held)):
            return 0  # not yet: a slash that held the stake may still be voided
        # (nor waiting for the first slash or later ones: the stake a void gave back is free to unbond meanwhile,
        # and a stream of slashes would hold the redo back for ever)
        events = rt.contracts.slash_events_after(account, at)
        if not any(e.kind == "voided" and e.evidence == after for e in events):  # (voided: overturned)
            if basis.get("bond"):  # the part of a false accuser's bond the verdict could not take
                bond, penalty = rt.contracts.dispute_terms(after)
                want = 0 if penalty is None else bond - penalty
            back = min(given_back(events, held, skip={after, ev}), sum(held.values()))
            st = rt.contracts.stake_state(account)
            amount = max(min(back, st.staked + st.unbonding, back if want is None else want), 0)
            if amount > 0 and beneficiary is not None:
                rt.contracts.slash(account, amount, beneficiary, ev)
    pending = rt.contracts.slash_of(ev)
    with rt.sessions.begin() as s:
        row = s.get(Slash, ev)
        if row is None or row.done_at is not None or row.kind != "redo":
            return 0
        if pending.amount > 0:
            row.kind, row.amount, row.ready_at = "payout", pending.amount, pending.ready_at
        else:  # nothing given back (what held it was paid out, or taken since), or paid at once (no delay any more),
            # or sent by a run that stopped before this row and voided since (its conviction overturned) or paid
            row.done_at, row.amount = rt.contracts.chain.timestamp(), amount
            sent = amount > 0 or rt.contracts.evidence_used(ev)
            row.outcome = ("gone" if rt.contracts.slash_voided(ev) else "slashed") if sent else "nothing"
        log(s, "slash_redone" if pending.amount > 0 or amount > 0 else "slash_redo_nothing", None, evidence=ev,
            account=account, amount=str(pending.amount or amount), voided=str(back))
    return 0
