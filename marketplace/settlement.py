"""Epoch settlement: how verified work becomes tokens in a provider's wallet.

1. ``settle_job`` (job done): the job's verified, unreleased ledger entries move from its escrow to the payout pool
   in ONE transfer (``JobEscrow.releaseToPool`` with a batch id derived from the entries), then the escrow is closed
   and the customer refunded the rest. A job stopped because its customer cancelled the escrow (``cancelling``,
   :mod:`marketplace.cancellation`) goes the same way, except that the escrow is left to the customer's close; a
   job that failed (``failing``: a round that could not be averaged into a finite model, ``service.advance``) is
   settled exactly as a done one and ends ``failed``; one
   whose escrow refuses for good (the cancel's grace is over, or the escrow was closed) ends ``cancelled`` with its
   unpaid entries recorded, never retried.
2. ``post_epoch`` (periodic, and after each settlement): one Merkle root over every provider's *cumulative* pooled
   earnings goes on chain (``PayoutDistributor.postRoot``). Nothing is posted when nothing changed, or while the
   previous root is still inside its dispute window.
3. ``payout_for`` (``GET /payouts/{address}``): the provider's leaf and proof under the newest claimable root; one
   ``claim`` pays everything owed up to it, however many epochs the provider waited.

Exactly-once, step by step: a batch id is a pure function of the job and its unit ids, and the escrow releases a
batch at most once; a root is written ahead (status ``posting``) before it is sent, so a crash between sending and
recording is finished by the next run instead of posting a second, different root; a voided root (guardian veto
inside the dispute window) is noticed on chain, logged and its epoch number reused.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from eth_utils import keccak
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ledger.payout_tree import PayoutTree, build_payout_tree
from marketplace.cancellation import unpaid_entries
from marketplace.db import Event, Job, LedgerEntry, PayoutEpoch, now_s
from marketplace.runtime import Runtime
from protocol.errors import ChainError, GridMintValueError, InsufficientFundsError
from protocol.signing import to_bytes32

logger = logging.getLogger(__name__)


def batch_id_for(job_id: str, unit_ids: list[str]) -> str:
    """The escrow batch id for paying ``unit_ids`` of ``job_id``: the same set always gives the same id."""
    parts = b"".join(sorted(to_bytes32(u) for u in unit_ids))
    return "0x" + keccak(to_bytes32(job_id) + b"pool-batch" + parts).hex()


#: Job states settle_job works on, and the final ones it leaves a job in (``_ENDS``: which one, for each).
SETTLING = ("done", "cancelling", "failing")
FINAL = ("settled", "cancelled", "failed")
_ENDS = {"done": "settled", "cancelling": "cancelled", "failing": "failed"}
#: Escrow refusals that are final: a cancel's grace is over, or the escrow was closed. Nothing more can be released.
_FOR_GOOD = ("EscrowJobCancelled", "EscrowJobClosed")


def settle_job(rt: Runtime, job_id: str) -> int:
    """Move a finished job's verified pay to the payout pool and refund the rest. Returns the refund: sent now, or,
    for a ``cancelling`` job (its customer cancelled the escrow), what the customer's own close will send, as the
    escrow is left open for it. Either way the job ends in a final state (``settled``, ``cancelled``; a ``failing``
    job, settled as a ``done`` one, ends ``failed``).

    Safe to re-run after a crash at any point: the batch id is derived from the unreleased entries, and the escrow
    refuses a second release of a batch (the client returns False without sending). If the escrow refuses the
    release for good (EscrowJobCancelled: the cancel's grace is over; EscrowJobClosed), the job ends ``cancelled`` and
    a ``cancel_unpaid`` event lists the entries left unpaid; a re-run returns at once, so nothing retries forever."""
    with rt.sessions.begin() as s:
        job = s.get(Job, job_id)
        if job is None or job.status not in SETTLING + FINAL:
            raise GridMintValueError(f"job {job_id} is not done" + (f" (status {job.status})" if job else ""))
        if job.status in FINAL:
            return job.refund or 0
        cancelling, ends = job.status == "cancelling", _ENDS[job.status]
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                           LedgerEntry.released.is_(False))))
        ids = [e.id for e in entries]
        batch = batch_id_for(job_id, [e.unit_id for e in entries]) if entries else None
        amount = sum(e.amount for e in entries)
    if batch is not None:
        try:
            rt.contracts.release_to_pool(job_id, batch, amount)  # False (no tx) if this batch was already released
        except ChainError as exc:
            if exc.error_name not in _FOR_GOOD:
                raise  # paused, node down, ...: the task retries, the sweep re-queues it
            return _end_unpaid(rt, job_id, str(exc))
        with rt.sessions.begin() as s:
            for e in s.scalars(select(LedgerEntry).where(LedgerEntry.id.in_(ids))):
                e.released, e.batch = True, batch
    if not cancelling:
        rt.contracts.close_job(job_id)  # 0, no tx, if already closed
    onchain = rt.contracts.get_job(job_id)
    with rt.sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        if job.status in FINAL:  # a concurrent run finished it
            return job.refund or 0
        paid = _check_released(s, job_id, onchain.released)
        # none but a verdict that raced the stop (cancellation.stop_in) can be left: recorded, never paid
        left = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id, LedgerEntry.released.is_(False))))
        job.status, job.settled_at = ends, now_s()
        job.refund = onchain.funded - onchain.released
        data: dict[str, Any] = {"paid": str(paid), "refund": str(job.refund), "released_on_chain": str(onchain.released),
                                "batch": batch}
        if cancelling:  # the escrow stays open: the customer's close refunds the rest
            data.update(closable_at=onchain.closable_at, escrow_closed=onchain.closed)
        if left:
            data["unpaid"] = unpaid_entries(left)
        s.add(Event(job_id=job_id, kind="job_cancel_settled" if cancelling else "job_settled", data=data))
        refund = job.refund
    rt.enqueue("gridmint.epoch", [])
    return refund


def _check_released(s: Session, job_id: str, onchain_released: int) -> int:
    """What the ledger says was released from ``job_id``'s escrow; InsufficientFundsError unless the escrow agrees."""
    paid = sum(e.amount for e in s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                                     LedgerEntry.released.is_(True))))
    if paid != onchain_released:
        raise InsufficientFundsError(f"ledger says {paid} paid for job {job_id} but escrow released {onchain_released}")
    return paid


def _end_unpaid(rt: Runtime, job_id: str, reason: str) -> int:
    """The escrow refuses ``job_id``'s release for good: the job ends ``cancelled``, its unreleased entries are
    recorded as unpaid (a ``cancel_unpaid`` event) and left so. Returns the customer's refund (the escrow's rest)."""
    onchain = rt.contracts.get_job(job_id)
    with rt.sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        if job.status in FINAL:
            return job.refund or 0
        _check_released(s, job_id, onchain.released)
        unpaid = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id,
                                                          LedgerEntry.released.is_(False))))
        job.status, job.settled_at = "cancelled", now_s()
        job.refund = onchain.funded - onchain.released
        s.add(Event(job_id=job_id, kind="cancel_unpaid", data={
            "reason": reason, "closable_at": onchain.closable_at, "escrow_closed": onchain.closed,
            "unpaid": str(sum(e.amount for e in unpaid)), "entries": unpaid_entries(unpaid),
            "refund": str(job.refund)}))
        return job.refund


def cumulative_earnings(s: Session) -> dict[str, int]:
    """Every provider's pooled earnings so far (entries whose batch reached the payout pool)."""
    rows = s.execute(select(LedgerEntry.provider, LedgerEntry.amount).where(LedgerEntry.released.is_(True),
                                                                            LedgerEntry.batch.is_not(None)))
    out: dict[str, int] = {}
    for provider, amount in rows:
        out[provider] = out.get(provider, 0) + amount
    return out


def pooled_earnings(s: Session, address: str) -> int:
    """``address``'s pooled earnings so far (its entry in :func:`cumulative_earnings`), read through the ledger's
    provider index: the cost of one address's entries, not of every entry ever released. Summed here, not in SQL:
    amounts are exact decimal strings (``db.Money``), which SQLite's SUM would add as floats."""
    return sum(s.scalars(select(LedgerEntry.amount).where(LedgerEntry.provider == address,
                                                          LedgerEntry.released.is_(True),
                                                          LedgerEntry.batch.is_not(None))))


def _entries_json(cumulative: dict[str, int]) -> dict[str, str]:
    return {a: str(v) for a, v in sorted(cumulative.items())}


@lru_cache(maxsize=8)
def _tree(entries: tuple[tuple[str, str], ...]) -> PayoutTree:
    return build_payout_tree({a: int(v) for a, v in entries})


def tree_of(row: PayoutEpoch) -> PayoutTree:
    return _tree(tuple(sorted(row.entries.items())))


def post_epoch(rt: Runtime) -> int | None:
    """Post the next epoch's root if cumulative earnings changed. Returns the epoch posted (or completed), else None.

    Needs POSTER_ROLE on the distributor. Idempotent and safe to run concurrently: the epoch row is the lock."""
    c = rt.contracts
    chain_latest = c.latest_epoch()
    try:
        pending = _claim_epoch(rt, chain_latest)
    except IntegrityError:  # another worker wrote this epoch's row first; it posts it
        return None
    if pending is None:
        return None
    epoch, root, total = pending.epoch, bytes.fromhex(pending.root[2:]), pending.total
    if chain_latest < epoch:
        try:
            c.post_root(epoch, root, total)
        except ChainError:
            if c.root_of(epoch) != root:
                raise
            # (another run sent this very row since this one read the chain: recorded below; a review found the
            # second run's send refused, SettlementWrongEpoch, and the task failed)
    elif c.root_of(epoch) != root:
        raise ChainError(f"epoch {epoch} on chain has root 0x{c.root_of(epoch).hex()}, the ledger wrote {pending.root}")
    claimable_at = c.latest_claimable_at()
    if c.root_of(epoch) != root:  # voided as soon as it landed: left "posting", the next run drops it (a review
        return None  # found it recorded claimable at once, its voided proof served)
    with rt.sessions.begin() as s:
        row = s.get(PayoutEpoch, epoch)
        if row is None or row.status == "posted":
            return epoch  # (recorded by another run, or voided and dropped since: nothing to record twice)
        row.status, row.posted_at, row.claimable_at = "posted", c.chain.timestamp(), claimable_at
        s.add(Event(kind="epoch_posted", data={"epoch": epoch, "root": row.root, "total": str(total),
                                               "accounts": len(row.entries), "claimable_at": claimable_at}))
    return epoch


def _claim_epoch(rt: Runtime, chain_latest: int) -> PayoutEpoch | None:
    """The epoch row to post: one left ``posting`` by a crashed run, or a new one written ahead now; None if there
    is nothing new to post or the previous root is still in its dispute window."""
    c = rt.contracts
    with rt.sessions.begin() as s:
        _forget_voided(s, c, chain_latest)
        pending = s.scalars(select(PayoutEpoch).where(PayoutEpoch.status == "posting")).first()
        if pending is not None and not _voided_after_sending(s, c, pending, chain_latest):
            return pending
        last = s.scalars(select(PayoutEpoch).where(PayoutEpoch.status == "posted")
                         .order_by(PayoutEpoch.epoch.desc())).first()
        cumulative = cumulative_earnings(s)
        if not cumulative or (last is not None and last.entries == _entries_json(cumulative)):
            return None
        if last is not None and last.claimable_at > c.chain.timestamp():
            return None  # the previous root is still in its dispute window; the periodic task comes back
        if last is not None and chain_latest < last.epoch:
            return None  # read before another worker's root landed (its row is here, its root on chain): next run
        if chain_latest != (last.epoch if last else 0):
            raise ChainError(f"distributor is at epoch {chain_latest}, the ledger at {last.epoch if last else 0}: "
                             "a root was posted that this ledger did not write")
        tree = build_payout_tree(cumulative)
        # the guardian's veto stands till the ledger changes (a review found the very root it voided sent again at
        # once, with a new dispute window). The vetoes are the ledger's own epoch_voided events (_forget_voided and
        # _voided_after_sending log each, above, before anything is posted), read only while latestClaimableAt is
        # 0, as a void leaves it till the next post (and before the first root): no chain log read (a second review
        # found one on every post, which failed the post on a node refusing log reads)
        if c.latest_claimable_at() == 0 and "0x" + tree.root.hex() in {
                d.get("root") for d in s.scalars(select(Event.data).where(Event.kind == "epoch_voided"))}:
            logger.warning("epoch %d: root 0x%s was voided by the guardian and the ledger has not changed since; "
                           "not posted again", chain_latest + 1, tree.root.hex())
            return None
        pending = PayoutEpoch(epoch=chain_latest + 1, root="0x" + tree.root.hex(), total=tree.total,
                              entries=_entries_json(cumulative), status="posting", posted_at=0, claimable_at=0)
        s.add(pending)
        s.flush()  # IntegrityError if another worker wrote this epoch first
        return pending


def _forget_voided(s: Session, c: Any, chain_latest: int) -> None:
    """Rows for epochs whose root the chain no longer has (the guardian voided them) are dropped, logged, and
    re-posted. ``chain_latest`` may be stale (read before another worker posted and recorded the next root): a row
    above it is dropped only if the chain, asked again, does not hold its root."""
    for row in s.scalars(select(PayoutEpoch).where(PayoutEpoch.epoch > chain_latest, PayoutEpoch.status == "posted")):
        if "0x" + c.root_of(row.epoch).hex() == row.root:
            continue  # on chain: the caller's read was older than this row
        s.add(Event(kind="epoch_voided", data={"epoch": row.epoch, "root": row.root, "total": str(row.total)}))
        s.delete(row)
    s.flush()


def _voided_after_sending(s: Session, c: Any, pending: PayoutEpoch, chain_latest: int) -> bool:
    """Whether ``pending`` (written ahead, its run crashed before recording it) was sent and then voided by the
    guardian: then it is dropped and logged like a posted root that was voided (the next root is built afresh from
    the ledger, not the vetoed snapshot re-sent). Not sent, or on chain: False, and it is posted (or recorded)."""
    if pending.epoch <= chain_latest or "0x" + c.root_of(pending.epoch).hex() == pending.root:
        return False
    if bytes.fromhex(pending.root[2:]) not in c.voided_roots(pending.epoch):
        return False
    s.add(Event(kind="epoch_voided", data={"epoch": pending.epoch, "root": pending.root, "total": str(pending.total),
                                           "recorded": False}))
    s.delete(pending)
    s.flush()
    return True


def payout_for(rt: Runtime, address: str) -> dict[str, Any]:
    """What ``address`` can claim now: its leaf and proof under the newest root past its dispute window."""
    now = rt.contracts.chain.timestamp()
    with rt.sessions() as s:
        row = s.scalars(select(PayoutEpoch).where(PayoutEpoch.status == "posted", PayoutEpoch.claimable_at <= now)
                        .order_by(PayoutEpoch.epoch.desc())).first()
        newest = s.scalar(select(func.max(PayoutEpoch.epoch)).where(PayoutEpoch.status == "posted"))
        pooled = pooled_earnings(s, address)
    out: dict[str, Any] = {"address": address, "pooled": str(pooled), "newest_epoch": newest or 0,
                           "epoch": 0, "cumulative": "0", "proof": []}
    if row is not None:
        tree = tree_of(row)
        cumulative = tree.cumulative(address)
        out.update(epoch=row.epoch, root=row.root, cumulative=str(cumulative),
                   proof=["0x" + p.hex() for p in tree.proof(address)] if cumulative else [])
    out["claimed"] = str(rt.contracts.claimed(address))
    return out
