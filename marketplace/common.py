"""What the marketplace's rooms share (:mod:`marketplace.service`: jobs, matching, results, rounds;
:mod:`marketplace.checking`: verification, disputes, reveals): their errors, the event log, a unit's training spec,
and the stake read that gates work."""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from eth_utils import keccak
from sqlalchemy import ColumnElement, and_, exists, or_, select, update
from sqlalchemy.orm import Session

from marketplace.db import Event, Job, LedgerEntry, Unit, Verification, check_fee_key
from marketplace.runtime import Runtime
from node.model import ModelConfig
from node.trainer import UnitSpec, check_finite, check_training_state
from protocol import verification
from protocol.errors import ChainUnavailable, CheckpointError, GridMintValueError
from protocol.money import format_tokens
from protocol.schemas import JobSpec
from protocol.signing import to_bytes32


class NotFound(GridMintValueError):
    """Unknown job, unit or verification (HTTP 404)."""


class Conflict(GridMintValueError):
    """The request is valid but the state does not allow it now (HTTP 409)."""


def log(s: Session, kind: str, job_id: str | None = None, **data: Any) -> None:
    s.add(Event(job_id=job_id, kind=kind, data=data))


#: A provider's checks of a unit that are still open: voided once the unit leaves it (a check judges its result only).
#: ``stocking``: queued, waiting for its unit's canaries to be forged (checking.stock_canaries) before any is handed out;
#: ``auditing``: passed by its verifier, replayed by the referee before the unit is paid (checking.audit_check)
OPEN_CHECKS = ("stocking", "pending", "assigned", "held", "auditing")
#: the statuses of a check whose referee may be waiting for a state from its provider: a dispute's bisection, and an
#: audit of work the referee does not replay bit for bit (its ``bisect`` says what is asked, if anything)
REVEALING = ("bisecting", "auditing")


def revealing() -> ColumnElement[bool]:
    """SQL: a check whose referee is bisecting it with its provider's revealed states (a dispute's, or an audit's
    that asked for one)."""
    return and_(Verification.status.in_(REVEALING),
                or_(Verification.status == "bisecting", Verification.bisect.is_not(None)))


def take_back(s: Session, unit_id: str, provider: str, statuses: Collection[str] = ("assigned",),
              **values: Any) -> bool:
    """Inside the caller's transaction: hand unit ``unit_id`` back to the pool (``pending``, no provider) if, and only
    if, ``provider`` still holds it in one of ``statuses``; ``values``: further columns to set (exclusions). False,
    changing nothing, otherwise.

    A conditional UPDATE, as :func:`marketplace.cancellation.stop_in` does: a step that moved the unit since the
    caller read it (a result accepted, a reap, a stop, a conviction) wins cleanly instead of being overwritten. The
    provider's open checks of the unit (not canaries: those are retired by their own path) are voided with it, so
    no check is ever handed out, judged or paid in its name over work that is no longer its."""
    fetch = {"synchronize_session": "fetch"}  # objects the caller's session holds follow what the database did
    if s.execute(update(Unit).where(Unit.id == unit_id, Unit.provider == provider, Unit.status.in_(statuses))
                 .values(status="pending", provider=None, price=None, rank=None, **values),
                 execution_options=fetch).rowcount != 1:
        return False
    s.execute(update(Verification).where(Verification.unit_id == unit_id, Verification.provider == provider,
                                         Verification.canary.is_(None), Verification.status.in_(OPEN_CHECKS))
              .values(status="void"), execution_options=fetch)
    return True


def unit_id_for(job_id: str, round_: int, shard: int) -> str:
    return "0x" + keccak(to_bytes32(job_id) + round_.to_bytes(32, "big") + shard.to_bytes(32, "big")).hex()


def check_fee_entry(unit: Unit, check: Verification) -> LedgerEntry:
    """The ledger entry that pays ``check``'s verifier for its passed replay of a segment of ``unit``: the provider's
    price for that share of the unit (``verification.check_fee``), keyed by the check (credited once)."""
    assert unit.price is not None and check.verifier is not None
    return LedgerEntry(job_id=unit.job_id, unit_id=check_fee_key(check.id), provider=check.verifier,
                       amount=verification.check_fee(unit.price, len(unit.segment_blobs or []) or 1),
                       verification_id=check.id)


def check_uploaded_state(spec: UnitSpec, tensors: Mapping[str, Any], what: str) -> None:
    """:class:`CheckpointError` (422) unless a state a provider uploaded (a result's checkpoints, a state revealed in
    a dispute) is a full fp32 training state of ``spec``'s model (names, shapes, dtypes: :func:`check_training_state`)
    with every value finite. A hash only binds the bytes to the proof: a float16 final state once passed, was paid,
    and then failed every average of its round (the job never ended); a NaN weight was averaged into the customer's
    model; a revealed state missing a tensor failed every ruling of its dispute. Refused before anything is written."""
    try:
        check_training_state(spec, tensors)
        check_finite(tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None


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


def stake_short(rt: Runtime, role: str, address: str, need: int, gets: str, then: str,
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


def check_uploader(rt: Runtime, address: str) -> None:
    """Checkpoints are uploaded for work: a unit assigned to ``address`` (its result) or a dispute (or an audit)
    of its work in bisection (a revealed state). Anyone else's upload would only fill the disk (Conflict, 409)."""
    with rt.sessions() as s:
        working = s.scalar(select(exists().where(Unit.provider == address, Unit.status == "assigned")))
        asked = working or s.scalar(select(exists().where(Verification.provider == address, revealing())))
    if not asked:
        raise Conflict(f"{address} has no unit assigned and no state asked of it: checkpoints are uploaded for "
                       f"those only")
