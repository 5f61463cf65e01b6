"""Job lifecycle: register -> job -> match -> submit -> verify -> (slash | credit) -> next round -> settle.

Each function takes a Runtime and does one step inside one DB transaction. Steps that move tokens on chain
(slash, release, refund) are idempotent twice over: the contracts refuse a second release of a unit or a
second use of slash evidence, and the client checks before sending. Replaying any task is harmless.
"""
from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

from eth_utils import keccak
from sqlalchemy import Connection, and_, bindparam, case, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from marketplace import canary, matching, referee, settlement, standby
from marketplace.db import (Event, Job, LedgerEntry, Provider, RefereePool, Unit, Verification, Verifier, now_s,
                            pools_seen, write_gate)
from marketplace.pricing import (MAX_THROUGHPUT, REFERENCE_THROUGHPUT, Reliability, check_ask, observe_throughput,
                                 reliability_ppm)
from protocol import verification
from marketplace.runtime import Runtime
from marketplace.settings import pool_builds
from node import checkpoint
from node.model import ModelConfig, init_state
from node.crosscheck import PROVIDER_PLAN, Plan
from node.trainer import (UnitSpec, average_states, evaluate, model_only, start_state_hash, state_hash,
                          update_norm)
from protocol.errors import ChainError, ChainUnavailable, GridMintValueError, InsufficientFundsError, ProofError
from protocol.money import format_tokens
from protocol.proof import TrainingProof, check_step_losses, check_structure
from protocol.schemas import (Heartbeat, JobSpec, ProviderRegister, ResultSubmit, RevealSubmit, VerdictSubmit,
                              VerificationBeat, VerifierRegister)
from protocol.signing import ACCUSE_ALL, recover_accusation, recover_typed, to_bytes32


#: Spare providers considered when a unit's provider drops out (the cheapest eligible one takes over at once).
STANDBY_POOL = 3


class NotFound(GridMintValueError):
    """Unknown job, unit or verification (HTTP 404)."""


class Conflict(GridMintValueError):
    """The request is valid but the state does not allow it now (HTTP 409)."""


def log(s: Session, kind: str, job_id: str | None = None, **data: Any) -> None:
    s.add(Event(job_id=job_id, kind=kind, data=data))


# ---------------------------------------------------------------- providers / verifiers

def register_provider(rt: Runtime, address: str, body: ProviderRegister) -> Provider:
    check_ask(body.region, body.price)
    stake = rt.contracts.stake_of(address)
    with rt.sessions.begin() as s:
        p = s.get(Provider, address)
        if p is None:
            p = Provider(address=address)
            s.add(p)
        if p.status == "slashed":
            raise Conflict(f"provider {address} was slashed for fraud and cannot re-register")
        p.region, p.gpu, p.vram_mb, p.price = body.region, body.gpu, body.vram_mb, body.price
        p.tokens_per_s, p.capacity, p.stake, p.last_seen = body.tokens_per_s, body.capacity, stake, now_s()
        log(s, "provider_registered", address=address, region=body.region, price=str(body.price), stake=str(stake))
    rt.enqueue("gridmint.match", [])
    return p


def register_verifier(rt: Runtime, address: str, body: VerifierRegister | None = None) -> None:
    with rt.sessions.begin() as s:
        v = s.get(Verifier, address) or Verifier(address=address)
        if v.status == "benched":
            raise Conflict(_benched_message(v))
        v.last_seen = now_s()
        if body is not None:
            v.plan, v.build = body.plan, body.build or None
        s.add(v)


# ---------------------------------------------------------------- jobs

def unit_id_for(job_id: str, round_: int, shard: int) -> str:
    return "0x" + keccak(to_bytes32(job_id) + round_.to_bytes(32, "big") + shard.to_bytes(32, "big")).hex()


def model_config(spec: JobSpec) -> ModelConfig:
    return ModelConfig(**spec.model.model_dump())


def unit_spec(job: Job, unit: Unit) -> UnitSpec:
    spec = JobSpec.model_validate(job.spec)
    return UnitSpec(
        job_id=job.id,
        unit_id=unit.id,
        round=unit.round,
        shard=unit.shard,
        n_shards=spec.units_per_round,
        model=model_config(spec),
        steps=spec.steps_per_unit,
        segment_len=spec.segment_len,
        batch_size=spec.batch_size,
        lr=spec.lr,
        seed=spec.seed * 1_000_003 + unit.round,
        threads=1,
        precision=spec.precision,
    )


def create_job(rt: Runtime, customer: str, job_id: str, spec: JobSpec) -> Job:
    """Accept a job only if its escrow on chain already holds the full budget, funded by this customer."""
    need = spec.budget()
    escrow = rt.contracts.get_job(job_id)
    if escrow.customer.lower() != customer.lower() or escrow.closed:
        raise InsufficientFundsError(
            f"job {job_id} is not funded by {customer} on chain (escrow customer {escrow.customer}, closed={escrow.closed});"
            f" fund {need} base units into JobEscrow first")
    if escrow.remaining < need:
        raise InsufficientFundsError(f"escrow for job {job_id} holds {escrow.remaining} base units, the job needs {need}")
    state = init_state(model_config(spec), spec.seed)
    sha = rt.blobs.put_tensors(state, {"kind": "global", "job": job_id, "round": "0"})
    with rt.sessions.begin() as s:
        if s.get(Job, job_id) is not None:
            raise Conflict(f"job {job_id} already exists")
        job = Job(id=job_id, customer=customer, spec=spec.model_dump(mode="json"), budget=need, global_blob=sha,
                  eval_losses=[evaluate(model_config(spec), state)])
        s.add(job)
        s.flush()
        _create_round_units(s, job, spec, 0)
        log(s, "job_created", job_id, customer=customer, budget=str(need), units=spec.rounds * spec.units_per_round)
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


def _offers(s: Session, busy: dict[str, int] | None = None) -> list[matching.Offer]:
    """Every active provider's offer: its ask, free slots, delivered throughput and delivery record, so the matcher
    ranks by effective price (ask per unit at reference speed, dearer for a provider that drops work). ``busy``:
    ``_busy(s)``, if the caller has it already.

    Throughput is what the provider *delivered* on real units (tokens trained per second from assignment to
    submission), never its self-reported benchmark, which would be free to inflate. A provider with no delivered
    unit yet is ranked at the median delivered throughput, so it competes on its ask until its work speaks."""
    busy = _busy(s) if busy is None else busy
    providers = list(s.scalars(select(Provider).where(Provider.status == "active")))
    seen = sorted(p.observed_tps for p in providers if p.observed_tps)
    default = seen[len(seen) // 2] if seen else REFERENCE_THROUGHPUT
    return [
        matching.Offer(p.address, p.region, p.price, p.vram_mb, p.stake, p.capacity - busy.get(p.address, 0),
                       throughput=min(max(p.observed_tps or default, 1), MAX_THROUGHPUT),
                       reliability_ppm=reliability_ppm(p.completed, p.dropped))
        for p in providers
    ]


def _demand(rt: Runtime, unit: Unit, job: Job) -> matching.Demand:
    spec = JobSpec.model_validate(job.spec)
    return matching.Demand(unit.id, spec.vram_mb, rt.settings.min_stake, spec.max_price, frozenset(unit.excluded or []))


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


def _assign(rt: Runtime, s: Session, unit: Unit, job: Job, offer: matching.Offer, price: int, rank: int,
            how: str, busy: dict[str, int]) -> None:
    """Give ``unit`` to ``offer``'s provider; ``busy`` (``_busy``, kept up to date by the caller's round) counts it."""
    provider, region = offer.provider, offer.region
    prov = s.get(Provider, provider)
    assert prov is not None
    now = now_s()
    busy[provider] = busy.get(provider, 0) + 1
    deadline = _deadline(rt, JobSpec.model_validate(job.spec), offer.throughput, busy[provider], now)
    unit.status, unit.provider, unit.price, unit.rank = "assigned", provider, price, rank
    unit.assigned_at, unit.heartbeat_at, unit.steps_done, unit.deadline_at = now, None, 0, deadline
    unit.attempts += 1
    prov.assigned += 1
    log(s, "unit_assigned", job.id, unit=unit.id, round=unit.round, shard=unit.shard, provider=provider,
        region=region, price=str(price), rank=rank, how=how, deadline=deadline)


def run_matching(rt: Runtime) -> list[matching.Assignment]:
    """One matching round over every pending unit (oldest job first) and every active provider's free slots."""
    with rt.sessions.begin() as s:
        pending = s.execute(
            select(Unit, Job).join(Job, Unit.job_id == Job.id)
            .where(Unit.status == "pending", Job.status == "running")
            .order_by(Job.created_at, Job.id, Unit.round, Unit.shard)
        ).all()
        if not pending:
            return []
        busy = _busy(s)
        offers = _offers(s, busy)
        got = matching.match(offers, [_demand(rt, unit, job) for unit, job in pending])
        units = {u.id: (u, j) for u, j in pending}
        by_provider = {o.provider: o for o in offers}
        for a in got:
            unit, job = units[a.unit_id]
            _assign(rt, s, unit, job, by_provider[a.provider], a.price, a.rank, "matching round", busy)
        return got


def _stake_short(rt: Runtime, role: str, address: str, need: int, gets: str, then: str,
                 fresh: bool = False) -> tuple[int | None, str]:
    """``address``'s bonded stake on chain now (a chain read: call it outside a transaction), and why it is less
    than ``need`` ("" if it is enough). A stake read once at registration is not enough: it could be unbonded after
    and the account go on working with nothing left to slash. A read that showed enough is reused for
    ``stake_read_ttl_s`` unless ``fresh`` (``marketplace.stakes``). None if the chain cannot be reached: the last
    stake read stands (an outage must not stall work; unbonding stake stays slashable for a week)."""
    if not fresh and (seen := rt.stakes.enough(address, need, rt.settings.stake_read_ttl_s)) is not None:
        return seen, ""
    try:
        stake = rt.contracts.stake_of(address)
    except ChainUnavailable:
        return None, ""
    rt.stakes.put(address, stake)
    if stake >= need:
        return stake, ""
    return stake, (f"{role} {address} has {format_tokens(stake)} staked; {role}s get {gets} only while staking at "
                   f"least {format_tokens(need)} {then}")


def _provider_stake(rt: Runtime, provider: str, fresh: bool = False) -> tuple[int | None, str]:
    return _stake_short(rt, "provider", provider, rt.settings.min_stake, "work",
                        "(its stake backs every unit until the unit is verified)", fresh)


def _release(s: Session, unit: Unit, provider: str, why: str) -> None:
    """Hand an assigned unit back to the pool: its provider's stake no longer backs it (not a dropout)."""
    unit.status, unit.provider, unit.price, unit.rank = "pending", None, None, None
    log(s, "unit_released", unit.job_id, unit=unit.id, provider=provider, reason=why)


def next_work(rt: Runtime, provider: str) -> dict[str, Any] | None:
    """The unit assigned to ``provider``, as the spec it must train and the checkpoint it starts from. A provider
    whose stake fell below the minimum gets none (409), and the units it was assigned go back to the pool."""
    stake, short = _provider_stake(rt, provider)
    released = 0
    with rt.sessions.begin() as s:
        p = s.get(Provider, provider)
        if p is None:
            raise NotFound(f"provider {provider} is not registered")
        if p.status == "slashed":
            raise Conflict(f"provider {provider} was slashed for fraud")
        p.last_seen = now_s()
        if stake is not None:
            p.stake = stake  # matching ranks on what is staked now
        if short:
            for unit in s.scalars(select(Unit).where(Unit.provider == provider, Unit.status == "assigned")):
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
            return {"spec": unit_spec(job, unit).to_json(), "start_blob": job.global_blob, "price": str(unit.price),
                    "due": unit.deadline_at}
    if released:
        rt.enqueue("gridmint.match", [])
    raise Conflict(short)


# ---------------------------------------------------------------- results

def submit_result(rt: Runtime, provider: str, body: ResultSubmit) -> None:
    """Cheap, complete structural checks now; a sampled replay by a verifier later. A result whose provider's stake
    fell below the minimum while it trained is refused and its unit goes back to the pool: nothing would back it
    (read from the chain now, not from a recent poll's read)."""
    stake, short = _provider_stake(rt, provider, fresh=True)
    if short:
        with rt.sessions.begin() as s:
            unit = s.get(Unit, body.unit_id)
            p = s.get(Provider, provider)
            if p is not None and stake is not None:
                p.stake = stake
            if unit is not None and unit.provider == provider and unit.status == "assigned":
                _release(s, unit, provider, short)
        rt.enqueue("gridmint.match", [])
        raise Conflict(f"{short}: the result is refused and the unit goes back to the pool")
    with rt.sessions.begin() as s:
        unit = s.get(Unit, body.unit_id)
        if unit is None:
            raise NotFound(f"unit {body.unit_id} does not exist")
        if unit.provider != provider or unit.status != "assigned":
            raise Conflict(f"unit {body.unit_id} is not assigned to {provider} (status {unit.status})")
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
    signer = recover_typed("TrainingProof", rt.chain_id, proof.signable_fields(), body.proof_signature)
    if signer != provider:
        raise ProofError(f"proof root is signed by {signer}, not by the assigned provider {provider}")
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
        if before is not None:
            norms.append(update_norm(before, tensors))
        before = model_only(tensors)
    final, _ = checkpoint.load(rt.blobs.read(body.final_blob))
    if state_hash(final) != proof.final_hash:
        raise ProofError("final checkpoint does not hash to the committed final hash")
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
    with rt.sessions.begin() as s:
        unit = s.get(Unit, body.unit_id)
        assert unit is not None
        if unit.provider != provider or unit.status != "assigned":  # raced with a timeout reassignment
            raise Conflict(f"unit {body.unit_id} is no longer assigned to {provider}")
        unit.status, unit.proof, unit.proof_signature = "submitted", body.proof, body.proof_signature
        _observe_delivery(s, provider, spec, now_s() - (unit.assigned_at or now_s()))
        unit.final_blob, unit.segment_blobs, unit.losses = body.final_blob, list(body.segment_blobs), list(body.losses)
        unit.plan, unit.build = plan.label, body.build or None
        for seg in picks:
            s.add(Verification(unit_id=unit.id, provider=provider, segment=seg))
        log(s, "unit_submitted", unit.job_id, unit=unit.id, provider=provider, segments=len(proof.segments),
            sampled=picks, rate=str(rate), trusted=trusted, update_outliers=[i for i in outliers if i in picks],
            final_loss=body.losses[-1] if body.losses else None)


def _observe_delivery(s: Session, provider: str, spec: UnitSpec, seconds: int) -> None:
    """Blend the throughput this unit was delivered at (tokens trained / seconds since assignment) into the
    provider's record; the first unit sets it."""
    p = s.get(Provider, provider)
    assert p is not None
    measured = spec.steps * spec.batch_size * spec.model.ctx // max(1, seconds)
    p.observed_tps = observe_throughput(p.observed_tps, measured) if p.observed_tps else max(1, min(MAX_THROUGHPUT, measured))


def _observe_late(prov: Provider, spec: JobSpec, seconds: int) -> int:
    """A provider alive but past a unit's deadline delivered that unit's tokens in *more* than ``seconds``: blend
    that bound into its delivered throughput (the first record sets it) and return it. Only the fact that the
    unit is not in counts, never the node's own progress report (free to shade either way), so a node that missed
    its deadline is ranked, and its next deadline set, at no more than it has shown; without this, a slow node new
    to the market stays ranked at the market's median and misses deadline after deadline."""
    bound = max(1, min(MAX_THROUGHPUT, spec.steps_per_unit * spec.batch_size * spec.model.ctx // max(1, seconds)))
    prov.observed_tps = min(prov.observed_tps, observe_throughput(prov.observed_tps, bound)) if prov.observed_tps else bound
    return bound


# ---------------------------------------------------------------- verification

def _benched_message(v: Verifier) -> str:
    return f"verifier {v.address} is benched: {v.benched_for or 'it approved a planted known-bad segment'}"


def next_verification(rt: Runtime, verifier: str) -> dict[str, Any] | None:
    now = now_s()
    # unknown while the chain is down: checks go on (a canary's slash waits for the chain)
    _, short = _stake_short(rt, "verifier", verifier, rt.settings.min_verifier_stake, "tasks",
                            "(gridmint verifier run --stake AMOUNT --chain URL)")
    with rt.sessions.begin() as s:
        v = s.get(Verifier, verifier)
        if v is None:
            raise NotFound(f"verifier {verifier} is not registered")
        if v.status == "benched":
            raise Conflict(_benched_message(v))
        if short:
            # an unstaked verifier would risk nothing: a lazy one caught by a canary, or one benched for a false
            # accusation, would simply come back under a new wallet
            raise Conflict(short)
        v.last_seen = now
        # a verifier can only replay plans whose device it has: a CPU verifier is not handed a GPU-trained segment;
        # it gets real tasks of units it was handed a canary of last (the two claims' roots differ); then units
        # trained on its own plan first (it replays those bit for bit where the plan is exact, catching what hides
        # in the drift between plans), oldest first
        checkable = Unit.plan.like("cpu%") if Plan.parse(v.plan).device == "cpu" else Unit.plan.is_not(None)
        canaried = select(Verification.unit_id).where(Verification.verifier == verifier,
                                                      Verification.canary.is_not(None))
        # a check of a unit on an exact plan (another CPU plan, a named GPU) waits a while for a verifier on that
        # plan and the same kernels, who replays it bit for bit (a float8 step hides from every other): while one is
        # around. (Kernels unsaid, "", are never the same: no bit-for-bit claim is made on them.)
        unit_build = func.coalesce(Unit.build, "")
        same_plan_verifier = select(Verifier.address).where(
            Verifier.plan == Unit.plan, Verifier.build == unit_build, Verifier.status == "active",
            Verifier.address != verifier, Verifier.address != Verification.provider,
            Verifier.last_seen >= now - rt.settings.unit_timeout_s).exists()
        not_mine = or_(Unit.plan != v.plan, unit_build != (v.build or ""), unit_build == "")
        # (the default plan on the referee's kernels: any verifier there replays it bit for bit, none is waited for)
        reserved = and_(not_mine, or_(Unit.plan != PROVIDER_PLAN.label, unit_build != rt.referee_build()),
                        or_(Unit.plan.like("cpu%"), Unit.plan.like("cuda:%")),
                        func.coalesce(Verification.created_at, 0) > now - rt.settings.same_plan_hold_s,
                        same_plan_verifier)
        task = s.scalars(select(Verification).join(Unit, Unit.id == Verification.unit_id)
                         .where(Verification.status == "pending", Verification.provider != verifier,
                                Verification.canary.is_(None), checkable, ~reserved)
                         .order_by(Verification.unit_id.in_(canaried), Unit.plan != v.plan, not_mine,
                                   Verification.id)
                         .limit(1)).first()
        if task is None:
            return None
        unit = s.get(Unit, task.unit_id)
        assert unit is not None and unit.proof is not None and unit.final_blob is not None
        job = s.get(Job, unit.job_id)
        assert job is not None
        task.status, task.verifier, task.assigned_at, task.heartbeat_at = "assigned", verifier, now, None
        spec = unit_spec(job, unit)
        body = _task_body(task.id, task.segment, spec.to_json(), unit.proof, unit.segment_blobs[task.segment],
                          task.provider, unit.plan, _end_blob(unit, task.segment), unit.id,
                          _referee_exact(rt, Plan.parse(unit.plan), unit.build or ""), unit.build or "",
                          rt.referee_for(unit.build or ""))
        # now and then this very task becomes a planted known-bad segment (its claim forged); its real check is
        # queued again once the canary is answered (or abandoned), and then handed out as itself: a segment is
        # planted at most once, so each check costs at most one extra replay, whatever the rate
        plant = (task.segment < len(unit.segment_blobs) - 1 and canary.draw(rt.settings.canary_rate)
                 and s.scalar(select(func.count()).select_from(Verification).where(
                     Verification.unit_id == unit.id, Verification.segment == task.segment,
                     Verification.canary.is_not(None))) == 0)
        if not plant:
            return body
        # the real check waits, held (counted open: the unit is not paid before it passes; never handed out)
        held = Verification(unit_id=unit.id, provider=task.provider, segment=task.segment, status="held")
        s.add(held)
        s.flush()
        task.canary = {"held": held.id}  # a crash before the forgery lands is reaped like an abandoned canary
        vid, seg, proof, blobs, final = task.id, task.segment, TrainingProof.from_dict(unit.proof), \
            list(unit.segment_blobs), unit.final_blob
    fake = canary.forge(spec, proof, seg, blobs, final, rt.blobs)  # checkpoint I/O: outside the transaction
    assert fake is not None
    with rt.sessions.begin() as s:
        task = s.get(Verification, vid)
        assert task is not None
        task.canary = {**fake, "held": task.canary["held"]}
        log(s, "canary_planted", verification=vid, verifier=verifier, unit=task.unit_id, segment=seg)
    return {**body, "proof": fake["proof"], "end_blob": fake["end_blob"]}


def _referee_exact(rt: Runtime, plan: Plan, build: str) -> bool:
    """Whether the referee replays work on ``plan`` computed with ``build`` bit for bit: a plan it is configured to
    replay so, on CPU kernels a referee computes with: the default referee's, or a referee pool's (a GPU plan's
    kernels are the operator's to match when naming the plan)."""
    return plan in rt.referee_plans() and bool(build) and (plan.device != "cpu" or build in rt.referee_builds())


def _referee(rt: Runtime, verification_id: int, build: str | None, fallen_back: bool = False) -> None:
    """Send dispute ``verification_id`` over work computed with kernel ``build`` to the referee that judges it:
    the referee pool computing with those kernels (it replays the work bit for bit), else the default referee; the
    default one too once the dispute has ``fallen_back`` (its pool was away: :func:`_pools_away`)."""
    rt.enqueue("gridmint.adjudicate", [verification_id], queue=None if fallen_back else rt.referee_queue(build or ""))


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


def _pools_away(rt: Runtime, s: Session, now: int) -> list[int]:
    """Hand each open dispute whose referee pool is away (:func:`pool_away`) to the default referee: marked
    ``fallback_at`` (so the pool, should it come back, leaves it alone) and logged. Returns their ids."""
    pools, wait = pool_builds(rt.settings.referee_pools), rt.settings.referee_pool_wait_s
    if not pools or not wait:
        return []
    seen = pools_seen(s, pools)
    moved = []
    for v, unit in s.execute(select(Verification, Unit).join(Unit, Unit.id == Verification.unit_id)
                             .where(Verification.status.in_(["disputed", "bisecting"]),
                                    Verification.fallback_at.is_(None), Unit.build.in_(pools))):
        assert unit.build is not None
        if pool_away(now, seen.get(unit.build), v.verdict_at or v.heartbeat_at or v.assigned_at or 0, wait):
            v.fallback_at = now
            log(s, "referee_fallback", unit.job_id, unit=unit.id, segment=v.segment, verification=v.id,
                provider=v.provider, verifier=v.verifier, pool=unit.build, pool_seen=seen.get(unit.build),
                reason=f"the referee pool computing with {unit.build} was not seen for {wait} s: the default "
                       f"referee judges the dispute across kernels")
            moved.append(v.id)
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
    if task.verifier != verifier or task.status != "assigned" or (task.canary and "proof" not in task.canary):
        raise Conflict(f"verification {task.id} is not assigned to {verifier} (status {task.status})")
    return task


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
        signer = recover_typed("Verdict", rt.chain_id, message, body.signature)
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
        planted, job_id, build = task.canary is not None, "", unit.build
        task.verdict_at = now_s()
        if planted:  # never adjudicated, never relayed: the provider never made this claim
            task.status = "canary_missed" if body.ok else "canary_flagged"
            _retire_canary(s, task)
            if body.ok:
                _bench(s, ver, task, f"it approved a planted known-bad segment (verification {task.id})")
            else:
                log(s, "canary_flagged", verification=task.id, verifier=verifier)
        elif body.ok:
            task.status = "passed"
            log(s, "segment_passed", unit.job_id, unit=unit.id, segment=task.segment, verifier=verifier)
            _maybe_verified(s, unit)
            job_id = unit.job_id
        else:
            task.status = "disputed"
            log(s, "segment_disputed", unit.job_id, unit=unit.id, segment=task.segment, verifier=verifier,
                provider=task.provider, reason=body.reason)
    if planted:
        if body.ok:
            rt.enqueue("gridmint.punish_verifier", [body.verification_id])
        return "passed" if body.ok else "disputed"  # the words a real task gets: a canary stays a canary
    if body.ok:
        rt.enqueue("gridmint.advance", [job_id])
    else:
        _referee(rt, body.verification_id, build)
    return "passed" if body.ok else "disputed"


def _maybe_verified(s: Session, unit: Unit) -> None:
    """A unit whose every sampled segment passed (by the verifier, or by the referee overruling a false accusation)
    is verified; its provider is owed its price (exactly once)."""
    open_checks = s.scalar(select(func.count()).select_from(Verification)
                           .where(Verification.unit_id == unit.id, Verification.provider == unit.provider,
                                  Verification.canary.is_(None),
                                  Verification.status.notin_(["passed", "verifier_wrong", "dismissed"])))
    if open_checks or unit.status != "submitted":
        return
    unit.status = "verified"
    assert unit.provider is not None and unit.price is not None
    prov = s.get(Provider, unit.provider)
    assert prov is not None
    prov.completed += 1
    replayed = s.scalar(select(func.count()).select_from(Verification).where(
        Verification.unit_id == unit.id, Verification.provider == unit.provider, Verification.canary.is_(None)))
    if replayed:  # a unit nobody replayed (level "none") builds no record
        prov.verified_streak += 1
    s.add(LedgerEntry(job_id=unit.job_id, unit_id=unit.id, provider=unit.provider, amount=unit.price))
    log(s, "unit_verified", unit.job_id, unit=unit.id, provider=unit.provider, price=str(unit.price))


def _retire_canary(s: Session, planted: Verification) -> None:
    """A canary took the place of a real check of its segment, held meanwhile: hand that check out again (unless it
    was voided meanwhile: the unit left its provider, e.g. slashed for another segment)."""
    held = s.get(Verification, (planted.canary or {}).get("held"))
    if held is not None and held.status == "held":
        held.status = "pending"


def _bench(s: Session, ver: Verifier, cause: Verification, why: str) -> None:
    """``ver`` approved a planted known-bad segment, or made an accusation the referee proved false (``cause``): it
    gets no more tasks, what it holds goes back to the pool, and every check it passed on a unit not yet credited is
    done again by another verifier (a unit already credited on its word stays credited: the canary rate bounds how
    many). A canary's approver also has its stake slashed (``punish_verifier``); a false accuser loses its bond."""
    if ver.status == "benched":
        return
    ver.status, ver.benched_for = "benched", why[:300]
    redo = 0
    for v in s.scalars(select(Verification).where(Verification.verifier == ver.address,
                                                  Verification.id != cause.id,
                                                  Verification.status.in_(["assigned", "passed"]))):
        if v.canary is not None:
            if v.status == "assigned":
                v.status = "void"
                _retire_canary(s, v)
            continue
        unit = s.get(Unit, v.unit_id)
        if v.status == "passed" and (unit is None or unit.status != "submitted"):
            continue
        v.status, v.verifier, v.assigned_at, v.replayed_hash, v.signature = "pending", None, None, None, None
        redo += 1
    log(s, "verifier_benched", verifier=ver.address, verification=cause.id, rechecks=redo, reason=why)


def punish_verifier(rt: Runtime, verification_id: int) -> str:
    """Slash the whole stake (bonded and unbonding) of the verifier that approved canary ``verification_id``, to the
    treasury (governance path; the evidence id is the canary's, usable once, so a re-run sends nothing twice)."""
    with rt.sessions.begin() as s:
        task = s.get(Verification, verification_id)
        if task is None or task.status != "canary_missed" or task.canary is None:
            return task.status if task else "missing"
        if task.slash_tx is not None:
            return "slashed"
        verifier = task.verifier
    assert verifier is not None
    evidence = canary.evidence(verification_id, verifier)
    st = rt.contracts.stake_state(verifier)
    amount = st.staked + st.unbonding
    if amount > 0 and not rt.contracts.evidence_used(evidence):
        rt.contracts.slash(verifier, amount, rt.contracts.deployment.treasury, evidence)
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
        asked = referee.bisect_view(task.bisect) if task.status == "bisecting" else {}
        if asked and str(asked.get("asked")) not in asked["reveals"] and now_s() <= int(asked["deadline"]):
            return task.status  # still waiting for the state asked: nothing to replay yet
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
        ver_row = s.get(Verifier, verifier) if verifier is not None else None
        verifier_plan = Plan.parse(ver_row.plan) if ver_row is not None else PROVIDER_PLAN
        # which kernels each computed with ("" unsaid: never taken for the referee's own)
        build, verifier_build = unit.build or "", (ver_row.build if ver_row is not None else None) or ""
    assert verifier is not None
    evidence = verification.fraud_evidence(unit.id, seg, provider)
    disputed = accusation is not None and _open_dispute(rt, provider, verifier, evidence, accusation)
    reveals = {int(k): rt.blobs.path(r["blob"]) for k, r in bisect["reveals"].items()}

    def overdue(step: int) -> str:
        if bisect.get("asked") == step and now_s() > int(bisect["deadline"]):
            return f"the provider did not reveal its state before step {step} by its deadline"
        return ""

    # a worker without a GPU it is configured to replay on says so here, and so does one handed a dispute that is
    # another referee's (its pool's queue, or the default one, holds it by mistake; one that fell back from its pool
    # is the default referee's, which judges the pool's kernels as other kernels: within the tolerance)
    exact = rt.referee_plans(here=True, build="" if fallen_back else build)
    verdict = referee.rule(spec, proof, seg, plan, rt.blobs.path(start), rt.blobs.path(end), reveals, overdue,
                           losses, exact, build)
    if verdict.fraud is None:  # the bisection waits for the provider's next reveal
        assert verdict.pending is not None
        with rt.sessions.begin() as s:
            task = s.get(Verification, verification_id)
            assert task is not None
            b = referee.bisect_view(task.bisect)
            if task.status in ("disputed", "bisecting") and b.get("asked") != verdict.pending:
                b["asked"], b["deadline"] = verdict.pending, now_s() + rt.settings.reveal_timeout_s
                b["more"] = list(verdict.pending_more)  # asked in turn as each comes in (record_reveal)
                task.status, task.bisect = "bisecting", b
                log(s, "reveal_requested", job.id, unit=unit.id, segment=seg, provider=provider, step=verdict.pending,
                    deadline=b["deadline"], then=len(b["more"]))
            return task.status
    if not verdict.fraud:
        # the provider is cleared; the verifier's bond is forfeit unless the referee's own replay shows the
        # accusation was made in good faith (it reached the verifier's signed state, past the tolerance): then it
        # is released. An accusation that replay proves false benches the verifier, bonded or not. A dispute that
        # fell back from its away pool blames no one: the verifier bonded on the pool's promise of an exact replay
        # (which might have convicted a cheat inside the drift between kernels), so the bond is released and the
        # overruled verdict not counted against it: "dismissed"
        lost, faith = 0, (referee.Faith(True, False, f"its referee pool ({build}) was away")
                          if fallen_back else referee.judge_accusation(verdict, plan, verifier_plan, replayed_hash,
                                                                       exact, build, verifier_build))
        if disputed and not rt.contracts.evidence_used(evidence):
            if faith.good:
                rt.contracts.dismiss_dispute(evidence)
            else:
                lost = rt.contracts.resolve_dispute(evidence, False)
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
            _maybe_verified(s, unit)
        rt.enqueue("gridmint.advance", [job.id])
        return task.status
    # all of it: staked and unbonding (a cheat that starts unbonding once it has submitted keeps nothing)
    st = rt.contracts.stake_state(provider)
    before = st.staked + st.unbonding
    if disputed:  # path (a): the verifier's fraud proof, resolved by this referee
        path = "fraud-proof"
        if not rt.contracts.evidence_used(evidence):
            rt.contracts.resolve_dispute(evidence, True)
    else:  # path (b): governance slash; idempotent (False if this evidence was already used, or nothing is left)
        path = "governance"
        if before > 0:
            rt.contracts.slash(provider, before, verifier, evidence)
    with rt.sessions.begin() as s:
        task = s.get(Verification, verification_id)
        assert task is not None
        if task.status not in ("disputed", "bisecting"):  # a concurrent run of this task got here first
            return task.status
        task.status = "fraud"
        task.slash_tx = "0x" + evidence.hex()
        prov = s.get(Provider, provider)
        assert prov is not None
        after = rt.contracts.stake_state(provider)
        prov.status, prov.stake = "slashed", after.staked
        ver = s.get(Verifier, verifier)
        if ver is not None:
            ver.fraud_found += 1
        # every unit of this provider not yet verified goes back to the pool, with the cheat excluded
        for u in s.scalars(select(Unit).where(Unit.provider == provider, Unit.status.in_(["assigned", "submitted"]))):
            u.status, u.provider, u.price, u.rank = "pending", None, None, None
            u.excluded = sorted(set(u.excluded or []) | {provider})
            for other in s.scalars(select(Verification).where(Verification.unit_id == u.id,
                                                               Verification.status.in_(["pending", "assigned",
                                                                                        "held"]))):
                other.status = "void"
        log(s, "provider_slashed", job.id, unit=unit.id, segment=seg, provider=provider, verifier=verifier,
            amount=str(before - after.staked - after.unbonding), claimed=verdict.claimed, replayed=verdict.replayed,
            reason=verdict.reason, path=path)
    rt.enqueue("gridmint.match", [])
    return "fraud"


def _open_dispute(rt: Runtime, provider: str, verifier: str, evidence: bytes, accusation: str) -> bool:
    """Relay ``verifier``'s accusation to GridStaking.accuse. True if a dispute for ``evidence`` is (or was) open on
    chain; False if the verifier cannot back it (no bond configured, or too little free stake)."""
    if rt.contracts.evidence_used(evidence):
        return True
    bond = rt.contracts.verifier_bond()
    if bond == 0 or rt.contracts.free_stake_of(verifier) < bond:
        return bool(rt.contracts.dispute_of(evidence).is_open)  # opened by an earlier run of this task
    try:
        rt.contracts.accuse(provider, evidence, ACCUSE_ALL, bytes.fromhex(accusation[2:]))
    except ChainError as exc:
        if exc.error_name != "StakingEvidenceUsed":  # already open: a re-run of this task
            raise
    return True


# ---------------------------------------------------------------- reveals (the provider's side of a bisection)

def next_reveal(rt: Runtime, provider: str) -> dict[str, Any] | None:
    """The state a referee is waiting for from ``provider``: which unit, the step before which it wants the training
    state, and the segment's start checkpoint to re-derive it from (on the plan the provider declared)."""
    with rt.sessions.begin() as s:
        if s.get(Provider, provider) is None:
            raise NotFound(f"provider {provider} is not registered")
        for task in s.scalars(select(Verification).where(Verification.provider == provider,
                                                         Verification.status == "bisecting").order_by(Verification.id)):
            b = referee.bisect_view(task.bisect)
            step = b.get("asked")
            if step is None or str(step) in b["reveals"]:
                continue
            unit = s.get(Unit, task.unit_id)
            assert unit is not None
            job = s.get(Job, unit.job_id)
            assert job is not None
            return {"verification_id": task.id, "unit_id": unit.id, "segment": task.segment, "step": int(step),
                    "spec": unit_spec(job, unit).to_json(), "plan": unit.plan,
                    "checkpoint_blob": unit.segment_blobs[task.segment], "deadline": int(b["deadline"])}
    return None


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
        if task.status != "bisecting" or b.get("asked") != body.step:
            raise Conflict(f"verification {task.id} is not waiting for a state before step {body.step}"
                           f" (status {task.status}, asked {b.get('asked')})")
        if now_s() > int(b["deadline"]):
            raise Conflict(f"the deadline to reveal step {body.step} of verification {task.id} has passed")
        unit_id = task.unit_id
    message = {"unitId": to_bytes32(unit_id), "step": body.step, "stateHash": to_bytes32(body.state_hash)}
    signer = recover_typed("Reveal", rt.chain_id, message, body.signature)
    if signer != provider:
        raise ProofError(f"reveal is signed by {signer}, not by the unit's provider {provider}")
    tensors, _ = checkpoint.load(rt.blobs.read(body.blob))
    if state_hash(tensors) != body.state_hash:
        raise ProofError(f"revealed checkpoint hashes to {state_hash(tensors)}, not to the signed {body.state_hash}")
    with rt.sessions.begin() as s:
        task = s.get(Verification, body.verification_id)
        assert task is not None
        b = referee.bisect_view(task.bisect)
        if task.status != "bisecting" or b.get("asked") != body.step:  # answered (or timed out) meanwhile
            raise Conflict(f"verification {task.id} is no longer waiting for step {body.step}")
        b["reveals"][str(body.step)] = {"blob": body.blob, "hash": body.state_hash, "signature": body.signature}
        unit = s.get(Unit, task.unit_id)
        assert unit is not None
        log(s, "state_revealed", unit.job_id, unit=unit.id, segment=task.segment, provider=provider, step=body.step)
        more, build = [int(x) for x in b.get("more") or [] if str(x) not in b["reveals"]], unit.build
        fallen_back = task.fallback_at is not None
        if more:  # the referee asked for several states (a loss scan): the next one, with its own deadline
            b["asked"], b["more"], b["deadline"] = more[0], more[1:], now_s() + rt.settings.reveal_timeout_s
            log(s, "reveal_requested", unit.job_id, unit=unit.id, segment=task.segment, provider=provider,
                step=more[0], deadline=b["deadline"], then=len(more) - 1)
        task.bisect = b
    if not more:  # all the referee asked for is in: it rules (or goes on bisecting)
        _referee(rt, body.verification_id, build, fallen_back)
    return "revealed"


# ---------------------------------------------------------------- rounds and settlement

def advance(rt: Runtime, job_id: str) -> str:
    """When every unit of the current round is verified: average them (outer step) and open the next round."""
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
    states = [model_only(checkpoint.load(rt.blobs.read(b))[0]) for b in blobs if b]
    merged = average_states(states)
    loss = evaluate(model_config(spec), merged)
    sha = rt.blobs.put_tensors(merged, {"kind": "global", "job": job_id, "round": str(round_ + 1)})
    with rt.sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        if job.round != round_ or job.status != "running":  # another advance got here first
            return job.status
        job.global_blob = sha
        job.eval_losses = [*job.eval_losses, loss]
        log(s, "round_done", job_id, round=round_, eval_loss=loss)
        if round_ + 1 < spec.rounds:
            job.round = round_ + 1
            _create_round_units(s, job, spec, round_ + 1)
            status = "running"
        else:
            job.status = status = "done"
            log(s, "job_done", job_id, eval_loss=loss)
    rt.enqueue("gridmint.settle" if status == "done" else "gridmint.match", [job_id] if status == "done" else [])
    return status


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


def sweep(rt: Runtime) -> dict[str, int]:
    """Re-enqueue follow-up steps that should have run but may have been lost (a task that ran out of retries while
    the chain node was down, a broker restart): disputes not yet adjudicated, verifiers caught by a canary not yet
    slashed, rounds fully verified but not advanced,
    finished jobs not settled. Each step is idempotent, so a duplicate of a step still queued does nothing."""
    with rt.sessions.begin() as s:
        disputes = list(s.execute(select(Verification.id, Unit.build, Verification.fallback_at.is_not(None))
                                  .join(Unit, Unit.id == Verification.unit_id)
                                  .where(Verification.status.in_(["disputed", "bisecting"]))))
        lazy = list(s.scalars(select(Verification.id).where(Verification.status == "canary_missed",
                                                            Verification.slash_tx.is_(None))))
        unverified = func.sum(case((Unit.status != "verified", 1), else_=0))
        ready = list(s.scalars(select(Job.id).join(Unit, (Unit.job_id == Job.id) & (Unit.round == Job.round))
                               .where(Job.status == "running").group_by(Job.id).having(unverified == 0)))
        done = list(s.scalars(select(Job.id).where(Job.status == "done")))
    for v, build, fallen_back in disputes:
        _referee(rt, v, build, fallen_back)
    for v in lazy:
        rt.enqueue("gridmint.punish_verifier", [v])
    for j in ready:
        rt.enqueue("gridmint.advance", [j])
    for j in done:
        rt.enqueue("gridmint.settle", [j])
    return {"adjudicate": len(disputes), "punish_verifier": len(lazy), "advance": len(ready), "settle": len(done)}


def reap(rt: Runtime) -> int:
    """Assigned units whose provider missed its heartbeat deadline, or the unit's own deadline (alive but stuck, or
    holding the unit without training it), are taken from it: the dropout's reliability drops (a higher effective
    price from now on) and it is excluded from the unit; the unit restarts from its last verified checkpoint (the
    job's current global model) on the cheapest eligible standby right away, or goes back to the pool for the next
    matching round when no spare provider fits. Verification tasks gone quiet go back to the queue; a dispute whose
    provider let a reveal deadline pass is ruled on; one whose referee pool is away goes to the default referee
    (:func:`_pools_away`). Returns how many units were taken back."""
    now = now_s()
    cutoff = now - rt.settings.unit_timeout_s
    n = 0
    with rt.sessions.begin() as s:
        silent = func.coalesce(Unit.heartbeat_at, Unit.assigned_at) < cutoff
        stale = s.execute(select(Unit, Job).join(Job, Unit.job_id == Job.id).where(
            Unit.status == "assigned", silent | (Unit.deadline_at < now))).all()
        busy = _busy(s) if stale else {}
        offers = _offers(s, busy) if stale else []
        for u, job in stale:
            dropped = u.provider
            assert dropped is not None
            prov = s.get(Provider, dropped)
            assert prov is not None
            u.excluded = sorted(set(u.excluded or []) | {dropped})
            u.status, u.provider, u.price, u.rank = "pending", None, None, None
            late = u.deadline_at is not None and u.deadline_at < now and (u.heartbeat_at or u.assigned_at or 0) >= cutoff
            extra: dict[str, Any] = {}
            if late:  # alive, yet not done: it trains at most this fast (a silent dropout says nothing of its speed)
                extra["delivered_at_most"] = _observe_late(prov, JobSpec.model_validate(job.spec),
                                                           now - (u.assigned_at or now))
            log(s, "unit_timed_out", u.job_id, unit=u.id, provider=dropped,
                reason=f"not submitted by its deadline ({u.deadline_at})" if late else "no heartbeat", **extra)
            demand = _demand(rt, u, job)
            spares = standby.pick_standbys(offers, demand, STANDBY_POOL, assigned={dropped})
            move = standby.reassign_on_dropout(demand, dropped, Reliability(prov.completed, prov.dropped), spares)
            prov.dropped = move.dropped_reliability.dropped
            prov.verified_streak = 0  # a dropout starts its trusted-host record over
            if move.replacement is not None:
                r = move.replacement
                _assign(rt, s, u, job, r, r.price, 0, f"standby for {dropped}", busy)
                offers = [o if o.provider != r.provider else replace(o, free_slots=o.free_slots - 1) for o in offers]
            n += 1
        quiet = func.coalesce(Verification.heartbeat_at, Verification.assigned_at) < cutoff
        held = Verification.assigned_at < now - rt.settings.verify_deadline_s
        for v in s.scalars(select(Verification).where(Verification.status == "assigned", quiet | held)):
            if v.canary is not None:  # an abandoned canary is never handed out again: its real check is instead
                v.status = "void"
                _retire_canary(s, v)
            else:
                v.status, v.verifier = "pending", None
        overdue = [(v.id, build, v.fallback_at is not None)
                   for v, build in s.execute(select(Verification, Unit.build)
                                             .join(Unit, Unit.id == Verification.unit_id)
                                             .where(Verification.status == "bisecting"))
                   if v.bisect and str(v.bisect.get("asked")) not in (v.bisect.get("reveals") or {})
                   and now_s() > int(v.bisect.get("deadline", 0))]
        away = _pools_away(rt, s, now)
    for vid, build, fallen_back in overdue:  # a provider that lets a reveal deadline pass loses its dispute
        if vid not in away:
            _referee(rt, vid, build, fallen_back)
    for vid in away:  # a dispute whose referee pool is away: to the default referee
        _referee(rt, vid, None, True)
    if n:
        rt.enqueue("gridmint.match", [])
    return n
