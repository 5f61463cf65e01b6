"""Checking submitted work: verification tasks and verdicts, canaries, the referee, disputes and bonds, and the
provider's reveals during a bisection.

Like :mod:`marketplace.service`, each function takes a Runtime and does one step inside one DB transaction; token
moves (slashes, bond releases) are idempotent on chain and checked before they are sent.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from eth_utils import keccak
from sqlalchemy import ColumnElement, and_, case, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from marketplace import canary, referee, slashes
from marketplace.common import (OPEN_CHECKS, REVEALING, Conflict, NotFound, check_fee_entry, check_uploaded_state,
                                log, stake_short, take_back, unit_spec)
from marketplace.db import (Handed, Job, LedgerEntry, Provider, RefereePool, Unit, Verification, Verifier,
                            check_fee_key, now_s, pools_seen)
from marketplace.runtime import Runtime
from marketplace.settings import pool_builds
from node import checkpoint
from node.crosscheck import PROVIDER_PLAN, Plan
from node.trainer import same_bits, state_hash
from protocol import verification
from protocol.errors import ChainError, ProofError
from protocol.money import MAX_AMOUNT
from protocol.proof import TrainingProof, segment_view
from protocol.schemas import JobSpec, RevealSubmit, VerdictSubmit, VerificationBeat
from protocol.verification import UNDER_REVIEW
from protocol.signing import ACCUSE_ALL, recover_accusation, recover_typed, to_bytes32

logger = logging.getLogger(__name__)


def benched_message(s: Session, v: Verifier) -> str:
    """Why ``v`` gets no tasks; while the referee has yet to rule on the canary that benched it (a replay that
    reaches the forged claim voids the canary and un-benches the verifier), it says so (``UNDER_REVIEW``), and an
    agent waits instead of stopping for good."""
    text = f"verifier {v.address} is benched: {v.benched_for or 'it approved a planted known-bad segment'}"
    pending = s.scalars(select(Verification.id).where(Verification.verifier == v.address,
                                                      Verification.status == "canary_missed",
                                                      Verification.slash_tx.is_(None))).all()
    if any(f"(verification {vid})" in (v.benched_for or "") for vid in pending):
        text += f"; {UNDER_REVIEW}"
    return text


def _known_verifier(s: Session, verifier: str) -> Verifier:
    """``verifier``'s row; NotFound if it never registered, Conflict if it is benched."""
    v = s.get(Verifier, verifier)
    if v is None:
        raise NotFound(f"verifier {verifier} is not registered")
    if v.status == "benched":
        raise Conflict(benched_message(s, v))
    return v


def next_verification(rt: Runtime, verifier: str) -> dict[str, Any] | None:
    now = now_s()
    with rt.sessions() as s:  # an unknown or benched signer is refused from the database, before a chain read
        _known_verifier(s, verifier)
    # unknown while the chain is down: checks go on (a canary's slash waits for the chain)
    _, short = stake_short(rt, "verifier", verifier, rt.settings.min_verifier_stake, "tasks",
                            "(gridmint verifier run --stake AMOUNT --chain URL)")
    with rt.sessions.begin() as s:
        v = _known_verifier(s, verifier)
        if short:
            # an unstaked verifier would risk nothing: a lazy one caught by a canary, or one benched for a false
            # accusation, would simply come back under a new wallet
            raise Conflict(short)
        v.last_seen = v.staked_seen_at = now
        # one task at a time: a poll while one is out hands that one back (a restarted agent resumes it), so a
        # verifier never holds two tasks of a unit at once to compare (a canary's tell: marketplace.canary)
        task = s.scalars(select(Verification).where(Verification.verifier == verifier,
                                                    Verification.status == "assigned")
                         .order_by(Verification.id).limit(1)).first()
        if task is not None:
            return _task_for(rt, s, task)
        # a verifier can only replay plans whose device it has: a CPU verifier is not handed a GPU-trained segment;
        # it gets units it has not been handed a segment of first (each unit's segments spread over the pool's
        # verifiers); then units trained on its own plan first (it replays those bit for bit where the plan is
        # exact, catching what hides in the drift between plans), oldest first
        checkable = Unit.plan.like("cpu%") if Plan.parse(v.plan).device == "cpu" else Unit.plan.is_not(None)
        seen_units = select(Handed.unit_id).where(Handed.verifier == verifier)
        # a check of a unit on an exact plan (another CPU plan, a named GPU) waits a while for a verifier on that
        # plan and the same kernels, who replays it bit for bit (a float8 step hides from every other): while one is
        # around. (Kernels unsaid, "", are never the same: no bit-for-bit claim is made on them.) Around means polling
        # for tasks with its stake enough (staked_seen_at), not merely registered: a registration needs no stake, and
        # one repeated every two minutes naming a plan held back every check of that plan for same_plan_hold_s
        unit_build = func.coalesce(Unit.build, "")
        same_plan_verifier = select(Verifier.address).where(
            Verifier.plan == Unit.plan, Verifier.build == unit_build, Verifier.status == "active",
            Verifier.address != verifier, Verifier.address != Verification.provider,
            Verifier.staked_seen_at >= now - rt.settings.unit_timeout_s).exists()
        not_mine = or_(Unit.plan != v.plan, unit_build != (v.build or ""), unit_build == "")
        # (the default plan on the referee's kernels: any verifier there replays it bit for bit, none is waited for)
        reserved = and_(not_mine, or_(Unit.plan != PROVIDER_PLAN.label, unit_build != rt.referee_build()),
                        or_(Unit.plan.like("cpu%"), Unit.plan.like("cuda:%")),
                        func.coalesce(Verification.created_at, 0) > now - rt.settings.same_plan_hold_s,
                        same_plan_verifier)
        # nor a check that tells a canary out with another verifier (its decoy's ``telling``): the two could compare
        # notes before the canary is answered; it waits until then
        blocked = [and_(Verification.unit_id == u, Verification.segment == seg)
                   for u, seg in sorted(_telling_canaries_out(s, verifier))]
        task = s.scalars(select(Verification).join(Unit, Unit.id == Verification.unit_id)
                         .where(Verification.status == "pending", Verification.provider != verifier,
                                Verification.canary.is_(None), checkable, ~reserved,
                                *([~or_(*blocked)] if blocked else []))
                         .order_by(Verification.unit_id.in_(seen_units), Unit.plan != v.plan, not_mine,
                                   Verification.id)
                         .limit(1)).first()
        if task is None:
            return None
        unit = s.get(Unit, task.unit_id)
        assert unit is not None and unit.proof is not None and unit.final_blob is not None
        task.status, task.verifier, task.assigned_at, task.heartbeat_at = "assigned", verifier, now, None
        # now and then this very task becomes a planted known-bad segment: its claim replaced by the decoy forged
        # when it was queued (no checkpoint I/O here: a canary is handed out as fast as a real task). Its real check
        # is queued again once the canary is answered (or abandoned), and then handed out as itself: a segment is
        # planted at most once, so each check costs at most one extra replay, whatever the rate
        # a GPU verifier's approval of a canary is excused (or not) against its own GPU's tolerance, which only a
        # referee with a GPU can stand in for (referee.canary_excuse): with none (no GPU plan among the referee's),
        # a CPU referee held it to the CPUs' own, ~1e-9, and could slash an honest approval near the truth. Such a
        # verifier gets no canary; the referee's audits check its passes all the same
        excusable = Plan.parse(v.plan).device == "cpu" or any(p.device == "cuda" for p in rt.referee_plans())
        decoy = task.decoy if excusable else None
        if decoy is not None:  # a bf16 job's retrained variant for a bit-for-bit replay (canary.for_verifier)
            decoy = canary.for_verifier(decoy, same_bits(Plan.parse(unit.plan or PROVIDER_PLAN.label),
                                                         unit.build or "", Plan.parse(v.plan), v.build or ""))
        tells = canary.telling(task.segment, decoy)
        if (decoy is not None and decoy.get("root") == unit.proof.get("merkleRoot")
                and canary.draw(canary.plant_odds(rt.settings.canary_rate, decoy, task.segment))
                and canary.plantable(task.segment, _seen(s, verifier, unit.id), tells)
                and not (decoy.get("source_unit") and _seen(s, verifier, decoy["source_unit"]))
                and not _shown_to_others(s, verifier, unit.id, tells)
                and s.scalar(select(func.count()).select_from(Verification).where(
                    Verification.unit_id == unit.id, Verification.segment == task.segment,
                    Verification.canary.is_not(None))) == 0):
            # the real check waits, held (counted open: the unit is not paid before it passes; never handed out)
            held = Verification(unit_id=unit.id, provider=task.provider, segment=task.segment, status="held")
            s.add(held)
            s.flush()
            task.canary = {"proof": decoy["proof"], "end_blob": decoy["end_blob"], "true_end": decoy["true_end"],
                           "held": held.id, "telling": tells}
            task.decoy = None
            log(s, "canary_planted", verification=task.id, verifier=verifier, unit=task.unit_id,
                segment=task.segment)
        s.add(Handed(verifier=verifier, unit_id=unit.id, segment=task.segment))
        return _task_for(rt, s, task)


#: A unit's stocking step claims its checks for this long (its forgeries take seconds: 0.4-0.7 s a canary on the
#: default job); a claim older than this is a worker killed mid-forgery, and the sweep's next send takes it over
STOCK_LEASE_S = 120


def stock_unclaimed(now: int) -> ColumnElement[bool]:
    """A check no stocking step holds at ``now``: never claimed, or its claim lapsed (:data:`STOCK_LEASE_S`). What a
    step may claim, and what the sweep sends a step again for (``service.sweep``)."""
    return or_(Verification.heartbeat_at.is_(None), Verification.heartbeat_at < now - STOCK_LEASE_S)


def stock_canaries(rt: Runtime, unit_id: str) -> int:
    """The step after a result is accepted (Celery ``gridmint.stock_canaries``): forge the canaries of a share of unit
    ``unit_id``'s checks (:func:`marketplace.canary.stock`; the default job's retrained one costs 0.4-0.7 s, which
    the submission's request no longer pays), then let every check of the unit out (``stocking`` -> ``pending``)
    at once, each with its decoy where one was drawn: a check handed out early is no likelier to be real than one
    handed out late. Returns how many decoys were stocked.

    Idempotent: a check let out (or voided: the unit taken back, its job stopped) is never touched again, so a
    duplicate of this step (the sweep sends it again for checks still waiting after ``service.STOCK_LOST_S``) stocks
    nothing twice. The step first claims the unit's waiting checks (their ``heartbeat_at``, unused while stocking):
    a duplicate that runs meanwhile finds them claimed and forges nothing; a claim older than
    :data:`STOCK_LEASE_S` (its worker killed mid-forgery) is taken over. A forgery that fails (a checkpoint gone, a
    bug) is logged, and the checks go out without canaries: a canary checks the verifiers, the checks are what the
    customer pays for."""
    now = now_s()
    with rt.sessions.begin() as s:
        unit = s.get(Unit, unit_id)
        if unit is None or unit.proof is None or unit.final_blob is None or unit.provider is None:
            return 0
        # conditional: of two steps claiming at once, the second finds the checks claimed (or let out) and leaves
        if not s.execute(update(Verification).where(
                Verification.unit_id == unit_id, Verification.provider == unit.provider,
                Verification.status == "stocking", stock_unclaimed(now)).values(heartbeat_at=now)).rowcount:
            return 0
        waiting = sorted(s.scalars(select(Verification.segment).where(
            Verification.unit_id == unit_id, Verification.provider == unit.provider,
            Verification.status == "stocking", Verification.heartbeat_at == now)))
        job = s.get(Job, unit.job_id)
        assert job is not None
        spec, provider = unit_spec(job, unit), unit.provider
        proof, segment_blobs, final_blob = (TrainingProof.from_dict(unit.proof), list(unit.segment_blobs or []),
                                            unit.final_blob)
        # another unit of the round handed in: the source of the elementwise canary of the last segment of a unit of
        # one or two segments (marketplace.canary.needs_sibling)
        sibling = s.execute(select(Unit.id, Unit.segment_blobs, Unit.final_blob).where(
            Unit.job_id == unit.job_id, Unit.round == unit.round, Unit.id != unit.id, Unit.final_blob.is_not(None),
            Unit.status.in_(("submitted", "verified"))).order_by(func.random()).limit(1)).first()
    try:
        decoys = canary.stock(spec, proof, waiting, segment_blobs, final_blob, rt.blobs, rt.settings.canary_rate,
                              (sibling[0], list(sibling[1] or []), sibling[2]) if sibling else None)
    except Exception:  # noqa: BLE001 - the checks must go out whatever became of their canaries
        logger.exception("unit %s: its canaries could not be forged; its checks go out without", unit_id)
        decoys = {}
    stocked = 0
    with rt.sessions.begin() as s:
        for seg in waiting:
            # conditional: a check voided (or let out by a duplicate of this step) since the read above stays so
            out = s.execute(update(Verification).where(
                Verification.unit_id == unit_id, Verification.provider == provider, Verification.segment == seg,
                Verification.status == "stocking").values(status="pending", decoy=decoys.get(seg), heartbeat_at=None))
            stocked += bool(out.rowcount and seg in decoys)
    return stocked


def _shown_to_others(s: Session, verifier: str, unit_id: str, segments: list[int]) -> bool:
    """Whether a verifier other than ``verifier`` was handed any of ``segments`` of unit ``unit_id``: what tells a
    canary of the unit (its decoy's ``telling``), and so what the two could compare notes on."""
    return s.scalar(select(Handed.id).where(Handed.unit_id == unit_id, Handed.segment.in_(segments),
                                            Handed.verifier != verifier).limit(1)) is not None


def _telling_canaries_out(s: Session, verifier: str) -> set[tuple[str, int]]:
    """The checks (unit, segment) that tell a canary out with a verifier other than ``verifier`` (its ``telling``)."""
    out: set[tuple[str, int]] = set()
    for unit_id, seg, planted in s.execute(select(Verification.unit_id, Verification.segment, Verification.canary)
                                           .where(Verification.status == "assigned", Verification.canary.is_not(None),
                                                  Verification.verifier != verifier)):
        out |= {(unit_id, t) for t in canary.telling(seg, planted)}
    return out


def _seen(s: Session, verifier: str, unit_id: str) -> list[tuple[int, bool]]:
    """What ``verifier`` was handed of unit ``unit_id`` before: (segment, was it a canary) per hand-out."""
    handed = [(seg, False) for seg in s.scalars(select(Handed.segment).where(Handed.verifier == verifier,
                                                                             Handed.unit_id == unit_id))]
    return handed + [(seg, True) for seg in s.scalars(select(Verification.segment).where(
        Verification.verifier == verifier, Verification.unit_id == unit_id, Verification.canary.is_not(None)))]


def _task_for(rt: Runtime, s: Session, task: Verification) -> dict[str, Any]:
    """What the verifier holding ``task`` is handed: the segment's claim (a canary's forged one) in a view of the
    unit's proof that shows no other segment's (protocol.proof.segment_view), and the checkpoints around it."""
    unit = s.get(Unit, task.unit_id)
    job = s.get(Job, unit.job_id) if unit is not None else None
    assert unit is not None and unit.proof is not None and job is not None
    proof = TrainingProof.from_dict(task.canary["proof"] if task.canary else unit.proof)
    end_blob = task.canary["end_blob"] if task.canary else _end_blob(unit, task.segment)
    return _task_body(task.id, task.segment, unit_spec(job, unit).to_json(),
                      segment_view(proof, task.segment).to_dict(), unit.segment_blobs[task.segment], task.provider,
                      unit.plan, end_blob, unit.id, _referee_exact(rt, Plan.parse(unit.plan), unit.build or ""),
                      unit.build or "", rt.referee_for(unit.build or ""))


def _referee_exact(rt: Runtime, plan: Plan, build: str) -> bool:
    """Whether the referee replays work on ``plan`` computed with ``build`` bit for bit: a plan it is configured to
    replay so, on kernels a referee computes with: on the CPU the default referee's or a referee pool's, on a GPU
    those its GPU workers name (settings.referee_gpu_builds; any build of the GPU model was taken for them)."""
    builds = rt.referee_builds() if plan.device == "cpu" else rt.referee_gpu_builds()
    return plan in rt.referee_plans() and bool(build) and build in builds


def _auditable(rt: Runtime, plan: Plan, build: str) -> bool:
    """Whether the referee audits passes of work on ``plan`` computed with ``build``: any CPU plan on any kernels
    (replayed bit for bit where :func:`_referee_exact`, else judged within the tolerance and bisected with the
    provider's reveals, as a dispute), and a GPU plan it replays bit for bit (a referee judges a GPU plan only on
    that GPU: one the operator names in ``GRIDMINT_REFEREE_PLANS``)."""
    return plan.device == "cpu" or _referee_exact(rt, plan, build)


def run_referee(rt: Runtime, verification_id: int, build: str | None, fallen_back: bool = False) -> None:
    """Send dispute ``verification_id`` over work computed with kernel ``build`` to the referee that judges it:
    the referee pool computing with those kernels (it replays the work bit for bit), else the default referee; the
    default one too once the dispute has ``fallen_back`` (its pool was away: :func:`pools_away`)."""
    rt.enqueue("gridmint.adjudicate", [verification_id], queue=rt.referee_queue(build or "", fallen_back))


def pool_alive(rt: Runtime, build: str) -> None:
    """A referee pool's sign of life, written by its workers every few seconds (settings.pool_beat_s): while it is
    recent, the pool's disputes stay with it."""

    def touch() -> int:
        with rt.sessions.begin() as s:
            return int(s.execute(update(RefereePool).where(RefereePool.build == build)
                                 .values(seen_at=now_s())).rowcount)  # type: ignore[attr-defined]

    if touch():
        return
    try:
        with rt.sessions.begin() as s:
            s.add(RefereePool(build=build, seen_at=now_s()))
    except IntegrityError:  # another of the pool's workers wrote it first
        touch()


def pool_away(now: int, pool_seen: int | None, dispute_seen: int, wait_s: int) -> bool:
    """Whether a dispute's referee pool counts as away: neither it (its last sign of life, None: never) nor the
    dispute (when its verdict came in) were seen for more than ``wait_s`` (0: never away)."""
    return wait_s > 0 and now - max(pool_seen or 0, dispute_seen) > wait_s


def pools_away(rt: Runtime, s: Session, now: int) -> list[tuple[int, bool]]:
    """Hand each open dispute, and each audit, whose referee pool is away (:func:`pool_away`) to the default
    referee: marked ``fallback_at`` (so the pool, should it come back, leaves it alone) and logged. Returns their
    ids, each with whether it is an audit (:func:`audit_check`; else a dispute: :func:`adjudicate`)."""
    pools, wait = pool_builds(rt.settings.referee_pools), rt.settings.referee_pool_wait_s
    if not pools or not wait:
        return []
    seen = pools_seen(s, pools)
    moved = []
    for v, unit in s.execute(select(Verification, Unit).join(Unit, Unit.id == Verification.unit_id)
                             .where(Verification.status.in_(["disputed", "bisecting", "auditing"]),
                                    Verification.fallback_at.is_(None), Unit.build.in_(pools))):
        assert unit.build is not None
        if pool_away(now, seen.get(unit.build), v.audit_at or v.verdict_at or v.heartbeat_at or v.assigned_at or 0,
                     wait):
            v.fallback_at = now
            audit = v.status == "auditing"
            log(s, "referee_fallback", unit.job_id, unit=unit.id, segment=v.segment, verification=v.id,
                provider=v.provider, verifier=v.verifier, pool=unit.build, pool_seen=seen.get(unit.build),
                reason=f"the referee pool computing with {unit.build} was not seen for {wait} s: the default "
                       f"referee judges the {'audit' if audit else 'dispute'} across kernels")
            moved.append((v.id, audit))
    return moved


def _task_body(vid: int, seg: int, spec_json: str, proof: dict[str, Any], checkpoint_blob: str, provider: str,
               plan: str, end_blob: str, unit_id: str, referee_exact: bool, build: str,
               referee_build: str) -> dict[str, Any]:
    """What a verifier is handed, the same for a real task and a canary."""
    return {"verification_id": vid, "segment": seg, "spec": spec_json, "proof": proof,
            "checkpoint_blob": checkpoint_blob, "provider": provider,
            "plan": plan,  # how the provider trained: the same plan replays bit for bit, another within a tolerance
            "build": build,  # with which kernels: bit for bit needs the same plan and the same kernels
            # whether the referee replays that plan bit for bit too: then a verifier on it bonds its disputes
            "referee_exact": referee_exact,
            # the kernels of the referee that would judge a dispute of it (a referee pool's, or the default's): it
            # reproduces a verifier's replay, and releases the bond of an honest accusation, only on these
            "referee_build": referee_build,
            # the segment's end state (next segment's start, or the final checkpoint): a verifier on other
            # hardware compares its replay with it within a tolerance instead of bit for bit
            "end_blob": end_blob,
            "evidence": "0x" + verification.fraud_evidence(unit_id, seg, provider).hex()}


def _end_blob(unit: Unit, seg: int) -> str:
    """The checkpoint a segment ends in: the next segment's start, or the unit's final checkpoint."""
    blob = unit.segment_blobs[seg + 1] if seg + 1 < len(unit.segment_blobs) else unit.final_blob
    assert blob is not None
    return blob


def _own_task(s: Session, verification_id: int, verifier: str) -> Verification:
    """The verification task ``verification_id``, handed out to ``verifier`` and still open (404 / 409 otherwise)."""
    task = s.get(Verification, verification_id)
    if task is None:
        raise NotFound(f"verification {verification_id} does not exist")
    if task.verifier != verifier or task.status != "assigned":
        raise Conflict(f"verification {task.id} is not assigned to {verifier} (status {task.status})")
    return task


def _replayed_with(s: Session, task: Verification) -> tuple[str, str | None]:
    """(plan, kernels) ``task``'s verifier replayed with: as registered when it gave its verdict (a review found a
    verifier judged by a registration it changed since, a restart on an upgraded torch during a bisection: its
    honest accusation ruled "cannot reproduce" and its bond forfeit), else (a verdict before they were kept) as
    registered now."""
    if task.verifier_plan is not None:
        return task.verifier_plan, task.verifier_build
    ver = s.get(Verifier, task.verifier) if task.verifier is not None else None
    return (ver.plan, ver.build) if ver is not None else (PROVIDER_PLAN.label, None)


def record_verdict(rt: Runtime, verifier: str, body: VerdictSubmit) -> str:
    with rt.sessions.begin() as s:
        task = _own_task(s, body.verification_id, verifier)
        unit = s.get(Unit, task.unit_id)
        assert unit is not None and unit.proof is not None
        # a canary is judged exactly like the claim it imitates: the forged proof is what the verifier signed over
        proof = TrainingProof.from_dict(task.canary["proof"] if task.canary else unit.proof)
        claimed = proof.segments[task.segment].end_hash
        message = {"unitId": to_bytes32(unit.id), "segment": task.segment, "ok": body.ok,
                   "claimedHash": to_bytes32(claimed), "replayedHash": to_bytes32(body.replayed_hash)}
        signer = recover_typed("Verdict", rt.domain, message, body.signature)
        if signer != verifier:
            raise ProofError(f"verdict is signed by {signer}, not by {verifier}")
        if body.accusation is not None:
            evidence = verification.fraud_evidence(unit.id, task.segment, task.provider)
            accuser = recover_accusation(rt.chain_id, rt.contracts.staking.address, task.provider, evidence,
                                         body.accusation)
            if body.ok or accuser != verifier:
                raise ProofError(f"accusation is signed by {accuser}, not by {verifier}" if not body.ok
                                 else "an accusation comes only with a fraud verdict (ok=false)")
        task.replayed_hash, task.signature, task.accusation = body.replayed_hash, body.signature, body.accusation
        ver = s.get(Verifier, verifier)
        assert ver is not None
        ver.checked += 1
        task.verifier_plan, task.verifier_build = ver.plan, ver.build  # (how it replayed: judged by these)
        planted, job_id, build, audited = task.canary is not None, "", unit.build, False
        task.verdict_at = now_s()
        if planted:  # never adjudicated, never relayed: the provider never made this claim
            task.status = "canary_missed" if body.ok else "canary_flagged"
            retire_canary(s, task)
            if body.ok:
                _bench(s, ver, task, f"it approved a planted known-bad segment (verification {task.id})")
            else:
                log(s, "canary_flagged", verification=task.id, verifier=verifier)
        elif body.ok:
            # now and then the referee replays the pass itself before the unit is paid (audit_check): what a verifier
            # colluding with the provider cannot tell from an unaudited pass, as it could a canary
            # (likelier where this verifier checks much more of the provider's work than of others': audit_odds)
            audited = (rt.settings.audit_rate > 0
                       and _auditable(rt, Plan.parse(unit.plan or PROVIDER_PLAN.label), unit.build or "")
                       and canary.draw(audit_odds(rt, s, task, unit.plan or PROVIDER_PLAN.label)))
            task.status = "auditing" if audited else "passed"
            task.audit_at = task.verdict_at if audited else None
            log(s, "segment_passed", unit.job_id, unit=unit.id, segment=task.segment, verifier=verifier,
                audited=audited)
            maybe_verified(s, unit)
            job_id = unit.job_id
        else:
            task.status = "disputed"
            log(s, "segment_disputed", unit.job_id, unit=unit.id, segment=task.segment, verifier=verifier,
                provider=task.provider, reason=body.reason)
    if planted:
        if body.ok:
            rt.enqueue("gridmint.punish_verifier", [body.verification_id])
        return "passed" if body.ok else "disputed"  # the words a real task gets: a canary stays a canary
    if audited:
        run_audit(rt, body.verification_id, build)
    elif body.ok:
        rt.enqueue("gridmint.advance", [job_id])
    else:
        run_referee(rt, body.verification_id, build)
    return "passed" if body.ok else "disputed"


def audit_odds(rt: Runtime, s: Session, task: Verification, plan: str) -> float:
    """The probability the referee audits ``task``'s pass (its verdict in): ``settings.audit_rate``, raised by how
    much larger its verifier's share of the provider's last ``AUDIT_WINDOW`` real verdicts is than its share of the
    market's real verdicts on work of ``plan`` over the same time, that plan's counted as the work of
    ``AUDIT_PEERS`` providers at least (:func:`protocol.verification.audit_rate`)."""
    assert task.verifier is not None
    real = (Verification.verdict_at.is_not(None), Verification.canary.is_(None))
    theirs = (select(Verification.verifier, Verification.verdict_at)
              .where(Verification.provider == task.provider, *real)
              .order_by(Verification.verdict_at.desc(), Verification.id.desc())
              .limit(verification.AUDIT_WINDOW).subquery())
    window, mine, since = s.execute(select(func.count(), _count_of(theirs.c.verifier, task.verifier),
                                           func.min(theirs.c.verdict_at)).select_from(theirs)).one()
    plans = (select(Verification.verifier, Verification.provider).join(Unit, Unit.id == Verification.unit_id)
             .where(Unit.plan == plan, Verification.verdict_at >= (since or 0), *real)
             .order_by(Verification.verdict_at.desc(), Verification.id.desc())
             .limit(verification.AUDIT_MARKET_WINDOW).subquery())
    plan_window, plan_mine, verifiers, peers = s.execute(select(
        func.count(), _count_of(plans.c.verifier, task.verifier), func.count(plans.c.verifier.distinct()),
        func.count(plans.c.provider.distinct())).select_from(plans)).one()
    return verification.audit_rate(rt.settings.audit_rate, int(mine), int(window), int(plan_mine), int(plan_window),
                                   int(verifiers), int(peers))


def _count_of(column: Any, value: str) -> Any:
    """SQL: how many rows have ``column`` = ``value`` (0 where none do)."""
    return func.coalesce(func.sum(case((column == value, 1), else_=0)), 0)


def maybe_verified(s: Session, unit: Unit) -> None:
    """A unit whose every sampled segment passed (by the verifier, or by the referee overruling a false accusation)
    is verified; its provider is owed its price (exactly once). A unit with nothing sampled (level "none": the
    buyer chose no replay) is verified once its result passed the structural checks."""
    if unit.status != "submitted":
        return
    if _held(s, unit):  # a convicted provider's, kept for the audits of its passes
        _release(s, unit)
        return
    if s.scalar(select(Job.status).where(Job.id == unit.job_id)) != "running":
        return  # a job ending (failing: its settlement pays the units it had verified, a set it takes as fixed)
    prov = s.get(Provider, unit.provider) if unit.provider is not None else None
    checks = list(s.scalars(select(Verification).where(Verification.unit_id == unit.id,
                                                       Verification.provider == unit.provider,
                                                       Verification.canary.is_(None))))
    if any(c.status not in ("passed", "verifier_wrong", "dismissed") for c in checks):
        return
    # conditional: a unit its job's stop cancelled meanwhile (marketplace.cancellation) is not credited
    # (synchronize "fetch": the session's copy of the unit follows what the database did, not what it assumed)
    if s.execute(update(Unit).where(Unit.id == unit.id, Unit.status == "submitted").values(status="verified")
                 .execution_options(synchronize_session="fetch")).rowcount != 1:
        return
    assert unit.provider is not None and unit.price is not None and prov is not None
    prov.completed += 1
    if checks:  # a unit nobody replayed (level "none") builds no record
        prov.verified_streak += 1
    s.add(LedgerEntry(job_id=unit.job_id, unit_id=unit.id, provider=unit.provider, amount=unit.price))
    # each verifier whose replay passed the unit earns the provider's price for that share of the compute (the job's
    # escrow holds it: JobSpec.budget); a check it got wrong, or a canary, earns nothing
    fees = 0
    for check in checks:
        if check.status == "passed" and check.verifier is not None:
            entry = check_fee_entry(unit, check)
            s.add(entry)
            fees += entry.amount
    log(s, "unit_verified", unit.job_id, unit=unit.id, provider=unit.provider, price=str(unit.price),
        check_fees=str(fees))


def retire_canary(s: Session, planted: Verification) -> None:
    """A canary took the place of a real check of its segment, held meanwhile: hand that check out again (unless it
    was voided meanwhile: the unit left its provider, e.g. slashed for another segment)."""
    held = s.get(Verification, (planted.canary or {}).get("held"))
    if held is not None and held.status == "held":
        held.status = "pending"


def _bench(s: Session, ver: Verifier, cause: Verification, why: str) -> None:
    """``ver`` approved a planted known-bad segment, or made an accusation the referee proved false (``cause``): it
    gets no more tasks, what it holds goes back to the pool, and every check it passed on a unit not yet credited is
    done again by another verifier; so is one on a unit credited in a running job's round not averaged yet, the
    unit's credit withdrawn till then (:func:`_reopen`). A unit of a round averaged already stays credited on its
    word (it is in the model; the canary rate bounds how many). A canary's approver also has its stake slashed
    (``punish_verifier``); a false accuser loses its bond. A pass of a convicted provider's unit held for the
    referee's audits (:func:`_release`) is not done again (nothing more is handed out on a cheat's claim): its fee,
    kept at the conviction (:func:`_forfeit_unsettled`), is withdrawn while the job runs."""
    if ver.status == "benched":
        return
    _lock_jobs(s, _verifier_jobs(ver.address))
    ver.status, ver.benched_for = "benched", why[:300]
    redo, withdrawn = 0, 0
    for v in list(s.scalars(select(Verification).where(Verification.verifier == ver.address,
                                                       Verification.id != cause.id,
                                                       Verification.status.in_(["assigned", "passed"])))):
        if v.canary is not None:
            if v.status == "assigned":
                v.status = "void"
                retire_canary(s, v)
            continue
        unit = s.get(Unit, v.unit_id)
        if v.status == "passed" and unit is not None and unit.provider == v.provider and _held(s, unit):
            withdrawn += _withdraw_fee(s, unit, v)
            continue
        if v.status == "passed" and (unit is None or unit.provider != v.provider
                                     or not (unit.status == "submitted" or _reopen(s, unit, ver.address))):
            continue  # credited in an averaged round, or a claim the unit no longer holds (its provider slashed...)
        v.status, v.verifier, v.assigned_at, v.replayed_hash, v.signature = "pending", None, None, None, None
        redo += 1
    log(s, "verifier_benched", verifier=ver.address, verification=cause.id, rechecks=redo, reason=why,
        **({"held_fees_withdrawn": str(withdrawn)} if withdrawn else {}))


def _held(s: Session, unit: Unit) -> bool:
    """Whether ``unit`` is a convicted provider's, held ``submitted`` for the referee's audits of its passes."""
    prov = s.get(Provider, unit.provider) if unit.provider is not None else None
    return unit.status == "submitted" and prov is not None and prov.status == "slashed"


def _withdraw_fee(s: Session, unit: Unit, check: Verification) -> int:
    """The fee credited for ``check`` of ``unit``, removed from the ledger while the job runs (a stopped or done
    job's settlement may be under way: it stands). Returns the amount withdrawn."""
    fee = s.scalars(select(LedgerEntry).where(LedgerEntry.unit_id == check_fee_key(check.id),
                                              LedgerEntry.released.is_(False))).one_or_none()
    if fee is None or _running_job(s, unit) is None:
        return 0
    s.delete(fee)
    return fee.amount


def _verifier_jobs(verifier: str) -> Any:
    """A select of the ids of the jobs whose checks ``verifier`` holds or passed (what :func:`_bench` changes)."""
    return select(Unit.job_id).join(Verification, Verification.unit_id == Unit.id).where(
        Verification.verifier == verifier, Verification.status.in_(["assigned", "passed"]))


def _provider_jobs(provider: str) -> Any:
    """A select of the ids of the jobs ``provider`` holds units of (what :func:`_convicted` changes)."""
    return select(Unit.job_id).where(Unit.provider == provider, Unit.status.in_(["assigned", "submitted", "verified"]))


def _lock_jobs(s: Session, *job_ids: Any) -> None:
    """Take the rows of the running jobs among ``job_ids`` (selects of ids) till the transaction ends (PostgreSQL;
    SQLite has one writer at a time), in id order, in one statement, writing nothing first (the session's pending
    changes wait): a customer's stop (``cancellation.stop_in``) and ``service.advance`` take a job's row before its
    units and checks, so a step that then changes a job's units and checks (a conviction, a bench) and takes its
    rows first never waits in a cycle with them, nor with another such step (each takes all its rows at once: a
    failed audit convicts a provider and benches a verifier, and takes the jobs of both first)."""
    with s.no_autoflush:
        s.execute(select(Job.id).where(or_(*(Job.id.in_(ids) for ids in job_ids)), Job.status == "running")
                  .order_by(Job.id).with_for_update()).all()


def _running_job(s: Session, unit: Unit) -> Job | None:
    """``unit``'s job if it is running, as the database has it now, else None. The caller took the job's row first
    (:func:`_lock_jobs`), as ``service.advance`` takes it before it commits a round: a round averaged meanwhile has
    moved the job on, and one averaging now finds the unit changed."""
    job = s.scalars(select(Job).where(Job.id == unit.job_id).execution_options(populate_existing=True)).one()
    return job if job.status == "running" else None


def _open_round(s: Session, unit: Unit) -> Job | None:
    """``unit``'s job if it is running and ``unit`` belongs to its round not averaged yet, else None
    (:func:`_running_job`)."""
    job = _running_job(s, unit)
    return job if job is not None and job.round == unit.round else None


def _fee_keys(s: Session, unit_id: str, provider: str) -> set[str]:
    """The ledger keys of the fees owed for the checks of ``provider``'s claim of unit ``unit_id`` that passed (an
    audit of the pass under way too: a verified unit's was credited with it)."""
    return {check_fee_key(c) for c in s.scalars(select(Verification.id).where(
        Verification.unit_id == unit_id, Verification.provider == provider,
        Verification.status.in_(["passed", "auditing"])))}


def _reopen(s: Session, unit: Unit, verifier: str) -> bool:
    """Inside :func:`_bench`'s transaction: verified ``unit``, passed by benched ``verifier``, back to ``submitted``
    if its round is open (:func:`_open_round`): what it was credited (its price, its checks' fees) withdrawn, to be
    credited again once the checks the verifier passed are redone (the others stand). True if reopened."""
    if _open_round(s, unit) is None:
        return False
    credited = list(s.scalars(select(LedgerEntry).where(
        LedgerEntry.job_id == unit.job_id, LedgerEntry.released.is_(False),
        or_(and_(LedgerEntry.unit_id == unit.id, LedgerEntry.provider == unit.provider),
            LedgerEntry.unit_id.in_(_fee_keys(s, unit.id, unit.provider or ""))))))
    if s.execute(update(Unit).where(Unit.id == unit.id, Unit.status == "verified").values(status="submitted")
                 .execution_options(synchronize_session="fetch")).rowcount != 1:
        return False
    for e in credited:
        s.delete(e)
    prov = s.get(Provider, unit.provider)
    if prov is not None:  # maybe_verified counts the unit again
        prov.completed = max(0, prov.completed - 1)
        prov.verified_streak = max(0, prov.verified_streak - 1)
    log(s, "unit_reopened", unit.job_id, unit=unit.id, provider=unit.provider, verifier=verifier,
        withdrawn=str(sum(e.amount for e in credited)))
    return True


def punish_verifier(rt: Runtime, verification_id: int) -> str:
    """Slash the whole stake (bonded and unbonding) of the verifier that approved canary ``verification_id``, to the
    treasury (governance path; the evidence id is the canary's, usable once, so a re-run sends nothing twice) —
    once the referee's own replay of the segment confirms the forged claim is wrong, and the provider's own claim of
    the segment holds (a second replay, only on a missed canary). A provider shapes the states a canary is forged
    from (its own claims): should a replay reach the forgery, the verifier approved the truth; should the provider's
    claim not hold, the forgery's distance from the truth is unknown (it may lie inside the verifier's tolerance).
    Either way the canary is void: nothing is slashed and the verifier is back at work. It gets back its place, not
    the checks its bench handed to other verifiers nor their fees (:func:`_bench`, at the approval): the price of
    benching at once, before a round averages on a lazy verifier's passes; a void canary is rare (a forgery is kept
    far past a verifier's tolerance), and one on a claim that does not hold also convicts its provider."""
    with rt.sessions.begin() as s:
        task = s.get(Verification, verification_id)
        if task is None or task.status != "canary_missed" or task.canary is None:
            return task.status if task else "missing"
        if task.slash_tx is not None:
            return "slashed"
        verifier = task.verifier
        confirmed = bool(task.canary.get("confirmed"))
        if not confirmed:
            unit = s.get(Unit, task.unit_id)
            assert unit is not None
            job = s.get(Job, unit.job_id)
            assert job is not None
            spec, seg, plan, build = unit_spec(job, unit), task.segment, Plan.parse(unit.plan), unit.build or ""
            forged, start, end = TrainingProof.from_dict(task.canary["proof"]), unit.segment_blobs[seg], \
                task.canary["end_blob"]
            real = TrainingProof.from_dict(unit.proof)
            real_end = unit.final_blob if seg == len(real.segments) - 1 else unit.segment_blobs[seg + 1]
            ver_plan, ver_build = _replayed_with(s, task)
    assert verifier is not None
    if not confirmed:
        exact = rt.referee_plans(here=True, build=build)
        ruling = referee.rule(spec, forged, seg, plan, rt.blobs.checked_path(start), rt.blobs.checked_path(end), {},
                              lambda _: "", None, exact, build)
        if ruling.fraud is not False:
            # A canary is forged a safe distance from the provider's claim of the segment's end (canary.forge), which
            # is the truth only if that claim holds. A provider that fakes a segment and shapes the claims the canary
            # borrows from can put the forgery a hair from the true end: inside an honest verifier's tolerance on
            # another plan, yet not the bits a replay ends in. So the claim itself is refereed too: where it does not
            # hold, the canary proves nothing (the segment's real check, handed out again, catches the provider)
            truth = referee.rule(spec, real, seg, plan, rt.blobs.checked_path(start),
                                 rt.blobs.checked_path(real_end), {}, lambda _: "", None, exact, build)
            if truth.fraud is not False:
                ruling = replace(ruling, fraud=False, reason=f"the provider's own claim of the segment does not hold "
                                 f"({truth.reason}): a canary forged from it proves nothing")
            else:
                # an honest verifier on another plan or kernels approves what lands within its tolerance of its
                # replay: a forgery that close to the truth proves nothing against it (canary.forge keeps them far)
                excuse = referee.canary_excuse(spec, plan, build, ver_plan, ver_build,
                                               rt.blobs.checked_path(real_end), rt.blobs.checked_path(end))
                if excuse is not None:
                    ruling = replace(ruling, fraud=False, reason=excuse)
        with rt.sessions.begin() as s:
            task = s.get(Verification, verification_id)
            assert task is not None and task.canary is not None
            if task.status != "canary_missed":  # a concurrent run of this task got here first
                return task.status
            if ruling.fraud is False:  # the replay reaches the forged claim (the verifier was right), the claim
                # the canary was forged from does not hold, or the forgery lies within the verifier's tolerance
                task.status = "canary_void"
                ver = s.get(Verifier, verifier)
                if ver is not None and ver.status == "benched" and f"(verification {task.id})" in (ver.benched_for or ""):
                    ver.status, ver.benched_for = "active", None
                log(s, "canary_void", verification=task.id, verifier=verifier, unit=task.unit_id, segment=task.segment,
                    reason=ruling.reason)
                return "void"
            # wrong beyond doubt (a bisection it would ask for means the replay is past the tolerance already)
            task.canary = {**task.canary, "confirmed": True}
    evidence = canary.evidence(verification_id, verifier)
    amount = _slash_whole_stake(rt, verifier, rt.contracts.deployment.treasury, evidence)
    after = rt.contracts.stake_state(verifier)
    with rt.sessions.begin() as s:
        task = s.get(Verification, verification_id)
        assert task is not None
        if task.slash_tx is None:
            task.slash_tx = "0x" + evidence.hex()
            log(s, "verifier_slashed", verifier=verifier, verification=verification_id,
                amount=str(amount - after.staked - after.unbonding))
    return "slashed"


def adjudicate(rt: Runtime, verification_id: int) -> str:
    """Referee a disputed segment: relay the verifier's signed accusation on chain (it freezes both stakes), replay
    the segment here, and resolve. Fraud -> the provider is slashed (bounty to the verifier) and its units go back to
    the pool; no fraud -> the verifier's bond is forfeit (unless in good faith; a dispute handed over from an away
    referee pool is dismissed, its bond released). A dispute without a (usable) accusation is settled by the
    operator's governance slash instead. A segment trained on another execution plan is bisected with the provider
    revealing states (``bisecting`` until it answers or its deadline passes; marketplace.referee). Every chain step
    checks first, so a re-run task sends nothing twice."""
    with rt.sessions.begin() as s:
        task = s.get(Verification, verification_id)
        if task is None or task.status not in ("disputed", "bisecting"):
            return task.status if task else "missing"
        fallen_back = task.fallback_at is not None
        if fallen_back and rt.referee_pool_here():
            return task.status  # the pool was away and the default referee has it now: not this worker's any more
        unit = s.get(Unit, task.unit_id)
        assert unit is not None
        moved = unit.provider != task.provider
        if not moved and task.status == "bisecting" and referee.unanswered(task.bisect) \
                and not referee.overdue(task.bisect, now_s()):
            return task.status  # still waiting for the state asked: nothing to replay yet
    if moved:
        return _dismiss_moved(rt, verification_id)
    with rt.sessions.begin() as s:
        task = s.get(Verification, verification_id)
        assert task is not None
        unit = s.get(Unit, task.unit_id)
        assert unit is not None and unit.proof is not None
        job = s.get(Job, unit.job_id)
        assert job is not None
        spec, proof, seg = unit_spec(job, unit), TrainingProof.from_dict(unit.proof), task.segment
        start, end, plan = unit.segment_blobs[seg], _end_blob(unit, seg), Plan.parse(unit.plan)
        losses = list(unit.losses) if unit.losses else None  # per step, as submitted and signed with the proof
        provider, verifier, accusation = task.provider, task.verifier, task.accusation
        replayed_hash = task.replayed_hash or ""
        bisect = referee.bisect_view(task.bisect)
        ver_plan, ver_build = _replayed_with(s, task)
        verifier_plan = Plan.parse(ver_plan)
        # which kernels each computed with ("" unsaid: never taken for the referee's own)
        build, verifier_build = unit.build or "", ver_build or ""
    assert verifier is not None
    evidence = verification.fraud_evidence(unit.id, seg, provider)
    disputed = accusation is not None and _open_dispute(rt, provider, verifier, evidence, accusation)
    verdict = _rule(rt, spec, proof, seg, plan, start, end, bisect, losses, build, fallen_back)
    if verdict.fraud is None:  # the bisection waits for the provider's next reveal
        with rt.sessions.begin() as s:
            task = s.get(Verification, verification_id)
            assert task is not None
            if task.status in ("disputed", "bisecting"):
                _ask(rt, s, task, verdict, job.id)
                task.status = "bisecting"
            return task.status
    if not verdict.fraud:
        # the provider is cleared; the verifier's bond is forfeit unless the referee's own replay shows the
        # accusation was made in good faith (it reached the verifier's signed state, past the tolerance): then it
        # is released. An accusation that replay proves false benches the verifier, bonded or not. A dispute that
        # fell back from its away pool blames no one: the verifier bonded on the pool's promise of an exact replay
        # (which might have convicted a cheat inside the drift between kernels), so the bond is released and the
        # overruled verdict not counted against it: "dismissed"
        lost, faith = 0, (referee.Faith(True, False, f"its referee pool ({build}) was away")
                          if fallen_back else referee.judge_accusation(
                              verdict, plan, verifier_plan, replayed_hash, rt.referee_plans(here=True, build=build),
                              build, verifier_build))
        if disputed and not faith.good:  # (noted before the verdict is sent: see slashes.before_slash)
            slashes.before_slash(rt, verifier, rt.contracts.deployment.treasury, evidence, bond=True)
        if disputed and not rt.contracts.evidence_used(evidence):
            if faith.good:
                rt.contracts.dismiss_dispute(evidence)
            else:
                lost = rt.contracts.resolve_dispute(evidence, False)
        if disputed:  # (a bond lost waits out the slash delay, as any slash: noted, also on a re-run)
            slashes.note(rt, evidence)
        if disputed and not faith.good:  # a bond its own pending slashes held: taken again if a void gives it back
            slashes.hold_over_bond(rt, verifier, evidence)
        with rt.sessions.begin() as s:
            task = s.get(Verification, verification_id)
            assert task is not None
            if task.status not in ("disputed", "bisecting"):  # a concurrent run of this task got here first
                return task.status
            task.status = "dismissed" if fallen_back else "verifier_wrong"
            task.slash_tx = "0x" + evidence.hex() if disputed else None
            ver = s.get(Verifier, verifier)
            unit = s.get(Unit, task.unit_id)
            assert unit is not None
            log(s, "dispute_dismissed" if fallen_back else "false_accusation", unit.job_id, unit=unit.id,
                segment=seg, verifier=verifier, provider=provider, bond_lost=str(lost), bonded=disputed,
                good_faith=faith.good, proven_false=faith.proven_false, faith_reason=faith.reason,
                reason=verdict.reason)
            if ver is not None and not fallen_back:
                ver.wrong += 1
                floor, share = rt.settings.verifier_overruled_floor, rt.settings.verifier_overruled_share
                if faith.proven_false:
                    _bench(s, ver, task, f"an accusation the referee proved false (verification {task.id}): "
                                         f"{faith.reason}")
                elif ver.wrong >= floor and ver.wrong > share * ver.checked:
                    # not provable one by one (its plan is not the referee's), but honest drift does not look like
                    # this: disputing freely would cost it nothing and the marketplace a referee replay each time
                    _bench(s, ver, task, f"the referee overruled {ver.wrong} of its {ver.checked} verdicts "
                                         f"(more than {share:.0%}, from {floor} on)")
            maybe_verified(s, unit)
        rt.enqueue("gridmint.advance", [job.id])
        return task.status
    # all of it: staked and unbonding (a cheat that starts unbonding once it has submitted keeps nothing)
    if disputed:  # path (a): the verifier's fraud proof, resolved by this referee
        path, st = "fraud-proof", rt.contracts.stake_state(provider)
        before = st.staked + st.unbonding
        slashes.before_slash(rt, provider, verifier, evidence)
        if not rt.contracts.evidence_used(evidence):
            rt.contracts.resolve_dispute(evidence, True)
        slashes.after_slash(rt, provider, verifier, evidence)
    else:  # path (b): governance slash, its bounty to the verifier; sent once per evidence
        before = _slash_whole_stake(rt, provider, verifier, evidence)
        path = "governance" if before > 0 else "nothing left to slash"
    with rt.sessions.begin() as s:
        task = s.get(Verification, verification_id)
        assert task is not None
        if task.status not in ("disputed", "bisecting"):  # a concurrent run of this task got here first
            return task.status
        task.status = "fraud"
        task.slash_tx = "0x" + evidence.hex()
        # slashed to nothing over another segment already: the fraud is on record, nothing moved this time
        audits = _convicted(rt, s, provider, lambda after: log(
            s, "provider_slashed" if before or disputed else "fraud_confirmed", job.id, unit=unit.id, segment=seg,
            provider=provider, verifier=verifier, amount=str(before - after.staked - after.unbonding),
            claimed=verdict.claimed, replayed=verdict.replayed, reason=verdict.reason, path=path))
        ver = s.get(Verifier, verifier)
        if ver is not None:
            ver.fraud_found += 1
    for vid, build in audits:
        run_audit(rt, vid, build)
    rt.enqueue("gridmint.match", [])
    return "fraud"


def _rule(rt: Runtime, spec: Any, proof: TrainingProof, seg: int, plan: Plan, start: str, end: str,
          bisect: dict[str, Any], losses: list[float] | None, build: str, fallen_back: bool) -> referee.Ruling:
    """The referee's ruling on segment ``seg`` (checkpoint blobs ``start``, ``end``) with the states its provider
    revealed so far (``bisect``): :func:`marketplace.referee.rule` on the plans this worker replays bit for bit."""
    # every state ruled on is checked against its name first: a copy corrupted on this disk replays to another
    # state, and would convict an honest provider (or clear a cheat); BlobCorruptError fails the task instead, and
    # the sweep queues it again until the operator restores the blob
    reveals = {int(k): rt.blobs.checked_path(r["blob"]) for k, r in bisect["reveals"].items()}

    def overdue(step: int) -> str:
        if bisect.get("asked") == step and referee.overdue(bisect, now_s()):
            return f"the provider did not reveal its state before step {step} by its deadline"
        return ""

    # a worker without a GPU it is configured to replay on says so here, and so does one handed a dispute that is
    # another referee's (its pool's queue, or the default one, holds it by mistake; one that fell back from its pool
    # is the default referee's, which judges the pool's kernels as other kernels: within the tolerance)
    exact = rt.referee_plans(here=True, build="" if fallen_back else build)
    return referee.rule(spec, proof, seg, plan, rt.blobs.checked_path(start), rt.blobs.checked_path(end), reveals,
                        overdue, losses, exact, build)


def _ask(rt: Runtime, s: Session, task: Verification, ruling: referee.Ruling, job_id: str, **extra: Any) -> None:
    """Record the state ``ruling`` waits for from ``task``'s provider (its ``bisect``: asked, deadline, and the
    states to ask in turn after it), unless that one is asked already."""
    assert ruling.pending is not None
    b = referee.bisect_view(task.bisect)
    if b.get("asked") == ruling.pending:
        return
    b["asked"], b["deadline"] = ruling.pending, now_s() + rt.settings.reveal_timeout_s
    b["more"] = list(ruling.pending_more)  # asked in turn as each comes in (record_reveal)
    task.bisect = b
    log(s, "reveal_requested", job_id, unit=task.unit_id, segment=task.segment, provider=task.provider,
        step=ruling.pending, deadline=b["deadline"], then=len(b["more"]), **extra)


def _convicted(rt: Runtime, s: Session, provider: str,
               record: Callable[[Any], None] | None = None) -> list[tuple[int, str]]:
    """Inside the caller's transaction, once ``provider``'s stake was slashed for a claim proven false: it is marked
    slashed (``record``, given its stake state on chain after the slash, logs the conviction: before the events that
    follow from it), and the passes of its work that still stand are drawn for the referee's audit
    (:func:`_audit_passes`).
    Every unit of it not yet verified goes back to the pool with it excluded (each conditionally, ``take_back``: a
    unit a reap handed to a standby meanwhile stays with the standby), their open checks void; so do its units
    verified in a round not averaged yet, and it is paid for none of a running job's units
    (:func:`_forfeit_unsettled`). A unit a pass of which the referee audits waits for its audits as ``submitted``
    (its claim kept for them; never credited: :func:`maybe_verified`), then goes back (:func:`_release`). Returns
    the audits to send once the transaction is committed. The rows of the jobs it holds units of are taken first
    (:func:`_lock_jobs`)."""
    _lock_jobs(s, _provider_jobs(provider))
    prov = s.get(Provider, provider)
    assert prov is not None
    after = rt.contracts.stake_state(provider)
    prov.status, prov.stake = "slashed", after.staked
    if record is not None:
        record(after)
    audits = _audit_passes(rt, s, provider)
    for u in list(s.scalars(select(Unit).where(Unit.provider == provider,
                                               Unit.status.in_(["assigned", "submitted"])))):
        _release(s, u, ("assigned", "submitted"))
    _forfeit_unsettled(s, provider)
    return audits


def _audited(s: Session, unit_id: str, provider: str) -> bool:
    """Whether the referee is auditing a pass of ``provider``'s claim of unit ``unit_id``."""
    return bool(s.scalar(select(exists().where(Verification.unit_id == unit_id, Verification.provider == provider,
                                               Verification.status == "auditing"))))


def _release(s: Session, unit: Unit, statuses: tuple[str, ...] = ("submitted",)) -> bool:
    """Inside a conviction's transaction (or once the last audit of a pass of a convicted provider's unit is done):
    ``unit``, held by its convicted provider in one of ``statuses``, goes back to the pool with it excluded (each
    conditionally, ``take_back``), its open checks void (canaries too) — unless the referee is auditing a pass of
    it: then it waits as ``submitted`` for those audits, its other open checks void (nothing more is handed out on a
    cheat's claim). True if it went back."""
    provider = unit.provider
    assert provider is not None
    fetch = {"synchronize_session": "fetch"}
    held = _audited(s, unit.id, provider)
    if held:
        moved = s.execute(update(Unit).where(Unit.id == unit.id, Unit.provider == provider, Unit.status.in_(statuses))
                          .values(status="submitted"), execution_options=fetch).rowcount == 1
    else:
        moved = take_back(s, unit.id, provider, statuses, excluded=sorted(set(unit.excluded or []) | {provider}))
    if moved:  # canaries too (take_back voided the provider's own real checks); never an audit under way
        s.execute(update(Verification).where(Verification.unit_id == unit.id,
                                             Verification.status.in_([c for c in OPEN_CHECKS if c != "auditing"]))
                  .values(status="void"), execution_options=fetch)
    return moved and not held


def _audit_passes(rt: Runtime, s: Session, provider: str) -> list[tuple[int, str]]:
    """Inside :func:`_convicted`'s transaction: the passes of ``provider``'s work that still stand in its units
    (verified, or submitted: the one it was caught on among them; or cancelled by a stop, their passes paid all the
    same: ``cancellation._credit_done_checks``), its latest ``CONVICTION_AUDITS`` not audited yet,
    each drawn for the referee's audit (``auditing``), where the referee replays the work bit for bit
    (:func:`_referee_exact`: a ruling that needs no state from the provider, which a convicted one may never
    reveal). Not other work, though audits of it run: off its own bits the referee's replay of an honest segment can
    be past the tolerance (``bench proof``'s cross_build: 1 of 40 honest segments on other CPU kernels, at 1.04x),
    and only the provider's reveals clear it; a convicted one, silent, would lose that ruling and the honest
    verifier's pass with it. A verifier colluding with a proven cheat passed its faked segments;
    each such pass fails its audit, which costs that verifier its fee, a mark, and, where it replayed on the unit's
    own plan and kernels, its whole stake (:func:`audit_check`). Units of a job settled over half the blob
    retention ago are left (their checkpoints go after it). Only where the operator runs audits
    (``settings.audit_rate``). Returns the audits to send, once the transaction is committed: (check, kernels)."""
    if rt.settings.audit_rate <= 0:
        return []
    now = now_s()
    rows = s.execute(select(Verification, Unit.plan, Unit.build).join(Unit, Unit.id == Verification.unit_id)
                     .join(Job, Job.id == Unit.job_id)
                     .where(Verification.provider == provider, Verification.status == "passed",
                            Verification.canary.is_(None), Verification.verifier.is_not(None),
                            Verification.verdict_at.is_not(None), Verification.audit_at.is_(None),
                            Unit.provider == provider, Unit.status.in_(["verified", "submitted", "cancelled"]),
                            or_(Job.settled_at.is_(None), Job.settled_at > now - rt.settings.blob_retention_s // 2))
                     .order_by(Verification.verdict_at.desc(), Verification.id.desc())
                     .limit(verification.CONVICTION_AUDITS)).all()
    out = []
    for check, plan, build in rows:
        if _referee_exact(rt, Plan.parse(plan or PROVIDER_PLAN.label), build or ""):
            check.status, check.audit_at = "auditing", now
            out.append((check.id, build or ""))
    if out:
        log(s, "passes_audited", provider=provider, checks=len(out),
            reason="its work passed these checks before its conviction: the referee replays each")
    return out


def _forfeit_unsettled(s: Session, provider: str) -> None:
    """Inside :func:`_convicted`'s transaction: a proven cheat is paid for nothing of a running job. Its other units
    passed sampled replays, not a proof of honesty. Each unit it has verified in a running job's round that is not
    averaged yet goes back to the pool, its price forfeit (its ledger entry removed), to be trained again by another
    provider: it stays out of the customer's model. One of a round averaged already is in the model and stays; its
    price is forfeit all the same (``pay_withheld``): the escrow keeps it, the customer's at settlement. A job done
    or stopped settles on what it was (its settlement may be under way).

    The escrow pays the redo: the job's budget holds ``JobSpec.unit_budget`` for each unit, so what the job owes
    (its ledger, less the forfeit price) and every unit not verified, this one and those of the rounds to come, at
    that price, must fit in it. The verifiers whose checks the unit passed keep their fees where the job's other
    units left room for them (they replayed honestly what they were handed); where they did not, those fees are
    forfeit too. The round is read with the job's row taken (:func:`_lock_jobs`, by :func:`_convicted`)."""
    for u in list(s.scalars(select(Unit).where(Unit.provider == provider, Unit.status == "verified"))):
        job = _running_job(s, u)
        if job is None:
            continue
        entries = list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job.id)))
        price = next((e for e in entries if e.unit_id == u.id and e.provider == provider), None)
        if price is None or price.released:
            continue  # (withheld already: a re-run; released: never, a running job's entries wait for its settlement)
        if u.round < job.round:  # averaged: in the model, unpaid
            s.delete(price)
            log(s, "pay_withheld", job.id, unit=u.id, provider=provider, round=u.round, forfeit=str(price.amount))
            continue
        fee_keys = _fee_keys(s, u.id, provider)
        fees = [e for e in entries if e.unit_id in fee_keys]
        if any(e.released for e in fees):
            continue  # (never, as above)
        spec = JobSpec.model_validate(job.spec)
        open_units = s.scalar(select(func.count()).select_from(Unit).where(Unit.job_id == job.id,
                                                                          Unit.status != "verified")) or 0
        later = (spec.rounds - job.round - 1) * spec.unit_budget() * spec.units_per_round
        worst = sum(e.amount for e in entries) - price.amount + (open_units + 1) * spec.unit_budget() + later
        paid = worst <= job.budget
        if not paid and worst - sum(e.amount for e in fees) > job.budget:
            continue  # (never: the budget held every unit at unit_budget before this one's redo)
        if not _release(s, u, ("verified",)) and u.status != "submitted":
            continue  # (gone meanwhile; "submitted": it waits for the audits of its passes, then goes back)
        for e in [price] if paid else [price, *fees]:
            s.delete(e)
        log(s, "unit_redone", job.id, unit=u.id, provider=provider, round=u.round, forfeit=str(price.amount),
            check_fees_forfeit=str(0 if paid else sum(e.amount for e in fees)))


def _slash_whole_stake(rt: Runtime, who: str, to: str, evidence: bytes) -> int:
    """Slash ``who``'s whole stake (staked and unbonding: one that started unbonding keeps nothing) under
    ``evidence``, its share to ``to``, unless that evidence was used already (a re-run of the step sends nothing
    twice). Returns what ``who`` held before. The slash is noted for the sweep to pay out after the slash delay
    (:mod:`marketplace.slashes`; also on a re-run that sends nothing: the run that sent it may have stopped short),
    and what ``who``'s own pending slashes held of its stake is slashed again if a void gives it back."""
    slashes.before_slash(rt, who, to, evidence)
    st = rt.contracts.stake_state(who)
    held = st.staked + st.unbonding
    if held > 0:
        # all there is when it lands (a void between this read and the send gave stake back: taken with the rest);
        # sends nothing where the evidence was used: exactly once
        rt.contracts.slash(who, MAX_AMOUNT, to, evidence)
    slashes.after_slash(rt, who, to, evidence)
    return held


def run_audit(rt: Runtime, verification_id: int, build: str | None, fallen_back: bool = False) -> None:
    """Send the audit of pass ``verification_id`` of work computed with kernel ``build`` to the referee that replays
    it bit for bit (as :func:`run_referee` sends a dispute); the default referee's once it has ``fallen_back``."""
    rt.enqueue("gridmint.audit_check", [verification_id], queue=rt.referee_queue(build or "", fallen_back))


#: An audit not done this long after the verdict it audits was lost (a broker away when it was sent, a worker killed
#: mid-replay): the sweep sends it again (a duplicate of one still queued finds the check audited: audit_check)
AUDIT_LOST_S = 300


def audit_evidence(verification_id: int, verifier: str) -> bytes:
    """The on-chain evidence id of "``verifier`` passed check ``verification_id``, whose claim the referee's audit
    proved false" (its stake's slash, once)."""
    return keccak(b"GridMint/audit/v1" + verification_id.to_bytes(32, "big") + bytes.fromhex(verifier[2:]))


def audit_check(rt: Runtime, verification_id: int) -> str:
    """The referee's own replay of a check a verifier passed (``auditing``: drawn at the odds :func:`audit_odds` gives,
    on work :func:`_auditable`), before the unit is paid: bit for bit where it replays the work so, else within the
    tolerance, bisected with the provider's revealed states where its replay is past it (the check stays
    ``auditing`` meanwhile, its ``bisect`` the ask, as a dispute's). The claim holds: the check is passed
    (the unit is credited once its every check is). It does not: the provider loses its whole stake to the treasury
    (a governance slash under the segment's fraud evidence, so a verifier's dispute of it could not slash twice), its
    units not yet verified go back to the pool; the verifier earns nothing for the check, and one that replayed on
    the unit's own plan and kernels (its pass asserted the very bits the referee did not get) is benched and loses
    its whole stake too (its other passes on units not yet paid are redone). A verifier on another plan passed
    within its tolerance: the overruled pass is counted against it (``wrong``), nothing more. A claim that fails only
    because its provider let a reveal deadline pass is not the verifier's fault: the provider is convicted, the pass
    stands (``unanswered``: :func:`_audit_failed`).

    The pass of a lazy verifier is caught by canaries, which a verifier colluding with the unit's provider tells
    apart (the provider knows every true state); an audit it cannot: the audited task was the real one. Idempotent:
    each chain step is checked first, and the check leaves ``auditing`` once."""
    with rt.sessions() as s:
        task = s.get(Verification, verification_id)
        if task is None or task.status != "auditing":
            return task.status if task else "missing"
        fallen_back = task.fallback_at is not None
        if fallen_back and rt.referee_pool_here():
            return task.status  # its pool was away and the default referee has it now: not this worker's any more
        bisect = referee.bisect_view(task.bisect)
        if referee.unanswered(bisect) and not referee.overdue(bisect, now_s()):
            return task.status  # still waiting for the state asked of the provider: nothing to replay yet
        unit = s.get(Unit, task.unit_id)
        assert unit is not None and unit.proof is not None
        job = s.get(Job, unit.job_id)
        assert job is not None and task.verifier is not None
        spec, proof, seg, plan = unit_spec(job, unit), TrainingProof.from_dict(unit.proof), task.segment, \
            Plan.parse(unit.plan or PROVIDER_PLAN.label)
        start, end, build = unit.segment_blobs[seg], _end_blob(unit, seg), unit.build or ""
        losses = list(unit.losses) if unit.losses else None  # per step, as submitted and signed with the proof
        provider, verifier, job_id, unit_id = task.provider, task.verifier, job.id, unit.id
        ver_plan, ver_build = _replayed_with(s, task)
        own_bits = same_bits(plan, build, Plan.parse(ver_plan), ver_build or "")
    # work the referee does not replay bit for bit (another CPU plan, other kernels; or its referee pool away) is
    # judged within the tolerance, and where its replay is past it, bisected with the provider's revealed states
    # (asked as a dispute's are; a provider that lets the deadline pass is convicted)
    ruling = _rule(rt, spec, proof, seg, plan, start, end, bisect, losses, build, fallen_back)
    if ruling.fraud is None:
        with rt.sessions.begin() as s:
            task = s.get(Verification, verification_id)
            assert task is not None
            if task.status == "auditing":
                _ask(rt, s, task, ruling, job_id, path="audit")
            return task.status
    if not ruling.fraud:  # holds
        with rt.sessions.begin() as s:
            task = s.get(Verification, verification_id)
            assert task is not None
            if task.status != "auditing":  # a concurrent run of this step got here first
                return task.status
            task.status = "passed"
            unit = s.get(Unit, task.unit_id)
            assert unit is not None
            log(s, "audit_passed", job_id, unit=unit_id, segment=seg, verifier=verifier, reason=ruling.reason)
            maybe_verified(s, unit)
        rt.enqueue("gridmint.advance", [job_id])
        return "passed"
    treasury = rt.contracts.deployment.treasury
    evidence, ver_evidence = verification.fraud_evidence(unit_id, seg, provider), audit_evidence(verification_id,
                                                                                                   verifier)
    before = _slash_whole_stake(rt, provider, treasury, evidence)
    ver_lost = 0
    slash_verifier = own_bits and not ruling.unbacked  # (its pass asserted the bits a replay, not silence, refuted)
    if slash_verifier:
        held = _slash_whole_stake(rt, verifier, treasury, ver_evidence)
        vafter = rt.contracts.stake_state(verifier)
        ver_lost = held - vafter.staked - vafter.unbonding
    with rt.sessions.begin() as s:
        task = s.get(Verification, verification_id)
        assert task is not None
        if task.status != "auditing":  # a concurrent run of this step got here first
            return task.status
        task.slash_tx = "0x" + evidence.hex()
        audits = _audit_failed(rt, s, task, ruling, before, ver_evidence if slash_verifier else None, ver_lost)
    for vid, build in audits:
        run_audit(rt, vid, build)
    rt.enqueue("gridmint.match", [])
    return "unanswered" if ruling.unbacked else "audit_failed"


def _audit_failed(rt: Runtime, s: Session, task: Verification, ruling: referee.Ruling, before: int,
                  ver_evidence: bytes | None, ver_lost: int) -> list[tuple[int, str]]:
    """Inside :func:`audit_check`'s transaction, the provider's stake slashed (it held ``before``): ``task``'s pass
    is ``audit_failed``, its provider convicted (:func:`_convicted`), its verifier's overruled verdict counted, and
    one that replayed on the unit's own plan and kernels (``ver_evidence``: its slash's, ``ver_lost`` taken) benched.
    The verifier earns nothing for the check: a pass audited after its unit was credited (drawn at the provider's
    conviction) has its fee withdrawn, while its job runs. Where the ruling rests on the provider's silence alone
    (``ruling.unbacked``: it let a reveal deadline pass; a node that crashed, or one convicted over other work, which
    never answers again) the provider is convicted all the same, but nothing was replayed against the verifier's
    pass: it stands (``passed``; its fee as any honest pass of a convict's unit: :func:`_forfeit_unsettled`), with no
    mark, no bench, no slash (an honest verifier's bit-for-bit pass cost it its whole stake when a provider fell
    silent). A ring's provider can so spare its friend, at its own whole stake. The rows of the jobs the conviction
    and the bench change are taken first, all in one batch (each then re-takes its own, held already): two failed
    audits, each convicting one's provider and benching the other's verifier, never wait on each other. Returns the
    audits the conviction drew (:func:`_convicted`)."""
    provider, verifier = task.provider, task.verifier
    assert verifier is not None
    _lock_jobs(s, _provider_jobs(provider), *([_verifier_jobs(verifier)] if ver_evidence is not None else []))
    task.status = "passed" if ruling.unbacked else "audit_failed"
    unit = s.get(Unit, task.unit_id)
    assert unit is not None
    # (a stopped job's settlement may be under way: the fee stands there)
    forfeit = 0 if ruling.unbacked else _withdraw_fee(s, unit, task)
    audits = _convicted(rt, s, provider, lambda after: log(
        s, "provider_slashed" if before else "fraud_confirmed", unit.job_id, unit=task.unit_id, segment=task.segment,
        provider=provider, verifier=verifier, amount=str(before - after.staked - after.unbonding),
        claimed=ruling.claimed, replayed=ruling.replayed, reason=ruling.reason, path="audit",
        check_fee_forfeit=str(forfeit)))
    if ruling.unbacked:
        log(s, "audit_unanswered", unit.job_id, unit=task.unit_id, segment=task.segment, verification=task.id,
            provider=provider, verifier=verifier, reason="the provider let a reveal deadline pass: it is convicted, "
            "and nothing was replayed against the verifier's pass, which stands")
    ver = s.get(Verifier, verifier)
    if ver is None or ruling.unbacked:
        return audits
    ver.wrong += 1
    if ver_evidence is not None:
        first = ver.status != "benched"
        _bench(s, ver, task, f"it passed a claim the referee's audit proved false, replayed on the unit's own plan "
                             f"and kernels (verification {task.id})")
        if first or ver_lost:  # (another of its passes failed first: benched and slashed already)
            log(s, "verifier_slashed", verifier=verifier, verification=task.id, amount=str(ver_lost),
                evidence="0x" + ver_evidence.hex())
    return audits


def _dismiss_moved(rt: Runtime, verification_id: int) -> str:
    """A dispute over a unit that has left its provider before the ruling (slashed over another segment: its units
    back to the pool; or taken back) blames no one: the claim it disputes is no longer the unit's (a standby's
    result may stand there by now, and a replay of it would clear the provider and call the verifier wrong). Any
    bond the verifier posted is released; the overruled verdict is not counted against it: ``dismissed``."""
    with rt.sessions() as s:
        task = s.get(Verification, verification_id)
        assert task is not None and task.verifier is not None
        evidence = verification.fraud_evidence(task.unit_id, task.segment, task.provider)
        bonded = task.accusation is not None
    if bonded and not rt.contracts.evidence_used(evidence) and rt.contracts.dispute_of(evidence).is_open:
        rt.contracts.dismiss_dispute(evidence)
    with rt.sessions.begin() as s:
        task = s.get(Verification, verification_id)
        assert task is not None
        if task.status not in ("disputed", "bisecting"):  # a concurrent run of this task got here first
            return task.status
        unit = s.get(Unit, task.unit_id)
        assert unit is not None
        task.status = "dismissed"
        log(s, "dispute_dismissed", unit.job_id, unit=unit.id, segment=task.segment, verifier=task.verifier,
            provider=task.provider, bond_lost="0", bonded=bonded, good_faith=True, proven_false=False,
            reason=f"the unit left provider {task.provider} before the ruling (now {unit.status}"
                   f"{', with ' + unit.provider if unit.provider else ''}): its claim is gone")
        return task.status


def _open_dispute(rt: Runtime, provider: str, verifier: str, evidence: bytes, accusation: str) -> bool:
    """Relay ``verifier``'s accusation to GridStaking.accuse. True if a dispute for ``evidence`` is (or was) open on
    chain; False if the verifier cannot back it (no bond configured, or too little free stake) or the provider has
    nothing left to dispute (slashed over another segment already: the referee still rules, nothing moves)."""
    if rt.contracts.evidence_used(evidence):
        return True
    bond = rt.contracts.verifier_bond()
    # not freeStakeOf: it is 0 while any of the verifier's accusations is open, so a second one went unbonded (a
    # false one then cost it nothing); accuse bonds from the stake beyond locks and bonds
    if bond == 0 or rt.contracts.bondable_stake_of(verifier) < bond:
        return bool(rt.contracts.dispute_of(evidence).is_open)  # opened by an earlier run of this task
    try:
        rt.contracts.accuse(provider, evidence, ACCUSE_ALL, bytes.fromhex(accusation[2:]))
    except ChainError as exc:
        if exc.error_name == "StakingNothingToSlash":  # slashed to nothing already (over another segment)
            return False
        if (exc.error_name or "").startswith("ECDSAInvalidSignature"):
            # a signature the contract does not take (record_verdict refuses them since: protocol.signing): the
            # dispute is ruled unbonded, not relayed again and again (it was never ruled)
            logger.warning("the accusation of %s over %s is not one GridStaking takes (%s): ruled unbonded",
                           verifier, "0x" + evidence.hex(), exc.error_name)
            return bool(rt.contracts.dispute_of(evidence).is_open)
        if exc.error_name != "StakingEvidenceUsed":  # already open: a re-run of this task
            raise
    return True


def verification_heartbeat(rt: Runtime, verifier: str, body: VerificationBeat) -> dict[str, Any]:
    """A verifier's sign of life while it replays a task (a long segment outlasts ``unit_timeout_s``): pushes back
    the task's timeout, never past ``verify_deadline_s`` after it was handed out. 409 once the task is not its own
    (withdrawn: reaped, or its provider slashed over another segment)."""
    now = now_s()
    with rt.sessions.begin() as s:
        task = _own_task(s, body.verification_id, verifier)
        task.heartbeat_at = now
        return {"deadline": now + rt.settings.unit_timeout_s,
                "due": (task.assigned_at or now) + rt.settings.verify_deadline_s}


# ---------------------------------------------------------------- reveals (the provider's side of a bisection)

def next_reveal(rt: Runtime, provider: str) -> dict[str, Any] | None:
    """The state a referee is waiting for from ``provider``: which unit, the step before which it wants the training
    state, and the segment's start checkpoint to re-derive it from (on the plan the provider declared)."""
    with rt.sessions.begin() as s:
        if s.get(Provider, provider) is None:
            raise NotFound(f"provider {provider} is not registered")
        for task in s.scalars(select(Verification).where(Verification.provider == provider,
                                                         Verification.status.in_(REVEALING))
                              .order_by(Verification.id)):
            if not referee.unanswered(task.bisect):
                continue
            step = task.bisect["asked"]
            unit = s.get(Unit, task.unit_id)
            assert unit is not None
            if unit.provider != provider:
                continue  # the unit left it: the dispute is dismissed, nothing to reveal
            job = s.get(Job, unit.job_id)
            assert job is not None
            spec = unit_spec(job, unit)
            return {"verification_id": task.id, "unit_id": unit.id, "segment": task.segment, "step": int(step),
                    "spec": spec.to_json(), "spec_hash": spec.spec_hash(), "plan": unit.plan,
                    "checkpoint_blob": unit.segment_blobs[task.segment], "deadline": int(task.bisect["deadline"])}
    return None


def _not_receiving(rt: Runtime, verification_id: int, step: int) -> None:
    """Drop the mark of a reveal of ``step`` being checked (``referee.overdue``): it was refused."""
    with rt.sessions.begin() as s:
        task = s.get(Verification, verification_id)
        b = referee.bisect_view(task.bisect if task is not None else None)
        if task is not None and (b.get("receiving") or {}).get("step") == step:
            b.pop("receiving")
            task.bisect = b


def record_reveal(rt: Runtime, provider: str, body: RevealSubmit) -> str:
    """Store a provider's revealed state: it must be the step the referee asked for, signed by the unit's provider
    (EIP-712 Reveal), and the uploaded checkpoint must hash to the signed state hash. Then the referee goes on."""
    with rt.sessions.begin() as s:
        task = s.get(Verification, body.verification_id)
        if task is None:
            raise NotFound(f"verification {body.verification_id} does not exist")
        if task.provider != provider:
            raise Conflict(f"verification {task.id} is not over a segment of {provider}")
        b = referee.bisect_view(task.bisect)
        if task.status not in REVEALING or b.get("asked") != body.step:
            raise Conflict(f"verification {task.id} is not waiting for a state before step {body.step}"
                           f" (status {task.status}, asked {b.get('asked')})")
        now = now_s()
        if now > int(b["deadline"]):
            raise Conflict(f"the deadline to reveal step {body.step} of verification {task.id} has passed")
        # arrived in time: not taken for silence while it is checked below (referee.overdue)
        b["receiving"] = {"step": body.step, "at": now}
        task.bisect = b
        unit_id = task.unit_id
        unit = s.get(Unit, unit_id)
        assert unit is not None
        job = s.get(Job, unit.job_id)
        assert job is not None
        spec = unit_spec(job, unit)
    try:
        message = {"unitId": to_bytes32(unit_id), "step": body.step, "stateHash": to_bytes32(body.state_hash)}
        signer = recover_typed("Reveal", rt.domain, message, body.signature)
        if signer != provider:
            raise ProofError(f"reveal is signed by {signer}, not by the unit's provider {provider}")
        tensors, _ = checkpoint.load(rt.blobs.read(body.blob))
        if state_hash(tensors) != body.state_hash:
            raise ProofError(f"revealed checkpoint hashes to {state_hash(tensors)}, not to the signed "
                             f"{body.state_hash}")
        # a state the referee cannot load failed every ruling, outside the guard that counts a bad reveal against
        # the provider: the dispute stalled for ever, the cheat unslashed (422 here; its deadline still runs)
        check_uploaded_state(spec, tensors, f"revealed state before step {body.step}")
    except Exception:
        _not_receiving(rt, body.verification_id, body.step)  # (refused: no grace past the deadline for it; review)
        raise
    with rt.sessions.begin() as s:
        task = s.get(Verification, body.verification_id)
        assert task is not None
        b = referee.bisect_view(task.bisect)
        if task.status not in REVEALING or b.get("asked") != body.step:  # answered (or timed out) meanwhile
            raise Conflict(f"verification {task.id} is no longer waiting for step {body.step}")
        b["reveals"][str(body.step)] = {"blob": body.blob, "hash": body.state_hash, "signature": body.signature}
        b.pop("receiving", None)
        unit = s.get(Unit, task.unit_id)
        assert unit is not None
        log(s, "state_revealed", unit.job_id, unit=unit.id, segment=task.segment, provider=provider, step=body.step)
        more, build = [int(x) for x in b.get("more") or [] if str(x) not in b["reveals"]], unit.build
        fallen_back, audit = task.fallback_at is not None, task.status == "auditing"
        if more:  # the referee asked for several states (a loss scan): the next one, with its own deadline
            b["asked"], b["more"], b["deadline"] = more[0], more[1:], now_s() + rt.settings.reveal_timeout_s
            log(s, "reveal_requested", unit.job_id, unit=unit.id, segment=task.segment, provider=provider,
                step=more[0], deadline=b["deadline"], then=len(more) - 1)
        task.bisect = b
    if not more and audit:  # all the referee asked for is in: it rules (or goes on bisecting)
        run_audit(rt, body.verification_id, build, fallen_back)
    elif not more:
        run_referee(rt, body.verification_id, build, fallen_back)
    return "revealed"
