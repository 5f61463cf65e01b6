"""Job lifecycle: register -> job -> match -> submit -> verify -> (slash | credit) -> next round -> settle.
Checking submitted work (verification, disputes, reveals) is :mod:`marketplace.checking`.

Each function takes a Runtime and does one step inside one DB transaction. Steps that move tokens on chain
(slash, release, refund) are idempotent twice over: the contracts refuse a second release of a unit or a
second use of slash evidence, and the client checks before sending. Replaying any task is harmless.
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, bindparam, case, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from marketplace import canary, cancellation, matching, referee, settlement, slashes, standby
from marketplace.checking import (AUDIT_LOST_S, benched_message, maybe_verified, pools_away, retire_canary,
                                  run_audit, run_referee, stock_unclaimed)
from marketplace.common import (Conflict, NotFound, check_uploaded_state, log, model_config, stake_short, take_back,
                                unit_id_for, unit_spec)
from marketplace.db import Job, Provider, Unit, Verification, Verifier, now_s, write_gate
from marketplace.pricing import (MAX_THROUGHPUT, REFERENCE_THROUGHPUT, Reliability, check_ask, check_max_price,
                                 observe_throughput,
                                 reliability_ppm)
from protocol import verification
from marketplace.runtime import Runtime
from marketplace.sizing import check_unit_fits
from node import checkpoint
from node.model import init_state
from node.crosscheck import Plan
from node.trainer import (UnitSpec, average_states, check_finite, evaluate, model_only, start_state_hash, state_hash,
                          update_norm)
from protocol.errors import CheckpointError, GridMintValueError, InsufficientFundsError, ProofError
from protocol.jobs import check_job_id
from protocol.money import format_tokens
from protocol.proof import TrainingProof, check_step_losses, check_structure
from protocol.schemas import Heartbeat, JobSpec, ProviderRegister, ResultSubmit, VerifierRegister
from protocol.signing import recover_typed


#: Spare providers considered when a unit's provider drops out (the cheapest eligible one takes over at once).
STANDBY_POOL = 3


# ---------------------------------------------------------------- providers / verifiers

def register_provider(rt: Runtime, address: str, body: ProviderRegister) -> Provider:
    """Record (or update) ``address``'s offer with its stake on chain now. A matching round is queued only when the
    offer is one matching can use (staked at least ``min_stake``) and it is new, changed or back to life, with a unit
    pending: a registration that changes nothing matching sees (an unstaked key's, say) costs no round."""
    check_ask(body.region, body.price)
    with rt.sessions() as s:  # refused from the database before a chain read is spent on it
        known = s.get(Provider, address)
        if known is not None and known.status == "slashed":
            raise Conflict(f"provider {address} was slashed for fraud and cannot re-register")
    stake = rt.contracts.stake_of(address)
    now = now_s()
    with rt.sessions.begin() as s:
        p = s.get(Provider, address)
        if p is None:
            p = Provider(address=address)
            s.add(p)
        if p.status == "slashed":
            raise Conflict(f"provider {address} was slashed for fraud and cannot re-register")
        before = _offer_terms(rt, p, now)
        p.region, p.gpu, p.vram_mb, p.price = body.region, body.gpu, body.vram_mb, body.price
        p.tokens_per_s, p.capacity, p.stake, p.last_seen = body.tokens_per_s, body.capacity, stake, now
        log(s, "provider_registered", address=address, region=body.region, price=str(body.price), stake=str(stake))
        rematch = (stake >= provider_floor(rt, body.price) and _offer_terms(rt, p, now) != before
                   and s.scalar(select(exists().where(Unit.status == "pending"))))
    if rematch:
        rt.enqueue("gridmint.match", [])
    return p


def provider_floor(rt: Runtime, ask: int) -> int:
    """The stake a provider asking ``ask`` per unit needs to be matched, to get its work and to hand it in
    (``verification.provider_min_stake``: ``STAKE_UNITS`` units at its ask, at least ``min_stake``)."""
    return verification.provider_min_stake(ask, rt.settings.min_stake)


def _offer_terms(rt: Runtime, p: Provider, now: int) -> tuple[Any, ...]:
    """What matching reads of a provider's row (``_offers`` and ``matching.Demand``), liveness included."""
    live = p.last_seen is not None and p.last_seen >= _live_since(rt, now)
    return (p.status, p.region, p.price, p.vram_mb, p.stake, p.capacity, live)


def register_verifier(rt: Runtime, address: str, body: VerifierRegister | None = None) -> None:
    with rt.sessions.begin() as s:
        v = s.get(Verifier, address) or Verifier(address=address)
        if v.status == "benched":
            raise Conflict(benched_message(s, v))
        v.last_seen = now_s()
        if body is not None:
            v.plan, v.build = body.plan, body.build or None
        s.add(v)


# ---------------------------------------------------------------- jobs

def create_job(rt: Runtime, customer: str, job_id: str, spec: JobSpec) -> Job:
    """Accept a job only if its id is this customer's (``protocol.jobs.check_job_id``: JobIdNotYours, a 422,
    otherwise), its escrow on chain already holds the full budget, funded by this customer, and was not
    cancelled (Conflict: a cancelled escrow pays nothing after its grace, and is the customer's to close), and only
    at a price cap some region's providers may take (``pricing.check_max_price``), and whose units can be handed in
    (``sizing.check_unit_fits``: checkpoints and result within the upload and body limits)."""
    check_job_id(job_id, customer)
    check_max_price(spec.max_price)
    check_unit_fits(spec, max_upload_bytes=rt.settings.max_upload_bytes)
    need = spec.budget()
    escrow = rt.contracts.get_job(job_id)
    if escrow.customer.lower() != customer.lower() or escrow.closed:
        raise InsufficientFundsError(
            f"job {job_id} is not funded by {customer} on chain (escrow customer {escrow.customer}, closed={escrow.closed});"
            f" fund {need} base units into JobEscrow first")
    if escrow.closable_at:
        raise Conflict(f"the escrow of job {job_id} was cancelled on chain: it pays no work after {escrow.closable_at}"
                       f" (unix s), when you may close it for the refund; fund a new job id to submit this job")
    if escrow.remaining < need:
        raise InsufficientFundsError(f"escrow for job {job_id} holds {escrow.remaining} base units, the job needs {need}")
    state = init_state(model_config(spec), spec.seed)
    sha = rt.blobs.put_tensors(state, {"kind": "global", "job": job_id, "round": "0"})
    loss = evaluate(model_config(spec), state)
    try:
        with rt.sessions.begin() as s:
            if s.get(Job, job_id) is not None:
                raise Conflict(f"job {job_id} already exists")
            job = Job(id=job_id, customer=customer, spec=spec.model_dump(mode="json"), budget=need, global_blob=sha,
                      eval_losses=[loss])
            s.add(job)
            s.flush()
            _create_round_units(s, job, spec, 0)
            log(s, "job_created", job_id, customer=customer, budget=str(need), units=spec.rounds * spec.units_per_round)
    except IntegrityError:  # the same job submitted twice at once: the other submission created it
        raise Conflict(f"job {job_id} already exists") from None
    rt.enqueue("gridmint.match", [])
    return job


def _create_round_units(s: Session, job: Job, spec: JobSpec, round_: int) -> None:
    for shard in range(spec.units_per_round):
        s.add(Unit(id=unit_id_for(job.id, round_, shard), job_id=job.id, round=round_, shard=shard, excluded=[]))


# ---------------------------------------------------------------- matching

def _busy(s: Session) -> dict[str, int]:
    """How many units each provider holds assigned now."""
    return dict(s.execute(
        select(Unit.provider, func.count()).where(Unit.status == "assigned").group_by(Unit.provider)).all())


def _offers(rt: Runtime, s: Session, busy: dict[str, int] | None = None, seen_since: int = 0) -> list[matching.Offer]:
    """The offer of every active provider seen (registered, polled for work, heartbeat) at ``seen_since`` or later
    (unix s; the caller's ``_live_since``: a node gone for good is offered no unit that would only sit until the
    reaper takes it back): its ask, free slots, delivered throughput and delivery record, so the matcher ranks by
    effective price (ask per unit at reference speed, dearer for a provider that drops work). ``busy``:
    ``_busy(s)``, if the caller has it already.

    Throughput is what the provider *delivered* on real units (tokens trained per second from assignment to
    submission), never its self-reported benchmark, which would be free to inflate. A provider with no delivered
    unit yet is ranked at the median delivered throughput, so it competes on its ask until its work speaks."""
    busy = _busy(s) if busy is None else busy
    # (an unstaked provider can meet no unit's stake floor: its row, free to create, is never loaded here)
    # (nor one the reaper found silent and that has not been seen since: a review found it given the next round's
    # work, and the next dropout's unit as standby, while the live window lasted)
    providers = list(s.scalars(select(Provider).where(
        Provider.status == "active", Provider.last_seen >= seen_since, Provider.stake != 0,
        or_(Provider.silent_at.is_(None), Provider.last_seen >= Provider.silent_at))))
    # (nor one whose stake does not cover STAKE_UNITS units at its ask: provider_floor)
    providers = [p for p in providers if p.stake >= provider_floor(rt, p.price)]
    seen = sorted(p.observed_tps for p in providers if p.observed_tps)
    default = seen[len(seen) // 2] if seen else REFERENCE_THROUGHPUT
    return [
        matching.Offer(p.address, p.region, p.price, p.vram_mb, p.stake, p.capacity - busy.get(p.address, 0),
                       throughput=min(max(p.observed_tps or default, 1), MAX_THROUGHPUT),
                       reliability_ppm=reliability_ppm(p.completed, p.dropped))
        for p in providers
    ]


def _live_since(rt: Runtime, now: int) -> int:
    """The oldest sign of life that still gets a provider offered work (``settings.resolved_provider_live_s``)."""
    return now - rt.settings.resolved_provider_live_s()


def _demand(rt: Runtime, unit: Unit, job: Job) -> matching.Demand:
    """``unit``'s demand, excluding its cheats and its dropouts (the latter a last resort: ``_back_after_dropping``)."""
    spec = JobSpec.model_validate(job.spec)
    return matching.Demand(unit.id, spec.vram_mb, rt.settings.min_stake, spec.max_price,
                           frozenset(unit.excluded or []) | frozenset(unit.dropped_by or {}))


def _back_after_dropping(s: Session, units: list[Unit]) -> dict[str, frozenset[str]]:
    """For each of ``units``, the providers excluded from it only for having dropped it, and seen since (back from
    a blip or a restart): a matching round may give the unit back to one of them when no other has a free slot."""
    dropouts = {a for u in units for a in (u.dropped_by or {})}
    if not dropouts:
        return {}
    seen = dict(s.execute(select(Provider.address, Provider.last_seen).where(Provider.address.in_(dropouts))).all())
    return {u.id: frozenset(a for a, at in u.dropped_by.items()
                            if a not in (u.excluded or []) and seen.get(a, -1) >= at)
            for u in units if u.dropped_by}


def unit_seconds(spec: JobSpec, tokens_per_s: int) -> int:
    """How long one unit of ``spec`` should train at ``tokens_per_s`` (rounded up, at least 1)."""
    return max(1, -(-spec.steps_per_unit * spec.batch_size * spec.model.ctx // max(1, tokens_per_s)))


def _deadline(rt: Runtime, spec: JobSpec, tokens_per_s: int, queued: int, now: int) -> int:
    """When a unit assigned now must be submitted: ``unit_deadline_factor`` times what the throughput the matching
    ranked its provider at (delivered on real units, else the market's median; never its own benchmark, which a
    node could understate to hold units longer) says it takes, times ``queued`` (the units the provider holds with
    this one: a node trains them one after another), never sooner than ``unit_deadline_min_s``."""
    due = rt.settings.unit_deadline_factor * queued * unit_seconds(spec, tokens_per_s)
    return now + max(rt.settings.unit_deadline_min_s, due)


def _lock_providers(s: Session, providers: Iterable[str]) -> None:
    """Take the rows of ``providers`` till the transaction ends (PostgreSQL; SQLite has one writer at a time), in
    address order, in one statement: two steps that assign units (matching rounds, a reap's standbys) to one
    provider then count its units one after the other (:func:`_assign`), and a conviction, which writes the row
    first, is seen by the step waiting for it."""
    with s.no_autoflush:
        s.execute(select(Provider.address).where(Provider.address.in_(sorted(set(providers))))
                  .order_by(Provider.address).with_for_update()).all()


def _assign(rt: Runtime, s: Session, unit: Unit, job: Job, offer: matching.Offer, price: int, rank: int,
            how: str, busy: dict[str, int]) -> bool:
    """Give ``unit`` to ``offer``'s provider, if it still may have it: the unit still pending, its job still running,
    the provider still active with a free slot, and on the terms it was matched on (its ask, enough VRAM for the
    job, the minimum stake), as the database has them now (a matching round decides on what it read before: a stop,
    a conviction, another round, a reap's standby, a new registration or a stake read may have committed since; the
    caller took the provider's row first, :func:`_lock_providers`). ``busy`` (``_busy``, kept up to date by the
    caller's round) counts it. True if assigned."""
    provider, region = offer.provider, offer.region
    now = now_s()
    spec = JobSpec.model_validate(job.spec)
    terms = s.execute(select(Provider.price, Provider.vram_mb, Provider.stake)
                      .where(Provider.address == provider)).one_or_none()
    if (terms is None or terms.price != offer.price or terms.vram_mb < spec.vram_mb
            or terms.stake < provider_floor(rt, terms.price)):
        return False  # (a review found a unit given on the terms read before: a GPU too small, an ask gone up)
    queued = busy.get(provider, 0) + 1
    deadline = _deadline(rt, spec, offer.throughput, queued, now)
    holds = (select(func.count()).select_from(Unit).where(Unit.provider == provider, Unit.status == "assigned")
             .scalar_subquery())
    may = select(Provider.address).where(Provider.address == provider, Provider.status == "active",
                                         Provider.capacity > holds).exists()
    running = select(Job.id).where(Job.id == unit.job_id, Job.status == "running").exists()
    if s.execute(update(Unit).where(Unit.id == unit.id, Unit.status == "pending", running, may).values(
            status="assigned", provider=provider, price=price, rank=rank, assigned_at=now, heartbeat_at=None,
            steps_done=0, deadline_at=deadline, attempts=Unit.attempts + 1),
            execution_options={"synchronize_session": "fetch"}).rowcount != 1:
        return False
    busy[provider] = queued
    stretch = {"busy_since": now, "busy_tokens": 0} if queued == 1 else {}  # (held nothing: a busy stretch starts)
    s.execute(update(Provider).where(Provider.address == provider).values(assigned=Provider.assigned + 1, **stretch),
              execution_options={"synchronize_session": "fetch"})
    log(s, "unit_assigned", job.id, unit=unit.id, round=unit.round, shard=unit.shard, provider=provider,
        region=region, price=str(price), rank=rank, how=how, deadline=deadline)
    return True


def run_matching(rt: Runtime) -> list[matching.Assignment]:
    """One matching round over every pending unit (oldest job first) and the free slots of every active provider
    seen lately (``_offers``). A unit's dropouts are passed over while anyone else has a free slot; then one seen
    since it dropped the unit may take it back (``matching.match_last_resort``: its reliability record already
    prices it dearer). Cheats never."""
    with rt.sessions.begin() as s:
        pending = s.execute(
            select(Unit, Job).join(Job, Unit.job_id == Job.id)
            .where(Unit.status == "pending", Job.status == "running")
            .order_by(Job.created_at, Job.id, Unit.round, Unit.shard)
        ).all()
        if not pending:
            return []
        busy = _busy(s)
        offers = _offers(rt, s, busy, _live_since(rt, now_s()))
        got = matching.match_last_resort(offers, [_demand(rt, unit, job) for unit, job in pending],
                                         _back_after_dropping(s, [u for u, _ in pending]))
        units = {u.id: (u, j) for u, j in pending}
        by_provider = {o.provider: o for o in offers}
        _lock_providers(s, (a.provider for a in got))
        return [a for a in got if _assign(rt, s, *units[a.unit_id], by_provider[a.provider], a.price, a.rank,
                                          "matching round", busy)]


def _provider_stake(rt: Runtime, provider: str, ask: int, fresh: bool = False) -> tuple[int | None, str]:
    return stake_short(rt, "provider", provider, provider_floor(rt, ask), "work",
                       f"at an ask of {format_tokens(ask)} ({verification.STAKE_UNITS} units at its ask, at least "
                       f"{format_tokens(rt.settings.min_stake)}: its stake backs every unit until the unit is "
                       f"verified)", fresh)


def _release(s: Session, unit: Unit, provider: str, why: str) -> bool:
    """Hand an assigned unit back to the pool: its provider's stake no longer backs it (not a dropout). Nothing
    if the unit moved meanwhile (``take_back``); says whether it was released."""
    if take_back(s, unit.id, provider):
        log(s, "unit_released", unit.job_id, unit=unit.id, provider=provider, reason=why)
        return True
    return False


def _known_provider(s: Session, provider: str) -> Provider:
    """``provider``'s row; NotFound if it never registered, Conflict if it was slashed."""
    p = s.get(Provider, provider)
    if p is None:
        raise NotFound(f"provider {provider} is not registered")
    if p.status == "slashed":
        raise Conflict(f"provider {provider} was slashed for fraud")
    return p


def next_work(rt: Runtime, provider: str) -> dict[str, Any] | None:
    """The unit assigned to ``provider``, as the spec it must train and the checkpoint it starts from. A provider
    whose stake fell below the minimum gets none (409), and the units it was assigned go back to the pool. An
    unknown or slashed signer is refused from the database, before its stake is read from the chain."""
    with rt.sessions() as s:
        ask = _known_provider(s, provider).price
        # the units it holds were given at their own price: its stake must cover those (a review found a provider
        # that raised its ask lose the units in hand, and one that lowered it hand in dear units on the flat minimum)
        held = [p for p in s.scalars(select(Unit.price).where(Unit.provider == provider, Unit.status == "assigned"))
                if p is not None]
    stake, short = _provider_stake(rt, provider, max(held) if held else ask)
    released = 0
    with rt.sessions.begin() as s:
        p = _known_provider(s, provider)
        p.last_seen = now_s()
        if stake is not None:
            p.stake = stake  # matching ranks on what is staked now
        if short:
            for unit in list(s.scalars(select(Unit).where(Unit.provider == provider, Unit.status == "assigned"))):
                _release(s, unit, provider, short)
                released += 1
        else:
            row = s.execute(select(Unit, Job).join(Job).where(Unit.provider == provider, Unit.status == "assigned")
                            .order_by(Unit.assigned_at)).first()
            if row is None:
                has_pending = s.scalar(select(func.count()).select_from(Unit).where(Unit.status == "pending"))
                if has_pending:
                    rt.enqueue("gridmint.match", [])
                return None
            unit, job = row
            spec = unit_spec(job, unit)
            return {"spec": spec.to_json(), "spec_hash": spec.spec_hash(), "start_blob": job.global_blob,
                    "price": str(unit.price), "due": unit.deadline_at}
    if released:
        rt.enqueue("gridmint.match", [])
    raise Conflict(short)


# ---------------------------------------------------------------- results

def _assigned_unit(s: Session, unit_id: str, provider: str) -> Unit:
    """Unit ``unit_id``; NotFound if there is none, Conflict unless it is assigned to ``provider``."""
    unit = s.get(Unit, unit_id)
    if unit is None:
        raise NotFound(f"unit {unit_id} does not exist")
    if unit.provider != provider or unit.status != "assigned":
        raise Conflict(f"unit {unit_id} is not assigned to {provider} (status {unit.status})")
    return unit


def submit_result(rt: Runtime, provider: str, body: ResultSubmit) -> None:
    """Cheap, complete structural checks now; a sampled replay by a verifier later. A result whose provider's stake
    fell below the minimum while it trained is refused and its unit goes back to the pool: nothing would back it
    (read from the chain now, not from a recent poll's read). A unit that does not exist or is not assigned to the
    signer is refused from the database first, without that chain read."""
    with rt.sessions() as s:
        held = _assigned_unit(s, body.unit_id, provider)
        ask = held.price if held.price is not None else _known_provider(s, provider).price  # (the unit's own price)
    stake, short = _provider_stake(rt, provider, ask, fresh=True)
    if short:
        with rt.sessions.begin() as s:
            unit = s.get(Unit, body.unit_id)
            p = s.get(Provider, provider)
            if p is not None and stake is not None:
                p.stake = stake
            released = (unit is not None and unit.provider == provider and unit.status == "assigned"
                        and _release(s, unit, provider, short))
        if released:  # a unit back in the pool is what a matching round has to place
            rt.enqueue("gridmint.match", [])
        raise Conflict(f"{short}: the result is refused and the unit goes back to the pool")
    with rt.sessions.begin() as s:
        unit = _assigned_unit(s, body.unit_id, provider)
        job = s.get(Job, unit.job_id)
        assert job is not None
        spec = unit_spec(job, unit)
        level = JobSpec.model_validate(job.spec).verification
        global_blob = job.global_blob
        prov = s.get(Provider, provider)
        assert prov is not None and unit.price is not None
        streak, price, backing = prov.verified_streak, unit.price, prov.stake if stake is None else stake
    plan = Plan.parse(body.plan)
    if not referee.refereeable(plan):
        raise GridMintValueError(f"plan {body.plan!r} cannot be refereed here (this marketplace replays on "
                                 f"{', '.join(referee.devices())} only); train on one of those")
    if spec.batch_size % plan.micro_batches:
        raise GridMintValueError(f"plan {body.plan!r}: a batch of {spec.batch_size} does not split into "
                                 f"{plan.micro_batches} equal micro-batches")
    proof = TrainingProof.from_dict(body.proof)
    signer = recover_typed("TrainingProof", rt.domain, proof.signable_fields(), body.proof_signature)
    if signer != provider:
        raise ProofError(f"proof root is signed by {signer}, not by the assigned provider {provider}")
    # the unit's own shape (what a verifier's replay checks first, node.replay.claim_problem): a proof of more
    # segments than the spec's, consistent with itself, had its checks drawn among segments no replay can find (a
    # verifier handed one stopped on it, again and again), and named as many checkpoints as it liked
    shape = (proof.steps, proof.segment_len, len(proof.segments))
    if proof.unit_id != body.unit_id or shape != (spec.steps, spec.segment_len, spec.n_segments):
        raise ProofError(f"the proof is of unit {proof.unit_id[:12]}, {shape[0]} steps in {shape[2]} segments of "
                         f"{shape[1]}: this unit is {body.unit_id[:12]}, {spec.steps} steps in {spec.n_segments} "
                         f"segments of {spec.segment_len}")
    global_model, _ = checkpoint.load(rt.blobs.read(global_blob))
    check_structure(proof, expected_start_hash=start_state_hash(model_only(global_model)),
                    expected_spec_hash=spec.spec_hash())
    check_step_losses(proof, body.losses)  # the loss curve it signs: what a loss scan judges each step against
    if len(body.segment_blobs) != len(proof.segments):
        raise ProofError(f"{len(proof.segments)} segments committed but {len(body.segment_blobs)} checkpoints uploaded")
    # each checkpoint must hash to its commitment; on the way, how far the model moved in each segment (the update
    # outliers are replayed on top of the level's budget: a segment that did not train, or jumped)
    norms: list[float] = []
    before: dict[str, Any] | None = None
    for i, sha in enumerate(body.segment_blobs):
        tensors, _ = checkpoint.load(rt.blobs.read(sha))
        if state_hash(tensors) != proof.segments[i].start_hash:
            raise ProofError(f"checkpoint for segment {i} does not hash to its committed start hash")
        check_uploaded_state(spec, tensors, f"checkpoint for segment {i}")
        if before is not None:
            norms.append(update_norm(before, tensors))
        before = model_only(tensors)
    final, _ = checkpoint.load(rt.blobs.read(body.final_blob))
    if state_hash(final) != proof.final_hash:
        raise ProofError("final checkpoint does not hash to the committed final hash")
    check_uploaded_state(spec, final, "final checkpoint")
    if before is not None:
        norms.append(update_norm(before, final))
    # Which segments to replay: the buyer's level sets how many; segment 0 and the oddest committed losses first,
    # the rest drawn with a seed the provider could not know when it signed (protocol.verification).
    # A trusted host (a record of verified units) is sampled at half the rate where that keeps a 1% cheat's odds
    # of being caught within its stake at 0.995 or better (protocol.verification.sampling_rate).
    rate, trusted = verification.sampling_rate(level, consecutive_verified=streak, n_segments=len(proof.segments),
                                               unit_price=price, stake=backing)
    picks = verification.choose_challenges(proof.unit_id, [c.loss_micro for c in proof.segments], rate,
                                           secrets.token_bytes(32), norms)
    outliers = verification.update_outliers(norms)[:verification.UPDATE_OUTLIER_PICKS]
    # canaries are forged for a share of the checks before any is handed out (checking.stock_canaries, on a worker:
    # 0.4-0.7 s each on the default job), so that planting one later costs a verifier's poll no I/O; meanwhile the
    # checks wait, all of the unit's, whether one was drawn or not: which checks were handed out first tells nothing
    stocking = bool(picks) and canary.stock_share(rt.settings.canary_rate) > 0
    with rt.sessions.begin() as s:
        # a conditional UPDATE: a reap (or a stop, or a stake release) that took the unit since the read above wins
        # cleanly and this result is refused; a plain write would put it over the unit's new holder
        if s.execute(update(Unit).where(Unit.id == body.unit_id, Unit.provider == provider, Unit.status == "assigned")
                     .values(status="submitted", proof=body.proof, proof_signature=body.proof_signature,
                             final_blob=body.final_blob, segment_blobs=list(body.segment_blobs),
                             losses=list(body.losses), plan=plan.label, build=body.build or None),
                     execution_options={"synchronize_session": "fetch"}).rowcount != 1:
            raise Conflict(f"unit {body.unit_id} is no longer assigned to {provider}")
        unit = s.get(Unit, body.unit_id)
        assert unit is not None
        _observe_delivery(s, provider, spec, unit.assigned_at)
        # queued in a random order (checks go out in queue order): had they gone out by segment, a ring of verifiers
        # seeing segment 2 handed out before 1 would guess 1 held back, the tell of a canary of 0 out with another
        for seg in _shuffled(picks):
            s.add(Verification(unit_id=unit.id, provider=provider, segment=seg,
                               status="stocking" if stocking else "pending"))
        log(s, "unit_submitted", unit.job_id, unit=unit.id, provider=provider, segments=len(proof.segments),
            sampled=picks, rate=str(rate), trusted=trusted, update_outliers=[i for i in outliers if i in picks],
            final_loss=body.losses[-1] if body.losses else None)
        if not picks:  # level "none": nothing to wait for; the unit is credited now
            maybe_verified(s, unit)
        job_id = unit.job_id
    if stocking:
        rt.enqueue("gridmint.stock_canaries", [body.unit_id])
    if not picks:
        rt.enqueue("gridmint.advance", [job_id])


def _shuffled(items: list[int]) -> list[int]:
    """``items`` in an order no one can predict (the system's CSPRNG)."""
    out = list(items)
    secrets.SystemRandom().shuffle(out)
    return out


def _observe_delivery(s: Session, provider: str, spec: UnitSpec, assigned_at: int | None) -> None:
    """Blend the throughput the provider delivered at into its record (the first unit sets it): the tokens it handed
    in over its busy stretch (since it last got a unit while holding none) by the stretch's length. A node trains
    its units one after another, so a unit that waited behind others is not timed from its own assignment (a
    review found the k-th of k queued units measured k times too slow, so a provider of several slots ranked
    dearer than a slower one); and units handed in together count the time they took together (timed from the
    previous hand-in, a provider that held one result back and handed in two at once was measured at a unit per
    second: a second review). What a stretch hands in was trained within it: never measured above its speed."""
    p = s.get(Provider, provider)
    assert p is not None
    now = now_s()
    since, tokens = _over_stretch(p, spec.steps * spec.batch_size * spec.model.ctx, assigned_at, now)
    p.busy_since, p.busy_tokens = since, tokens
    measured = tokens // max(1, now - since)
    p.observed_tps = observe_throughput(p.observed_tps, measured) if p.observed_tps else max(1, min(MAX_THROUGHPUT, measured))


def _over_stretch(p: Provider, tokens: int, assigned_at: int | None, now: int) -> tuple[int, int]:
    """(since when, tokens) to time a unit of ``tokens`` assigned at ``assigned_at`` over: ``p``'s busy stretch and
    what it handed in during it, when the unit was assigned within the stretch (none before migration 0023), else
    the unit alone from its assignment."""
    since = assigned_at if assigned_at is not None else now
    if p.busy_since is not None and p.busy_since <= since:
        return p.busy_since, (p.busy_tokens or 0) + tokens
    return since, tokens


def _observe_late(prov: Provider, spec: JobSpec, now: int, assigned_at: int | None) -> int:
    """A provider alive but past the deadline of a unit assigned at ``assigned_at`` has not delivered it by ``now``:
    over its busy stretch (:func:`_over_stretch`), it trains at most this fast. Blend that bound into its delivered
    throughput (the first record sets it) and return it. Only the fact that the unit is not in counts, never the
    node's own progress report (free to shade either way), so a node that missed its deadline is ranked, and its
    next deadline set, at no more than it has shown; without this, a slow node new to the market stays ranked at
    the market's median and misses deadline after deadline."""
    since, tokens = _over_stretch(prov, spec.steps_per_unit * spec.batch_size * spec.model.ctx, assigned_at, now)
    bound = max(1, min(MAX_THROUGHPUT, tokens // max(1, now - since)))
    prov.observed_tps = min(prov.observed_tps, observe_throughput(prov.observed_tps, bound)) if prov.observed_tps else bound
    return bound


# ---------------------------------------------------------------- rounds and settlement

def advance(rt: Runtime, job_id: str) -> str:
    """When every unit of the current round is verified: average them (outer step) and open the next round, unless
    the customer cancelled the escrow meanwhile (read from the chain first): then the job stops there, its verified
    units are paid (:mod:`marketplace.cancellation`). A round that cannot be averaged, or whose average is not finite
    (a diverged job: NaN or inf in the model or its held-out loss), fails the job (:func:`_fail`) instead of being
    retried: the same bytes fail the same way every time."""
    with rt.sessions.begin() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "running":
            return job.status if job else "missing"
        units = list(s.scalars(select(Unit).where(Unit.job_id == job_id, Unit.round == job.round).order_by(Unit.shard)))
        if not units or any(u.status != "verified" for u in units):
            return "running"
        blobs = [u.final_blob for u in units]
        spec = JobSpec.model_validate(job.spec)
        round_ = job.round
    try:
        states = [model_only(checkpoint.load(rt.blobs.read(b))[0]) for b in blobs if b]
        merged = average_states(states)
        check_finite(merged)
        loss = evaluate(model_config(spec), merged)
        if not math.isfinite(loss):
            raise GridMintValueError(f"the averaged model's held-out loss is {loss}")
    except (CheckpointError, GridMintValueError) as exc:  # not a chain error: a retry would fail the same way
        if any(b and not rt.blobs.path(b).exists() for b in blobs):
            # a checkpoint of the round not in the store (its verified units' blobs were all there when each was
            # submitted): a storage problem here (a share not mounted, a restore), not the providers' bytes, and a
            # retry (the task's, then the sweep's) finds it back; as a corrupt copy is (BlobCorruptError)
            raise FileNotFoundError(f"round {round_} of job {job_id}: a checkpoint is missing from the blob store "
                                    f"({exc}); the round is averaged once it is back") from exc
        try:
            return _fail(rt, job_id, round_, blobs, f"round {round_} could not be averaged into a usable model: {exc}")
        except _RoundChanged:  # (as below: the verdict that credits the unit again advances, and fails it then)
            return "running"
    sha = rt.blobs.put_tensors(merged, {"kind": "global", "job": job_id, "round": str(round_ + 1)})
    stop = None  # a new round starts only on an escrow that was not cancelled (the last round just ends: done)
    if round_ + 1 < spec.rounds:
        escrow = rt.contracts.get_job(job_id)
        if (why := cancellation.escrow_stop(escrow)) is not None:
            stop = (why, escrow.closable_at)
    try:
        status = _next_round(rt, job_id, round_, spec, blobs, sha, loss, stop)
    except _RoundChanged:  # a unit of the round left "verified" while it averaged (its provider convicted, or a
        return "running"   # benched verifier's pass of it to be redone): the verdict that credits it again advances
    if status is None:  # another advance got here first
        with rt.sessions() as s:
            return str(s.scalar(select(Job.status).where(Job.id == job_id)))
    if status == "running":
        rt.enqueue("gridmint.match", [])
    else:
        rt.enqueue("gridmint.settle", [job_id])
    return status


class _RoundChanged(Exception):
    """The round's units are no longer those averaged."""


def _check_round_unchanged(s: Session, job_id: str, round_: int, blobs: list[str | None]) -> None:
    """Raise :class:`_RoundChanged` unless round ``round_``'s units are still all verified, on ``blobs``."""
    now = list(s.execute(select(Unit.status, Unit.final_blob).where(Unit.job_id == job_id, Unit.round == round_)
                         .order_by(Unit.shard)))
    if [(st, b) for st, b in now] != [("verified", b) for b in blobs]:
        raise _RoundChanged(job_id)


def _next_round(rt: Runtime, job_id: str, round_: int, spec: JobSpec, blobs: list[str | None], sha: str,
                loss: float, stop: tuple[str, int] | None) -> str | None:
    """:func:`advance`'s commit of round ``round_``, averaged from ``blobs`` into ``sha``: the next round, the stop
    (``stop``: the escrow's), or the job done; the job's status after it. None, writing nothing, where another advance
    got here first; :class:`_RoundChanged`, writing nothing, where the round's units are no longer those verified
    ``blobs``."""
    with rt.sessions.begin() as s:
        # the job's row first, as a conviction or a bench taking a unit of the round back does (checking._lock_jobs):
        # locked till commit on PostgreSQL; on SQLite this write takes the database's write lock
        if s.execute(update(Job).where(Job.id == job_id, Job.round == round_, Job.status == "running")
                     .values(global_blob=sha)).rowcount != 1:
            return None
        _check_round_unchanged(s, job_id, round_, blobs)  # (raising, rolls the write above back)
        job = s.get(Job, job_id)
        assert job is not None
        job.eval_losses = [*job.eval_losses, loss]
        log(s, "round_done", job_id, round=round_, eval_loss=loss)
        if stop is not None:
            cancellation.stop_in(s, job_id, *stop)
            return "cancelling"
        if round_ + 1 < spec.rounds:
            job.round = round_ + 1
            _create_round_units(s, job, spec, round_ + 1)
            return "running"
        job.status = "done"
        log(s, "job_done", job_id, eval_loss=loss)
        return "done"


def _fail(rt: Runtime, job_id: str, round_: int, blobs: list[str | None], reason: str) -> str:
    """End a running job at ``round_`` as ``failing`` (a ``job_failed`` event says why) and queue its settlement: its
    verified units are paid and the rest of the escrow refunded as for a finished job, and it ends ``failed``
    (:func:`settlement.settle_job`). Its global model stays the last one that averaged cleanly (what the customer
    downloads); its ``eval_losses`` get nothing for the failed round (a NaN cannot be stored as JSON on PostgreSQL).
    As :func:`_next_round`, only if the round's units are still those verified ``blobs`` (:class:`_RoundChanged`):
    one taken back meanwhile (a benched verifier's pass of it to be redone) would be credited to the job after its
    settlement began, which a re-run of that settlement then released again, or never."""
    with rt.sessions.begin() as s:
        # the job's row first (checking._lock_jobs: a bench or a conviction taking a unit back takes it first too)
        if s.execute(update(Job).where(Job.id == job_id, Job.round == round_, Job.status == "running")
                     .values(status="failing")).rowcount != 1:  # another advance got here first
            return str(s.scalar(select(Job.status).where(Job.id == job_id)))
        _check_round_unchanged(s, job_id, round_, blobs)  # (raising, rolls the write above back)
        log(s, "job_failed", job_id, round=round_, reason=reason)
    rt.enqueue("gridmint.settle", [job_id])
    return "failing"


def settle(rt: Runtime, job_id: str) -> int:
    """Pay a finished job's verified units into the epoch payout pool and refund the rest (``settlement.settle_job``)."""
    try:
        return settlement.settle_job(rt, job_id)
    except GridMintValueError as exc:
        raise Conflict(str(exc)) from None


_BEAT_PROVIDER = update(Provider).where(Provider.address == bindparam("p")).values(last_seen=bindparam("now"))
_BEAT_UNITS = (update(Unit).where(Unit.provider == bindparam("p"), Unit.status == "assigned")
               .values(heartbeat_at=bindparam("now")).returning(Unit.id, Unit.deadline_at))
_BEAT_PROGRESS = update(Unit).where(Unit.id == bindparam("u"), Unit.provider == bindparam("p"),
                                    Unit.status == "assigned").values(steps_done=bindparam("steps"))


def heartbeat(rt: Runtime, provider: str, body: Heartbeat) -> dict[str, Any]:
    """A provider's sign of life: pushes back the deadline of its assigned units (and records progress on one)."""
    with write_gate(rt.sessions.kw["bind"]).begin() as conn:
        return heartbeat_in(conn, rt, provider, body)


def heartbeat_in(conn: Connection, rt: Runtime, provider: str, body: Heartbeat) -> dict[str, Any]:
    """``heartbeat`` inside the caller's transaction (the signed route runs it with the nonce in one transaction).

    The hottest write path (every provider, every few seconds): prebuilt Core statements. A refusal (NotFound,
    Conflict) is raised before any write to units."""
    now = now_s()
    params = {"p": provider, "now": now, "u": body.unit_id, "steps": body.steps_done}
    if conn.execute(_BEAT_PROVIDER, params).rowcount != 1:
        raise NotFound(f"provider {provider} is not registered")
    if body.unit_id is not None and conn.execute(_BEAT_PROGRESS, params).rowcount != 1:
        raise Conflict(f"unit {body.unit_id} is not assigned to {provider}")
    units = conn.execute(_BEAT_UNITS, params).all()
    # deadline: the next heartbeat's; due: when each unit must be submitted by, however often we hear from it
    return {"units": [u for u, _ in units], "deadline": now + rt.settings.unit_timeout_s,
            "due": {u: due for u, due in units}}


#: A unit's checks still waiting for their canaries this long after it was handed in: the stocking task was lost (a
#: broker away when it was sent, a worker killed mid-task) and is sent again (a duplicate of one still queued finds
#: nothing left to stock: checking.stock_canaries)
STOCK_LOST_S = 60


def sweep(rt: Runtime) -> dict[str, int]:
    """Re-enqueue follow-up steps that should have run but may have been lost (a task that ran out of retries while
    the chain node was down, a broker restart): checks whose canaries are not stocked a while after their unit was
    handed in (:data:`STOCK_LOST_S`), disputes not yet adjudicated, verifiers caught by a canary not yet slashed,
    passes whose audit is not done a while after it was drawn (``checking.AUDIT_LOST_S``),
    rounds fully verified but not advanced, finished (or stopped) jobs not settled; and it pays out the slashes whose
    delay has passed and sends again those a void gave stake back to (:func:`marketplace.slashes.sweep`). Each step is
    idempotent, so a duplicate of a step still queued does nothing. First, every running job whose customer
    cancelled its escrow on chain is stopped (:func:`cancellation.stop_cancelled`, a thousand escrows per chain read);
    a job settled for good (``settled``, ``cancelled``, ``failed``) is never queued again."""
    cancelled = cancellation.stop_cancelled(rt)
    slashes_paid = slashes.sweep(rt)
    with rt.sessions.begin() as s:
        disputes = list(s.execute(select(Verification.id, Unit.build, Verification.fallback_at.is_not(None))
                                  .join(Unit, Unit.id == Verification.unit_id)
                                  .where(Verification.status.in_(["disputed", "bisecting"]))))
        lazy = list(s.scalars(select(Verification.id).where(Verification.status == "canary_missed",
                                                            Verification.slash_tx.is_(None))))
        unverified = func.sum(case((Unit.status != "verified", 1), else_=0))
        ready = list(s.scalars(select(Job.id).join(Unit, (Unit.job_id == Job.id) & (Unit.round == Job.round))
                               .where(Job.status == "running").group_by(Job.id).having(unverified == 0)))
        done = list(s.scalars(select(Job.id).where(Job.status.in_(settlement.SETTLING))))
        # (not those a stocking step holds: its claim lapses after STOCK_LEASE_S, the worker gone)
        now = now_s()
        unstocked = list(s.scalars(select(Verification.unit_id).where(
            Verification.status == "stocking", Verification.created_at < now - STOCK_LOST_S,
            stock_unclaimed(now)).distinct()))
        audits = list(s.execute(select(Verification.id, Unit.build, Verification.fallback_at.is_not(None))
                                .join(Unit, Unit.id == Verification.unit_id)
                                .where(Verification.status == "auditing",
                                       func.coalesce(Verification.audit_at, Verification.verdict_at)
                                       < now - AUDIT_LOST_S)))
    for u in unstocked:
        rt.enqueue("gridmint.stock_canaries", [u])
    for v, build, fallen_back in disputes:
        run_referee(rt, v, build, fallen_back)
    for v in lazy:
        rt.enqueue("gridmint.punish_verifier", [v])
    for v, build, fallen_back in audits:
        run_audit(rt, v, build, fallen_back)
    for j in ready:
        rt.enqueue("gridmint.advance", [j])
    done = [j for j in done if j not in cancelled]  # stop_cancelled queued their settlement
    for j in done:
        rt.enqueue("gridmint.settle", [j])
    return {"adjudicate": len(disputes), "punish_verifier": len(lazy), "advance": len(ready), "settle": len(done),
            "cancelled": len(cancelled), "stock_canaries": len(unstocked), "audit_check": len(audits),
            "slashes_paid": slashes_paid}


def reap(rt: Runtime) -> int:
    """Assigned units whose provider missed its heartbeat deadline, or the unit's own deadline (alive but stuck, or
    holding the unit without training it), are taken from it: the dropout's reliability drops (a higher effective
    price from now on) and it joins the unit's ``dropped_by`` (passed over while another provider can take the unit:
    ``run_matching``); the unit restarts from its last verified checkpoint (the job's current global model) on the
    cheapest eligible standby seen lately right away, or goes back to the pool for the next matching round when no
    spare provider fits. Each take-back is conditional (``common.take_back``): a result, a stop or a conviction that
    landed since the units were read wins, and that unit is left alone. Verification tasks gone quiet go back to
    the queue; a dispute (or an audit) whose provider let a reveal deadline pass is ruled on; one whose referee pool
    is away goes to the default referee (:func:`pools_away`). Returns how many units were taken back."""
    now = now_s()
    cutoff = now - rt.settings.unit_timeout_s
    n = 0
    with rt.sessions.begin() as s:
        silent = func.coalesce(Unit.heartbeat_at, Unit.assigned_at) < cutoff
        stale = s.execute(select(Unit, Job).join(Job, Unit.job_id == Job.id).where(
            Unit.status == "assigned", silent | (Unit.deadline_at < now))).all()
        busy = _busy(s) if stale else {}
        # (not to a provider this pass takes a unit from: silent, or stuck past a deadline)
        reaped = {u.provider for u, _ in stale}
        offers = [o for o in _offers(rt, s, busy, _live_since(rt, now)) if o.provider not in reaped] if stale else []
        if offers:
            _lock_providers(s, (o.provider for o in offers))
        for u, job in stale:
            dropped = u.provider
            assert dropped is not None
            prov = s.get(Provider, dropped)
            assert prov is not None
            late = u.deadline_at is not None and u.deadline_at < now and (u.heartbeat_at or u.assigned_at or 0) >= cutoff
            assigned_at, deadline_at = u.assigned_at, u.deadline_at
            demand = _demand(rt, u, job)
            spares = standby.pick_standbys(offers, demand, STANDBY_POOL, assigned={dropped})
            move = standby.reassign_on_dropout(demand, dropped, Reliability(prov.completed, prov.dropped), spares)
            # only while ``dropped`` still holds it: a result accepted since the read above stands (and is paid)
            if not take_back(s, u.id, dropped, dropped_by={**(u.dropped_by or {}), dropped: now}):
                continue
            extra: dict[str, Any] = {}
            if late:  # alive, yet not done: it trains at most this fast (a silent dropout says nothing of its speed);
                # over its busy stretch, as a delivery is measured (a unit queued behind others waited for them)
                extra["delivered_at_most"] = _observe_late(prov, JobSpec.model_validate(job.spec), now, assigned_at)
            else:  # silent: no work for it till it is seen again
                prov.silent_at = now
            log(s, "unit_timed_out", u.job_id, unit=u.id, provider=dropped,
                reason=f"not submitted by its deadline ({deadline_at})" if late else "no heartbeat", **extra)
            prov.dropped = move.dropped_reliability.dropped
            prov.verified_streak = 0  # a dropout starts its trusted-host record over
            if move.replacement is not None:
                r = move.replacement
                _assign(rt, s, u, job, r, r.price, 0, f"standby for {dropped}", busy)  # (else: the next round's)
                offers = [o if o.provider != r.provider else replace(o, free_slots=o.free_slots - 1) for o in offers]
            n += 1
        quiet = func.coalesce(Verification.heartbeat_at, Verification.assigned_at) < cutoff
        held = Verification.assigned_at < now - rt.settings.verify_deadline_s
        for v in s.scalars(select(Verification).where(Verification.status == "assigned", quiet | held)):
            if v.canary is not None:  # an abandoned canary is never handed out again: its real check is instead
                v.status = "void"
                retire_canary(s, v)
            else:
                v.status, v.verifier = "pending", None
        overdue = [(v.id, build, v.fallback_at is not None, v.status == "auditing")
                   for v, build in s.execute(select(Verification, Unit.build)
                                             .join(Unit, Unit.id == Verification.unit_id)
                                             .where(Verification.status.in_(["bisecting", "auditing"]),
                                                    Verification.bisect.is_not(None)))
                   if referee.overdue(v.bisect, now_s())]
        away = pools_away(rt, s, now)
    moved = {vid for vid, _ in away}
    for vid, build, fallen_back, audit in overdue:  # a provider that lets a reveal deadline pass loses the ruling
        if vid in moved:
            continue
        if audit:  # (the sweep would send it again only AUDIT_LOST_S after it was drawn)
            run_audit(rt, vid, build, fallen_back)
        else:
            run_referee(rt, vid, build, fallen_back)
    for vid, audit in away:  # a dispute (or an audit) whose referee pool is away: to the default referee
        if audit:
            run_audit(rt, vid, None, True)
        else:
            run_referee(rt, vid, None, True)
    if n:
        rt.enqueue("gridmint.match", [])
    return n
